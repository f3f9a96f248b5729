"""Plain Gaussian noise on the sent features (the paper's "local DP" baseline, without a DP claim).

Adds N(0, std^2 I) to each sent feature tensor of the chosen branch(es) before it
leaves the client: ``branch=control`` (default: the control features, h = E(hint) + x_t
under nograd, the head's output under vanilla), ``unet`` (the UNet first-conv features
of x_t) or ``both``. ``std`` is the standard deviation, not the variance (the reference
code used the variance as the standard deviation). The noise comes from the client-private
generator, fresh for every batch; under vanilla the gradient passes through unchanged.
Applied at inference too (sampling sends the features the same way, so the same
transform keeps train and test consistent and protects the hint at sampling time).

Hook: feature. Schemes: every split scheme (those whose clients offer the hook).
Threat model: honest-but-curious server; no formal guarantee (nothing bounds the
features' sensitivity: use ``local-dp`` for an accounted version). It hides values
below the noise level; averaging many releases of the same sample shrinks it.
"""
from __future__ import annotations

import torch

from .base import Defense, HookContext, register

BRANCHES = ("control", "unet", "both")


def gaussian_like(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Standard normal noise shaped like ``x`` drawn from ``gen`` (on its device), moved to x's."""
    return torch.randn(x.shape, generator=gen, device=gen.device).to(device=x.device, dtype=x.dtype)


@register
class FeatureNoise(Defense):
    """Add N(0, std^2) to the sent features of the chosen branch (no DP claim)."""

    name = "noise"
    hooks = ("feature",)
    why_not = "FedAvg sends weights, not features (use dp-sgd or server-dp for FedAvg)"
    params = {"std": 0.1, "branch": "control"}
    at_inference = True
    threat_model = "hides feature values below the noise level; no formal guarantee (sensitivity unbounded)"

    def validate(self) -> None:
        if not self.p["std"] >= 0:
            raise ValueError(f"defense 'noise': std must be >= 0 (the standard deviation), got {self.p['std']}")
        if self.p["branch"] not in BRANCHES:
            raise ValueError(f"defense 'noise': branch must be one of {BRANCHES}, got {self.p['branch']!r}")

    def feature(self, name: str, x: torch.Tensor, ctx: HookContext) -> torch.Tensor:
        if self.p["branch"] not in (name, "both") or self.p["std"] == 0:
            return x
        return x + self.p["std"] * gaussian_like(x, ctx.gen)

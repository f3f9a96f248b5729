"""Accounted local differential privacy on the sent control features (clip + Gaussian noise).

Each sample's control feature tensor (h = E(hint) + x_t under nograd, the head's output
under vanilla) is clipped to L2 norm ``clip`` = C and then gets N(0, sigma^2 I) with

    sigma = s * 2C,    s = accounting.multiplier_for(epsilon, delta)

(analytic Gaussian mechanism, defenses/accounting.py). 2C is the replace-one L2
sensitivity of a clipped vector (any two vectors in the C-ball are at most 2C apart), so
each release of a sample's control features is (epsilon, delta)-DP for that sample, and
a sample sent r times (training steps that draw it, sampling steps at inference) is
``accounting.composed_epsilon(s, r, delta)`` by exact GDP composition
(``accounting(scheduler, releases=r)``). ``clip=0`` (default) sets C = sqrt(d) for the d
values of one sample's control features (an RMS of 1 per value; d is public).

What it protects: the control branch only. The UNet branch still carries the first-conv
features of x_t -- and with the noise target eps the server recovers z0 from them
(attacks/noise_target.py) -- unless this is combined with ``latent-dp`` (which noises
x_t itself). So the guarantee is for what the control features reveal beyond x_t:
mainly the hint. Local DP on high-dimensional features needs noise far above the signal
(per value sigma = 2 s C, i.e. ~2 s times the clipped RMS): expect a large utility cost.
Under vanilla the clipping is differentiable and the noise a constant, so the returned
gradient trains the head through the clip.

Hook: feature (control). Schemes: every split scheme (those whose clients offer the hook). Applied at inference too (the hint
is released at each sampling step; count those releases).
Threat model: honest-but-curious server that knows this defense and C; (epsilon, delta)
per release per sample for the control features; nothing for the UNet branch.
"""
from __future__ import annotations

import math

import torch

from . import accounting
from .base import Defense, HookContext, register
from .noise import gaussian_like


def clip_per_sample(x: torch.Tensor, c: float) -> torch.Tensor:
    """Each sample (leading dim) scaled to L2 norm at most ``c``."""
    norms = x.flatten(1).norm(dim=1).view(-1, *([1] * (x.ndim - 1)))
    return x * (c / norms.clamp_min(1e-12)).clamp(max=1.0)


@register
class LocalDP(Defense):
    """Clip each sample's control features to L2 norm C, add N(0, (s 2C)^2): (epsilon, delta)-DP per release."""

    name = "local-dp"
    hooks = ("feature",)
    why_not = "FedAvg sends weights, not features (use dp-sgd or server-dp for FedAvg)"
    params = {"epsilon": 8.0, "delta": 1e-5, "clip": 0.0}
    at_inference = True
    accounted = True
    threat_model = ("honest-but-curious server knowing C; (epsilon, delta)-DP per release of the control "
                    "features; the UNet branch (x_t) is not protected unless combined with latent-dp")

    def validate(self) -> None:
        p = self.p
        if not p["epsilon"] > 0:
            raise ValueError(f"defense 'local-dp': epsilon must be > 0, got {p['epsilon']}")
        if not 0 < p["delta"] < 1:
            raise ValueError(f"defense 'local-dp': delta must be in (0, 1), got {p['delta']}")
        if not p["clip"] >= 0:
            raise ValueError(f"defense 'local-dp': clip must be >= 0 (0: sqrt of the feature size), got {p['clip']}")
        self.multiplier = accounting.multiplier_for(p["epsilon"], p["delta"])
        self.clip = p["clip"] or None  # resolved from the feature size on first use when 0

    def clip_norm(self, x: torch.Tensor) -> float:
        """C: the ``clip`` parameter, or sqrt(values per sample) when it is 0."""
        return self.p["clip"] or math.sqrt(x[0].numel())

    def sigma(self, c: float) -> float:
        """Noise standard deviation for clip norm ``c``: multiplier x replace-one sensitivity 2c."""
        return self.multiplier * 2 * c

    def feature(self, name: str, x: torch.Tensor, ctx: HookContext) -> torch.Tensor:
        if name != "control":
            return x
        self.clip = c = self.clip_norm(x)
        return clip_per_sample(x, c) + self.sigma(c) * gaussian_like(x, ctx.gen)

    def accounting(self, scheduler=None, releases: float = 1.0) -> dict:
        c = self.clip
        return {"mechanism": "per-sample L2 clipping of the control features + Gaussian noise (analytic GM; "
                             "exact GDP composition over releases)",
                "epsilon_per_release": self.p["epsilon"], "delta": self.p["delta"],
                "noise_multiplier": self.multiplier,
                "clip": c if c is not None else "sqrt(values per sample)",
                "sensitivity": 2 * c if c is not None else "2 * clip (replace-one)",
                "sigma": self.sigma(c) if c is not None else f"{2 * self.multiplier:.4g} * clip",
                "releases": releases,
                "epsilon_composed": accounting.composed_epsilon(self.multiplier, releases, self.p["delta"]),
                "epsilon_per_run": accounting.composed_epsilon(self.multiplier, releases, self.p["delta"]),
                "covers": "each record's control features (mainly the hint), over every step that sends it",
                "assumes": "replace-one neighbouring samples; the control branch only (the UNet branch carries "
                           "x_t unprotected unless latent-dp is also on)"}

"""Mixup of the sent control features across the batch (a baseline the paper compared with).

Each sample's control features are mixed with another sample of the same batch:

    c_i' = lambda_i c_i + (1 - lambda_i) c_{j(i)},    lambda_i ~ Beta(alpha, alpha)

where j(i) = (i + k) mod B for one random shift k in {1..B-1} per batch (so no sample is
paired with itself; B = 1 leaves the batch unchanged), all drawn from the client-private
generator. ``dominant=true`` uses max(lambda, 1 - lambda), so the sample's own features
always weigh at least half.

Unlike mixup as a training technique (Zhang et al. 2018), the noise target eps, t and
the UNet branch are NOT mixed: the server still trains sample i's target against the
mixed control features, so this is a feature perturbation (as the paper's baseline),
and with the default alpha=0.4 (lambda near 0 or 1 most of the time) about half the
samples are trained with mostly another sample's hint.

Hook: feature (control). Schemes: every split scheme (those whose clients offer the hook). Not applied at inference (a user
generates from their own hint; mixing in the other half of a guided batch is
meaningless), so what the server sees at sampling time is unmixed.
Threat model: blends two private hints; no formal guarantee (with lambda near 1 the
sample passes almost unchanged, and pairs can be separated given priors).
"""
from __future__ import annotations

import numpy as np
import torch

from .base import Defense, HookContext, register


def mix_batch(x: torch.Tensor, alpha: float, gen: torch.Generator, dominant: bool = False
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mixed x, lambda per sample, partner index per sample) for a batch ``x``."""
    b = x.shape[0]
    seed = int(torch.randint(0, 2**62, (1,), generator=gen, device=gen.device))
    lam = torch.from_numpy(np.random.default_rng(seed).beta(alpha, alpha, size=b)).float()
    if dominant:
        lam = torch.maximum(lam, 1 - lam)
    shift = int(torch.randint(1, b, (1,), generator=gen, device=gen.device)) if b > 1 else 0
    partner = (torch.arange(b) + shift) % b
    lam_x = lam.to(device=x.device, dtype=x.dtype).view(-1, *([1] * (x.ndim - 1)))
    return lam_x * x + (1 - lam_x) * x[partner.to(x.device)], lam, partner


@register
class Mixup(Defense):
    """Mix each sample's control features with another sample's (lambda ~ Beta(alpha, alpha)); targets unmixed."""

    name = "mixup"
    hooks = ("feature",)
    why_not = "FedAvg sends weights, not features"
    params = {"alpha": 0.4, "dominant": False}
    at_inference = False
    threat_model = "blends pairs of private hints; no formal guarantee; nothing at inference"

    def validate(self) -> None:
        if not self.p["alpha"] > 0:
            raise ValueError(f"defense 'mixup': alpha must be > 0, got {self.p['alpha']}")

    def feature(self, name: str, x: torch.Tensor, ctx: HookContext) -> torch.Tensor:
        if name != "control":
            return x
        return mix_batch(x, self.p["alpha"], ctx.gen, self.p["dominant"])[0]

"""Accounted client-private noise on x_t that survives a server who knows the noise target.

The leak it closes: the reference server receives eps and t, so from the first-conv
features of x_t it recovers z0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t) exactly
(attacks/noise_target.py). Here the client adds its own noise xi ~ N(0, sigma_t^2 I),
never sent, to x_t before anything reads it, independently for the two branches:

    unet branch:    conv_in(x_t + sigma_t xi_1)
    control branch: E(hint) + x_t + sigma_t xi_2  (nograd)  /  head(x_t + sigma_t xi_2, hint)  (vanilla)

With eps known, each branch is a Gaussian mechanism on z0 with L2 sensitivity
sqrt(abar_t) Delta and noise sigma_t; we set sigma_t = s sqrt(abar_t) Delta with the noise
multiplier s that makes the two branches together (epsilon, delta)-DP per training step
(analytic Gaussian mechanism, exact GDP composition over the 2 releases). So the timestep
policy helps directly: the noise needed shrinks with sqrt(abar_t). This defense also sets
t_start: the smallest t at which sigma_t <= ``ratio`` * sqrt(1 - abar_t) (the private noise
at most ``ratio`` times the diffusion noise the frozen UNet expects); ratio=0 keeps the
uniform policy.

What is accounted: z0 (the private target image's latent), per release and over a run
(``accounting(..., releases)``: a record sent r times composes to multiplier s/sqrt(2r)).
What is NOT: the hint. The control branch carries E(hint) at full scale; a server that
also inverts the unet branch sees E(hint) + sigma_t (xi_2 - xi_1) + (known terms): noise
of std sqrt(2) sigma_t, no formal guarantee (reported by the attack suite).
Hooks: latent, timestep. Schemes: every split scheme (those whose clients offer the hook). Not applied at inference (there is no
private z0 when sampling).
"""
from __future__ import annotations

import math

import torch

from . import accounting
from .base import Defense, HookContext, register

BRANCHES = 2  # the unet and control branches each release z0 once per step


@register
class LatentDP(Defense):
    """Client-private Gaussian noise on x_t, accounted as (epsilon, delta)-DP for z0 with eps known to the server."""

    name = "latent-dp"
    hooks = ("latent", "timestep")
    why_not = "FedAvg sends no per-step features (use dp-sgd for FedAvg)"
    params = {"epsilon": 8.0, "delta": 1e-5, "sensitivity": 0.0, "ratio": 1.0}
    at_inference = False
    accounted = True
    threat_model = ("honest-but-curious server that knows eps, t, the public weights and this defense; "
                    "protects z0 with (epsilon, delta) per step; the hint is not accounted")

    def validate(self) -> None:
        p = self.p
        if p["epsilon"] <= 0 or not 0 < p["delta"] < 1 or p["sensitivity"] < 0 or p["ratio"] < 0:
            raise ValueError(f"defense 'latent-dp': need epsilon > 0, 0 < delta < 1, sensitivity >= 0, "
                             f"ratio >= 0; got {p}")
        # per branch: the 2 branches compose to multiplier s/sqrt(2), which must reach (epsilon, delta)
        self.multiplier = accounting.multiplier_for(p["epsilon"], p["delta"]) * math.sqrt(BRANCHES)

    def bind(self, latent_dim: int) -> None:
        self.sensitivity = self.p["sensitivity"] or accounting.replace_one_sensitivity(latent_dim)

    def sigma(self, scheduler, t: torch.Tensor) -> torch.Tensor:
        """Per-sample noise std sigma_t = s sqrt(abar_t) Delta."""
        abar = scheduler.alphas_cumprod[t.cpu()].float()
        return self.multiplier * abar.sqrt() * self.sensitivity

    def t_start(self, scheduler) -> int:
        if self.p["ratio"] == 0:
            return 0
        abar = scheduler.alphas_cumprod.double()
        ok = (self.multiplier * abar.sqrt() * self.sensitivity <= self.p["ratio"] * (1 - abar).sqrt()).nonzero()
        if len(ok) == 0:
            raise ValueError(f"latent-dp: no timestep has private noise <= ratio={self.p['ratio']} x the diffusion "
                             f"noise at epsilon={self.p['epsilon']}; raise epsilon or ratio")
        return int(ok[0])

    def latent(self, x_t: torch.Tensor, ctx: HookContext) -> tuple[torch.Tensor, torch.Tensor]:
        if ctx.inference:
            return x_t, x_t
        s = self.sigma(ctx.scheduler, ctx.t).view(-1, *([1] * (x_t.ndim - 1)))
        xi_unet = torch.randn(x_t.shape, generator=ctx.gen)
        xi_control = torch.randn(x_t.shape, generator=ctx.gen)
        return x_t + s * xi_unet, x_t + s * xi_control

    def accounting(self, scheduler, releases: float = 1.0) -> dict:
        t0 = self.t_start(scheduler)
        per_step = self.p["epsilon"]
        run = accounting.composed_epsilon(self.multiplier, BRANCHES * releases, self.p["delta"])
        return {"mechanism": "client-private Gaussian noise on x_t, eps known to the server (analytic GM, "
                             "GDP composition over 2 branches per step)",
                "t_start": t0, "epsilon_per_step": per_step, "delta": self.p["delta"],
                "steps_per_record": releases, "epsilon_per_run": run,
                "noise_multiplier_per_branch": self.multiplier, "sensitivity": self.sensitivity,
                "sigma_at_t_start": float(self.sigma(scheduler, torch.tensor([t0]))[0]),
                "assumes": "replace-one sensitivity of z0 (latents in [-1, 1] unless set); hint not accounted"}

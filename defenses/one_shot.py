"""One-shot release: each private record's latent is released once, as one Gaussian mechanism;
every training step re-noises that release with public noise and trains on the unbiased target.

Per record i (fixed for the whole run; its noise xi_i is derived from the client's secret and i,
so the release is the same every time the record is drawn, with nothing cached on disk):

    x_t0 = sqrt(abar_t0) clip(z0_i) + sqrt(1 - abar_t0) xi_i          (the release)

Per step, at a batch timestep t > t0 with the batch's public noise eta (the batch stream's eps):

    x_t    = sqrt(r) x_t0 + sqrt(1 - r) eta,          r = abar_t / abar_t0
    target = eta sqrt(1 - abar_t) / sqrt(1 - r)

x_t is a forward-process sample of timestep t (noise variance r (1 - abar_t0) + 1 - r = 1 - abar_t),
and the target is unbiased for its noise: x_t depends on xi and eta only through
n = sqrt(r (1 - abar_t0)) xi + sqrt(1 - r) eta, so E[eta | x_t] = sqrt(1 - r) E[n | x_t] / (1 - abar_t)
and E[target | x_t] = E[n | x_t] / sqrt(1 - abar_t) = E[eps_t | x_t] (denoising score matching
from noisy data, as in the "ambient diffusion" line of work). The clean z0 and the client's
xi never leave the client; the server learns only x_t0 (it can rebuild it from x_t and the
target) and public noise. Both branches read the same x_t. The price is the target's
variance, (1 - abar_t) / (1 - r) times eps's, large just above t0: ``gap`` skips the first
timesteps above t0 (t ~ U{t0 + gap..T-1}), and sampling applies the control from there up;
the server weights each sample's loss by the inverse of that factor (:meth:`target_weights`).

The guarantee: one Gaussian mechanism per record with L2 sensitivity sqrt(abar_t0) 2 clip
sqrt(d) (replace-one, values clipped to [-clip, clip]) and noise sqrt(1 - abar_t0) (analytic
GM). Every step's message is post-processing of (x_t0, public noise, the hint), so it holds
for the whole run however often the record is drawn: (epsilon, delta) per record per run.
``epsilon`` > 0 picks t0 as the smallest timestep that reaches it (else ``t0`` is used).
What it does NOT cover: the hint (the control branch carries E(hint) + x_t under nograd and
head(x_t, hint) under vanilla, with no noise of its own: declared unprotected) and the
prompt (combine with prompt-local).
Hooks: latent, timestep. Not applied at inference (sampling has no private record).
"""
from __future__ import annotations

import hashlib

import torch

from . import accounting
from .base import Defense, HookContext, Latents, register
from .timestep_target import epsilon_at, t_start_for


def record_generator(secret: int, record: int) -> torch.Generator:
    """The generator of one record's release noise, from the client's secret and the record id."""
    digest = hashlib.sha256(f"splitcontrol-one-shot:{int(secret)}:{int(record)}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") % 2**63)


@register
class OneShot(Defense):
    """Release each record's latent once as a Gaussian mechanism; steps re-noise it publicly and train on the unbiased target."""

    name = "one-shot"
    hooks = ("latent", "timestep")
    why_not = "FedAvg sends no per-step features (use dp-sgd for FedAvg)"
    params = {"t0": 600, "epsilon": 0.0, "delta": 1e-5, "clip": 1.0, "gap": 0}
    at_inference = False
    accounted = True
    per_record = True
    threat_model = ("honest-but-curious server that knows eps, t, the public weights and this defense; z0 of each "
                    "record released once (epsilon, delta) per record per run; the hint not protected")

    def validate(self) -> None:
        p = self.p
        if not 0 < p["delta"] < 1 or p["clip"] <= 0 or p["epsilon"] < 0 or p["gap"] < 0 or p["t0"] < 0:
            raise ValueError(f"defense 'one-shot': need 0 < delta < 1, clip > 0, epsilon >= 0 (0: use t0), "
                             f"gap >= 0, t0 >= 0; got {p}")

    def bind(self, latent_dim: int) -> None:
        self.sensitivity = accounting.replace_one_sensitivity(latent_dim, 2 * self.p["clip"])

    def t0(self, scheduler) -> int:
        T = len(scheduler.alphas_cumprod)
        t0 = (t_start_for(scheduler, self.p["epsilon"], self.p["delta"], self.sensitivity)
              if self.p["epsilon"] > 0 else self.p["t0"])
        if t0 + 1 + self.p["gap"] > T - 1:
            raise ValueError(f"one-shot: t0={t0} + gap={self.p['gap']} leaves no training timestep below T={T}")
        return int(t0)

    def t_start(self, scheduler) -> int:
        return self.t0(scheduler) + 1 + self.p["gap"]

    def ratios(self, scheduler, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(r = abar_t / abar_t0, abar_t, abar_t0) for timesteps ``t`` (float64)."""
        abar = scheduler.alphas_cumprod.double()
        a0 = float(abar[self.t0(scheduler)])
        at = abar[t.cpu()]
        return at / a0, at, a0

    def release(self, z0: torch.Tensor, idx: torch.Tensor, secret: int, scheduler) -> torch.Tensor:
        """x_t0 of each record in the batch (the same every time a record is drawn)."""
        a0 = float(scheduler.alphas_cumprod[self.t0(scheduler)])
        xi = torch.stack([torch.randn(z0.shape[1:], generator=record_generator(secret, int(i))) for i in idx])
        c = self.p["clip"]
        return a0 ** 0.5 * z0.clamp(-c, c) + (1 - a0) ** 0.5 * xi

    def latent(self, x_t: torch.Tensor, ctx: HookContext) -> Latents:
        if ctx.inference:
            return Latents(x_t, x_t)
        if ctx.z0 is None or ctx.idx is None or ctx.noise is None or ctx.secret is None:
            raise ValueError("one-shot needs the batch's z0, record ids, noise and the client's secret")
        r, at, _ = self.ratios(ctx.scheduler, ctx.t)
        view = (-1, *([1] * (x_t.ndim - 1)))
        r, at = r.float().view(view), at.float().view(view)
        x = r.sqrt() * self.release(ctx.z0, ctx.idx, ctx.secret, ctx.scheduler) + (1 - r).sqrt() * ctx.noise
        return Latents(x, x, None, ctx.noise * (1 - at).sqrt() / (1 - r).sqrt())

    def target_weights(self, t, target, scheduler):
        """(1 - r) / (1 - abar_t): the inverse of the target's variance relative to eps's (a function of t
        alone, so the minimiser per timestep is unchanged)."""
        r, at, _ = self.ratios(scheduler, t)
        return ((1 - r) / (1 - at)).float()

    def estimate_z0(self, x, t, target, scheduler):
        """From one step the server rebuilds the release exactly: eta = target sqrt(1 - r) / sqrt(1 - abar_t),
        x_t0 = (x - sqrt(1 - r) eta) / sqrt(r); z0_hat = x_t0 / sqrt(abar_t0) = clip(z0) + noise of std
        sqrt((1 - abar_t0) / abar_t0), the same in every release of the record."""
        r, at, a0 = self.ratios(scheduler, t)
        view = (-1, *([1] * (x.ndim - 1)))
        r, at = r.view(view), at.view(view)
        eta = target.double() * (1 - r).sqrt() / (1 - at).sqrt()
        x_t0 = (x.double() - (1 - r).sqrt() * eta) / r.sqrt()
        return (x_t0 / a0 ** 0.5).float(), torch.full((x.shape[0],), ((1 - a0) / a0) ** 0.5)

    def accounting(self, scheduler, releases: float = 1.0) -> dict:
        t0 = self.t0(scheduler)
        eps = epsilon_at(float(scheduler.alphas_cumprod[t0]), self.sensitivity, self.p["delta"])
        return {"mechanism": "one Gaussian release of each record's clipped latent at t0 (analytic GM); every step "
                             "is post-processing of it and public noise",
                "t0": t0, "t_start": self.t_start(scheduler), "epsilon_per_record": eps, "delta": self.p["delta"],
                "steps_per_record": releases, "epsilon_per_run": eps, "sensitivity": self.sensitivity,
                "covers": "z0 (the target image's latent, clipped to [-clip, clip]) of each record, the whole run",
                "assumes": "replace-one neighbouring records; the hint and the prompt not protected"}

"""Accounted client-private noise on x_t that survives a server who knows the noise target,
released as a valid diffusion sample so that the model never trains on inputs it will not see.

The leak it closes: the reference server receives eps and t, so from the first-conv
features of x_t it recovers z0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t) exactly
(attacks/noise_target.py). Here the client adds its own noise xi ~ N(0, I), never sent:

    x' = c (x_t + sigma_t xi),   c = 1 / sqrt(1 + sigma_t^2)

which both branches read (the unet branch's conv_in(x'), the control branch's E(hint) + x'
under nograd, head(x', hint) under vanilla). With eps known, x' is a Gaussian mechanism
on z0 with L2 sensitivity sqrt(abar_t) Delta and noise sigma_t = s sqrt(abar_t) Delta, with
the noise multiplier s that makes one step (epsilon, delta)-DP (analytic Gaussian
mechanism). The rescaled x' is a forward-process sample of signal level
abar' = abar_t / (1 + sigma_t^2); the client sends the schedule timestep t' nearest to it in
log-SNR as the timestep (forcing an exact landing would add up to ten times the noise at
the schedule's coarse end), and the unbiased noise target

    k eps,   k = sqrt((1 - abar_t + sigma_t^2) / (1 - abar_t))

(E[k eps | x'] = E[eps_t' | x'], because x' depends on eps and xi only through
sqrt(1 - abar_t) eps + sigma_t xi), computed from eps, the schedule and sigma_t alone. So the
frozen UNet sees inputs of its training distribution and the ControlNet learns E[eps | x']
at t': a defense that removes control at high noise, never one that teaches it to hurt.
The target's variance is k^2 that of eps, so the server weights each sample's loss by 1 / k^2
(:meth:`target_weights`, from public knowledge); the weights do not move the loss's minimiser.

``ratio`` sets t_start: the smallest t at which sigma_t <= ratio * sqrt(1 - abar_t) (how far
t' may move above t); ratio=0 keeps the uniform policy; ``t-start`` >= 0 sets it directly. At sampling the ControlNet acts at
the timesteps it was trained on, t >= t'(t_start) (:meth:`trained_from`).
A schedule may have no such t: sigma_t / sqrt(1 - abar_t) = s Delta / sqrt(SNR_t) with SNR_t =
abar_t / (1 - abar_t), so the ratio is met only where the schedule's noise reaches s Delta / ratio
x the signal. The tiny preset's cosine schedule ends at SNR ~2e-9 (noise 20,000x the signal),
SD1.5's scaled-linear one at SNR 0.0047 (14.6x), while s Delta is ~154 for SD1.5's 4x64x64
latent at epsilon = 8. Then t_start is T-1 (where the diffusion noise is largest), x' carries
less signal than the schedule's last step (it is sent as T-1) and the accounting says so
(``ratio_met`` false, ``private_over_diffusion_noise``): the guarantee is unchanged, the
control learnt from such steps is close to none.

``bound``: z0's entries are clipped to [-bound, bound] before the noise (x_t moves by
sqrt(abar_t) (clip(z0) - z0)), so the default sensitivity 2 bound sqrt(dim) holds for any
autoencoder: the tiny preset's pixels already lie in [-1, 1] (nothing changes); SD latents
do not (roughly unit variance), and clipping changes the data trained on.

What is accounted: z0 (the private target image's latent), per step and over a run
(``accounting(..., releases)``: a record sent r times composes to multiplier s / sqrt(r),
assuming the server links every release). What is NOT: the hint. Both branches read the
same x', so the control branch carries E(hint) (nograd) or head(x', hint) (vanilla) with no
noise of its own: the hint is declared unprotected (combine with local-dp for an accounted
hint mechanism).
Hooks: latent, timestep. Not applied at inference (there is no private z0 when sampling).
"""
from __future__ import annotations

import torch

from . import accounting
from .base import Defense, HookContext, Latents, register


@register
class LatentDP(Defense):
    """Client-private Gaussian noise on x_t, released as a valid later-timestep sample with an unbiased target;
    (epsilon, delta)-DP for z0 per step with eps known to the server."""

    name = "latent-dp"
    hooks = ("latent", "timestep")
    why_not = "FedAvg sends no per-step features (use dp-sgd for FedAvg)"
    params = {"epsilon": 8.0, "delta": 1e-5, "sensitivity": 0.0, "ratio": 1.0, "t-start": -1, "bound": 1.0}
    at_inference = False
    accounted = True
    threat_model = ("honest-but-curious server that knows eps, t, the public weights and this defense; "
                    "protects z0 with (epsilon, delta) per step; the hint is not protected")

    def validate(self) -> None:
        p = self.p
        if p["epsilon"] <= 0 or not 0 < p["delta"] < 1 or p["sensitivity"] < 0 or p["ratio"] < 0 \
                or not -1 <= p["t-start"] or p["bound"] <= 0:
            raise ValueError(f"defense 'latent-dp': need epsilon > 0, 0 < delta < 1, sensitivity >= 0, "
                             f"ratio >= 0, t-start >= 0 (-1: from ratio), bound > 0; got {p}")
        self.multiplier = accounting.multiplier_for(p["epsilon"], p["delta"])
        self._tables: dict = {}

    def bind(self, latent_dim: int) -> None:
        self.sensitivity = self.p["sensitivity"] or accounting.replace_one_sensitivity(latent_dim, 2 * self.p["bound"])
        self._tables = {}

    def sigma_min(self, scheduler, t: torch.Tensor) -> torch.Tensor:
        """The calibrated noise std s sqrt(abar_t) Delta (per sample)."""
        abar = scheduler.alphas_cumprod[t.cpu()].double()
        return self.multiplier * abar.sqrt() * self.sensitivity

    def table(self, scheduler) -> dict[str, torch.Tensor]:
        """Per training timestep t (public): ``t_out`` (the t' sent), ``sigma`` (the noise std),
        ``scale`` (c) and ``target_scale`` (k)."""
        key = id(scheduler)
        if key not in self._tables:
            abar = scheduler.alphas_cumprod.double()
            sigma = self.sigma_min(scheduler, torch.arange(len(abar)))
            want = abar / (1 + sigma ** 2)  # the signal level of x'
            log_snr = (abar / (1 - abar)).log()
            t_out = ((want / (1 - want)).log()[:, None] - log_snr[None, :]).abs().argmin(1)
            self._tables[key] = {"t_out": t_out, "sigma": sigma, "scale": 1 / (1 + sigma ** 2).sqrt(),
                                 "target_scale": ((1 - abar + sigma ** 2) / (1 - abar).clamp_min(1e-12)).sqrt()}
        return self._tables[key]

    def t_start(self, scheduler) -> int:
        if self.p["t-start"] >= 0:
            if self.p["t-start"] >= len(scheduler.alphas_cumprod):
                raise ValueError(f"latent-dp: t-start={self.p['t-start']} >= T={len(scheduler.alphas_cumprod)}")
            return self.p["t-start"]
        if self.p["ratio"] == 0:
            return 0
        ok = (self.noise_ratio(scheduler) <= self.p["ratio"]).nonzero()
        return int(ok[0]) if len(ok) else len(scheduler.alphas_cumprod) - 1  # not met: the noisiest step (doc)

    def noise_ratio(self, scheduler) -> torch.Tensor:
        """sigma_t / sqrt(1 - abar_t) per timestep: the private noise over the diffusion noise."""
        abar = scheduler.alphas_cumprod.double()
        return self.sigma_min(scheduler, torch.arange(len(abar))) / (1 - abar).sqrt()

    def trained_from(self, scheduler) -> int:
        return int(self.table(scheduler)["t_out"][self.t_start(scheduler)])

    def latent(self, x_t: torch.Tensor, ctx: HookContext) -> Latents:
        if ctx.inference:
            return Latents(x_t, x_t)
        tab = self.table(ctx.scheduler)
        t = ctx.t.cpu()
        view = (-1, *([1] * (x_t.ndim - 1)))
        if ctx.z0 is not None:  # clip z0 to [-bound, bound] (the sensitivity's premise); a no-op inside it
            shift = ctx.z0.clamp(-self.p["bound"], self.p["bound"]) - ctx.z0
            if shift.any():
                x_t = x_t + ctx.scheduler.alphas_cumprod[t].sqrt().to(x_t).view(view) * shift
        sigma, c = tab["sigma"][t].float().view(view), tab["scale"][t].float().view(view)
        x = c * (x_t + sigma * torch.randn(x_t.shape, generator=ctx.gen))
        target = None if ctx.noise is None else ctx.noise * tab["target_scale"][t].float().view(view)
        return Latents(x, x, tab["t_out"][t].to(ctx.t), target)

    def target_weights(self, t, target, scheduler):
        """1 / k_t^2: the inverse of the target's variance relative to eps's, at the batch timestep t
        behind each sent t' (:meth:`source_timestep`)."""
        return (1 / self.table(scheduler)["target_scale"][self.source_timestep(t, target, scheduler)] ** 2).float()

    def source_timestep(self, t: torch.Tensor, target: torch.Tensor, scheduler) -> torch.Tensor:
        """The batch timestep t behind each sent t' (public knowledge): t' has several preimages, and the
        target's RMS over a latent's values (k_t times eps's, ~1) tells them apart."""
        tab = self.table(scheduler)
        rms = target.flatten(1).double().pow(2).mean(1).sqrt()
        t_in = torch.empty_like(t)
        for i, (ts, r) in enumerate(zip(t.tolist(), rms.tolist())):
            pre = (tab["t_out"] == ts).nonzero().flatten()
            pre = pre if len(pre) else torch.tensor([ts])
            t_in[i] = pre[(tab["target_scale"][pre] - r).abs().argmin()]
        return t_in

    def estimate_z0(self, x, t, target, scheduler):
        """z0_hat = (x / c - sqrt(1 - abar_t) target / k) / sqrt(abar_t) = z0 + sigma_t xi / sqrt(abar_t), at the
        batch timestep t recovered by :meth:`source_timestep`."""
        tab = self.table(scheduler)
        t_in = self.source_timestep(t, target, scheduler)
        abar = scheduler.alphas_cumprod.double()[t_in]
        view = (-1, *([1] * (x.ndim - 1)))
        c, k = tab["scale"][t_in].view(view), tab["target_scale"][t_in].view(view)
        a = abar.view(view)
        z0 = (x.double() / c - (1 - a).sqrt() * target.double() / k) / a.sqrt()
        return z0.float(), (tab["sigma"][t_in] / abar.sqrt()).float()

    def accounting(self, scheduler, releases: float = 1.0) -> dict:
        t0 = self.t_start(scheduler)
        run = accounting.composed_epsilon(self.multiplier, releases, self.p["delta"])
        over = float(self.noise_ratio(scheduler)[t0])
        return {"mechanism": "client-private Gaussian noise on x_t, eps known to the server (analytic GM; exact "
                             "GDP composition over a record's releases)",
                "t_start": t0, "trained_from": self.trained_from(scheduler), "epsilon_per_step": self.p["epsilon"],
                "delta": self.p["delta"], "steps_per_record": releases, "epsilon_per_run": run,
                "noise_multiplier": self.multiplier, "sensitivity": self.sensitivity,
                "sigma_at_t_start": float(self.table(scheduler)["sigma"][t0]),
                "private_over_diffusion_noise": over, "ratio_met": self.p["t-start"] >= 0 or over <= self.p["ratio"],
                "bound": self.p["bound"],
                "covers": "z0 (the target image's latent) of each record, over every step that sends it",
                "assumes": "replace-one sensitivity of z0 (entries clipped to [-bound, bound] unless the sensitivity "
                           "is set); every release of a record linked; the hint not protected"}

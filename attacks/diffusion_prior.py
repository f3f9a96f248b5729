"""Diffusion prior: denoise what the server recovers with the public base model's own reverse process.

A latent defense leaves the server a z0 estimate with Gaussian noise of known std s
(``DefenseStack.estimate_z0``): z0_hat = z0 + s xi. Rescaled, x = z0_hat / sqrt(1 + s^2) =
sqrt(abar) z0 + sqrt(1 - abar) xi with abar = 1 / (1 + s^2): a valid sample of the forward
process, so the public frozen UNet, which was trained to denoise exactly such samples, can
take it the rest of the way. The attack finds the schedule timestep tau whose abar_tau is
nearest, runs deterministic DDIM (eta = 0) from tau to 0 with the base UNet (text context:
the sent one where the prompt crosses the wire, else the empty prompt; classifier-free
``guidance``, 1 = none), and decodes with the public autoencoder. Where s = 0 (no private
noise) the estimate is returned as it is. Nothing here is specific to the data set.

Options: ``combine`` first links a client's releases of one record and combines them
(attacks/multi_release.py: a smaller s, so a later start); ``control`` also applies the server's
trained ControlNet with the hint recovered from the control branch (frozen client only; not
where a fixed per-client offset hides the hint's level), at the timesteps it was trained on,
as sampling does (``strategies.base.composed_eps``).

Needs: sent features, the noise target and t, the public client parts and base model. Passive.
"""
from __future__ import annotations

from typing import ClassVar

import torch

from defenses import HookContext
from strategies.base import composed_eps

from .base import Attack, Reconstruction, ServerView, register
from .common import signed_to_hint
from .multi_release import (
    MultiReleaseAttack,
    client_heads,
    linked_estimates,
    release_estimates,
)


def start_timesteps(scheduler, s: torch.Tensor) -> torch.Tensor:
    """Per sample, the schedule timestep whose abar is nearest 1 / (1 + s^2)."""
    abar = scheduler.alphas_cumprod.double()
    want = 1 / (1 + s.double() ** 2)
    return (abar[None, :] - want[:, None]).abs().argmin(dim=1)


@torch.no_grad()
def ddim_from(eps_fn, scheduler, x: torch.Tensor, tau: torch.Tensor, steps: int) -> torch.Tensor:
    """Deterministic DDIM from per-sample timesteps ``tau`` down to a clean sample: ``steps`` steps at
    t_k = round(tau (steps - k) / steps), the last one to abar = 1 (the model's z0 prediction).
    ``eps_fn(x, t)`` predicts the noise for per-sample timesteps ``t``."""
    abar = scheduler.alphas_cumprod.double()
    view = (-1, *([1] * (x.ndim - 1)))
    ts = [(tau.double() * (steps - k) / steps).round().long() for k in range(steps)]
    x = x.double()
    for k, t in enumerate(ts):
        a = abar[t].view(view)
        a_prev = abar[ts[k + 1]].view(view) if k + 1 < steps else torch.ones_like(a)
        eps = eps_fn(x.float(), t).double()
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    return x.float()


@register
class DiffusionPriorAttack(Attack):
    """Treat the noisy z0 estimate as a diffusion sample at the matching timestep and finish it with the public UNet."""

    name = "diffusion-prior"
    needs = ("sent-features", "noise-target", "white-box-client")
    client_parts = ("frozen", "head")
    why_not = "FedAvg sends no per-step features or noise targets"
    targets = ("image",)
    params: ClassVar[dict] = {"steps": 20, "guidance": 1.0, "combine": False, "control": False, "max-samples": 64,
                              "iters": 300, "batch": 32}
    threat_model = ("passive server that receives eps and t, knows the public base model, client parts and defenses, "
                    "and uses the base model as a prior to denoise what a latent defense leaves")

    def validate(self) -> None:
        if self.p["steps"] < 1 or self.p["guidance"] <= 0 or self.p["batch"] < 1:
            raise ValueError(f"diffusion-prior: need steps >= 1, guidance > 0, batch >= 1; got {self.p}")

    def estimates(self, view: ServerView) -> dict:
        """Per kept sample: refs, z0 estimate, residual std, E(hint) estimate (or None), and the text context
        (None where the prompt stays home or was dropped); linked and combined with ``combine``."""
        batches = view.batches()
        refs = [(b["ref"][0], b["ref"][1], j) for b in batches for j in range(b["control"].shape[0])]
        rows = [c for b in batches for c in (b["context"] if b["context"] is not None else [None] * len(b["t"]))]
        if self.p["combine"]:
            r = linked_estimates(view, {**MultiReleaseAttack.params, "iters": self.p["iters"]})
            comb, keys, groups = r["combined"], r["single"]["prompt"], r["groups"]
            for g in groups.unique().tolist():  # a group's prompt where any of its releases sent one
                named = [i for i in (groups == g).nonzero().flatten().tolist() if keys[i] >= 0]
                for i in (groups == g).nonzero().flatten().tolist():
                    rows[i] = rows[named[0]] if named else None
            return {"refs": refs, "z0": comb["z0"], "std": comb["std"], "e_hint": comb["e_hint"], "context": rows,
                    "groups": len(groups.unique())}
        est = release_estimates(view, batches, client_heads(view, batches), self.p["iters"])
        keys = est["prompt"]
        rows = [c if k >= 0 else None for c, k in zip(rows, keys.tolist())]
        return {"refs": refs, "z0": est["z0"], "std": est["std"], "e_hint": est["e_hint"], "context": rows}

    def control_reason(self, view: ServerView, e_hint) -> str | None:
        """Why the server's ControlNet cannot be used here (None: it can)."""
        if view.controlnet_final is None:
            return "no trained ControlNet in the view"
        if e_hint is None:
            return "no hint estimate (head client)"
        if any(d.name == "fp16" and d.p.get("offset") for d in view.defenses.defenses):
            return "a fixed per-client offset enters the ControlNet's input"
        return None

    @torch.no_grad()
    def run(self, view: ServerView) -> Reconstruction:
        p, base, sched = self.p, view.base, view.scheduler
        est = self.estimates(view)
        n = min(p["max-samples"], len(est["refs"]))
        z0, s = est["z0"][:n], est["std"][:n].float()
        null = base.encode_prompts([""]).float()
        context = torch.stack([c.float() if c is not None else null[0] for c in est["context"][:n]])
        reason = self.control_reason(view, est["e_hint"]) if p["control"] else "not asked"
        hints = None
        if reason is None:
            hints = signed_to_hint(base.autoencoder.decode(est["e_hint"][:n]))
        stack, strategy = view.defenses, view.strategy
        trained_from = stack.trained_from(sched)
        gen = torch.Generator().manual_seed(0)
        cn_ctx_needed = not stack.sends_prompt

        def eps_for(x, t, c, h, control):
            if h is None:
                return composed_eps(strategy, base, None, x, t, c, None)
            scale = (t >= trained_from).float() * control  # as sampling: from the trained timesteps up
            hook = HookContext(t, sched, -1, gen, inference=True)
            cn_ctx = null.expand(x.shape[0], *null.shape[1:]) if cn_ctx_needed else None
            return composed_eps(strategy, base, view.controlnet_final, x, t, c, h, scale, stack, hook, cn_ctx)

        out = z0.clone()
        noisy = (s > 0).nonzero().flatten()
        tau = start_timesteps(sched, s)
        for chunk in noisy.split(p["batch"]) if len(noisy) else ():
            c = context[chunk]
            h = hints[chunk] if hints is not None else None
            ones = torch.ones(len(chunk))

            def eps_fn(x, t, c=c, h=h, ones=ones):
                if p["guidance"] == 1.0:
                    return eps_for(x, t, c, h, ones)
                both = eps_for(torch.cat([x, x]), torch.cat([t, t]), torch.cat([c, null.expand_as(c)]),
                               None if h is None else torch.cat([h, h]), torch.cat([ones, 0 * ones]))
                cond, uncond = both.chunk(2)  # the control in the conditional branch only, as sampling does
                return uncond + p["guidance"] * (cond - uncond)

            x = z0[chunk] / (1 + s[chunk].view(-1, 1, 1, 1) ** 2).sqrt()
            out[chunk] = ddim_from(eps_fn, sched, x, tau[chunk], p["steps"])
        images = base.autoencoder.decode(out).clamp(-1, 1)
        info = {"denoised": len(noisy), "residual_std_median": round(float(s.median()), 4),
                "start_t_mean": round(float(tau[noisy].double().mean()), 1) if len(noisy) else None,
                "control": reason or "used"}
        if "groups" in est:
            info["groups"] = est["groups"]
        return Reconstruction(est["refs"][:n], images, info=info)

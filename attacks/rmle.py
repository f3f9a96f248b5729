"""Optimisation-based white-box inversion of the sent features: regularised MLE (rMLE, He et al. 2019).

Threat model: a passive, honest-but-curious server that knows the client's model (the
public frozen E and ``unet.conv_in`` under nograd; under vanilla the head relayed at the
start of each batch's turn, interpolated toward the turn's returned head where that is
kept), the public defense stack and t. No auxiliary data, no training, and NOT the noise
target eps (that is the noise-target attack).

Stage 1 (the MLE of what the client fed its model): find x_t and the hint whose client
features, through the public defense pipeline, match the sent ones, by Adam on

    sum over branches of mean((F_b(x_t, hint) - y_b)^2) / r_b  +  tv-hint * TV(hint)  +  l1-hint * mean|hint|

with x_t initialised by the exact least-squares inversion of the public conv_in (conjugate
gradients) and the hint at 0.5 everywhere, projected back onto [0, 1] after every step. Each branch is
normalised by its residual at the start (r_b), so the small hint-dependent part of the
vanilla head's output is not drowned by the x_t-dependent part. The hint priors: edge /
outline maps are piecewise constant (TV) and sparse (L1, which also fixes the one level a
fixed offset leaves undetermined: a constant shift of every hint at a pixel is otherwise
absorbed by the offset). Where the stack has independent client-private noise per branch
(public sigma_t; none of the project's latent defenses now: they send one valid sample of
the sent t to both), the two branches get their own x_t, tied by the Gaussian penalty the noise
implies; where it adds a fixed per-client offset (fp16:offset=true) one offset per client
is shared by all that client's samples and refitted in closed form (the client's mean
residual) every iteration -- the box [0, 1] on the hints across many samples pins it down.

Stage 2 (the image): the server now has x_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps with t
known and eps unknown; ``estimate="map"`` (default) returns the TV-regularised MAP of z0 under
that Gaussian likelihood (noise variance 1 - abar_t of the sent t) within
the latent box [-1, 1]: x_t / sqrt(abar_t) where abar_t is close to 1, shrinking to a flat
image as t grows. ``estimate="x_t"`` reports x_t itself, ``"scaled"`` x_t / sqrt(abar_t).
With the tiny preset's identity autoencoder the latents are the images; otherwise the public
decoder maps them back.
"""
from __future__ import annotations

import torch

from attacks.inverse_net import head_for, returned_heads, vanilla_heads
from defenses import HookContext
from sim.core.autoencoder import IdentityAutoencoder
from sim.core.cuts import control_head, nograd_control_input, unet_first_conv

from .base import Attack, Reconstruction, ServerView, register
from .common import invert_conv

ESTIMATES = ("map", "x_t", "scaled")


def tv(x: torch.Tensor) -> torch.Tensor:
    """Anisotropic total variation, mean over elements, per sample."""
    dh = (x[..., 1:, :] - x[..., :-1, :]).abs().mean(dim=(1, 2, 3))
    dw = (x[..., :, 1:] - x[..., :, :-1]).abs().mean(dim=(1, 2, 3))
    return dh + dw


def latent_sigma(stack, scheduler, t: torch.Tensor) -> torch.Tensor:
    """Per-sample std of client-private noise on the branch inputs beyond what the sent t implies, drawn
    separately per branch (0 if none). The project's latent defenses (latent-dp, one-shot) send one
    input to both branches that is a valid sample of the sent t, so it is 0 under them; a defense
    with independent per-branch noise declares it as ``branch_sigma(scheduler, t)``."""
    for d in stack.with_hook("latent"):
        if hasattr(d, "branch_sigma"):
            return d.branch_sigma(scheduler, t).float()
    return torch.zeros(t.shape[0])


def public_features(view: ServerView, x_unet: torch.Tensor, x_control: torch.Tensor, hint: torch.Tensor,
                    t: torch.Tensor, head=None, offset: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The client pipeline (defenses.split_client_features) from given branch inputs, differentiably.

    The latent hook is replaced by the given ``x_unet`` / ``x_control``; a fixed per-client offset
    (fp16:offset=true) is replaced by ``offset``, the attacker's variable, added where the stack
    adds the client's private one.
    """
    stack, ae, unet = view.defenses, view.base.autoencoder, view.base.unet
    ctx = HookContext(t, view.scheduler, -1, torch.Generator().manual_seed(0))
    if view.client_part == "frozen":
        control = nograd_control_input(ae, x_control, hint)
    else:
        control = control_head(head, x_control, hint)
    feats = unet_first_conv(unet, x_unet)
    for d in stack.with_hook("feature"):
        if d.name == "fp16":
            if d.p.get("offset") and offset is not None:
                control = control + offset
            continue
        control, feats = d.feature("control", control, ctx), d.feature("unet", feats, ctx)
    return stack.wire(control, ctx), stack.wire(feats, ctx)


def map_z0(x_t: torch.Tensor, t: torch.Tensor, scheduler, extra_var: torch.Tensor, tv_weight: float,
           iters: int, lr: float, box: bool) -> torch.Tensor:
    """TV-regularised MAP of z0 from x_t = sqrt(abar) z0 + N(0, (1 - abar) + extra_var)."""
    abar = scheduler.alphas_cumprod[t.cpu()].float().view(-1, 1, 1, 1)
    var = (1 - abar) + extra_var.view(-1, 1, 1, 1)
    init = abar.sqrt() * x_t / (abar + var)  # Gaussian shrinkage with a unit prior variance
    a = (torch.atanh(init.clamp(-0.98, 0.98)) if box else init).clone().requires_grad_(True)
    opt = torch.optim.Adam([a], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, iters))
    for _ in range(iters):
        z = torch.tanh(a) if box else a
        loss = (((x_t - abar.sqrt() * z) ** 2) / (2 * var)).mean(dim=(1, 2, 3)) + tv_weight * tv(z)
        opt.zero_grad(set_to_none=True)
        loss.sum().backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        return torch.tanh(a) if box else a.detach()


@register
class RMLEAttack(Attack):
    """Regularised MLE: optimise x_t and the hint so the known client model reproduces the sent features."""

    name = "rmle"
    needs = ("sent-features", "white-box-client")
    client_parts = ("frozen", "head")
    why_not = "FedAvg sends no per-step features"
    targets = ("image", "hint")
    params = {"iters": 300, "lr": 0.05, "tv": 4.0, "tv-hint": 0.001, "l1-hint": 0.3, "estimate": "map",
              "map-iters": 200, "max-samples": 64}
    threat_model = ("passive server that knows the client model (public frozen parts; vanilla: the relayed head), "
                    "the public defenses and t; no auxiliary data; does not use eps")

    def validate(self) -> None:
        if self.p["estimate"] not in ESTIMATES:
            raise ValueError(f"rmle: estimate must be one of {ESTIMATES}, got {self.p['estimate']!r}")
        if min(self.p["iters"], self.p["tv"], self.p["tv-hint"], self.p["l1-hint"]) < 0:
            raise ValueError(f"rmle: iters, tv, tv-hint and l1-hint must be >= 0, got {self.p}")

    def run(self, view: ServerView) -> Reconstruction:
        p = self.p
        torch.manual_seed(0)
        batches, budget = [], p["max-samples"]
        for b in view.batches():
            if budget <= 0:
                break
            k = min(budget, b["control"].shape[0])
            batches.append({**b, "control": b["control"][:k], "unet_features": b["unet_features"][:k],
                            "t": b["t"][:k], "n": k})
            budget -= k
        ae, conv = view.base.autoencoder, view.base.unet.conv_in
        stack, sched = view.defenses, view.scheduler
        box = isinstance(ae, IdentityAutoencoder)  # pixel latents live in [-1, 1]
        y_c = torch.cat([b["control"] for b in batches])
        y_u = torch.cat([b["unet_features"] for b in batches])
        t = torch.cat([b["t"] for b in batches])
        cids = torch.cat([torch.full((b["n"],), b["cid"]) for b in batches])
        refs = [(b["ref"][0], b["ref"][1], j) for b in batches for j in range(b["n"])]
        heads = None
        if view.client_part == "head":  # one head per batch, as the server knows it (inverse_net.head_for)
            relayed, returned = vanilla_heads(view), returned_heads(view)
            heads = [(b["n"], head_for(view, b["ref"][0], relayed, returned)) for b in batches]

        sigma = latent_sigma(stack, sched, t)
        split = bool((sigma > 0).any())
        use_offset = any(d.name == "fp16" and d.p.get("offset") for d in stack.defenses)

        x_u = invert_conv(conv, y_u).requires_grad_(True)  # exact LS solution of the public conv
        x_c = x_u.detach().clone().requires_grad_(True) if split else None
        size = view.base.preset.image_size
        hint_var = torch.full((len(t), 3, size, size), 0.5, requires_grad=True)  # projected onto [0, 1]
        uniq = sorted(set(cids.tolist()))
        offsets = torch.zeros(len(uniq), *y_c.shape[1:], requires_grad=True) if use_offset else None
        slot = torch.tensor([uniq.index(c) for c in cids.tolist()])

        def forward():
            hint = hint_var
            xc = x_c if split else x_u
            off = offsets[slot] if use_offset else None
            if heads is None:
                return public_features(view, x_u, xc, hint, t, None, off), hint
            outs, i = [], 0
            for n, head in heads:
                s = slice(i, i + n)
                outs.append(public_features(view, x_u[s], xc[s], hint[s], t[s], head,
                                            off[s] if off is not None else None))
                i += n
            return (torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])), hint

        # the offset: where it enters last on the control branch (after every other feature defense, as in
        # pp-reference) its least-squares value given the rest is the client's mean residual, set in closed form
        # every iteration (block-coordinate descent); otherwise a free variable for Adam
        closed_form = use_offset and [d.name for d in stack.with_hook("feature")][-1] == "fp16"
        members = [(slot == k).nonzero().flatten() for k in range(len(uniq))]

        def refit_offsets():
            with torch.no_grad():
                offsets.zero_()
                (c_plain, _), _ = forward()
                for k, idx in enumerate(members):
                    offsets[k] = (y_c[idx] - c_plain[idx]).mean(0)

        if closed_form:
            refit_offsets()
        with torch.no_grad():
            (c0, u0), _ = forward()
            per = lambda r: r.pow(2).mean(dim=(1, 2, 3))  # noqa: E731
            # floors: the wire's own rounding (fp16: relative 2^-11, uniform) or float32 noise
            rel = 2.0 ** -22 / 3 if stack.wire_dtype == torch.float16 else 1e-12
            r_c = per(c0 - y_c).clamp_min(1e-12 + rel * float(y_c.pow(2).mean()))
            r_u = per(u0 - y_u).clamp_min(1e-12 + rel * float(y_u.pow(2).mean()))
        params = [x_u, hint_var] + ([x_c] if split else []) + ([offsets] if use_offset and not closed_form else [])
        opt = torch.optim.Adam(params, lr=p["lr"])
        lr_sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, p["iters"]))
        first = last = None
        for it in range(p["iters"]):
            if closed_form:
                refit_offsets()
            (c, u), hint = forward()
            loss = (per(c - y_c) / r_c + per(u - y_u) / r_u
                    + p["tv-hint"] * tv(hint) + p["l1-hint"] * hint.abs().mean(dim=(1, 2, 3)))
            if split:  # x_u - x_c ~ N(0, 2 sigma^2) per element
                loss = loss + per(x_u - x_c) / (2 * 2 * sigma.clamp_min(1e-6) ** 2)
            total = loss.sum()
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
            lr_sched.step()
            with torch.no_grad():
                hint_var.clamp_(0, 1)
            first = float(loss.detach().mean()) if it == 0 else first
            last = float(loss.detach().mean())

        with torch.no_grad():
            x_t = x_u.detach()
            hints = hint_var.detach().clone()
            abar = sched.alphas_cumprod[t.cpu()].float().view(-1, 1, 1, 1)
        if p["estimate"] == "x_t":
            z0 = x_t
        elif p["estimate"] == "scaled":
            z0 = x_t / abar.sqrt()
        else:
            z0 = map_z0(x_t, t, sched, sigma ** 2, p["tv"], p["map-iters"], p["lr"], box)
        with torch.no_grad():
            images = ae.decode(z0).clamp(-1, 1)
        info = {"iters": p["iters"], "estimate": p["estimate"], "loss_first": round(first, 6) if first else None,
                "loss_last": round(last, 6) if last is not None else None, "offset_variables": use_offset,
                "split_branches": split}
        return Reconstruction(refs, images, hints, info=info)

"""UnSplit (Erdogan, Kupcu and Cicek, WPES 2022): joint inversion of unknown client weights and input.

Threat model: honest-but-curious server of vanilla split learning. The client's head
(ControlNet hint block + first conv) is trained on the device, so its current weights
are unknown to the attacker; the architecture and the public initial weights
(``view.controlnet_init``) are known. (Our vanilla protocol relays the head through
the server at every turn, as Plato's sequential split learning does, so a real server
*does* see the weights; UnSplit deliberately ignores them, to measure what a server
learns without that relay. With them, the problem is white-box inversion.)

The head is ``conv_in(x_t) + conv_out(silu(cond_in(hint)))``. For every sent batch:

1. x_t from the public UNet branch: the public ``unet.conv_in`` is injective, so x_t is
   the exact least-squares solution for the sent ``unet_features``.
2. Weights of the x path (unknown, trained): linear in its weights, so UnSplit's weight
   step is solved exactly by least squares over all pixels of the batch; the residual
   is the hint block's output (it shows the hint's strokes plainly once the block's
   zero-initialised ``conv_out`` has moved: not in the first two steps of training,
   whose batches carry no hint information at all and get the blind all-black guess).
3. The hint block, UnSplit's alternation: ``cond_in`` at its public initial weights
   (the honest gradient moves it by ~lr per step), ``conv_out`` solved by ridge least
   squares for the current hint (the weight step), then Adam steps on the hint (a
   sigmoid-bounded image, grey when the auxiliary hints are, TV prior) for the current
   ``conv_out`` (the input step); the hint starts from the residual's energy map.
4. Calibration (``calibrate``): blind deconvolution leaves the sign open; the public
   prior that hints are sparse bright strokes (positive skew in the aux data) fixes it,
   and the values are quantile-matched to the aux hints.

Public transforms on the control branch are undone first (symsigmoid is inverted); the
fp16 wire's fixed per-client offset and latent-dp's noise on the control branch are not
modelled (they stay in the residual).

Outputs: the hint (the part UnSplit is needed for) and the image from x_t: with the
sent noise target z0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar) (what noise-target also
gets), else sqrt(abar) x_t (the posterior mean of z0 under a unit Gaussian prior).
Measured (smoke preset, batch 4, after the head's hint block started moving): hint
SSIM 0.585 against 0.558 for the blind all-black guess; the energy map alone gives 0.59.
Ring-shaped 1-pixel strokes make SSIM unforgiving of a one-pixel miss.

Where UnSplit does not apply
----------------------------
* nograd: the client holds only public frozen weights (autoencoder, UNet conv_in), so
  there are no unknown client weights to estimate: UnSplit degenerates to white-box
  inversion of the sent features (the rMLE attack), which the noise-target attack even
  solves in closed form (h - x_t = E(hint)).
* fedavg: nothing is sent per step; the server sees weights (see grad-inversion).
"""
from __future__ import annotations

import torch

from defenses.symsigmoid import inverse
from strategies.vanilla import ControlHead

from .base import Attack, Reconstruction, ServerView, register
from .common import invert_conv

NOGRAD_REASON = ("no unknown client weights under nograd (the client holds only public frozen parts): UnSplit "
                 "degenerates to white-box inversion (rMLE; noise-target solves it in closed form)")
FEDAVG_REASON = "FedAvg sends no per-step features (only model updates: see grad-inversion)"


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference between neighbouring pixels (anisotropic TV)."""
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()


def quantile_match(x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Map each image's pixel values (per channel) onto the value distribution of ``reference``
    (a pool of images) by rank: the smallest pixel gets the smallest reference quantile, etc."""
    ref = reference.float().transpose(0, 1).flatten(1).sort(dim=1).values  # (C, M)
    out = torch.empty_like(x)
    n = x.shape[-1] * x.shape[-2]
    q = torch.linspace(0, 1, n)
    for i in range(x.shape[0]):
        for c in range(x.shape[1]):
            flat = x[i, c].flatten()
            order = flat.argsort()
            vals = torch.quantile(ref[c], q)
            res = torch.empty_like(flat)
            res[order] = vals
            out[i, c] = res.view_as(x[i, c])
    return out


def _design(z: torch.Tensor, k: int = 3) -> torch.Tensor:
    """Rows [patch_k(z)(p), 1] for every sample and pixel: a k x k conv with bias is ``_design(z) @ coef``."""
    b, _, h, w = z.shape
    p = torch.nn.functional.unfold(z, k, padding=k // 2)
    return torch.cat([p, torch.ones(b, 1, h * w, dtype=z.dtype)], 1).transpose(1, 2).reshape(b * h * w, -1)


def _as_map(rows: torch.Tensor, b: int, h: int, w: int) -> torch.Tensor:
    return rows.reshape(b, h, w, -1).permute(0, 3, 1, 2)


@register
class UnSplit(Attack):
    """Alternating estimation of the private head's weights and its input (x_t, hint) from the sent control features."""

    name = "unsplit"
    needs = ("sent-features",)
    client_parts = ("head",)
    why_not = f"nograd: {NOGRAD_REASON}; fedavg: {FEDAVG_REASON}"
    targets = ("image", "hint")
    params = {"max-samples": 16, "rounds": 30, "inner": 10, "lr": 0.05, "tv": 0.003, "ridge": 1e-6,
              "calibrate": True, "aux": 256, "seed": 0}
    threat_model = ("passive server of vanilla split learning that does not know the trained head's weights "
                    "(public architecture and initial weights only)")

    def not_applicable(self, view: ServerView) -> str | None:
        if view.client_part == "frozen":
            return NOGRAD_REASON
        if view.client_part == "whole":
            return FEDAVG_REASON
        return super().not_applicable(view)

    def run(self, view: ServerView) -> Reconstruction:
        torch.manual_seed(self.p["seed"])
        names = [d.name for d in view.defenses.defenses]
        aux = view.aux(self.p["aux"])["condition"]
        grey = bool((aux == aux[:, :1]).all())  # public prior: hints are grey-level edge maps
        skew = float(((aux - aux.mean()) ** 3).mean())  # ... and sparse bright strokes (positive skew)
        cond_in = ControlHead(view.controlnet_init).controlnet_cond_embedding.conv_in.requires_grad_(False)
        conv = view.base.unet.conv_in
        refs, images, hints, fits, silent = [], [], [], [], 0
        for b in view.batches():
            if len(refs) >= self.p["max-samples"]:
                break
            y = b["control"].float()
            if "symsigmoid" in names:
                y = inverse(y)
            x = invert_conv(conv, b["unet_features"].float())  # the UNet branch: x_t, exactly
            r = self._x_path_residual(x, y)
            if float(r.norm()) <= 1e-5 * float(y.norm()):  # the hint block still outputs 0: nothing to invert
                hint, fit = torch.zeros(y.shape[0], aux.shape[1], *y.shape[2:]), float("nan")
                silent += y.shape[0]
            else:
                hint, fit = self._hint_path(r / r.std(), cond_in, aux, grey, skew)
                fits.append(fit)
            images.append(view.base.autoencoder.decode(self._image(x, b, view)).clamp(-1, 1))
            hints.append(hint)
            refs += [(b["ref"][0], b["ref"][1], j) for j in range(y.shape[0])]
        n = self.p["max-samples"]
        info = {"hint_fit_residual": float(sum(fits) / len(fits)) if fits else None,
                "samples_without_hint_signal": silent}
        return Reconstruction(refs[:n], torch.cat(images)[:n], torch.cat(hints)[:n], info=info)

    @staticmethod
    def _x_path_residual(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Weights step for the head's x_t path (a 3x3 conv, linear in its weights: solved exactly by
        least squares over every pixel of the batch); returns what it leaves: the hint block's output."""
        b, c, h, w = y.shape
        X, Y = _design(x.double()), y.double().permute(0, 2, 3, 1).reshape(-1, c)
        coef = torch.linalg.lstsq(X, Y).solution
        return _as_map(Y - X @ coef, b, h, w).float()

    def _hint_path(self, r: torch.Tensor, cond_in, aux: torch.Tensor, grey: bool, skew: float):
        """UnSplit's alternation on the hint block conv_out(silu(conv_in(hint))): conv_in at its public
        initial weights, conv_out solved by ridge least squares for the current hint, the hint by Adam
        steps (TV prior) for the current conv_out. Starts from the residual's energy map."""
        p = self.p
        b, c, h, w = r.shape
        ch = 1 if grey else aux.shape[1]
        energy = r.abs().mean(1, keepdim=True)
        energy = energy - energy.flatten(1).median(1).values.view(-1, 1, 1, 1)
        start = quantile_match(energy.expand(-1, ch, -1, -1).contiguous(), aux[:, :ch])
        logits = torch.logit(start.clamp(0.05, 0.95)).requires_grad_(True)
        opt = torch.optim.Adam([logits], lr=p["lr"])
        target = r.double().permute(0, 2, 3, 1).reshape(-1, c)
        expand = (lambda z: z.expand(-1, aux.shape[1], -1, -1)) if grey else (lambda z: z)  # noqa: E731
        fit = torch.tensor(float("nan"))
        for _ in range(p["rounds"]):
            with torch.no_grad():  # weights step: conv_out for the current hint
                D = _design(torch.nn.functional.silu(cond_in(expand(torch.sigmoid(logits)))).double())
                gram = D.T @ D
                lam = p["ridge"] * float(gram.diagonal().mean())
                coef = torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype), D.T @ target).float()
            for _ in range(p["inner"]):  # input step: the hint for the current conv_out
                hint = expand(torch.sigmoid(logits))
                pred = _as_map(_design(torch.nn.functional.silu(cond_in(hint))) @ coef, b, h, w)
                fit = (pred - r).pow(2).mean()
                loss = fit + p["tv"] * total_variation(hint)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        hint = expand(torch.sigmoid(logits)).detach()
        if p["calibrate"]:
            centred = hint - hint.mean(dim=(1, 2, 3), keepdim=True)
            flip = ((centred ** 3).mean(dim=(1, 2, 3)) * skew < 0).view(-1, 1, 1, 1)  # blind deconvolution's sign
            hint = torch.where(flip, hint.amax(dim=(1, 2, 3), keepdim=True) - hint, hint)
            hint = quantile_match(hint, aux)
        return hint, float(fit.detach())

    @staticmethod
    def _image(x: torch.Tensor, b: dict, view: ServerView) -> torch.Tensor:
        if b["noise"] is not None:
            return view.defenses.estimate_z0(x, b["t"], b["noise"].float(), view.scheduler)[0]
        abar = view.scheduler.alphas_cumprod[b["t"].cpu()].float().view(-1, 1, 1, 1)
        return abar.sqrt() * x

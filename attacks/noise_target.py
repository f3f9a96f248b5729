"""The noise-target algebraic attack on split learning that sends eps (the reference's leak).

Needs: the sent UNet first-conv features of x_t, t and the noise target eps (both split
schemes send them unless a defense changes that); white-box knowledge of the public
``unet.conv_in`` and autoencoder decoder. Passive, honest-but-curious server; no
training, no auxiliary data.

1. Solve the public, injective ``conv_in`` for x_t (conjugate gradients, exact).
2. z0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t) (under a latent defense its public
   ``estimate_z0``, which undoes its rescaling and target); decode: the private target image.
3. nograd only, for the hint: undo the public wire transforms of the control branch
   (symsigmoid is inverted; a fixed per-client offset is estimated as the per-pixel
   median over that client's batches, assuming hints are mostly black edge maps),
   subtract x_t: E(hint); decode.
Division by sqrt(abar_t) amplifies any error at very high t, so success depends on the
timestep policy only through rounding (fp16) and whatever noise a defense adds.
Against latent-dp the recovered x_t carries client-private noise sigma_t, so z0 carries
sigma_t / sqrt(abar_t); against one-shot it carries the release's noise; stronger attacks
(multi-release, diffusion-prior) start from the same estimate.
"""
from __future__ import annotations

import torch

from defenses.symsigmoid import inverse, symsigmoid

from .base import Attack, Reconstruction, ServerView, register
from .common import invert_conv, signed_to_hint


@register
class NoiseTargetAttack(Attack):
    """Solve the public first conv for x_t, subtract the sent noise target, decode: image (and hint under nograd)."""

    name = "noise-target"
    needs = ("sent-features", "noise-target", "white-box-client")
    client_parts = ("frozen", "head")
    why_not = "FedAvg sends no per-step features or noise targets"
    targets = ("image", "hint")
    params = {"max-samples": 64, "iters": 300}
    threat_model = "passive server that receives eps and t (reference design) and knows the public conv_in and decoder"

    @torch.no_grad()
    def run(self, view: ServerView) -> Reconstruction:
        batches = view.batches()
        conv, ae = view.base.unet.conv_in, view.base.autoencoder
        stack = view.defenses
        refs, images, hints = [], [], []
        x_by_batch = []
        for b in batches:
            x_t = invert_conv(conv, b["unet_features"], self.p["iters"])
            x_by_batch.append(x_t)
            z0 = stack.estimate_z0(x_t, b["t"], b["noise"], view.scheduler)[0]
            images.append(ae.decode(z0).clamp(-1, 1))
            refs += [(b["ref"][0], b["ref"][1], j) for j in range(x_t.shape[0])]
        info = {}
        if view.client_part == "frozen":
            names = [d.name for d in stack.defenses]
            offset_used = any(d.name == "fp16" and d.p["offset"] for d in stack.defenses)
            pre = []
            for b, x_t in zip(batches, x_by_batch):
                pre.append((b["cid"], b["control"], x_t))
            offsets = {}
            if offset_used:  # per-pixel median of sent - f(background hint), per client
                for cid in {c for c, _, _ in pre}:
                    diffs = [h - self._forward(x_t - 1, names) for c, h, x_t in pre if c == cid]
                    offsets[cid] = torch.cat(diffs).median(dim=0).values
                info["offset_estimated"] = True
            for cid, h, x_t in pre:
                y = h - offsets.get(cid, 0)
                e_hint = (inverse(y) if "symsigmoid" in names else y) - x_t
                hints.append(signed_to_hint(ae.decode(e_hint)))
        n = self.p["max-samples"]
        return Reconstruction(refs[:n], torch.cat(images)[:n], torch.cat(hints)[:n] if hints else None, info=info)

    @staticmethod
    def _forward(e_plus_x: torch.Tensor, names: list[str]) -> torch.Tensor:
        return symsigmoid(e_plus_x) if "symsigmoid" in names else e_plus_x

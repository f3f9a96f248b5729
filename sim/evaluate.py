"""Generate images with (or without) a trained ControlNet and score them.

Scores (see :mod:`sim.metrics`): ``outline_iou`` (IoU of the generated circle with the
condition's disc), prompt-colour accuracy (``fg_colour_acc``, ``bg_colour_acc`` and
``colour_acc`` = both right). Sampling is DDIM with classifier-free guidance; the
control is applied to the conditional and the unconditional branch alike.
"""
from __future__ import annotations

import numpy as np
import torch

from .cuts import controlled_eps
from .diffusion import bar_position, ddim_sample, to_uint8
from .models import ddpm_scheduler


@torch.no_grad()
def generate(base, prompts: list[str], scheme: str | None = None, controlnet=None,
             hints: torch.Tensor | None = None, steps: int = 20, guidance: float = 5.0, seed: int = 0,
             progress: bool = True, desc: str = "sampling") -> torch.Tensor:
    """Images in [-1, 1] from the frozen base model, controlled by ``controlnet`` when given.

    ``scheme`` decides how the ControlNet reads the hint (see :func:`sim.cuts.control_features`).
    """
    p = base.preset
    ctx = base.encode_prompts(prompts)
    null = base.encode_prompts([""])

    def eps_fn(x, t, c):
        h = None if hints is None else hints.repeat(x.shape[0] // hints.shape[0], 1, 1, 1)
        return controlled_eps(scheme or "fedavg", base.unet, controlnet, base.autoencoder, x, t, c, h)

    g = torch.Generator().manual_seed(seed)
    shape = (len(prompts), p.latent_channels, p.latent_size, p.latent_size)
    z = ddim_sample(eps_fn, ddpm_scheduler(p), shape, ctx, null, steps=steps, guidance=guidance,
                    generator=g, progress=progress, desc=desc,
                    position=bar_position())
    return base.autoencoder.decode(z)


def conditions_uint8(conditions: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) hints in [0, 1] -> (N, H, W, 3) uint8."""
    return (conditions * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def score(images_uint8, conditions_uint8, fgs=None, bgs=None) -> dict:
    """Task metrics of generated images against their conditions (and prompt colours when known)."""
    from .metrics import colour_accuracy, outline_iou

    out = {"outline_iou": float(outline_iou(images_uint8, conditions_uint8))}
    if fgs is not None:
        out.update(colour_accuracy(images_uint8, fgs, bgs))
    return out


def evaluate(base, eval_set: dict, scheme: str | None, controlnet, steps: int, guidance: float, seed: int,
             desc: str) -> tuple[dict, np.ndarray]:
    """Generate one image per eval condition and score it; returns (metrics, uint8 images)."""
    images = generate(base, eval_set["prompt"], scheme, controlnet, eval_set["condition"], steps=steps,
                      guidance=guidance, seed=seed, desc=desc)
    imgs = to_uint8(images)
    conds = conditions_uint8(eval_set["condition"])
    return score(imgs, conds, eval_set.get("fg"), eval_set.get("bg")), imgs

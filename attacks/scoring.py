"""Scores of a reconstruction against the private data: MSE, PSNR, SSIM, success rate, prompt accuracy.

Images are compared in [0, 1] (targets are mapped from [-1, 1]); SSIM is skimage's
``structural_similarity`` per image (channel axis last, data_range 1, 7x7 window, or
smaller for tiny images), averaged. A reconstruction "succeeds" when its SSIM reaches
:data:`SUCCESS_SSIM`. Prompt recovery is exact-string accuracy against the prompt in the
client's data, reported beside chance (1 / number of candidate prompts).
"""
from __future__ import annotations

import numpy as np
import torch

SUCCESS_SSIM = 0.6  # stated threshold: the reconstruction shows the private image's content


def _hwc01(x: torch.Tensor, from_signed: bool) -> np.ndarray:
    x = x.detach().float()
    if from_signed:
        x = (x + 1) / 2
    return x.clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy().astype(np.float64)


def ssim_per_image(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    from skimage.metrics import structural_similarity

    win = min(7, a.shape[1], a.shape[2])
    win -= 1 - win % 2
    return np.array([structural_similarity(x, y, channel_axis=-1, data_range=1.0, win_size=win)
                     for x, y in zip(a, b)])


def image_scores(recon: torch.Tensor, private: torch.Tensor, signed: bool) -> dict:
    """MSE / PSNR / SSIM of ``recon`` against ``private`` (both in [-1, 1] if ``signed`` else [0, 1])."""
    a, b = _hwc01(recon, signed), _hwc01(private, signed)
    mse = ((a - b) ** 2).mean(axis=(1, 2, 3))
    psnr = 10 * np.log10(1.0 / np.maximum(mse, 1e-12))
    ssim = ssim_per_image(a, b)
    return {"n": int(len(a)), "mse": float(mse.mean()), "psnr": float(psnr.mean()), "ssim": float(ssim.mean()),
            "ssim_median": float(np.median(ssim)), "ssim_best": float(ssim.max()),
            "success_rate": float((ssim >= SUCCESS_SSIM).mean()), "success_ssim": SUCCESS_SSIM}


def prompt_scores(guesses: list[str], truth: list[str], candidates: list[str]) -> dict:
    """Accuracy of prompt guesses, against ``chance``: the better of a uniform guess among the
    candidates and the best constant guess (prompt dropout makes "" the most common prompt)."""
    from collections import Counter

    acc = float(np.mean([g == t for g, t in zip(guesses, truth)])) if truth else 0.0
    uniform = 1.0 / max(1, len(set(candidates)))
    majority = Counter(truth).most_common(1)[0][1] / len(truth) if truth else 0.0
    return {"n": len(truth), "accuracy": acc, "chance": max(uniform, majority), "uniform_chance": uniform}


def blind_scores(cfg, n: int = 64) -> dict:
    """What a server guesses without any transcript: the better (by mean SSIM) of the mean auxiliary
    image and mid-grey for images, of the mean auxiliary hint and an all-black hint for hints, scored
    against the first ``n`` private training samples. Attack scores mean something only above these."""
    from sim.compare import client_datasets
    from sim.models import get_preset

    from .base import aux_data

    size = get_preset(cfg.model).image_size
    clients, _ = client_datasets(cfg, size)
    target = torch.cat([c.target for c in clients])[:n]
    hint = torch.cat([c.condition for c in clients])[:n]
    aux = aux_data(cfg, size, 256)
    out = {}
    for key, private, guesses, signed in (
            ("image", target, (aux["target"].mean(0), torch.zeros_like(target[0])), True),
            ("hint", hint, (aux["condition"].mean(0), torch.zeros_like(hint[0])), False)):
        out[key] = max((image_scores(g.expand_as(private), private, signed) for g in guesses), key=lambda s: s["ssim"])
    return out

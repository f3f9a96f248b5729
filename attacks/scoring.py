"""Scores of a reconstruction against a reference: MSE, PSNR, SSIM, success rate, prompt accuracy.

Pure functions of two sets of images (or prompts). The engine's scorer calls them with
the private data after an attack returns (:mod:`sim.engine.scoring`); an attack may call
them on public data only (e.g. FSHA's decoder on held-out auxiliary images).

Images are compared in [0, 1] (targets are mapped from [-1, 1]); SSIM is skimage's
``structural_similarity`` per image (channel axis last, data_range 1, 7x7 window, or
smaller for tiny images), averaged. A reconstruction "succeeds" when its SSIM reaches
:data:`SUCCESS_SSIM`. Prompt recovery is exact-string accuracy against the prompt in the
client's data, reported beside chance (1 / number of candidate prompts).
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import torch
from skimage.metrics import structural_similarity

SUCCESS_SSIM = 0.6  # stated threshold: the reconstruction shows the private image's content


def _hwc01(x: torch.Tensor, from_signed: bool) -> np.ndarray:
    x = x.detach().float()
    if from_signed:
        x = (x + 1) / 2
    return x.clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy().astype(np.float64)


def ssim_per_image(a: np.ndarray, b: np.ndarray) -> np.ndarray:
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
            "ssim_se": float(ssim.std(ddof=1) / np.sqrt(len(ssim))) if len(ssim) > 1 else 0.0,
            "ssim_median": float(np.median(ssim)), "ssim_best": float(ssim.max()),
            "success_rate": float((ssim >= SUCCESS_SSIM).mean()), "success_ssim": SUCCESS_SSIM}


def prompt_scores(guesses: list[str], truth: list[str], candidates: list[str]) -> dict:
    """Accuracy of prompt guesses, against ``chance``: the better of a uniform guess among the
    candidates and the best constant guess (prompt dropout makes "" the most common prompt)."""
    acc = float(np.mean([g == t for g, t in zip(guesses, truth)])) if truth else 0.0
    uniform = 1.0 / max(1, len(set(candidates)))
    majority = Counter(truth).most_common(1)[0][1] / len(truth) if truth else 0.0
    return {"n": len(truth), "accuracy": acc, "chance": max(uniform, majority), "uniform_chance": uniform}

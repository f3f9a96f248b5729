"""Metrics for any paired data: condition fidelity by the condition's kind, and PSNR / SSIM against targets.

Condition fidelity re-extracts the condition from each generated image and compares it with
the input condition; how depends on what the condition is (its *kind*):

``outline``
    thin white outlines on black (Fill50K's circles, scribbles): Canny edges of the image vs
    the outline, by :func:`sim.core.fidelity.edge_ssim` and :func:`sim.core.fidelity.edge_f1`
    with a 1-pixel tolerance (a filled shape's Canny edge lies half a pixel off its outline).
``canny``
    Canny edge maps (the faces' conditions, train_controlnet.py's canny datasets): the same
    two scores, F1 with no tolerance (dense edges of another image already match within 1 px).
``none``
    anything else (depth, pose, segmentation maps): no re-extractor here, no fidelity score.

Conditions are binarised per image at half their brightest grey level, so a thin outline
that resizing made grey still counts (for 0/255 maps this is the usual > 127 threshold).

:func:`target_similarity` gives PSNR and SSIM of each generated image against its target
(uint8 RGB, data range 255): how close the sample is to the one real image of that
condition, a weak but data-agnostic score (a ControlNet should match layout, not texture).
"""
from __future__ import annotations

import numpy as np
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from sim.core.fidelity import edge_f1, edge_ssim

EDGE_TOLERANCE = {"outline": 1, "canny": 0}
PSNR_CAP = 100.0  # dB, for an image identical to its target (PSNR is infinite there)


def _grey_and_peak(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Grey levels (N, H, W) and each image's brightest level, shaped (N, 1, 1) to broadcast."""
    grey = np.asarray(images, dtype=np.float64).mean(axis=-1)
    return grey, grey.reshape(len(grey), -1).max(axis=1)[:, None, None]


def binarize_conditions(conditions_uint8: np.ndarray) -> np.ndarray:
    """White-on-black uint8 (N, H, W, 3): a pixel is lit where its grey level exceeds half the image's brightest."""
    grey, peak = _grey_and_peak(conditions_uint8)
    lit = (grey > peak / 2) & (peak > 0)
    return np.repeat((lit * 255).astype(np.uint8)[..., None], 3, axis=-1)


def infer_condition_kind(conditions_uint8: np.ndarray | None) -> str:
    """``"canny"`` when the conditions look like edge maps, else ``"none"``.

    Edge-like: grey (channels equal within 8 levels), at least 60% of the pixels black (within
    10% of the image's brightest level from 0; a resized thin outline leaves grey pixels around
    it) and at most 30% lit (above half the brightest). A heuristic: give ``condition-kind``
    to say what the conditions are."""
    if conditions_uint8 is None or len(conditions_uint8) == 0:
        return "none"
    c = np.asarray(conditions_uint8, dtype=np.float64)
    if np.abs(c - c.mean(axis=-1, keepdims=True)).max() > 8:
        return "none"
    grey, peak = _grey_and_peak(c)
    if (peak <= 0).all():
        return "none"
    dark = grey <= 0.1 * peak
    lit = grey > peak / 2
    return "canny" if dark.mean() >= 0.6 and lit.mean() <= 0.3 else "none"


def condition_fidelity(images_uint8: np.ndarray, conditions_uint8: np.ndarray, kind: str) -> dict[str, float]:
    """``edge_ssim`` and ``edge_f1`` of the images against their conditions for an ``outline`` or
    ``canny`` kind (see the module doc); ``{}`` for ``none``."""
    if kind == "none":
        return {}
    if kind not in EDGE_TOLERANCE:
        raise ValueError(f"condition kind must be one of {['none', *EDGE_TOLERANCE]}, got {kind!r}")
    cond = binarize_conditions(conditions_uint8)
    return {"edge_ssim": float(edge_ssim(images_uint8, cond)),
            "edge_f1": float(edge_f1(images_uint8, cond, tolerance=EDGE_TOLERANCE[kind]))}


def target_similarity_per_image(images_uint8: np.ndarray, targets_uint8: np.ndarray) -> dict[str, np.ndarray]:
    """Per image: ``psnr`` (dB, capped at :data:`PSNR_CAP`) and ``ssim`` against its target, float64 (N,) each.

    Both uint8 (N, H, W, 3) of equal shape; SSIM over the RGB channels with 7x7 windows (the
    largest odd size that fits for images below 7 px)."""
    images, targets = np.asarray(images_uint8), np.asarray(targets_uint8)
    if images.shape != targets.shape:
        raise ValueError(f"images and targets differ in shape: {images.shape} vs {targets.shape}")
    side = min(images.shape[1:3])
    win = min(7, side if side % 2 else side - 1)
    psnr, ssim = [], []
    for img, tgt in zip(images, targets):
        if np.array_equal(img, tgt):
            psnr.append(PSNR_CAP)
        else:
            psnr.append(min(PSNR_CAP, float(peak_signal_noise_ratio(tgt, img, data_range=255))))
        ssim.append(float(structural_similarity(tgt, img, data_range=255, channel_axis=-1, win_size=win)))
    return {"psnr": np.array(psnr), "ssim": np.array(ssim)}


def target_similarity(images_uint8: np.ndarray, targets_uint8: np.ndarray) -> dict[str, float]:
    """Mean ``psnr`` and ``ssim`` of each image against its target (:func:`target_similarity_per_image`)."""
    return {k: float(v.mean()) for k, v in target_similarity_per_image(images_uint8, targets_uint8).items()}

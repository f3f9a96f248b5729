"""Task metrics on generated Fill50K-style images.

Two exact measures of whether a generated image obeys its prompt and its
condition, needing no pretrained network:

- prompt-colour accuracy (:func:`colour_accuracy`): are the circle and the
  background the colours the prompt names?
- outline IoU (:func:`outline_iou`): does the generated circle cover the disc
  drawn by the condition's outline?

Both snap every pixel to the nearest colour of the palette
:data:`sim.core.data.COLOURS` and read the background off the image border, so they
work wherever the model put its circle.

Images may be given as uint8 arrays (H, W, 3) / (N, H, W, 3), or as float
arrays or torch tensors (3, H, W) / (N, 3, H, W) in [-1, 1] (the diffusion
model's output range). Conditions may be given as uint8 arrays (H, W, 3) /
(N, H, W, 3), or as float arrays or tensors (3, H, W) / (N, 3, H, W) in
[0, 1] (what :func:`sim.core.data.to_tensors` makes).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy import ndimage

from sim.core.data import COLOURS
from sim.core.stats import standard_error

PALETTE = np.array(list(COLOURS.values()), dtype=np.float64)  # (8, 3), rows in COLOURS order
COLOUR_NAMES = list(COLOURS)
BORDER_WIDTH = 2  # pixels of the outer ring that define the background
MIN_FOREGROUND_FRACTION = 0.02  # fewer foreground pixels than this: no circle


# ---------------------------------------------------------------------------
# Input conversion
# ---------------------------------------------------------------------------


def _as_numpy(x) -> np.ndarray:
    """A torch tensor or array-like as a numpy array (no copy when possible)."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _to_uint8_hwc(img) -> np.ndarray:
    """One image or a batch as uint8, channels last.

    uint8 input must already be (..., H, W, 3). Float input must be
    (..., 3, H, W) in [-1, 1]; it maps to ``round((x + 1) * 127.5)``.
    """
    arr = _as_numpy(img)
    if arr.dtype == np.uint8:
        if arr.ndim not in (3, 4) or arr.shape[-1] != 3:
            raise ValueError(f"img: uint8 images must be (H, W, 3) or (N, H, W, 3), got shape {arr.shape}")
        return arr
    if arr.ndim not in (3, 4) or arr.shape[-3] != 3:
        raise ValueError(f"img: float images must be (3, H, W) or (N, 3, H, W) in [-1, 1], got shape {arr.shape}")
    arr = np.round((np.clip(arr.astype(np.float64), -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)
    return np.moveaxis(arr, -3, -1)


def _condition_to_bool(condition) -> np.ndarray:
    """Where a condition is lit in any channel: (..., H, W) bool.

    uint8 (..., H, W, 3): value > 127. Float (..., 3, H, W) in [0, 1]: value > 0.5.
    """
    arr = _as_numpy(condition)
    if arr.dtype == np.uint8:
        if arr.ndim not in (3, 4) or arr.shape[-1] != 3:
            raise ValueError(f"condition: uint8 must be (H, W, 3) or (N, H, W, 3), got shape {arr.shape}")
        return (arr > 127).any(axis=-1)
    if arr.ndim not in (3, 4) or arr.shape[-3] != 3:
        raise ValueError(f"condition: float must be (3, H, W) or (N, 3, H, W) in [0, 1], got shape {arr.shape}")
    return (arr > 0.5).any(axis=-3)


def _batch(images, name: str) -> np.ndarray:
    """A batch of images as uint8 (N, H, W, 3); a list of single images is stacked."""
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError(f"{name} must hold at least one image, got an empty {type(images).__name__}")
        images = np.stack([_to_uint8_hwc(img) for img in images])
    arr = _to_uint8_hwc(images)
    if arr.ndim != 4 or len(arr) == 0:
        raise ValueError(f"{name} must be a non-empty batch of images, got shape {arr.shape}")
    return arr


# ---------------------------------------------------------------------------
# Colours
# ---------------------------------------------------------------------------


def nearest_colour_map(img) -> np.ndarray:
    """Index into :data:`sim.core.data.COLOURS` of each pixel's nearest colour (Euclidean RGB).

    Returns an int64 (H, W) array (or (N, H, W) for a batch); ties go to the
    colour listed first.
    """
    rgb = _to_uint8_hwc(img).astype(np.float64)
    distances = ((rgb[..., None, :] - PALETTE) ** 2).sum(axis=-1)  # (..., H, W, 8)
    return distances.argmin(axis=-1)


def _border(labels: np.ndarray) -> np.ndarray:
    """The labels of the outer ring of an (H, W) map, flattened."""
    width = min(BORDER_WIDTH, max(1, min(labels.shape) // 16))
    ring = np.ones(labels.shape, dtype=bool)
    ring[width:-width, width:-width] = False
    return labels[ring]


def _most_frequent(labels: np.ndarray) -> int:
    """The most frequent palette index (the lowest one on ties)."""
    return int(np.bincount(labels.ravel(), minlength=len(PALETTE)).argmax())


def _background_index(labels: np.ndarray) -> int:
    """Palette index of the background: the most frequent colour on the border."""
    return _most_frequent(_border(labels))


def measure_colours(img) -> tuple[str | None, str]:
    """Measure the circle and background colours of one image.

    The background is the most frequent palette colour on the outer ring
    (2 px at 32x32); the foreground is the most frequent palette colour among
    the other pixels, or None when they are fewer than 2% of the image.

    Returns
    -------
    (fg, bg) : (str or None, str)
        Colour names, keys of :data:`sim.core.data.COLOURS`.
    """
    labels = nearest_colour_map(img)
    if labels.ndim != 2:
        raise ValueError(f"img must be a single image, got a batch of shape {labels.shape}")
    bg = _background_index(labels)
    others = labels[labels != bg]
    if others.size < MIN_FOREGROUND_FRACTION * labels.size:
        return None, COLOUR_NAMES[bg]
    return COLOUR_NAMES[_most_frequent(others)], COLOUR_NAMES[bg]


def colour_accuracy(images, fgs: Sequence[str], bgs: Sequence[str]) -> dict[str, float]:
    """Fraction of images whose measured colours match the prompted ones.

    Parameters
    ----------
    images : (N, H, W, 3) uint8, or (N, 3, H, W) float in [-1, 1]
        Generated images.
    fgs, bgs : sequences of N colour names
        The circle and background colours each prompt asked for.

    Returns
    -------
    dict
        ``fg_colour_acc`` (circle right), ``bg_colour_acc`` (background right)
        and ``colour_acc`` (both right), each a float in [0, 1], and ``colour_acc_se``
        (the standard error of ``colour_acc`` over the images).
    """
    fg_ok, bg_ok = colours_right(images, fgs, bgs)
    both = fg_ok & bg_ok
    return {
        "fg_colour_acc": float(fg_ok.mean()),
        "bg_colour_acc": float(bg_ok.mean()),
        "colour_acc": float(both.mean()),
        "colour_acc_se": standard_error(both),
    }


def colours_right(images, fgs: Sequence[str], bgs: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Per image: (circle colour right, background colour right), two boolean arrays."""
    batch = _batch(images, "images")
    for arg, names in (("fgs", fgs), ("bgs", bgs)):
        if len(names) != len(batch):
            raise ValueError(f"{arg} must have one colour per image ({len(batch)}), got {len(names)}")
    measured = [measure_colours(img) for img in batch]
    return (np.array([m[0] == fg for m, fg in zip(measured, fgs)], dtype=bool),
            np.array([m[1] == bg for m, bg in zip(measured, bgs)], dtype=bool))


# ---------------------------------------------------------------------------
# Outline overlap
# ---------------------------------------------------------------------------


def disc_from_condition(condition) -> np.ndarray:
    """The disc enclosed by a condition's outline: (H, W) bool.

    The outline is every pixel lit in any channel; filling its holes gives
    the outline plus everything it encloses.
    """
    outline = _condition_to_bool(condition)
    if outline.ndim != 2:
        raise ValueError(f"condition must be a single image, got a batch of shape {outline.shape}")
    return ndimage.binary_fill_holes(outline)


def foreground_mask(img) -> np.ndarray:
    """Pixels whose palette colour differs from the measured background: (H, W) bool."""
    labels = nearest_colour_map(img)
    if labels.ndim != 2:
        raise ValueError(f"img must be a single image, got a batch of shape {labels.shape}")
    return labels != _background_index(labels)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks (1.0 when both are empty)."""
    union = np.logical_or(a, b).sum()
    if union == 0:
        return 1.0
    return float(np.logical_and(a, b).sum() / union)


def outline_iou_per_image(images, conditions) -> np.ndarray:
    """IoU of each generated foreground with its condition's disc: float64 (N,)."""
    batch = _batch(images, "images")
    conds = _condition_to_bool(conditions)
    if conds.ndim != 3 or len(conds) != len(batch):
        raise ValueError(
            f"conditions must be a batch of {len(batch)} conditions, one per image, got shape {conds.shape}"
        )
    discs = [ndimage.binary_fill_holes(c) for c in conds]
    return np.array([iou(foreground_mask(img), disc) for img, disc in zip(batch, discs)], dtype=np.float64)


def outline_iou(images, conditions) -> float:
    """Mean IoU between generated foregrounds and their conditions' discs.

    Parameters
    ----------
    images : (N, H, W, 3) uint8, or (N, 3, H, W) float in [-1, 1]
        Generated images.
    conditions : (N, H, W, 3) uint8, or (N, 3, H, W) float in [0, 1]
        The outlines the images were generated from.

    Returns
    -------
    float
        1.0 when every circle fills exactly its outline's disc; 0.0 when no
        generated foreground pixel falls inside it.
    """
    return float(outline_iou_per_image(images, conditions).mean())

"""Image-quality and condition-fidelity metrics that run offline.

Distribution metrics on the project's own feature network
---------------------------------------------------------
Papers report FID / KID on Inception-v3 features. No Inception weights can be
downloaded on this project's machines, so :func:`fid_project` and
:func:`kid_project` compute the same statistics on the features of
:mod:`sim.core.feature_net`, a small CNN the project trained on its own 32x32 data.
Call them "FID (project features)" / "KID (project features)"
(:data:`FID_PROJECT_LABEL`, :data:`KID_PROJECT_LABEL`), never plain "FID":
their values are not comparable with Inception FID, nor across versions of the
feature network. They measure how far the generated images are from real ones in
what that network learned to see (circle colours, position, size; circle vs
face), not perceptual quality in general. :func:`standard_fid` gives Inception
FID ("FID (Inception)") and :func:`clip_score` the CLIP score only when the user
supplies local Inception / CLIP weights.

Condition fidelity
------------------
:func:`edge_ssim`, as in the paper: re-extract the condition from each generated
image with Canny edges and compare it with the condition's edge map by SSIM.
:func:`edge_f1` is a tolerance-based alternative that an empty edge map cannot
game (see the caveats of :func:`edge_ssim`).

Inputs
------
Images: uint8 (N, H, W, 3), or float arrays / tensors (N, 3, H, W) in [-1, 1]
(the diffusion model's output range). Conditions: uint8 (N, H, W, 3) (white on
black), or float (N, 3, H, W) in [0, 1] (what :func:`sim.core.data.to_tensors` makes).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from scipy import linalg, ndimage
from skimage.color import rgb2gray
from skimage.feature import canny
from skimage.metrics import structural_similarity
from transformers import AutoTokenizer, CLIPModel

from sim.core.data import make_fill50k
from sim.core.feature_net import load_feature_net, uint8_to_input
from sim.core.metrics import _batch, _condition_to_bool

FID_PROJECT_LABEL = "FID (project features)"
KID_PROJECT_LABEL = "KID (project features)"

#: Canny settings for 32x32 images (see :func:`edge_ssim`).
CANNY_SIGMA = 1.0
CANNY_LOW = 0.05
CANNY_HIGH = 0.1
SSIM_WIN = 7


# ---------------------------------------------------------------------------
# Features
# ---------------------------------------------------------------------------


@torch.no_grad()
def project_features(images, net=None, batch_size: int = 256) -> np.ndarray:
    """Embeddings of images by the project's feature network: float64 (N, D).

    Parameters
    ----------
    images : (N, H, W, 3) uint8, or (N, 3, H, W) float in [-1, 1]
        Images of any size (resized to 32x32, bilinear with antialiasing).
    net : sim.core.feature_net.FeatureNet, optional
        Default: the committed weights (:func:`sim.core.feature_net.load_feature_net`).
    """
    net = load_feature_net() if net is None else net
    x = uint8_to_input(_batch(images, "images"))
    was_training = net.training
    net.eval()
    try:
        feats = [net.features(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]
    finally:
        net.train(was_training)
    return torch.cat(feats).double().numpy()


def _features_of(images, net, name: str) -> np.ndarray:
    feats = project_features(images, net)
    if len(feats) < 2:
        raise ValueError(f"{name} must hold at least 2 images, got {len(feats)}")
    return feats


# ---------------------------------------------------------------------------
# Frechet distance
# ---------------------------------------------------------------------------


def _psd_sqrt(cov: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix (negative eigenvalues clipped)."""
    w, v = np.linalg.eigh((cov + cov.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     method: str = "eigh") -> float:
    """Frechet distance between the Gaussians N(mu1, sigma1) and N(mu2, sigma2).

    ``|mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2))``.

    Parameters
    ----------
    method : {"eigh", "sqrtm"}
        ``"eigh"`` (default, stable): ``tr((s1 s2)^(1/2))`` as the sum of the
        square roots of the eigenvalues of the symmetric PSD matrix
        ``s1^(1/2) s2 s1^(1/2)`` (same spectrum as ``s1 s2``), negative round-off
        clipped to 0; exact also for the singular covariances of few samples.
        ``"sqrtm"``: :func:`scipy.linalg.sqrtm` of ``s1 s2`` as in pytorch-fid
        (with its 1e-6 diagonal offset when the result is not finite; imaginary
        parts dropped).

    Returns
    -------
    float
        >= 0 (tiny negative round-off is clipped to 0).
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"shape mismatch: mu {mu1.shape} / {mu2.shape}, sigma {s1.shape} / {s2.shape}")
    if method == "eigh":
        r1 = _psd_sqrt(s1)
        m = r1 @ s2 @ r1
        eig = np.linalg.eigvalsh((m + m.T) / 2)
        tr_covmean = float(np.sqrt(np.clip(eig, 0, None)).sum())
    elif method == "sqrtm":
        covmean = linalg.sqrtm(s1 @ s2)
        if not np.isfinite(covmean).all():
            offset = np.eye(len(s1)) * 1e-6
            covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
        tr_covmean = float(np.real(np.trace(covmean)))
    else:
        raise ValueError(f"method must be 'eigh' or 'sqrtm', got {method!r}")
    diff = mu1 - mu2
    return max(0.0, float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean))


def fid_from_features(feats1: np.ndarray, feats2: np.ndarray, method: str = "eigh") -> float:
    """Frechet distance between the Gaussian fits (mean, unbiased covariance) of two feature sets."""
    f1, f2 = np.asarray(feats1, np.float64), np.asarray(feats2, np.float64)
    if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1] or min(len(f1), len(f2)) < 2:
        raise ValueError(f"need two (N >= 2, D) feature arrays of the same D, got {f1.shape} and {f2.shape}")
    return frechet_distance(f1.mean(0), np.cov(f1, rowvar=False), f2.mean(0), np.cov(f2, rowvar=False), method)


def fid_project(real_uint8, fake_uint8, net=None) -> float:
    """FID (project features): Frechet distance of real and generated images on the project's feature net.

    Fits a Gaussian (mean, covariance) to the :data:`sim.core.feature_net.FEATURE_DIM`-
    dimensional features of each set and returns the Frechet distance between the
    two (lower is better, 0 for identical sets). The features are standardised
    (unit std per dimension on clean training images), so the value is in
    squared training standard deviations summed over the 128 dimensions.

    Parameters
    ----------
    real_uint8, fake_uint8 : (N, H, W, 3) uint8, or (N, 3, H, W) float in [-1, 1]
        At least 2 images each; the two sets may differ in size.
    net : sim.core.feature_net.FeatureNet, optional
        Default: the committed feature network.

    Returns
    -------
    float

    Notes
    -----
    - Not Inception FID: the values are on another scale and only comparable
      between runs that use the same feature-network weights. Report it as
      "FID (project features)".
    - Few samples inflate FID: the estimate is biased upward roughly like
      ``1/N``. With N below the feature dimension (128) the covariances are
      singular; the eigen-based distance still works, but two disjoint sets of
      32 real images score far above 0 (see ``sim/assets/feature-net/MODEL_CARD.md``
      for reference values). Compare only FIDs computed with the same N, and
      report the real-vs-real value at that N next to them.
    - What it sees is what the feature net was trained to tell apart: circle and
      background colours, circle position and size, circle or face, and whether
      an image was blurred, noised or had its colours shifted off the palette
      (:mod:`sim.core.feature_net`). It responds strongly to those (64 vs 64 images:
      real 28, blur sigma 1 102, noise std 10/255 100, washed-out colours 383),
      weakly to other defects (2x pixelation: 28), and is a weak judge of face
      quality (it saw 80 faces, which also appear among the project's client data).
    """
    return fid_from_features(_features_of(real_uint8, net, "real_uint8"),
                             _features_of(fake_uint8, net, "fake_uint8"))


# ---------------------------------------------------------------------------
# Kernel distance
# ---------------------------------------------------------------------------


def _poly_mmd2_unbiased(x: np.ndarray, y: np.ndarray, degree: int, gamma: float, coef: float) -> float:
    m = len(x)
    kxx = (gamma * x @ x.T + coef) ** degree
    kyy = (gamma * y @ y.T + coef) ** degree
    kxy = (gamma * x @ y.T + coef) ** degree
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
                 - 2 * kxy.sum() / (m * m))


def kid_from_features(feats1: np.ndarray, feats2: np.ndarray, subsets: int = 100, subset_size: int | None = None,
                      degree: int = 3, gamma: float | None = None, coef: float = 1.0,
                      seed: int = 0) -> tuple[float, float]:
    """Unbiased polynomial-kernel MMD^2 averaged over random subsets: (mean, std) over subsets.

    ``subset_size`` None: ``min(1000, N // 2)`` with ``N`` the smaller set (at
    least 2); a given size is capped at ``N``.
    """
    f1, f2 = np.asarray(feats1, np.float64), np.asarray(feats2, np.float64)
    if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1] or min(len(f1), len(f2)) < 2:
        raise ValueError(f"need two (N >= 2, D) feature arrays of the same D, got {f1.shape} and {f2.shape}")
    if subsets < 1:
        raise ValueError(f"subsets must be >= 1, got {subsets}")
    n_min = min(len(f1), len(f2))
    m = max(2, min(1000, n_min // 2)) if subset_size is None else min(subset_size, n_min)
    if m < 2:
        raise ValueError(f"subset_size must be >= 2, got {subset_size}")
    gamma = 1.0 / f1.shape[1] if gamma is None else gamma
    rng = np.random.default_rng(seed)
    vals = np.array([
        _poly_mmd2_unbiased(f1[rng.choice(len(f1), m, replace=False)], f2[rng.choice(len(f2), m, replace=False)],
                            degree, gamma, coef)
        for _ in range(subsets)
    ])
    return float(vals.mean()), float(vals.std())


def kid_project(real_uint8, fake_uint8, net=None, subsets: int = 100, subset_size: int | None = None,
                degree: int = 3, gamma: float | None = None, coef: float = 1.0,
                seed: int = 0) -> tuple[float, float]:
    """KID (project features): kernel distance of real and generated images on the project's feature net.

    The squared maximum mean discrepancy between the two feature distributions
    under the polynomial kernel ``k(x, y) = (gamma x.y + coef)^degree``
    (default ``(x.y / D + 1)^3`` as in Binkowski et al. 2018), estimated without
    bias on ``subsets`` random subsets of ``subset_size`` images from each set
    (default ``min(1000, N // 2)``, ``N`` the smaller set; capped at ``N``).

    Parameters
    ----------
    real_uint8, fake_uint8 : (N, H, W, 3) uint8, or (N, 3, H, W) float in [-1, 1]
        At least 2 images each.
    net : sim.core.feature_net.FeatureNet, optional
        Default: the committed feature network.
    subsets, subset_size, degree, gamma, coef, seed
        Estimator settings; ``seed`` draws the subsets.

    Returns
    -------
    (mean, std) : (float, float)
        Mean and standard deviation of the MMD^2 estimates over the subsets.
        The estimator is unbiased, so the mean can be slightly negative when the
        two sets come from the same distribution; around 0 means "same
        distribution", whatever N.

    Notes
    -----
    Unlike FID, KID has no small-N bias, but its variance grows as N falls.
    The subsets are drawn from the same N images, so ``std`` describes the
    spread over subsets, not the uncertainty of the estimate (it understates
    it, and is 0 when the subsets are the whole sets). Values are on the project feature network's scale, not
    Inception's: report it as "KID (project features)".
    """
    return kid_from_features(_features_of(real_uint8, net, "real_uint8"),
                             _features_of(fake_uint8, net, "fake_uint8"),
                             subsets=subsets, subset_size=subset_size, degree=degree, gamma=gamma,
                             coef=coef, seed=seed)


# ---------------------------------------------------------------------------
# Condition fidelity: Canny edges
# ---------------------------------------------------------------------------


def canny_edges(images, sigma: float = CANNY_SIGMA, low_threshold: float | None = CANNY_LOW,
                high_threshold: float | None = CANNY_HIGH) -> np.ndarray:
    """Canny edge maps of images: bool (N, H, W).

    :func:`skimage.feature.canny` on the grey image (:func:`skimage.color.rgb2gray`
    of the RGB values / 255). Thresholds are in skimage's units (gradient
    magnitude of the [0, 1] grey image after Gaussian smoothing); ``None`` uses
    skimage's defaults (0.1, 0.2), which are what :func:`sim.core.data.make_faces`
    used to make the faces' conditions.
    """
    batch = _batch(images, "images")
    return np.stack([canny(rgb2gray(img.astype(np.float64) / 255.0), sigma=sigma,
                           low_threshold=low_threshold, high_threshold=high_threshold) for img in batch])


def _condition_edges(conditions, n: int) -> np.ndarray:
    edges = _condition_to_bool(conditions)
    if edges.ndim != 3 or len(edges) != n:
        raise ValueError(f"conditions must be a batch of {n} conditions, one per image, got shape {edges.shape}")
    return edges


def edge_ssim_per_image(images_uint8, conditions_uint8, sigma: float = CANNY_SIGMA,
                        low_threshold: float | None = CANNY_LOW, high_threshold: float | None = CANNY_HIGH,
                        win_size: int = SSIM_WIN) -> np.ndarray:
    """SSIM between each image's Canny edge map and its condition's edge map: float64 (N,)."""
    edges = canny_edges(images_uint8, sigma, low_threshold, high_threshold)
    cond = _condition_edges(conditions_uint8, len(edges))
    if edges.shape != cond.shape:
        raise ValueError(f"images and conditions differ in size: {edges.shape[1:]} vs {cond.shape[1:]}")
    return np.array([structural_similarity(e.astype(np.float64), c.astype(np.float64), data_range=1.0,
                                           win_size=win_size) for e, c in zip(edges, cond)])


def edge_ssim(images_uint8, conditions_uint8, sigma: float = CANNY_SIGMA,
              low_threshold: float | None = CANNY_LOW, high_threshold: float | None = CANNY_HIGH,
              win_size: int = SSIM_WIN) -> float:
    """Condition fidelity: SSIM between re-extracted Canny edges and the condition's edges (mean over images).

    Each generated image goes to grey, :func:`skimage.feature.canny` (``sigma``,
    thresholds) gives its binary edge map; the condition's edge map is every
    pixel lit in any channel (uint8 > 127; float > 0.5): the circle outline for
    Fill50K, the Canny edges for faces. The two binary maps are compared by
    :func:`skimage.metrics.structural_similarity` (``data_range=1``, uniform
    ``win_size`` x ``win_size`` windows, 7 for 32x32 images). Higher is better.

    Parameters
    ----------
    images_uint8 : (N, H, W, 3) uint8, or (N, 3, H, W) float in [-1, 1]
        Generated images.
    conditions_uint8 : (N, H, W, 3) uint8, or (N, 3, H, W) float in [0, 1]
        The conditions they were generated from, same H, W.
    sigma : float, default 1.0
        Canny's Gaussian smoothing, for 32x32 images (the faces' conditions use 1.0).
    low_threshold, high_threshold : float or None, default 0.05, 0.1
        Canny hysteresis thresholds. The defaults are half skimage's: with
        skimage's (None, None), the 8 of 56 Fill50K colour pairs whose grey
        levels differ by only 0.07 (red/magenta, blue/black, green/cyan,
        yellow/white) give no edges at all. For faces, (None, None) reproduces
        the condition extractor exactly.
    win_size : int, default 7

    Returns
    -------
    float
        Mean SSIM over images, in [-1, 1].

    Notes
    -----
    Not 1 on real data, and not 0 for an image without edges. Reference values
    at 32x32 (300 Fill50K samples, max_radius 0.25; the 100 faces):

    ========================================  =========  ==========================
    images scored against the conditions      Fill50K    faces
    ========================================  =========  ==========================
    the real targets                          0.85       0.95 (0.99, skimage thr.)
    real targets, Gaussian blur sigma 1.5     0.89       --
    a flat image (no edges at all)            0.57       --
    real targets of other conditions          0.38       0.05
    uniform random noise                      0.00       --
    ========================================  =========  ==========================

    Canny puts a filled circle's edge about half a pixel off the condition's
    one-pixel outline, hence < 1 on real data (and blur can move it closer).
    SSIM of sparse binary maps is dominated by the empty windows, which match
    whenever both maps are empty there: an image with no edges scores 0.57 on
    Fill50K, above a well-formed circle in the wrong place. Read it against
    those reference values, and next to :func:`edge_f1` or
    :func:`sim.core.metrics.outline_iou`.
    """
    return float(edge_ssim_per_image(images_uint8, conditions_uint8, sigma, low_threshold, high_threshold,
                                     win_size).mean())


def edge_f1(images_uint8, conditions_uint8, tolerance: int = 1, sigma: float = CANNY_SIGMA,
            low_threshold: float | None = CANNY_LOW, high_threshold: float | None = CANNY_HIGH) -> float:
    """Condition fidelity: F1 of re-extracted Canny edges against the condition's edges, with a pixel tolerance.

    Precision: the fraction of the image's edge pixels within ``tolerance`` pixels
    (chessboard distance) of a condition edge pixel; recall: the fraction of
    condition edge pixels within ``tolerance`` of an image edge pixel; F1 their
    harmonic mean, per image (0 when either map is empty and the other is not,
    1 when both are empty), then averaged. Unlike :func:`edge_ssim`, an image
    without edges scores 0. Edges as in :func:`edge_ssim`.

    ``tolerance=1`` (default) absorbs the half-pixel offset between a filled
    circle's Canny edge and its condition outline; it suits sparse edges like
    Fill50K's. For the dense edge maps of 32x32 faces use ``tolerance=0``: at 1,
    the edges of a *different* face already score 0.79.

    Reference values at 32x32 (same sets as :func:`edge_ssim`): Fill50K,
    tolerance 1: real targets 1.00, other conditions' targets 0.28, uniform
    noise 0.25, flat images 0.00. Faces, tolerance 0: real 0.97, other faces 0.27.
    """
    edges = canny_edges(images_uint8, sigma, low_threshold, high_threshold)
    cond = _condition_edges(conditions_uint8, len(edges))
    if edges.shape != cond.shape:
        raise ValueError(f"images and conditions differ in size: {edges.shape[1:]} vs {cond.shape[1:]}")
    square = np.ones((2 * tolerance + 1, 2 * tolerance + 1), dtype=bool)
    scores = []
    for e, c in zip(edges, cond):
        if not e.any() or not c.any():
            scores.append(float(not e.any() and not c.any()))
            continue
        precision = (e & ndimage.binary_dilation(c, square)).sum() / e.sum()
        recall = (c & ndimage.binary_dilation(e, square)).sum() / c.sum()
        scores.append(0.0 if precision + recall == 0 else float(2 * precision * recall / (precision + recall)))
    return float(np.mean(scores))


# ---------------------------------------------------------------------------
# Inception FID, only with user-supplied weights
# ---------------------------------------------------------------------------


def standard_fid(real_uint8, fake_uint8, inception_path: str | Path | None = None,
                 batch_size: int = 64) -> float:
    """Inception FID, only from a local TorchScript Inception-v3 file the user supplies.

    No Inception weights ship with this project or any package it installs, and
    nothing is downloaded: without ``inception_path`` this raises. The file must
    be a TorchScript detector called as ``detector(x, return_features=True)`` on
    uint8-valued (N, 3, H, W) tensors and returning (N, 2048) pool features, like
    NVIDIA's ``inception-2015-12-05.pt`` of the StyleGAN2-ADA / StyleGAN3 metrics
    (it resizes to 299x299 itself).

    Caveat: at 32x32 the images are upsampled ~9x before Inception; the values
    are not comparable with FIDs of 512x512 images in papers.

    Raises
    ------
    FileNotFoundError
        When no path is given or the file does not exist.
    """
    if inception_path is None or not Path(inception_path).is_file():
        where = "no inception_path was given" if inception_path is None else f"{inception_path} does not exist"
        raise FileNotFoundError(
            f"standard (Inception) FID needs local Inception-v3 weights and {where}: none are available "
            "offline and this project never downloads them. Pass inception_path= a TorchScript file such as "
            "NVIDIA's inception-2015-12-05.pt, or use fid_project() (FID on the project's feature network).")
    detector = torch.jit.load(str(inception_path), map_location="cpu").eval()

    @torch.no_grad()
    def feats(images, name):
        x = torch.from_numpy(np.ascontiguousarray(_batch(images, name).transpose(0, 3, 1, 2)))
        out = [detector(x[i:i + batch_size].to(torch.uint8), return_features=True)
               for i in range(0, len(x), batch_size)]
        return torch.cat(out).double().numpy()

    return fid_from_features(feats(real_uint8, "real_uint8"), feats(fake_uint8, "fake_uint8"))


# ---------------------------------------------------------------------------
# CLIP score, only with user-supplied weights
# ---------------------------------------------------------------------------

#: CLIP's image normalisation (OpenAI CLIP, as in CLIPImageProcessor).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _clip_pixels(images, size: int) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> CLIP input (N, 3, size, size): shorter side resized to ``size`` (bicubic),
    centre crop, values in [0, 1] (clamped after resizing), normalised with CLIP's mean and std."""
    x = torch.from_numpy(np.ascontiguousarray(_batch(images, "images").transpose(0, 3, 1, 2))).float() / 255
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    x = torch.nn.functional.interpolate(x, size=(max(size, round(h * scale)), max(size, round(w * scale))),
                                        mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    x = x[..., top:top + size, left:left + size]
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def _embedding(out) -> torch.Tensor:
    """get_*_features returns the projected embedding, as a tensor or (transformers >= 5) as pooler_output."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def clip_score(images_uint8, prompts, clip_path: str | Path | None = None, batch_size: int = 64) -> float:
    """CLIP score of images against their prompts, only from a local CLIP model the user supplies.

    ``mean over images of 100 * max(cos(E_image, E_prompt), 0)`` (Hessel et al. 2021,
    with w = 100 as in torchmetrics' ``CLIPScore``; torchmetrics clips the mean
    instead of each image, which differs only when some cosine is negative), in
    [0, 100], higher is better.

    ``clip_path`` is a Hugging Face CLIP folder (``CLIPModel`` weights, config and
    tokenizer files), loaded with ``local_files_only=True``: nothing is downloaded
    and without it this raises. The embeddings come from ``get_image_features`` /
    ``get_text_features``. Images are preprocessed here with torch alone (shorter
    side resized bicubically to the model's ``vision_config.image_size``, centre
    crop, CLIP's mean and std), not with ``CLIPImageProcessor``, which works on
    PIL images and so rounds to uint8 after resizing: values may differ slightly
    from torchmetrics'. Prompts longer than the text model's
    ``max_position_embeddings`` tokens are truncated.

    Parameters
    ----------
    images_uint8 : (N, H, W, 3) uint8, or (N, 3, H, W) float in [-1, 1]
    prompts : list of N str
        One prompt per image.
    clip_path : str or Path
        Local CLIP folder, e.g. a saved ``openai/clip-vit-base-patch16``.

    Caveat: at 32x32 the images are upsampled to CLIP's input size (~7x for 224 px)
    before CLIP; the values are not comparable with the CLIP scores of 512x512
    images in papers.

    Raises
    ------
    FileNotFoundError
        When no path is given or the folder does not exist.
    """
    if clip_path is None or not Path(clip_path).is_dir():
        where = "no clip_path was given" if clip_path is None else f"{clip_path} is not a folder"
        raise FileNotFoundError(
            f"CLIP score needs a local CLIP model and {where}: none is available offline and this project never "
            "downloads one. Pass clip_path= a Hugging Face CLIP folder (model, config and tokenizer files).")

    images = _batch(images_uint8, "images_uint8")
    prompts = [str(p) for p in prompts]
    if len(prompts) != len(images):
        raise ValueError(f"need one prompt per image: {len(images)} images, {len(prompts)} prompts")
    model = CLIPModel.from_pretrained(str(clip_path), local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(clip_path), local_files_only=True)
    size = model.config.vision_config.image_size
    max_len = model.config.text_config.max_position_embeddings
    scores = []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            img = _embedding(model.get_image_features(pixel_values=_clip_pixels(images[i:i + batch_size], size)))
            tok = tokenizer(prompts[i:i + batch_size], padding=True, truncation=True, max_length=max_len,
                            return_tensors="pt")
            txt = _embedding(model.get_text_features(input_ids=tok["input_ids"],
                                                     attention_mask=tok["attention_mask"]))
            cos = torch.nn.functional.cosine_similarity(img.double(), txt.double(), dim=-1)
            scores.append(100 * cos.clamp(min=0))
    return float(torch.cat(scores).mean())


# ---------------------------------------------------------------------------
# Reference values
# ---------------------------------------------------------------------------


def _alterations() -> dict:
    """Name -> function(uint8 images, rng) of the alterations of the model card's reference table."""
    def blur(sigma):
        return lambda x, rng: np.stack([ndimage.gaussian_filter(i.astype(np.float64), (sigma, sigma, 0))
                                        for i in x]).round().astype(np.uint8)

    def noise(std):
        return lambda x, rng: np.clip(x + rng.normal(0, std, x.shape), 0, 255).round().astype(np.uint8)

    def affine(gain, offset):
        return lambda x, rng: np.clip(x * gain + offset, 0, 255).round().astype(np.uint8)

    return {
        "real (disjoint sample)": lambda x, rng: x,
        "channels rotated RGB->GBR": lambda x, rng: x[..., [1, 2, 0]],
        "2x pixelated": lambda x, rng: x[:, ::2, ::2].repeat(2, 1).repeat(2, 2),
        "noise std 5/255": noise(5), "noise std 10/255": noise(10),
        "blur sigma 0.7": blur(0.7), "blur sigma 1.0": blur(1.0), "blur sigma 1.5": blur(1.5),
        "colour offsets +-20/255": lambda x, rng: np.clip(
            x + rng.integers(-20, 21, (len(x), 1, 1, 3)), 0, 255).astype(np.uint8),
        "colours x0.9+12": affine(0.9, 12), "washed out x0.5+64": affine(0.5, 64),
        "uniform noise images": lambda x, rng: rng.integers(0, 256, x.shape, dtype=np.uint8),
    }


def reference_table(n: int = 64, seed: int = 6000, net=None) -> dict[str, tuple[float, float]]:
    """FID and KID (project features) of ``n`` real circles against ``n`` others, plain or altered.

    The real sets are ``make_fill50k(n, seed=seed)`` and ``seed + 1`` (max_radius
    0.25); the alterations are those of ``sim/assets/feature-net/MODEL_CARD.md``.
    Returns ``{alteration: (fid, kid_mean)}``; ``python -m sim.commands.feature_net --report``
    prints it.
    """
    real = make_fill50k(n, seed=seed, max_radius=0.25)["target"]
    other = make_fill50k(n, seed=seed + 1, max_radius=0.25)["target"]
    f_real = _features_of(real, net, "real")
    out = {}
    for name, alter in _alterations().items():
        f = _features_of(alter(other, np.random.default_rng(0)), net, name)
        out[name] = (fid_from_features(f_real, f), kid_from_features(f_real, f)[0])
    return out

"""Offline datasets and client partitions for the simulations.

Two datasets are built on the fly, without any download:

``fill50k``
    A procedural version of ControlNet's Fill50K toy task: the condition is a
    white circle outline on black, the target is the same circle filled with
    one colour on a flat background of another colour, and the prompt names
    both colours ("a red circle on a blue background").
    Columns: ``target``, ``condition``, ``prompt``, ``fg``, ``bg``, ``cx``,
    ``cy``, ``r``.

``faces``
    The 100 face crops of scikit-image's ``data.lfw_subset()`` (a small slice of
    Labeled Faces in the Wild, shipped inside the scikit-image wheel), used as
    private client data for attack evaluation. The condition is the Canny edge
    map of the face. Columns: ``target``, ``condition``, ``prompt``.

In both, ``target`` and ``condition`` are ``uint8`` arrays of shape
``(size, size, 3)``. :func:`load_dataset` caches a dataset on disk as a
Hugging Face :class:`datasets.Dataset`; :func:`to_tensors` turns one into the
float tensors the diffusion code trains on; :func:`partition` splits sample
indices between clients (IID or Dirichlet non-IID).
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

import datasets
import numpy as np
import torch
from scipy import ndimage
from skimage import data as skdata
from skimage.feature import canny
from skimage.transform import resize

#: The palette: the 8 corners of the RGB cube, as far apart as colours can be.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "cyan": (0, 255, 255),
    "magenta": (255, 0, 255),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}

DATASET_NAMES = ("fill50k", "faces")
DATA_VERSION = 1  # part of the cache folder name: bump it when a generator changes its output
DEFAULT_N = {"fill50k": 2000, "faces": 100}
PARTITION_SCHEMES = ("iid", "dirichlet")
MIN_SIZE = 8
MIN_RADIUS = 0.15  # smallest circle radius, as a fraction of the image size
NUM_LFW_FACES = 100  # lfw_subset(): images 0-99 are faces, 100-199 are not
FACE_PROMPT = "a photo of a face"
IMAGE_COLUMNS = ("target", "condition")


# ---------------------------------------------------------------------------
# Fill50K-style circles
# ---------------------------------------------------------------------------


def outline_thickness(size: int) -> int:
    """Outline width in pixels for an image of side ``size`` (1 px at 32)."""
    return max(1, round(size / 32))


def _circle_margin(size: int) -> int:
    """Empty pixels kept between the circle and the image border."""
    return 1 if size < 16 else 2


def _draw_colour_pairs(rng: np.random.Generator, n: int) -> tuple[list[str], list[str]]:
    """Draw ``n`` (circle, background) colour names, uniform over the 56 ordered pairs."""
    names = list(COLOURS)
    pairs = [(fg, bg) for fg in names for bg in names if fg != bg]
    chosen = rng.integers(len(pairs), size=n)
    return [pairs[k][0] for k in chosen], [pairs[k][1] for k in chosen]


def _draw_circles(rng: np.random.Generator, n: int, size: int,
                  max_radius: float = 0.35) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw centres and radii (pixels) of ``n`` circles lying inside the image.

    Pixel ``(x, y)`` has its centre at integer coordinates ``x, y`` in
    ``[0, size - 1]``; every circle keeps :func:`_circle_margin` free pixels
    to the border.
    """
    margin = _circle_margin(size)
    r_max = min(max_radius * size, (size - 1) / 2 - margin)
    r = rng.uniform(MIN_RADIUS * size, r_max, size=n)
    cx = rng.uniform(margin + r, size - 1 - margin - r)
    cy = rng.uniform(margin + r, size - 1 - margin - r)
    return cx, cy, r


def disc_masks(cx: np.ndarray, cy: np.ndarray, r: np.ndarray, size: int) -> np.ndarray:
    """Boolean masks (N, size, size) of the pixels whose centre lies in each disc."""
    coords = np.arange(size, dtype=np.float64)
    dx = coords[None, None, :] - np.asarray(cx, dtype=np.float64)[:, None, None]
    dy = coords[None, :, None] - np.asarray(cy, dtype=np.float64)[:, None, None]
    return dx**2 + dy**2 <= np.asarray(r, dtype=np.float64)[:, None, None] ** 2


def outline_masks(discs: np.ndarray, thickness: int) -> np.ndarray:
    """Inner boundary (N, H, W) of each disc, ``thickness`` pixels wide.

    A pixel is on the outline when it is in the disc and fewer than
    ``thickness`` 4-neighbour steps from outside it. Filling the holes of the
    outline gives back the disc exactly.
    """
    cross = ndimage.generate_binary_structure(2, 1)[None]  # no mixing across samples
    interior = ndimage.binary_erosion(discs, structure=cross, iterations=thickness)
    return discs & ~interior


def _paint(masks: np.ndarray, inside: np.ndarray, outside: np.ndarray) -> np.ndarray:
    """RGB uint8 images (N, H, W, 3): colour ``inside[i]`` where ``masks[i]``, else ``outside[i]``."""
    inside = np.asarray(inside, dtype=np.uint8)[:, None, None, :]
    outside = np.asarray(outside, dtype=np.uint8)[:, None, None, :]
    return np.where(masks[..., None], inside, outside)


def make_fill50k(n: int, size: int = 32, seed: int = 0, max_radius: float = 0.35) -> dict:
    """Make ``n`` Fill50K-style samples: circle outline -> filled coloured circle.

    Parameters
    ----------
    n : int
        Number of samples, at least 1.
    size : int, default 32
        Image side in pixels, at least 8.
    seed : int, default 0
        Seed of :func:`numpy.random.default_rng`; equal seeds give equal bytes.
    max_radius : float, default 0.35
        Largest radius as a fraction of ``size`` (radii are uniform from
        ``MIN_RADIUS * size``). Smaller circles overlap less by chance: two random
        circles have mean IoU ~0.36 at 0.35 and ~0.21 at 0.25 (32 px).

    Returns
    -------
    dict
        Columns, one entry per sample:

        - ``target``: uint8 (n, size, size, 3), the circle filled with colour
          ``fg`` on a flat ``bg`` background;
        - ``condition``: uint8 (n, size, size, 3), the circle's white outline
          (:func:`outline_thickness` px wide) on black;
        - ``prompt``: list of str, ``"a {fg} circle on a {bg} background"``;
        - ``fg``, ``bg``: lists of colour names (keys of :data:`COLOURS`);
        - ``cx``, ``cy``, ``r``: float64 (n,), centre column, centre row and
          radius in pixels.
    """
    _check_n(n)
    _check_size(size)
    rng = np.random.default_rng(seed)
    fgs, bgs = _draw_colour_pairs(rng, n)
    _check_max_radius(max_radius)
    cx, cy, r = _draw_circles(rng, n, size, max_radius)
    discs = disc_masks(cx, cy, r, size)
    outlines = outline_masks(discs, outline_thickness(size))
    white, black = np.full((n, 3), 255), np.zeros((n, 3))
    return {
        "target": _paint(discs, [COLOURS[c] for c in fgs], [COLOURS[c] for c in bgs]),
        "condition": _paint(outlines, white, black),
        "prompt": [f"a {fg} circle on a {bg} background" for fg, bg in zip(fgs, bgs)],
        "fg": fgs,
        "bg": bgs,
        "cx": cx,
        "cy": cy,
        "r": r,
    }


# ---------------------------------------------------------------------------
# Faces
# ---------------------------------------------------------------------------


def _lfw_faces() -> np.ndarray:
    """The 100 face crops of ``skimage.data.lfw_subset()``: float (100, 25, 25) in [0, 1].

    ``lfw_subset()`` returns 200 greyscale 25x25 images: the first 100 are
    faces, the last 100 are background patches (non-faces), which we drop.
    """
    return np.asarray(skdata.lfw_subset()[:NUM_LFW_FACES], dtype=np.float64)


def _grey_to_rgb_uint8(grey: np.ndarray) -> np.ndarray:
    """Float greyscale (..., H, W) in [0, 1] -> uint8 (..., H, W, 3)."""
    grey = np.round(np.clip(grey, 0.0, 1.0) * 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)


def make_faces(size: int = 32, seed: int = 0, n: int | None = None) -> dict:
    """Make face samples from scikit-image's LFW subset (offline).

    Parameters
    ----------
    size : int, default 32
        Image side in pixels, at least 8 (the originals are 25x25).
    seed : int, default 0
        Chooses which faces are kept when ``n < 100``.
    n : int or None, default None
        Number of faces, 1 to 100; None keeps all 100 in their original order.
        A subset keeps the original order too.

    Returns
    -------
    dict
        ``target`` (uint8 (n, size, size, 3), the grey face on all three
        channels), ``condition`` (uint8 (n, size, size, 3), Canny edges with
        sigma 1, white on black) and ``prompt`` (``"a photo of a face"``).
    """
    _check_size(size)
    if n is None:
        n = NUM_LFW_FACES
    _check_n(n, upper=NUM_LFW_FACES)
    faces = _lfw_faces()
    if n < NUM_LFW_FACES:
        keep = np.sort(np.random.default_rng(seed).choice(NUM_LFW_FACES, size=n, replace=False))
        faces = faces[keep]
    grey = np.stack([resize(face, (size, size), order=1) for face in faces])
    edges = np.stack([canny(g, sigma=1.0) for g in grey])
    return {
        "target": _grey_to_rgb_uint8(grey),
        "condition": _grey_to_rgb_uint8(edges.astype(np.float64)),
        "prompt": [FACE_PROMPT] * n,
    }


# ---------------------------------------------------------------------------
# Cached Hugging Face datasets
# ---------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """``$SPLITCONTROL_CACHE``, or ``~/.cache/splitcontrol`` when it is unset."""
    env = os.environ.get("SPLITCONTROL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "splitcontrol"


def _features(columns: Mapping, size: int) -> datasets.Features:
    """Arrow schema: fixed-shape uint8 images (stored and read back exactly)."""
    spec = {
        "target": datasets.Array3D((size, size, 3), "uint8"),
        "condition": datasets.Array3D((size, size, 3), "uint8"),
        "prompt": datasets.Value("string"),
        "fg": datasets.Value("string"),
        "bg": datasets.Value("string"),
        "cx": datasets.Value("float64"),
        "cy": datasets.Value("float64"),
        "r": datasets.Value("float64"),
    }
    return datasets.Features({name: spec[name] for name in columns})


def _generate(name: str, n: int, size: int, seed: int, max_radius: float = 0.35) -> dict:
    """Columns of dataset ``name`` (the generators behind :func:`load_dataset`)."""
    if name == "fill50k":
        return make_fill50k(n, size=size, seed=seed, max_radius=max_radius)
    return make_faces(size=size, seed=seed, n=n)


def _save_atomically(columns: dict, size: int, path: Path) -> None:
    """Write a dataset to a temporary folder next to ``path``, then rename it.

    A crash leaves at most a ``.tmp-*`` folder behind, never a half-written
    ``path``. If another process finished ``path`` first, ours is discarded.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".tmp-{path.name}-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        dataset = datasets.Dataset.from_dict(columns, features=_features(columns, size))
        dataset.save_to_disk(str(tmp))
        os.rename(tmp, path)
    except OSError:
        if not path.exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_dataset(
    name: str,
    n: int | None = None,
    size: int = 32,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    max_radius: float = 0.35,
) -> datasets.Dataset:
    """Load dataset ``name`` from the disk cache, generating it on first use.

    Parameters
    ----------
    name : {"fill50k", "faces"}
        Which dataset (see the module docstring for their columns).
    n : int or None
        Number of samples; None means 2000 for fill50k and all 100 for faces.
    size : int, default 32
        Image side in pixels, at least 8.
    seed : int, default 0
        Generator seed (for faces: which faces are kept when n < 100).
    cache_dir : path, optional
        Cache root; default :func:`default_cache_dir`. The dataset lives in
        ``<cache_dir>/datasets/<name>-v<version>-n<n>-s<size>-seed<seed>[-r<max_radius>]``.
    max_radius : float, default 0.35
        fill50k only: largest circle radius as a fraction of ``size``.

    Returns
    -------
    datasets.Dataset
        Memory-mapped from the cache. ``target`` and ``condition`` come back
        as uint8 numpy arrays (``ds["target"][:]`` is (n, size, size, 3));
        the other columns come back as Python str and float.
    """
    if name not in DATASET_NAMES:
        raise ValueError(f"name must be one of {DATASET_NAMES}, got {name!r}")
    n = DEFAULT_N[name] if n is None else n
    _check_n(n, upper=NUM_LFW_FACES if name == "faces" else None)
    _check_size(size)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    suffix = f"-r{max_radius}" if name == "fill50k" and max_radius != 0.35 else ""
    path = root / "datasets" / f"{name}-v{DATA_VERSION}-n{n}-s{size}-seed{seed}{suffix}"
    if not path.exists():
        _save_atomically(_generate(name, n, size, seed, max_radius), size, path)
    dataset = datasets.load_from_disk(str(path))
    image_columns = [c for c in IMAGE_COLUMNS if c in dataset.column_names]
    return dataset.with_format("numpy", columns=image_columns, output_all_columns=True, dtype=np.uint8)


def to_tensors(dataset: datasets.Dataset | Mapping) -> dict:
    """Float tensors for training from a dataset (or a dict of columns).

    Returns
    -------
    dict
        ``target``: float32 (N, 3, H, W) in [-1, 1] (uint8 ``v`` -> ``v / 127.5 - 1``);
        ``condition``: float32 (N, 3, H, W) in [0, 1] (``v / 255``);
        ``prompt``: list of N str.
    """
    target = _column_as_uint8(dataset, "target")
    condition = _column_as_uint8(dataset, "condition")
    prompts = dataset["prompt"][:] if isinstance(dataset, datasets.Dataset) else dataset["prompt"]
    return {
        "target": _hwc_to_nchw(target) / 127.5 - 1.0,
        "condition": _hwc_to_nchw(condition) / 255.0,
        "prompt": [str(p) for p in prompts],
    }


def _column_as_uint8(dataset: datasets.Dataset | Mapping, column: str) -> np.ndarray:
    """One image column as a uint8 (N, H, W, 3) array, whatever the dataset's format."""
    if isinstance(dataset, datasets.Dataset):
        return dataset.with_format("numpy", columns=[column], dtype=np.uint8)[column][:]
    return np.asarray(dataset[column], dtype=np.uint8)


def _hwc_to_nchw(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> contiguous float32 tensor (N, 3, H, W), values unchanged."""
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).float()


# ---------------------------------------------------------------------------
# Client partitions
# ---------------------------------------------------------------------------


def partition(
    labels_or_n: int | Sequence,
    num_clients: int,
    scheme: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
) -> list[np.ndarray]:
    """Split sample indices between clients.

    Parameters
    ----------
    labels_or_n : int or sequence
        The number of samples, or one label per sample (needed for
        ``"dirichlet"``; for fill50k pass the ``fg`` colour names).
    num_clients : int
        Number of clients, 1 to the number of samples.
    scheme : {"iid", "dirichlet"}, default "iid"
        ``"iid"``: a shuffled split into sizes that differ by at most 1.
        ``"dirichlet"``: non-IID; each label's samples are shared between the
        clients in proportions drawn from Dirichlet(alpha, ..., alpha), so a
        small ``alpha`` gives each client few labels.
    alpha : float, default 0.5
        Dirichlet concentration, > 0.
    seed : int, default 0
        Seed of :func:`numpy.random.default_rng`.

    Returns
    -------
    list of numpy.ndarray
        One sorted int64 index array per client; disjoint, covering
        ``range(N)``, none empty.
    """
    labels = None if isinstance(labels_or_n, (int, np.integer)) else np.asarray(labels_or_n)
    if labels is not None and labels.ndim != 1:
        raise ValueError(f"labels_or_n must be an int or a 1-D sequence of labels, got {labels_or_n!r}")
    n = int(labels_or_n) if labels is None else len(labels)
    if scheme not in PARTITION_SCHEMES:
        raise ValueError(f"scheme must be one of {PARTITION_SCHEMES}, got {scheme!r}")
    if n < 1:
        raise ValueError(f"labels_or_n must describe at least 1 sample, got {n}")
    if not isinstance(num_clients, (int, np.integer)) or not 1 <= num_clients <= n:
        raise ValueError(f"num_clients must be an int from 1 to the dataset size {n}, got {num_clients!r}")
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha!r}")
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        parts = np.array_split(rng.permutation(n), num_clients)
    else:
        if labels is None:
            raise ValueError("scheme='dirichlet' needs one label per sample in labels_or_n, got only a count")
        parts = _dirichlet_split(labels, num_clients, alpha, rng)
        parts = _fill_empty_clients(parts)
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def _dirichlet_split(
    labels: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    """Share each label's samples between clients in Dirichlet(alpha) proportions."""
    parts: list[list[int]] = [[] for _ in range(num_clients)]
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        shares = rng.dirichlet(np.full(num_clients, alpha))
        cuts = np.round(np.cumsum(shares)[:-1] * len(members)).astype(int)
        for client, chunk in enumerate(np.split(members, cuts)):
            parts[client].extend(chunk.tolist())
    return [np.asarray(p, dtype=np.int64) for p in parts]


def _fill_empty_clients(parts: list[np.ndarray]) -> list[np.ndarray]:
    """Give each empty client one sample taken from the currently largest client.

    Deterministic: the largest client (lowest id on ties) gives its last index.
    """
    parts = [np.asarray(p, dtype=np.int64) for p in parts]
    for client, part in enumerate(parts):
        if len(part) == 0:
            donor = int(np.argmax([len(p) for p in parts]))
            parts[client] = parts[donor][-1:]
            parts[donor] = parts[donor][:-1]
    return parts


# ---------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------


def _check_n(n: int, upper: int | None = None) -> None:
    """Raise ValueError unless ``n`` is an int in ``[1, upper]``."""
    if not isinstance(n, (int, np.integer)) or n < 1 or (upper is not None and n > upper):
        allowed = ">= 1" if upper is None else f"from 1 to {upper}"
        raise ValueError(f"n must be an int {allowed}, got {n!r}")


def _check_max_radius(max_radius: float) -> None:
    if not MIN_RADIUS < max_radius <= 0.5:
        raise ValueError(f"max_radius must be in ({MIN_RADIUS}, 0.5], got {max_radius}")


def _check_size(size: int) -> None:
    """Raise ValueError unless ``size`` is an int >= :data:`MIN_SIZE`."""
    if not isinstance(size, (int, np.integer)) or size < MIN_SIZE:
        raise ValueError(f"size must be an int >= {MIN_SIZE}, got {size!r}")

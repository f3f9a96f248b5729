"""Datasets from a local folder, in the layout diffusers' ``train_controlnet.py`` trains on.

Two layouts are read, both offline:

``save_to_disk``
    A folder written by :meth:`datasets.Dataset.save_to_disk` (or a ``DatasetDict``'s: its
    ``train`` split, or its only split). Image columns may be ``datasets.Image`` features,
    uint8 arrays (H, W, 3) or (H, W), or file paths relative to the folder.
``imagefolder``
    A folder with ``metadata.jsonl`` at its root, one JSON object per line, as datasets'
    ImageFolder reads it: ``file_name`` is the path of the row's ``image``, any
    ``<column>_file_name`` the path of image column ``<column>`` (e.g.
    ``conditioning_image_file_name``); other keys are plain columns (``text``). A plain
    string column named as an image column is read as a path too. Paths are relative to the
    folder and must stay inside it.

Columns are chosen by the config keys ``image-column``, ``conditioning-image-column`` and
``caption-column``, whose defaults (``image``, ``conditioning_image``, ``text``) are
train_controlnet.py's, so the Hugging Face Fill50K's layout needs no key at all.
Preprocessing is train_controlnet.py's: both images to RGB, ``Resize(resolution)``
(shorter side, bilinear) then ``CenterCrop(resolution)``; the target then goes to [-1, 1]
and the condition to [0, 1] (:func:`sim.core.data.to_tensors` on the uint8 arrays made
here). A caption that is a list gives its first entry (train_controlnet.py draws one at
random during training; here it is fixed so runs reproduce).

Which rows are whose is decided in :mod:`sim.core.splits` (held-out eval set, clients'
pool, public auxiliary rows). Every bad input fails with a ValueError that names it:
a missing folder, an unknown layout, a missing column (with the columns found), an
unreadable image (row, column and file).
"""
from __future__ import annotations

import functools
import io
import json
from collections.abc import Sequence
from pathlib import Path

import datasets
import numpy as np
from PIL import Image, UnidentifiedImageError

CONDITION_KINDS = ("auto", "outline", "canny", "none")
METADATA = "metadata.jsonl"


def _err(path, msg: str) -> ValueError:
    return ValueError(f"dataset={str(path)!r}: {msg}")


# ---------------------------------------------------------------------------
# Opening a folder
# ---------------------------------------------------------------------------


def layout(path: str | Path) -> str:
    """``"save_to_disk"`` or ``"imagefolder"``; a ValueError naming the path otherwise."""
    path = Path(path)
    if not path.exists():
        raise _err(path, "no such folder (give fill50k, faces, or a local dataset folder; nothing is downloaded)")
    if not path.is_dir():
        raise _err(path, "is a file, not a dataset folder")
    if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
        return "save_to_disk"
    if (path / METADATA).exists():
        return "imagefolder"
    raise _err(path, f"neither a folder written by datasets' save_to_disk (state.json / dataset_dict.json) nor an "
                     f"imagefolder with {METADATA}; found {sorted(p.name for p in path.iterdir())[:10]}")


def _stamp(path: Path) -> tuple:
    """What changes when the folder's data changes (the cache key of :func:`open_local`)."""
    files = [path / n for n in ("state.json", "dataset_dict.json", METADATA) if (path / n).exists()]
    return tuple((f.name, f.stat().st_mtime_ns, f.stat().st_size) for f in files)


def open_local(path: str | Path) -> datasets.Dataset:
    """The folder's rows as a :class:`datasets.Dataset` (image columns not decoded yet)."""
    path = Path(path).resolve()
    layout(path)
    return _open(str(path), _stamp(path))


@functools.lru_cache(maxsize=4)
def _open(path: str, stamp: tuple) -> datasets.Dataset:
    if layout(path) == "imagefolder":
        return _read_metadata(Path(path))
    try:
        loaded = datasets.load_from_disk(path)
    except Exception as e:  # a damaged folder: name it, not the library's frames
        raise _err(path, f"cannot load it with datasets.load_from_disk ({type(e).__name__}: {str(e)[:200]})") from None
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded)
        if "train" in loaded:
            return loaded["train"]
        if len(splits) == 1:
            return loaded[splits[0]]
        raise _err(path, f"is a DatasetDict with splits {splits} and no 'train' split; save the split to use alone")
    return loaded


def _read_metadata(path: Path) -> datasets.Dataset:
    """An imagefolder's metadata.jsonl as columns (``file_name`` -> ``image``, ``x_file_name`` -> ``x``)."""
    rows = []
    for number, line in enumerate((path / METADATA).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise _err(path, f"{METADATA} line {number} is not JSON ({e})") from None
        if not isinstance(item, dict):
            raise _err(path, f"{METADATA} line {number} is not a JSON object")
        row = {}
        for key, value in item.items():
            if key == "file_name":
                key = "image"
            elif key.endswith("_file_name"):
                key = key[: -len("_file_name")]
            row[key] = value
        rows.append(row)
    if not rows:
        raise _err(path, f"{METADATA} has no rows")
    keys = sorted({k for r in rows for k in r})
    missing = [(i, k) for i, r in enumerate(rows) for k in keys if k not in r]
    if missing:
        i, k = missing[0]
        raise _err(path, f"{METADATA} line {i + 1} has no {k!r} (every line needs the same keys)")
    return datasets.Dataset.from_dict({k: [r[k] for r in rows] for k in keys})


# ---------------------------------------------------------------------------
# Checks (config time)
# ---------------------------------------------------------------------------


def check_columns(path, ds: datasets.Dataset, **columns: str) -> None:
    """Fail naming the key, the column and the columns found unless every named column exists."""
    for key, column in columns.items():
        if column not in ds.column_names:
            raise _err(path, f"no column {column!r} ({key.replace('_', '-')}); columns found: {ds.column_names}")


def check_local_config(cfg) -> str:
    """Check a config whose ``dataset`` is a folder; return the folder as an absolute path.

    Checks the layout, the three columns, ``partition-by`` (required for a Dirichlet split),
    and that the rows suffice: ``eval-samples`` + ``num-samples`` <= rows, plus at least one
    row left for the public auxiliary data when attacks are listed (:mod:`sim.core.splits`)."""
    path = Path(cfg.dataset).expanduser().resolve()
    ds = open_local(path)
    check_columns(path, ds, image_column=cfg.image_column,
                  conditioning_image_column=cfg.conditioning_image_column, caption_column=cfg.caption_column)
    if cfg.partition == "dirichlet" and not cfg.partition_by:
        raise _err(path, f"partition='dirichlet' needs partition-by=COLUMN (the label to split by); "
                         f"columns found: {ds.column_names}")
    if cfg.partition_by:
        check_columns(path, ds, partition_by=cfg.partition_by)
    _check_files(str(path), _stamp(path), cfg.image_column, cfg.conditioning_image_column)
    _check_decodes(str(path), _stamp(path), tuple(public_order(len(ds), cfg.eval_seed)[:cfg.eval_samples].tolist()),
                   cfg.image_column, cfg.conditioning_image_column)
    need = cfg.eval_samples + cfg.num_samples + (1 if cfg.attacks else 0)
    if need > len(ds):
        aux = " + 1 auxiliary row for the attacks" if cfg.attacks else ""
        raise _err(path, f"has {len(ds)} rows, split disjointly: eval-samples={cfg.eval_samples} + "
                         f"num-samples={cfg.num_samples}{aux} must be <= {len(ds)}")
    return str(path)


@functools.lru_cache(maxsize=8)
def _check_files(path: str, stamp: tuple, *columns: str) -> None:
    """Every image path the named columns give exists inside the folder (a stat each, no decoding:
    an unreadable file is named when its row is loaded)."""
    ds, folder = _open(path, stamp), Path(path)
    for column in columns:
        if not isinstance(ds.features[column], datasets.Value) or ds.features[column].dtype not in ("string", "large_string"):
            continue  # decoded images or arrays: stored in the folder itself
        for row, value in enumerate(ds[column]):
            file = (folder / value).resolve()
            if folder not in file.parents:
                raise _err(path, f"row {row}, column {column!r}: the path {value!r} leaves the dataset folder")
            if not file.is_file():
                raise _err(path, f"row {row}, column {column!r}: no image file {str(file)!r}")


@functools.lru_cache(maxsize=8)
def _check_decodes(path: str, stamp: tuple, rows: tuple[int, ...], *columns: str) -> None:
    """The eval rows' images decode (they are read only after training: fail before it instead)."""
    ds, folder = _open(path, stamp).select(list(rows)), Path(path)
    for column in columns:
        for row, value in zip(rows, ds[column]):
            _to_pil(value, folder, row, column).load()


def public_order(num: int, eval_seed: int) -> np.ndarray:
    """The public permutation of a folder's rows by ``eval-seed`` (:func:`sim.core.splits.local_split`)."""
    return np.random.default_rng(eval_seed).permutation(num)


# ---------------------------------------------------------------------------
# Rows -> uint8 arrays
# ---------------------------------------------------------------------------


def resize_center_crop(image: Image.Image, resolution: int) -> np.ndarray:
    """train_controlnet.py's ``Resize(resolution, BILINEAR)`` + ``CenterCrop(resolution)`` on an RGB PIL image.

    The shorter side becomes ``resolution`` (the longer ``int(resolution * long / short)``,
    as torchvision computes it), then the centre square is cut (offsets rounded as
    torchvision rounds them). Returns uint8 (resolution, resolution, 3)."""
    image = image.convert("RGB")
    w, h = image.size
    if (w <= h and w == resolution) or (h <= w and h == resolution):
        resized = image
    elif w <= h:
        resized = image.resize((resolution, int(resolution * h / w)), Image.Resampling.BILINEAR)
    else:
        resized = image.resize((int(resolution * w / h), resolution), Image.Resampling.BILINEAR)
    w, h = resized.size
    top, left = int(round((h - resolution) / 2.0)), int(round((w - resolution) / 2.0))
    return np.asarray(resized.crop((left, top, left + resolution, top + resolution)), dtype=np.uint8)


def _to_pil(value, folder: Path, row: int, column: str) -> Image.Image:
    """One cell of an image column as a PIL image, or a ValueError naming row, column and file."""
    where = f"row {row}, column {column!r}"
    try:
        if isinstance(value, Image.Image):
            return value
        if isinstance(value, dict) and (value.get("bytes") or value.get("path")):  # an undecoded Image cell
            if value.get("bytes"):
                return Image.open(io.BytesIO(value["bytes"]))
            value = value["path"]
        if isinstance(value, str):
            file = (folder / value).resolve()
            if folder.resolve() not in file.parents:
                raise _err(folder, f"{where}: the path {value!r} leaves the dataset folder")
            where += f", file {str(file)!r}"
            with Image.open(file) as im:
                im.load()
                return im
        array = np.asarray(value)
        if array.ndim in (2, 3) and array.size:
            if array.dtype != np.uint8:
                raise _err(folder, f"{where}: an array image must be uint8, got {array.dtype}")
            return Image.fromarray(array)
    except (OSError, UnidentifiedImageError, SyntaxError) as e:
        raise _err(folder, f"{where}: cannot read the image ({type(e).__name__}: {e})") from None
    raise _err(folder, f"{where}: not an image (got {type(value).__name__})")


def _caption(value, folder: Path, row: int, column: str) -> str:
    """A caption cell: a string, or the first of a list of strings (train_controlnet.py's shapes)."""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple, np.ndarray)) and len(value) and isinstance(value[0], str):
        return value[0]
    raise _err(folder, f"row {row}, column {column!r}: a caption must be a string or a list of strings, "
                       f"got {type(value).__name__}")


def load_rows(path: str | Path, indices: Sequence[int], resolution: int, image_column: str = "image",
              conditioning_image_column: str = "conditioning_image", caption_column: str = "text",
              label_column: str = "") -> dict:
    """Rows ``indices`` of a local dataset, preprocessed as train_controlnet.py does.

    Returns
    -------
    dict
        ``target`` and ``condition``: uint8 (n, resolution, resolution, 3); ``prompt``:
        list of str; with ``label_column``, ``label``: list of str (for a Dirichlet split).
    """
    folder = Path(path).resolve()
    ds = open_local(folder)
    columns = dict(image_column=image_column, conditioning_image_column=conditioning_image_column,
                   caption_column=caption_column)
    if label_column:
        columns["partition_by"] = label_column
    check_columns(folder, ds, **columns)
    indices = [int(i) for i in indices]
    rows = ds.select(indices) if indices else ds.select([])
    out = {"target": [], "condition": [], "prompt": []}
    for key, column in (("target", image_column), ("condition", conditioning_image_column)):
        for row, value in zip(indices, rows[column]):
            out[key].append(resize_center_crop(_to_pil(value, folder, row, column), resolution))
    out["prompt"] = [_caption(v, folder, row, caption_column) for row, v in zip(indices, rows[caption_column])]
    shape = (0, resolution, resolution, 3)
    out["target"] = np.stack(out["target"]) if indices else np.zeros(shape, np.uint8)
    out["condition"] = np.stack(out["condition"]) if indices else np.zeros(shape, np.uint8)
    if label_column:
        out["label"] = [str(v) for v in rows[label_column]]
    return out


def num_rows(path: str | Path) -> int:
    return len(open_local(path))

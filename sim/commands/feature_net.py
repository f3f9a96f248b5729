"""``splitcontrol feature-net`` (or ``python -m sim.commands.feature_net``): train the project's feature
network, on its own circles and faces or on the user's dataset, or report FID (project features) tables.

The network and its training live in :mod:`sim.core.feature_net`; the circle reference table in
:func:`sim.core.fidelity.reference_table` (the model card's numbers).

With a local dataset (``--set dataset=PATH``, with ``resolution`` and the column keys of a run's
config) the network trains self-supervised on that dataset's target images
(:func:`sim.core.feature_net.train_feature_net_on_images`), read as a run reads them (resize and
centre crop at ``resolution``; 0 = the model's own size), from rows the run does not evaluate on:
``--rows aux`` (default) the config's public auxiliary rows (never any client's, see
:func:`sim.core.splits.local_split`), ``--rows all-but-eval`` the clients' pool as well. The held-out
eval rows are never used, so the features are not fitted to the images FID is measured on. A run
uses the weights with ``--set feature-net=OUT``; its ``fid_project`` is still "FID (project
features)", on features that have seen only these images at 32x32.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from sim.commands import cli
from sim.core.config import PublicConfig, load_config
from sim.core.data import DATASET_NAMES
from sim.core.feature_net import (
    DEFAULT_DIR,
    DEGRADATIONS,
    NUM_TRAIN_CIRCLES,
    load_feature_net,
    to_net_input,
    train_feature_net,
    train_feature_net_on_images,
)
from sim.core.feature_net import degrade as degrade_images
from sim.core.fidelity import fid_project, reference_table
from sim.core.local_data import load_rows
from sim.core.models import get_preset
from sim.core.splits import local_split

ROWS = ("aux", "all-but-eval")
CHUNK = 256  # rows decoded at a time (at resolution) before they are shrunk to the network's 32x32


def feature_rows(cfg: PublicConfig, rows: str = "aux") -> np.ndarray:
    """Indices of a local dataset's rows the network may train on (see the module doc); never the eval rows."""
    if rows not in ROWS:
        raise ValueError(f"--rows={rows!r} is not allowed; choose one of {list(ROWS)}")
    split = local_split(cfg)
    return split["aux"] if rows == "aux" else np.concatenate([split["pool"], split["aux"]])


def read_images(cfg: PublicConfig, indices, max_images: int | None = None) -> np.ndarray:
    """Target images of rows ``indices`` as uint8 (n, 32, 32, 3): decoded at the run's resolution in chunks,
    then resized as the network resizes its input (so memory stays small at any resolution)."""
    indices = np.asarray(indices)[:max_images] if max_images else np.asarray(indices)
    size = cfg.resolution or get_preset(cfg.model).image_size
    parts = []
    for i in range(0, len(indices), CHUNK):
        rows = load_rows(cfg.dataset, indices[i:i + CHUNK], size, cfg.image_column, cfg.conditioning_image_column,
                         cfg.caption_column)
        parts.append(to_net_input(rows["target"]))
    if not parts:
        return np.zeros((0, 32, 32, 3), np.uint8)
    return to_uint8(torch.cat(parts))


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float (N, 3, H, W) in [-1, 1] -> uint8 (N, H, W, 3)."""
    return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def train_on_dataset(cfg: PublicConfig, out: str | Path, rows: str = "aux", max_images: int = NUM_TRAIN_CIRCLES,
                     **train_kwargs) -> dict:
    """Train the feature network on a local dataset's rows (:func:`feature_rows`) and save it in ``out``;
    returns the training record."""
    indices = feature_rows(cfg, rows)
    if len(indices) < 2:
        raise ValueError(f"dataset={cfg.dataset!r}: --rows {rows} leaves {len(indices)} row(s) to train the feature "
                         f"network on (eval-samples={cfg.eval_samples}, num-samples={cfg.num_samples}); lower "
                         "num-samples, or use --rows all-but-eval")
    images = read_images(cfg, indices, max_images)
    source = {"dataset": cfg.dataset, "rows": rows, "num_rows": len(images), "image_column": cfg.image_column,
              "resolution": cfg.resolution or get_preset(cfg.model).image_size, "eval_seed": cfg.eval_seed,
              "eval_samples": cfg.eval_samples, "num_samples": cfg.num_samples}
    _, record = train_feature_net_on_images(images, out, source=source, **train_kwargs)
    return record


def dataset_reference(cfg: PublicConfig, net, n: int = 64, rows: str = "aux") -> dict[str, float]:
    """FID (project features) of up to ``n`` held-out eval images against: other real images of the dataset
    (rows :func:`feature_rows`), and degraded copies of themselves (each kind of
    :func:`sim.core.feature_net.degrade`): how far apart the features put real images and defects."""
    split = local_split(cfg)
    real = read_images(cfg, split["eval"][:n])
    other = read_images(cfg, feature_rows(cfg, rows)[:n])
    if len(real) < 2 or len(other) < 2:
        raise ValueError(f"dataset={cfg.dataset!r}: the report needs >= 2 eval rows and >= 2 other rows, got "
                         f"{len(real)} and {len(other)}")
    out = {"real (other rows)": fid_project(real, other, net=net)}
    x = to_net_input(real)
    g = torch.Generator().manual_seed(0)
    for k, name in enumerate(DEGRADATIONS[1:], start=1):
        altered = to_uint8(degrade_images(x, torch.full((len(x),), k), g))
        out[name] = fid_project(real, altered, net=net)
    return {k: float(v) for k, v in out.items()}


def run(a: argparse.Namespace) -> int:
    """The sub-command (arguments as :mod:`sim.commands.cli` parses them)."""
    torch.set_num_threads(a.threads)
    cfg = load_config(a.preset, a.set or [])
    local = cfg.dataset not in DATASET_NAMES
    out = Path(a.out) if a.out else DEFAULT_DIR
    if local and (not a.out or out.resolve() == DEFAULT_DIR.resolve()):
        raise ValueError("--out: give a folder for the weights trained on dataset="
                         f"{cfg.dataset!r} (the committed weights in {DEFAULT_DIR} stay as they are)")
    if a.report:
        net = load_feature_net(out)
        if local:
            table = {k: {"fid_project": v} for k, v in dataset_reference(cfg, net, a.n, a.rows).items()}
        else:
            table = {k: {"fid_project": fid, "kid_project": kid} for k, (fid, kid) in reference_table(a.n, net=net).items()}
        if a.json:
            print(json.dumps({"rows": table, "weights": str(out)}))
        else:
            for name, row in table.items():
                print(f"{name:28s} FID (project features) {row['fid_project']:8.1f}" +
                      (f"   KID (project features) {row['kid_project']:8.3f}" if "kid_project" in row else ""))
        return 0
    kwargs = dict(steps=a.steps, seed=a.seed, batch_size=a.batch_size, lr=a.lr, verbose=not a.json)
    if local:
        record = train_on_dataset(cfg, out, rows=a.rows, max_images=a.max_images, **kwargs)
    else:
        _, record = train_feature_net(out, **kwargs)
    if a.json:
        print(json.dumps({k: v for k, v in record.items() if k != "log"}))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m sim.commands.feature_net ARGS`` = ``splitcontrol feature-net ARGS``."""
    return cli.main(["feature-net", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())

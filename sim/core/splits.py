"""Who holds which data: the clients' private partitions, the public eval set, the server's auxiliary data.

Public (from :class:`sim.core.config.PublicConfig` alone, so the server and the harness
can draw them): the held-out evaluation set and the auxiliary data the server may use
for attacks, both drawn with the public ``eval-seed``. Private (needs the client-side
``data-seed``): the clients' training samples and how they are split between clients.

* fill50k (procedural): the clients' circles are the stream of ``data-seed``; the eval set
  and the auxiliary data are the streams of ``eval-seed + 10,000`` and ``eval-seed + 20,000``,
  which no client uses.
* faces (100 LFW faces): a public permutation by ``eval-seed`` splits them into the clients'
  pool (the first ``num-samples``), the eval set (the next ``eval-samples``) and the
  auxiliary data (the rest). The faces are a public dataset standing in for private ones:
  a server that knows LFW knows the pool; what the simulation measures is reconstruction
  of the samples a client sends, not membership. ``data-seed`` splits the pool between clients.

* a local folder (:mod:`sim.core.local_data`): a public permutation of its rows by ``eval-seed``
  splits them into the eval set (the first ``eval-samples``, whatever ``num-samples`` is), the
  clients' pool (the next ``num-samples``) and the auxiliary data (all the rest: the declared
  public split, never a client's row). As with faces, the folder stands in for private data;
  ``data-seed`` splits the pool between clients (IID, or Dirichlet over ``partition-by``).

Images are made at ``resolution`` (0: the model's own size), which must equal the size the
model samples at (:func:`data_size`).

With ``eval-seed`` = ``data-seed`` = 1 (both defaults) these are exactly the sets the
project drew before the keys were separated, so older reference numbers reproduce.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from sim.core import data as data_mod
from sim.core import local_data
from sim.core.condition_metrics import infer_condition_kind

EVAL_SEED_OFFSET = 10_000  # fill50k eval set: a generator stream no client's data uses
AUX_SEED_OFFSET = 20_000  # fill50k auxiliary data: a stream neither clients nor the eval set use


@dataclass
class ClientData:
    """One client's private triples: target images in [-1, 1], conditions in [0, 1], prompts."""

    target: torch.Tensor
    condition: torch.Tensor
    prompts: list[str]

    def __len__(self) -> int:
        return self.target.shape[0]


def data_size(cfg, image_size: int) -> int:
    """The image side the data is made at: ``resolution``, or the model's ``image_size`` when it is 0.

    A ``resolution`` the model does not sample at fails naming both (the model side decides
    which resolutions a preset supports)."""
    if cfg.resolution and cfg.resolution != image_size:
        raise ValueError(f"resolution={cfg.resolution} but model={cfg.model!r} makes {image_size} px images; "
                         f"set resolution={image_size} or a model that samples at {cfg.resolution} px")
    return image_size


def is_local(cfg) -> bool:
    """Whether ``dataset`` is a local folder rather than a built-in name."""
    return cfg.dataset not in data_mod.DATASET_NAMES


def _faces_order(cfg) -> np.ndarray:
    """The public split of the LFW faces: [clients' pool | eval | auxiliary]."""
    return np.random.default_rng(cfg.eval_seed).permutation(data_mod.NUM_LFW_FACES)


def local_split(cfg) -> dict[str, np.ndarray]:
    """The public split of a local dataset's rows: ``eval``, ``pool`` (the clients') and ``aux`` index arrays."""
    order = local_data.public_order(local_data.num_rows(cfg.dataset), cfg.eval_seed)
    e, n = cfg.eval_samples, cfg.num_samples
    return {"eval": order[:e], "pool": order[e:e + n], "aux": order[e + n:]}


def _local_rows(cfg, indices, size: int, labels: bool = False) -> dict:
    rows = local_data.load_rows(cfg.dataset, indices, size, cfg.image_column, cfg.conditioning_image_column,
                                cfg.caption_column, cfg.partition_by if labels else "")
    return rows


def condition_kind(cfg, conditions_uint8: np.ndarray) -> str:
    """How condition fidelity is measured on this data: ``outline`` (fill50k), ``canny`` (faces), or for a
    local dataset ``condition-kind`` (``auto``: :func:`sim.core.condition_metrics.infer_condition_kind`)."""
    if cfg.dataset == "fill50k":
        return "outline"
    if cfg.dataset == "faces":
        return "canny"
    if cfg.condition_kind != "auto":
        return cfg.condition_kind
    return infer_condition_kind(conditions_uint8)


def eval_set(cfg, image_size: int) -> dict:
    """The public held-out evaluation set: tensors target, condition, prompt, the ``condition_kind``
    (and fg/bg colours for fill50k)."""
    size = data_size(cfg, image_size)
    if is_local(cfg):
        rows = _local_rows(cfg, local_split(cfg)["eval"], size)
        out = data_mod.to_tensors(rows)
        out["condition_kind"] = condition_kind(cfg, rows["condition"])
        return out
    if cfg.dataset == "faces":
        order = _faces_order(cfg)
        ev = data_mod.load_dataset("faces", size=size).select(
            order[cfg.num_samples:cfg.num_samples + cfg.eval_samples].tolist())
    else:
        ev = data_mod.load_dataset(cfg.dataset, n=cfg.eval_samples, size=size,
                                   seed=cfg.eval_seed + EVAL_SEED_OFFSET, max_radius=cfg.max_radius)
    out = data_mod.to_tensors(ev)
    if "fg" in ev.column_names:
        out.update(fg=list(ev["fg"][:]), bg=list(ev["bg"][:]))
    out["condition_kind"] = condition_kind(cfg, None)
    return out


def aux_set(cfg, image_size: int, n: int = 256) -> dict:
    """The server's public auxiliary data, disjoint from every client's and from the eval set."""
    size = data_size(cfg, image_size)
    if is_local(cfg):
        rest = local_split(cfg)["aux"][:n]
        if len(rest) == 0:
            raise ValueError(f"dataset={cfg.dataset!r}: no rows left for auxiliary data after eval-samples="
                             f"{cfg.eval_samples} and num-samples={cfg.num_samples}; lower one of them")
        return data_mod.to_tensors(_local_rows(cfg, rest, size))
    if cfg.dataset == "faces":
        rest = _faces_order(cfg)[cfg.num_samples + cfg.eval_samples:][:n]
        if len(rest) == 0:
            raise ValueError("faces: no images left for auxiliary data; lower num-samples or eval-samples")
        ds = data_mod.load_dataset("faces", size=size).select(rest.tolist())
    else:
        ds = data_mod.load_dataset(cfg.dataset, n=n, size=size, seed=cfg.eval_seed + AUX_SEED_OFFSET,
                                   max_radius=cfg.max_radius)
    return data_mod.to_tensors(ds)


def client_partitions(cfg, image_size: int) -> list[ClientData]:
    """Every client's private data (needs the client-side ``data-seed``: an ExperimentConfig)."""
    size = data_size(cfg, image_size)
    if is_local(cfg):
        rows = _local_rows(cfg, local_split(cfg)["pool"], size, labels=bool(cfg.partition_by))
        tensors, labels = data_mod.to_tensors(rows), rows.get("label")
    else:
        if cfg.dataset == "faces":
            ds = data_mod.load_dataset("faces", size=size).select(_faces_order(cfg)[:cfg.num_samples].tolist())
        else:
            ds = data_mod.load_dataset(cfg.dataset, n=cfg.num_samples, size=size, seed=cfg.data_seed,
                                       max_radius=cfg.max_radius)
        tensors = data_mod.to_tensors(ds)
        label = cfg.partition_by or "fg"
        labels = list(ds[label][:]) if label in ds.column_names else None
    n = len(tensors["prompt"])
    parts = data_mod.partition(labels if labels is not None else n, cfg.num_clients, cfg.partition,
                               cfg.dirichlet_alpha, seed=cfg.data_seed)
    return [ClientData(tensors["target"][idx], tensors["condition"][idx], [tensors["prompt"][i] for i in idx])
            for idx in parts]

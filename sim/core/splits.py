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

With ``eval-seed`` = ``data-seed`` = 1 (both defaults) these are exactly the sets the
project drew before the keys were separated, so older reference numbers reproduce.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from sim.core import data as data_mod

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


def _faces_order(cfg) -> np.ndarray:
    """The public split of the LFW faces: [clients' pool | eval | auxiliary]."""
    return np.random.default_rng(cfg.eval_seed).permutation(data_mod.NUM_LFW_FACES)


def eval_set(cfg, image_size: int) -> dict:
    """The public held-out evaluation set: tensors target, condition, prompt (and fg/bg colours for fill50k)."""
    if cfg.dataset == "faces":
        order = _faces_order(cfg)
        ev = data_mod.load_dataset("faces", size=image_size).select(
            order[cfg.num_samples:cfg.num_samples + cfg.eval_samples].tolist())
    else:
        ev = data_mod.load_dataset(cfg.dataset, n=cfg.eval_samples, size=image_size,
                                   seed=cfg.eval_seed + EVAL_SEED_OFFSET, max_radius=cfg.max_radius)
    out = data_mod.to_tensors(ev)
    if "fg" in ev.column_names:
        out.update(fg=list(ev["fg"][:]), bg=list(ev["bg"][:]))
    return out


def aux_set(cfg, image_size: int, n: int = 256) -> dict:
    """The server's public auxiliary data, disjoint from every client's and from the eval set."""
    if cfg.dataset == "faces":
        rest = _faces_order(cfg)[cfg.num_samples + cfg.eval_samples:][:n]
        if len(rest) == 0:
            raise ValueError("faces: no images left for auxiliary data; lower num-samples or eval-samples")
        ds = data_mod.load_dataset("faces", size=image_size).select(rest.tolist())
    else:
        ds = data_mod.load_dataset(cfg.dataset, n=n, size=image_size, seed=cfg.eval_seed + AUX_SEED_OFFSET,
                                   max_radius=cfg.max_radius)
    return data_mod.to_tensors(ds)


def client_partitions(cfg, image_size: int) -> list[ClientData]:
    """Every client's private data (needs the client-side ``data-seed``: an ExperimentConfig)."""
    if cfg.dataset == "faces":
        ds = data_mod.load_dataset("faces", size=image_size).select(_faces_order(cfg)[:cfg.num_samples].tolist())
    else:
        ds = data_mod.load_dataset(cfg.dataset, n=cfg.num_samples, size=image_size, seed=cfg.data_seed,
                                   max_radius=cfg.max_radius)
    tensors = data_mod.to_tensors(ds)
    labels = list(ds["fg"][:]) if "fg" in ds.column_names else None
    parts = data_mod.partition(labels if labels is not None else len(ds), cfg.num_clients, cfg.partition,
                               cfg.dirichlet_alpha, seed=cfg.data_seed)
    return [ClientData(tensors["target"][idx], tensors["condition"][idx], [tensors["prompt"][i] for i in idx])
            for idx in parts]

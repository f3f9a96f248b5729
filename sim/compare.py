"""``splitcontrol compare``: the same ControlNet task under every scheme, side by side.

Each scheme gets the same frozen base model, the same initial ControlNet, the same
client partitions, the same per-client batch/timestep/noise streams and the same step
budget (``steps`` batches of ``batch-size``, all clients together). Output in ``--out``:
``config.toml`` (resolved config), ``summary.json`` (a row per scheme plus the base
model without control), ``losses.jsonl`` (per-step loss per scheme) and
``samples_<scheme>.png`` (condition | generated | target) and ``summary.md`` (the table).
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch

from . import data as data_mod
from .config import ExperimentConfig
from .evaluate import evaluate
from .models import build_controlnet, count_params, ddpm_scheduler, load_base

EVAL_SEED_OFFSET = 10_000  # eval data: a different generator stream from every client's data


def fingerprint(*modules) -> str:
    """sha256 over every parameter and buffer: equal before and after training iff bit-identical."""
    h = hashlib.sha256()
    for m in modules:
        if m is None:
            continue
        for name, t in sorted(m.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def client_datasets(cfg: ExperimentConfig, image_size: int):
    """The private training data, partitioned over the clients, and the held-out eval set.

    fill50k draws its eval set from another seed (a fresh procedural stream); faces has
    only 100 images, so a seeded permutation splits them into disjoint train/eval parts.
    """
    from strategies.base import ClientData

    if cfg.dataset == "faces":
        full = data_mod.load_dataset("faces", size=image_size)
        order = np.random.default_rng(cfg.data_seed).permutation(len(full))
        ds = full.select(order[:cfg.num_samples].tolist())
        ev = full.select(order[cfg.num_samples:cfg.num_samples + cfg.eval_samples].tolist())
    else:
        ds = data_mod.load_dataset(cfg.dataset, n=cfg.num_samples, size=image_size, seed=cfg.data_seed,
                                   max_radius=cfg.max_radius)
        ev = data_mod.load_dataset(cfg.dataset, n=cfg.eval_samples, size=image_size,
                                   seed=cfg.data_seed + EVAL_SEED_OFFSET, max_radius=cfg.max_radius)
    tensors = data_mod.to_tensors(ds)
    labels = list(ds["fg"][:]) if "fg" in ds.column_names else None
    parts = data_mod.partition(labels if labels is not None else len(ds), cfg.num_clients, cfg.partition,
                               cfg.dirichlet_alpha, seed=cfg.data_seed)
    clients = [ClientData(tensors["target"][idx], tensors["condition"][idx],
                          [tensors["prompt"][i] for i in idx]) for idx in parts]
    eval_set = data_mod.to_tensors(ev)
    if "fg" in ev.column_names:
        eval_set.update(fg=list(ev["fg"][:]), bg=list(ev["bg"][:]))
    return clients, eval_set


def train_scheme(scheme: str, cfg: ExperimentConfig, base, controlnet, clients):
    """Run one scheme in process; returns its :class:`strategies.base.SchemeResult`.

    The strategy (server) gets the frozen UNet, the public initial ControlNet and the
    config; the clients are built here, by the simulation harness, with their private data.
    """
    from strategies import InProcessTransport, get_strategy
    from strategies.base import TrainSettings

    cls = get_strategy(scheme)
    sched = ddpm_scheduler(base.preset)
    settings = TrainSettings(lr=cfg.lr, steps=cfg.steps, local_steps=cfg.local_steps, batch_size=cfg.batch_size,
                             high_noise_weight=cfg.high_noise_weight, prompt_dropout=cfg.prompt_dropout)
    strategy = cls(base.unet, controlnet, sched, settings)
    scheme_clients = [cls.client_class(cid, base, sched, d, settings, cfg.seed, **strategy.client_kwargs())
                      for cid, d in enumerate(clients)]
    result = strategy.start(InProcessTransport(scheme_clients))
    result.client_trainable_params = max(c.trainable_parameters() for c in scheme_clients)
    return result


def summary_row(res, metrics: dict) -> dict:
    w = res.wire
    return {
        "scheme": res.scheme, **metrics, "final_loss": res.final_loss,
        "client_trainable_params": res.client_trainable_params,
        "server_trainable_params": res.server_trainable_params,
        "bytes_up_per_step": w.bytes_up / res.steps, "bytes_down_per_step": w.bytes_down / res.steps,
        "messages_per_step": w.messages / res.steps, "steps": res.steps,
        "wall_s": round(res.wall_s, 2), "client_s": round(w.client_s, 2), "server_s": round(res.server_s, 2),
        **res.extra,
    }


TABLE_COLUMNS = ["scheme", "outline_iou", "colour_acc", "final_loss", "client_trainable_params",
                 "bytes_up_per_step", "bytes_down_per_step", "messages_per_step", "wall_s"]


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.3e}"
    return str(v)


def markdown_table(rows: list[dict], columns: list[str] = TABLE_COLUMNS) -> str:
    """The summary as a Markdown table (what the README shows); missing cells stay empty."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def print_table(rows: list[dict]) -> None:
    widths = [max(len(c), *(len(_cell(r.get(c, ""))) for r in rows)) for c in TABLE_COLUMNS]
    print("  ".join(c.rjust(w) for c, w in zip(TABLE_COLUMNS, widths)))
    for r in rows:
        print("  ".join(_cell(r.get(c, "")).rjust(w) for c, w in zip(TABLE_COLUMNS, widths)))


def run_compare(cfg: ExperimentConfig, out: str | Path) -> dict:
    """Train every scheme of ``cfg``, evaluate, write the run folder; returns the summary."""
    from .plots import save_rows_grid

    torch.set_num_threads(cfg.threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.toml").write_text(cfg.to_toml())
    t_start = time.time()
    base = load_base(cfg.model, folder=cfg.base_model or None)
    clients, eval_set = client_datasets(cfg, base.preset.image_size)
    frozen_before = fingerprint(base.unet, base.autoencoder, base.text_encoder)
    torch.manual_seed(cfg.seed)
    controlnet = build_controlnet(base.unet, base.preset)

    rows = []
    metrics, _ = evaluate(base, eval_set, None, None, cfg.ddim_steps, cfg.guidance, cfg.seed, "base (no control)")
    rows.append({"scheme": "base (no control)", **metrics, "steps": 0})
    conds = (eval_set["condition"] * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    targets = ((eval_set["target"] + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    losses_path = out / "losses.jsonl"
    losses_path.write_text("")
    for scheme in cfg.schemes:
        res = train_scheme(scheme, cfg, base, controlnet, clients)
        metrics, imgs = evaluate(base, eval_set, scheme, res.controlnet, cfg.ddim_steps, cfg.guidance, cfg.seed,
                                 f"sampling {scheme}")
        rows.append(summary_row(res, metrics))
        with losses_path.open("a") as f:
            f.write(json.dumps({"scheme": scheme, "losses": res.losses}) + "\n")
        save_rows_grid({"condition": conds[:16], scheme: imgs[:16], "target": targets[:16]},
                       out / f"samples_{scheme}.png", title=f"{scheme}: condition | generated | target")
    frozen_after = fingerprint(base.unet, base.autoencoder, base.text_encoder)
    summary = {
        "experiment": cfg.experiment, "rows": rows,
        "frozen_base_unchanged": frozen_before == frozen_after,
        "base_params": count_params(base.unet), "controlnet_params": count_params(controlnet),
        "total_wall_s": round(time.time() - t_start, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "summary.md").write_text(markdown_table(rows) + "\n")
    print_table(rows)
    print(f"frozen base unchanged: {summary['frozen_base_unchanged']}; wrote {out}")
    return summary

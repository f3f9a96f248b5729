"""``splitcontrol compare``: the same ControlNet task under every scheme, side by side.

Each scheme gets the same frozen base model, the same initial ControlNet, the same
client partitions, the same per-client batch/timestep/noise streams and the same step
budget (``steps`` batches of ``batch-size``, all clients together). Output in ``--out``:
``config.toml`` (resolved config), ``summary.json`` (a row per scheme plus the base
model without control), ``losses.jsonl`` (per-step loss per scheme) and
``samples_<scheme>.png`` (condition | generated | target), ``summary.md`` (the table) and
``controlnet_<scheme>/`` (the trained ControlNet, diffusers format).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import multiprocessing
import os
import time
from pathlib import Path

import numpy as np
import torch

from . import data as data_mod
from .config import ExperimentConfig
from .diffusion import BAR_POSITION_ENV, to_uint8
from .evaluate import conditions_uint8, evaluate
from .grid import quiet_flower_logs
from .models import build_controlnet, configure_torch, count_params, ddpm_scheduler, get_preset, load_base

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


def discover(grid, num_clients: int) -> list[int]:
    """Node ids ordered by partition id: asks every node (node ids are random per Flower run)."""
    from flwr.app import ConfigRecord, Message, RecordDict

    from .client_app import HELLO

    deadline = time.monotonic() + 120  # SuperNodes that just started may not be registered yet
    while len(nodes := list(grid.get_node_ids())) < num_clients and time.monotonic() < deadline:
        time.sleep(1.0)
    replies = grid.send_and_receive([Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=n,
                                             message_type=f"query.{HELLO}") for n in nodes])
    by_pid = {}
    for r in replies:
        if r.has_error():
            raise RuntimeError(f"node {r.metadata.src_node_id} failed to say hello: {r.error.reason}")
        by_pid[int(r.content.config_records["config"]["partition-id"])] = r.metadata.src_node_id
    if sorted(by_pid) != list(range(num_clients)):
        raise RuntimeError(f"expected clients with partition ids 0..{num_clients - 1}, found {sorted(by_pid)} "
                           f"on {len(nodes)} nodes")
    return [by_pid[i] for i in range(num_clients)]


def train_scheme(scheme: str, cfg: ExperimentConfig, base, controlnet, grid=None, node_ids=None, transcript=None):
    """Run one scheme of ``cfg`` through the Flower apps; returns its :class:`strategies.base.SchemeResult`.

    ``grid`` is any Flower grid whose nodes run :mod:`sim.client_app` (default: an
    :class:`sim.grid.InProcessGrid` with ``num-clients`` nodes built from ``cfg``).
    """
    from strategies.base import TrainSettings

    from .client_app import make_client_app
    from .config import to_run_config
    from .grid import InProcessGrid

    if grid is None:
        grid = InProcessGrid(make_client_app(), cfg.num_clients, to_run_config(cfg))
    return run_strategy(scheme, base, controlnet, TrainSettings.from_config(cfg), cfg.seed, grid,
                        node_ids or discover(grid, cfg.num_clients), transcript)


def run_strategy(scheme: str, base, controlnet, settings, seed: int, grid, node_ids: list[int], transcript=None):
    """The server side of one scheme on ``grid``: the strategy gets the frozen UNet, the public
    initial ControlNet and the recipe; every message is recorded in ``transcript``."""
    from strategies import get_strategy
    from strategies.base import Channel, ClientEnv

    from .transcript import RecordingGrid, Transcript, peak_rss_mb

    cls = get_strategy(scheme)
    sched = ddpm_scheduler(base.preset)
    transcript = transcript if transcript is not None else Transcript()
    rgrid = RecordingGrid(grid, transcript, {n: i for i, n in enumerate(node_ids)}, scheme)
    strategy = cls(base.unet, controlnet, sched, settings, null_context=base.encode_prompts([""]))
    result = strategy.start(Channel(rgrid, node_ids, cls.message_type))
    # what a client of this scheme trains: a property of the scheme, computed on a public client
    public = cls.client_class(0, ClientEnv(base, sched, settings, None, seed, controlnet))
    result.client_trainable_params = public.trainable_parameters()
    result.extra["client_model_mb"] = round(public.model_state_bytes() / 2**20, 2)
    result.extra["server_peak_rss_mb"] = round(peak_rss_mb(), 1)
    return result


def summary_row(res, metrics: dict) -> dict:
    t = res.transcript
    return {
        "scheme": res.scheme, **metrics, "final_loss": res.final_loss,
        "client_trainable_params": res.client_trainable_params,
        "server_trainable_params": res.server_trainable_params,
        "bytes_up_per_step": t.bytes_up / res.steps, "bytes_down_per_step": t.bytes_down / res.steps,
        "messages_per_step": t.messages / res.steps, "steps": res.steps,
        "wall_s": round(res.wall_s, 2), "client_s": round(t.client_s, 2), "server_s": round(res.server_s, 2),
        "client_s_per_step": t.client_s / res.steps, "server_s_per_step": res.server_s / res.steps,
        "client_peak_rss_mb": round(t.client_peak_mb, 1), **res.extra,
    }


TABLE_COLUMNS = ["scheme", "outline_iou", "outline_iou_se", "colour_acc", "final_loss", "client_trainable_params",
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


def print_table(rows: list[dict], columns: list[str] = TABLE_COLUMNS) -> None:
    widths = [max(len(c), *(len(_cell(r.get(c, ""))) for r in rows)) for c in columns]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(_cell(r.get(c, "")).rjust(w) for c, w in zip(columns, widths)))


@functools.lru_cache(maxsize=1)
def _setup(cfg: ExperimentConfig):
    """What every job of a run shares on the server: the frozen base, the eval set, the initial ControlNet."""
    configure_torch(cfg.threads)
    base = load_base(cfg.model, folder=cfg.base_model or None)
    _, eval_set = client_datasets(cfg, base.preset.image_size)
    torch.manual_seed(cfg.seed)
    controlnet = build_controlnet(base.unet, base.preset)
    return base, eval_set, controlnet, fingerprint(base.unet, base.autoencoder, base.text_encoder)


def _external_weights(cfg: ExperimentConfig) -> dict:
    """evaluate()'s keywords for the metrics that need user-supplied weights (None when not given)."""
    return {"inception_weights": cfg.inception_weights or None, "clip_weights": cfg.clip_weights or None}


def run_job(cfg: ExperimentConfig, scheme: str | None, position: int = 0, out: Path | None = None,
            grid=None, node_ids=None) -> dict:
    """Train one scheme (or, for ``None``, only sample the base model without control) and score it.

    Runs in the calling process or in a worker process; everything it needs comes from ``cfg``
    (and ``grid``: where the clients run; default: an in-process grid).
    """
    os.environ[BAR_POSITION_ENV] = str(position)
    quiet_flower_logs()
    base, eval_set, controlnet, frozen_before = _setup(cfg)
    transcript, rounds = [], []
    if scheme is None:
        metrics, imgs = evaluate(base, eval_set, None, None, cfg.ddim_steps, cfg.guidance, cfg.seed,
                                 "sampling base (no control)", **_external_weights(cfg))
        row, losses = {"scheme": "base (no control)", **metrics, "steps": 0}, []
    else:
        from .transcript import Transcript, save_seen

        res = train_scheme(scheme, cfg, base, controlnet, grid=grid, node_ids=node_ids,
                           transcript=Transcript(keep=cfg.keep_messages, keep_last=cfg.keep_from == "end"))
        metrics, imgs = evaluate(base, eval_set, scheme, res.controlnet, cfg.ddim_steps, cfg.guidance, cfg.seed,
                                 f"sampling {scheme}", uncond_control=cfg.uncond_control, defenses=cfg.defenses,
                                 **_external_weights(cfg))
        row, losses = summary_row(res, metrics), res.losses
        transcript = [dataclasses.asdict(s) for s in res.transcript.stats]
        rounds = round_metrics(res)
        if out is not None:  # the trained ControlNet, so the run can be re-evaluated later
            res.controlnet.save_pretrained(out / f"controlnet_{scheme}")
            if cfg.keep_messages:  # what the server saw, for the attacks
                save_seen(res.transcript, out / f"seen_{scheme}.pt")
    return {"row": row, "losses": losses, "images": imgs, "frozen_before": frozen_before,
            "transcript": transcript, "rounds": rounds,
            "frozen_after": fingerprint(base.unet, base.autoencoder, base.text_encoder),
            "base_params": count_params(base.unet), "controlnet_params": count_params(controlnet)}


def round_metrics(res) -> list[dict]:
    """Per round (a FedAvg round, or one client's turn in split learning): steps, mean loss, bytes, times."""
    rows: dict[int, dict] = {}
    for s in res.transcript.stats:
        row = rows.setdefault(s.round, {"scheme": res.scheme, "round": s.round, "first_step": s.first_step,
                                        "last_step": s.first_step, "messages": 0, "bytes_up": 0,
                                        "bytes_down": 0, "client_s": 0.0})
        row["first_step"] = min(row["first_step"], s.first_step)
        row["last_step"] = max(row["last_step"], s.first_step + s.num_steps - 1)
        row["messages"] += 1
        row["bytes_up"] += s.bytes_up
        row["bytes_down"] += s.bytes_down
        row["client_s"] += s.client_s
    out = []
    for r in sorted(rows.values(), key=lambda r: r["round"]):
        seg = res.losses[r["first_step"]: r["last_step"] + 1]
        out.append({**r, "steps": len(seg), "loss": float(np.mean(seg)) if seg else None,
                    "client_s": round(r["client_s"], 4)})
    return out


def _run_job_star(args) -> dict:
    return run_job(*args)


def run_compare(cfg: ExperimentConfig, out: str | Path, grid=None, node_ids=None) -> dict:
    """Train every scheme of ``cfg``, evaluate, write the run folder; returns the summary.

    Without ``grid`` every scheme gets its own in-process grid, and with ``jobs`` > 1 the
    schemes (and the no-control baseline) run in that many worker processes, each with
    ``threads`` torch threads; the schemes are independent, so the numbers are the same
    as in one process with the same ``threads``. With a ``grid`` (the ServerApp under
    Flower's engines) the schemes take turns on it in this process.
    """
    from .plots import save_rows_grid

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.toml").write_text(cfg.to_toml())
    t_start = time.time()
    jobs = [(cfg, None, 0, out)] if cfg.baseline else []
    jobs += [(cfg, s, (i + 1) % cfg.jobs, out) for i, s in enumerate(cfg.schemes)]
    if grid is not None:
        results = [run_job(c, s, 0, o, grid, node_ids) for c, s, _, o in jobs]
    elif cfg.jobs == 1:
        results = [run_job(*j) for j in jobs]
    else:
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(min(cfg.jobs, len(jobs))) as pool:
            results = pool.map(_run_job_star, jobs, chunksize=1)

    trained = results[1:] if cfg.baseline else results
    _, eval_set = client_datasets(cfg, get_preset(cfg.model).image_size)  # cached on disk: cheap
    conds, targets = conditions_uint8(eval_set["condition"]), to_uint8(eval_set["target"])
    with (out / "losses.jsonl").open("w") as f:
        for r in trained:
            f.write(json.dumps({"scheme": r["row"]["scheme"], "losses": r["losses"]}) + "\n")
    with (out / "rounds.jsonl").open("w") as f:
        for r in trained:
            f.writelines(json.dumps(row) + "\n" for row in r["rounds"])
    with (out / "transcript.jsonl").open("w") as f:
        for r in trained:
            f.writelines(json.dumps(row) + "\n" for row in r["transcript"])
    np.savez_compressed(out / "samples.npz", condition=conds[:16], target=targets[:16],
                        **{r["row"]["scheme"].split()[0]: r["images"][:16] for r in results})
    for r in results:
        name = r["row"]["scheme"]
        save_rows_grid({"condition": conds[:16], name: r["images"][:16], "target": targets[:16]},
                       out / f"samples_{name.split()[0]}.png", title=f"{name}: condition | generated | target")
    rows = [r["row"] for r in results]
    fingerprints = {r["frozen_before"] for r in results} | {r["frozen_after"] for r in results}
    summary = {
        "experiment": cfg.experiment, "rows": rows,
        "frozen_base_unchanged": len(fingerprints) == 1,
        "base_params": results[0]["base_params"], "controlnet_params": results[0]["controlnet_params"],
        "total_wall_s": round(time.time() - t_start, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "summary.md").write_text(markdown_table(rows) + "\n")
    print_table(rows)
    if cfg.attacks:
        from attacks import run_attacks

        summary["attacks"] = {}
        for r in run_attacks(out, list(cfg.attacks)):
            summary["attacks"].setdefault(r["scheme"], []).append(r)
    print(f"frozen base unchanged: {summary['frozen_base_unchanged']}; wrote {out} in {summary['total_wall_s']} s")
    return summary


EVAL_KEYS = ("guidance", "uncond-control", "ddim-steps", "eval-samples", "seed", "inception-weights",
             "clip-weights")


def reevaluate(run_dir: str | Path, overrides: list[str] = (), update: bool = False) -> list[dict]:
    """Sample and score a finished run's saved ControlNets again, e.g. at another guidance.

    ``overrides`` may change only the evaluation keys (:data:`EVAL_KEYS`); the run's
    ``config.toml`` gives the rest. Returns a row per scheme plus the base without control
    (if the run sampled it). ``update`` writes the new metrics into the run's summary.json
    rows (e.g. after the evaluation code changed), recording the overrides used.
    ``--set clip-weights=PATH`` / ``inception-weights=PATH`` add ``clip_score`` /
    ``fid_inception`` from local weights; ``--set clip-weights=`` turns off a path the
    run's config.toml names but this machine lacks.
    """
    from diffusers import ControlNetModel

    from .config import load_run_config

    run = Path(run_dir)
    for item in overrides:
        key = item.split("=", 1)[0].strip().replace("_", "-")
        if key not in EVAL_KEYS:
            raise ValueError(f"evaluate can only change the evaluation keys {list(EVAL_KEYS)}, not {key!r}")
    cfg = load_run_config(run, overrides)
    base, eval_set, _, _ = _setup(cfg)
    rows = []
    if cfg.baseline:
        metrics, _ = evaluate(base, eval_set, None, None, cfg.ddim_steps, cfg.guidance, cfg.seed,
                              "sampling base (no control)", **_external_weights(cfg))
        rows.append({"scheme": "base (no control)", **metrics})
    for scheme in cfg.schemes:
        path = run / f"controlnet_{scheme}"
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: the run did not save a ControlNet for {scheme!r}")
        controlnet = ControlNetModel.from_pretrained(path).eval()
        metrics, _ = evaluate(base, eval_set, scheme, controlnet, cfg.ddim_steps, cfg.guidance, cfg.seed,
                              f"sampling {scheme}", uncond_control=cfg.uncond_control, defenses=cfg.defenses,
                              **_external_weights(cfg))
        rows.append({"scheme": scheme, **metrics})
    if update and (run / "summary.json").exists():
        summary = json.loads((run / "summary.json").read_text())
        new = {r["scheme"]: r for r in rows}
        for r in summary["rows"]:
            r.update(new.get(r["scheme"], {}))
        summary["reevaluated"] = list(overrides) or True
        (run / "summary.json").write_text(json.dumps(summary, indent=2))
    return rows

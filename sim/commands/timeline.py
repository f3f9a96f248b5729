"""``splitcontrol timeline``: how long one epoch takes per scheme, for N clients on modelled devices and links.

The costs are :mod:`sim.commands.cost`'s (FLOPs, bytes and messages per sample, computed
from the configuration on the meta device: what the code executes, encoders included); the
devices and networks are the committed profiles (``sim/assets/profiles.toml``, each with
its source; utilisation is an assumption); the concurrency is each scheme's own
declaration (``Scheme.concurrency``), simulated by :mod:`sim.core.timeline`.

``validate`` checks the composition on this machine: it measures per-step compute and the
cost per round trip in one short tiny-preset run, predicts a run of another shape (more
clients, other turn length and number of steps) with the same simulator in ``shared`` mode
(one processor, the in-process grid), runs it and reports each scheme's relative error.
"""
from __future__ import annotations

import json
import math
import time
import tomllib
from dataclasses import replace
from pathlib import Path

from sim.commands.cost import cost_table
from sim.core import jsonio
from sim.core.plots import plot_timeline
from sim.core.timeline import (
    Network,
    Workload,
    bottleneck,
    epoch_plan,
    plan_from_turns,
    simulate,
    wall_if_free,
)
from sim.engine.context import load_experiment
from sim.engine.runner import run_compare
from strategies import SCHEMES, get_strategy
from strategies.base import turn_schedule

PROFILES = Path(__file__).resolve().parents[1] / "assets" / "profiles.toml"
VALIDATION = Path(__file__).resolve().parents[2] / "results" / "reference" / "timeline" / "validation.json"
# what an epoch is per model preset: the real Fill50K for SD1.5, the tiny preset's default data
EPOCH_SAMPLES = {"sd15": 50_000, "tiny": 2_000}
SETTINGS = {  # the figure's two device/network settings
    "phones on 4G, one A100 server": ("phone", "a100", "4g"),
    "laptops on Wi-Fi, one H100 server": ("laptop", "h100", "wifi"),
}
CLIENT_COUNTS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
NOTES = [
    ("client compute per sample step includes its record's one-time encoding (`splitcontrol cost`'s "
     "client_flops + client_flops_once_per_record): one epoch's upper bound, since clients cache each "
     "record's encodings (~63% of records are new in a first epoch drawn with replacement; none later)"),
    "utilisation is assumed, not measured (sim/assets/profiles.toml)",
    ("not modelled: stragglers, failures, compute/communication overlap on one device, aggregation and "
     "optimizer time, memory limits (client_fits_memory reports them)"),
]


def load_profiles(path: Path = PROFILES) -> dict:
    with open(path, "rb") as f:
        return tomllib.load(f)


def _pick(profiles: dict, kind: str, name: str) -> dict:
    table = profiles[kind]
    if name not in table:
        raise ValueError(f"unknown {kind} profile {name!r}; one of {', '.join(table)} ({PROFILES})")
    return table[name]


def flops_per_s(device: dict, utilisation: float | None = None) -> float:
    return float(device["peak-flops"]) * float(device["utilisation"] if utilisation is None else utilisation)


def network(profiles: dict, name: str, server: dict) -> Network:
    n = _pick(profiles, "network", name)
    return Network(up_Bps=n["up-mbit"] * 1e6 / 8, down_Bps=n["down-mbit"] * 1e6 / 8, rtt_s=n["rtt-ms"] / 1e3,
                   server_Bps=server["link-gbit"] * 1e9 / 8)


def workload(row: dict, client_rate: float, server_rate: float, wire: str = "fp32") -> Workload:
    """One scheme's :class:`Workload` from its cost-table row at the given FLOP/s."""
    suffix = "" if wire == "fp32" else "_fp16"
    up = row.get("up_bytes_per_sample" + suffix, 0)
    bwd = row["client_flops_backward"]
    if "round_up_message" in row:  # the whole model crosses once per round
        relay, msg = row["round_up_message"], 0
    else:
        relay = row.get("turn_head_message", 0)
        msg = row["up_message_bytes" + suffix] - up
    return Workload(
        scheme=row["scheme"], concurrency=get_strategy(row["scheme"]).concurrency,
        # one epoch: every sample step counts its record's one-time encoding (an upper bound: drawn with
        # replacement, ~63% of the records are new in the first epoch; later epochs read the cache)
        client_fwd_s=(row["client_flops"] + row.get("client_flops_once_per_record", 0) - bwd) / client_rate,
        client_bwd_s=bwd / client_rate,
        server_s=row["server_flops"] / server_rate, up_bytes=up,
        down_bytes=row.get("down_bytes_per_sample" + suffix, 0), message_bytes=msg, relay_bytes=relay)


def client_memory_bytes(row: dict, batch_size: int) -> int:
    """Model state + peak activations at ``batch_size`` (activations scale with the batch)."""
    return int(row["client_model_state_bytes"] + batch_size * row["client_peak_activation_bytes"])


def predict(table: dict, clients: int, client_device: dict, server_device: dict, net: Network, samples: int,
            batch_size: int, local_steps: int, wire: str = "fp32", utilisation: float | None = None,
            details: bool = True) -> list[dict]:
    """One row per scheme: the simulated epoch, what limits it (``details``: four more simulations, each with
    one cost class made free) and whether the client's training state fits its memory."""
    crate, srate = flops_per_s(client_device, utilisation), flops_per_s(server_device, utilisation)
    plan = epoch_plan(samples, clients, batch_size, local_steps)
    rows = []
    for r in table["rows"]:
        w = workload(r, crate, srate, wire)
        res = simulate(w, net, plan, clients)
        free = wall_if_free(w, net, plan, clients) if details else {}
        mem = client_memory_bytes(r, batch_size)
        wall = res.pop("wall_s")
        extra = {"bottleneck": bottleneck(wall, free), "wall_s_if_free": free} if details else {}
        rows.append({**res, "wall_s_per_epoch": wall, **extra,
                     "client_memory_gb": round(mem / 1e9, 2),
                     "client_fits_memory": mem <= client_device["memory-gb"] * 1e9})
    return rows


def timeline(preset: str = "sd15", clients: int = 100, client_device: str = "laptop", server_device: str = "a100",
             network_name: str = "wifi", samples: int | None = None, batch_size: int = 8, local_steps: int = 10,
             wire: str = "fp32", utilisation: float | None = None, table: dict | None = None) -> dict:
    """The ``splitcontrol timeline`` result (JSON-able)."""
    if clients < 1 or batch_size < 1 or local_steps < 1:
        raise ValueError(f"clients, batch-size and local-steps must be >= 1 (got {clients}, {batch_size}, {local_steps})")
    if wire not in ("fp32", "fp16"):
        raise ValueError(f"wire must be fp32 or fp16, got {wire!r}")
    if utilisation is not None and not 0 < utilisation <= 1:
        raise ValueError(f"utilisation must be in (0, 1], got {utilisation}")
    profiles = load_profiles()
    cdev, sdev = _pick(profiles, "device", client_device), _pick(profiles, "device", server_device)
    net = network(profiles, network_name, sdev)
    if samples is None:
        samples = EPOCH_SAMPLES.get(preset, EPOCH_SAMPLES["sd15"])
    if samples < clients:
        raise ValueError(f"samples={samples} < clients={clients}: every client needs data")
    table = table or cost_table(preset)
    t0 = time.perf_counter()
    rows = predict(table, clients, cdev, sdev, net, samples, batch_size, local_steps, wire, utilisation)
    return {
        "preset": table["preset"], "image_size": table["image_size"], "clients": clients, "samples_per_epoch": samples,
        "batch_size": batch_size, "local_steps": local_steps, "wire": wire,
        "client_device": {"name": client_device, **cdev}, "server_device": {"name": server_device, **sdev},
        "network": {"name": network_name, **profiles["network"][network_name]},
        "utilisation": utilisation, "rows": rows, "simulated_s": round(time.perf_counter() - t0, 3),
        "validation": committed_validation(),
        "notes": NOTES,
    }


def committed_validation(path: Path = VALIDATION) -> dict:
    """The committed validation's summary (this machine, measured), or how to produce it."""
    if not path.exists():
        return {"status": "not run here", "how": "splitcontrol timeline --validate --out results/timeline-validation"}
    v = json.loads(path.read_text())
    return {"status": "measured", "source": str(path.relative_to(path.parents[3])),
            "max_relative_error": v["max_relative_error"], "goal": v["goal"], "measured_on": v["measured_on"],
            "schemes": {r["scheme"]: round(r["relative_error"], 4) for r in v["rows"]}}


def scaling(table: dict, settings: dict = SETTINGS, counts=CLIENT_COUNTS, samples: int | None = None,
            batch_size: int = 8, local_steps: int = 10) -> dict:
    """The figure's data: ``wall_s_per_epoch[setting][scheme]`` = [[clients, seconds], ...] over ``counts``,
    and ``does_not_fit[setting]``: the schemes whose client training state exceeds the client's memory."""
    profiles = load_profiles()
    samples = samples or EPOCH_SAMPLES.get(table["preset"], EPOCH_SAMPLES["sd15"])
    walls, unfit = {}, {}
    for label, (c, s, n) in settings.items():
        cdev, sdev = profiles["device"][c], profiles["device"][s]
        net = network(profiles, n, sdev)
        curves: dict[str, list] = {}
        for k in counts:
            for r in predict(table, k, cdev, sdev, net, samples, batch_size, local_steps, details=False):
                curves.setdefault(r["scheme"], []).append([k, r["wall_s_per_epoch"]])
                if not r["client_fits_memory"]:
                    unfit.setdefault(label, set()).add(r["scheme"])
        walls[label] = curves
    return {"wall_s_per_epoch": walls, "does_not_fit": {k: sorted(v) for k, v in unfit.items()},
            "settings": {k: dict(zip(("client_device", "server_device", "network"), v)) for k, v in settings.items()}}


# ----------------------------------------------------------------------------- validation on this machine
CALIBRATION = {"steps": 40, "num-clients": 2, "local-steps": 10}
TARGET = {"steps": 120, "num-clients": 4, "local-steps": 5}
VALIDATION_KEYS = ["eval-samples=2", "ddim-steps=2", "baseline=false", "jobs=1", "keep-messages=0",
                   "client-seed=4374731471100209218"]


def _run(out: Path, shape: dict, extra: list[str]) -> dict:
    schemes = json.dumps(list(SCHEMES))
    keys = VALIDATION_KEYS + [f"schemes={schemes}"] + [f"{k}={v}" for k, v in shape.items()] + list(extra)
    return run_compare(load_experiment("default", keys), out)


def measured_workload(row: dict, batch_size: int, rounds: int) -> tuple[Workload, float]:
    """A scheme's per-sample compute and per-round-trip cost as one run measured them (shared processor)."""
    w = Workload(scheme=row["scheme"], concurrency=get_strategy(row["scheme"]).concurrency,
                 client_fwd_s=row["client_s_per_step"] / batch_size)
    messages = row["messages_per_step"] * row["steps"]
    if w.concurrency == "rounds":  # the server's time is aggregation, once per round
        w = replace(w, server_round_s=row["server_s"] / rounds)
    else:
        w = replace(w, server_s=row["server_s_per_step"] / batch_size)
    per_message = max(0.0, row["wall_s"] - row["client_s"] - row["server_s"]) / messages
    return w, per_message


def validate(out: str | Path, extra: list[str] = (), calibration: dict = CALIBRATION, target: dict = TARGET,
             goal: float = 0.25) -> dict:
    """Measure on one run shape, predict another, run it, compare (see the module doc)."""
    out = Path(out)
    cal = _run(out / "calibration", calibration, list(extra))
    batch = load_experiment("default", list(extra)).batch_size  # the runs' (extra may override it)
    tgt = _run(out / "target", target, list(extra))
    cal_turns = turn_schedule(calibration["steps"], calibration["num-clients"], calibration["local-steps"])
    turns = turn_schedule(target["steps"], target["num-clients"], target["local-steps"])
    plan = plan_from_turns(turns, batch)
    measured = {r["scheme"]: r for r in tgt["rows"]}
    rows = []
    rounds = math.ceil(len(cal_turns) / calibration["num-clients"])  # the calibration run's
    for r in cal["rows"]:
        w, per_message = measured_workload(r, batch, rounds)
        net = Network(math.inf, math.inf, 0.0, math.inf, message_s=per_message, shared=True)
        pred = simulate(w, net, plan, target["num-clients"])
        m = measured[r["scheme"]]
        rows.append({"scheme": r["scheme"], "predicted_wall_s": round(pred["wall_s"], 2), "measured_wall_s": m["wall_s"],
                     "relative_error": abs(pred["wall_s"] - m["wall_s"]) / m["wall_s"],
                     "predicted_messages": pred["messages"],
                     "measured_messages": round(m["messages_per_step"] * m["steps"]),
                     "calibration": {"client_s_per_sample": w.client_fwd_s, "server_s_per_sample": w.server_s,
                                     "server_s_per_round": w.server_round_s, "s_per_round_trip": per_message}})
    res = {"max_relative_error": max(r["relative_error"] for r in rows), "goal": goal, "rows": rows,
           "calibration_run": calibration, "target_run": target, "keys": VALIDATION_KEYS + list(extra),
           "measured_on": time.strftime("%Y-%m-%d") + ", in-process grid, this machine (jobs=1, 1 torch thread)",
           "what_it_checks": "per-step compute and per-round-trip cost measured on one run shape predict the "
                             "wall time of another (clients, turn length, steps) through the simulator's "
                             "message counts; the concurrency of a deployment is not exercised (one processor)"}
    out.mkdir(parents=True, exist_ok=True)
    (out / "validation.json").write_text(jsonio.dumps(res, indent=2))
    return res


def figure(path: str | Path, table: dict | None = None) -> tuple[Path, dict]:
    """:func:`scaling` drawn by :func:`sim.core.plots.plot_timeline`; returns the path and the data."""
    table = table or cost_table("sd15")
    data = scaling(table)
    title = (f"predicted: one epoch of {EPOCH_SAMPLES.get(table['preset'], 0):,} samples, {table['preset']} at "
             f"{table['image_size']} px, batch 8, 10 steps per turn, fp32 wire (utilisation assumed: "
             "sim/assets/profiles.toml)")
    return plot_timeline(data["wall_s_per_epoch"], path, title=title, dashed=data["does_not_fit"]), data


def markdown(res: dict) -> str:
    """A readable table of :func:`timeline`'s result."""
    head = (f"One epoch ({res['samples_per_epoch']:,} samples, batch {res['batch_size']}, {res['local_steps']} steps "
            f"per turn) of preset `{res['preset']}` at {res['image_size']} px, {res['clients']} clients "
            f"({res['client_device']['name']}) on {res['network']['name']}, server {res['server_device']['name']}:")
    lines = [head,
             "", ("| scheme | wall per epoch | client busy | server busy | bottleneck | up per client | "
                  "down per client | client memory GB (fits) |"), "|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['scheme']} | {_duration(r['wall_s_per_epoch'])} | {r['client_busy']:.1%} | "
                     f"{r['server_busy']:.1%} | {r['bottleneck']} | {_bytes(r['up_bytes_per_client'])} | "
                     f"{_bytes(r['down_bytes_per_client'])} | {r['client_memory_gb']} "
                     f"({'yes' if r['client_fits_memory'] else 'NO'}) |")
    v = res["validation"]
    lines += ["", (f"validation ({v['source']}): max relative error {v['max_relative_error']:.3f} "
                   f"(goal <= {v['goal']})") if v["status"] == "measured" else f"validation: {v['how']}"]
    return "\n".join(lines)


def _duration(s: float) -> str:
    if s >= 86_400:
        return f"{s / 86_400:.1f} d"
    if s >= 3600:
        return f"{s / 3600:.1f} h"
    return f"{s / 60:.1f} min" if s >= 60 else f"{s:.1f} s"


def _bytes(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"

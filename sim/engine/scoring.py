"""The scorer: runs attacks on the server's view of a run, then scores them against the private data.

Order, by construction: :func:`server_view` builds a scheme's :class:`attacks.base.ServerView`
from the public part of a run folder only (config.toml as a PublicConfig, the kept
messages, every message's statistics, the public models, the final ControlNet the server
trained); the attack runs on it and returns a :class:`attacks.base.Reconstruction`; only
then does :func:`attack_view` replay the clients (:mod:`sim.engine.truth`, which needs
clients.toml) and score the reconstruction with :mod:`attacks.scoring`. An active attack
gets a fresh session with the run's clients through ``view.connect`` (the harness
provisions them; the attack only sends and receives messages).

:func:`run_attacks` does this for every attack and scheme of a run, saves a
private | reconstructed grid per (scheme, attack) and writes ``attacks.json`` (merged into
``summary.json`` under ``"attacks"``). :func:`blind_scores` is what a server guesses with
no transcript at all: attack scores mean something only above it.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch

from attacks import ServerView, make_attack
from attacks.scoring import image_scores, prompt_scores
from sim.core import jsonio
from sim.core.config import ExperimentConfig, load_public_config
from sim.core.diffusion import to_uint8
from sim.core.models import load_controlnet, load_pickled
from sim.core.plots import save_rows_grid
from sim.core.splits import aux_set
from sim.engine.clientside import load_run_config
from sim.engine.context import context_for
from sim.engine.grid import discover, in_process_grid, quiet_flower_logs
from sim.engine.transcript import RecordingGrid, Transcript, record_to_dict
from sim.engine.truth import private_samples


def message_history(run: Path, scheme: str) -> list[dict] | None:
    """Every message's statistics for ``scheme`` (transcript.jsonl): what the server logged."""
    path = run / "transcript.jsonl"
    if not path.exists():
        return None
    return [s for s in map(json.loads, path.read_text().splitlines()) if s["scheme"] == scheme]


class _Forward(Transcript):
    """A transcript that hands every round trip, decoded, to a callback (an active attack's session)."""

    def __init__(self, on_message):
        super().__init__()
        self.on_message = on_message

    def add(self, stat, down, up) -> None:
        self.stats.append(stat)
        self.on_message({"stat": dataclasses.asdict(stat), "down": record_to_dict(down), "up": record_to_dict(up)})


def session(run: Path, scheme: str):
    """``connect`` for an active attack: ``connect(on_message) -> (recording grid, node ids)``, a fresh
    session with the run's clients (provisioned from clients.toml by the harness, not the attack)."""
    def connect(on_message):
        cfg = load_run_config(run)
        quiet_flower_logs()
        grid = in_process_grid(cfg)
        node_ids = discover(grid, cfg.num_clients)
        return RecordingGrid(grid, _Forward(on_message), {n: i for i, n in enumerate(node_ids)}, scheme), node_ids

    return connect


def server_view(run_dir: str | Path, scheme: str) -> ServerView:
    """The server's view of one scheme of a finished run: public config, kept messages, public models."""
    run = Path(run_dir)
    cfg = load_public_config(run)
    seen = run / f"seen_{scheme}.pt"
    if not seen.exists():
        raise FileNotFoundError(f"{seen} is missing: run compare with keep-messages > 0 (or attacks=[...])")
    ctx = context_for(cfg)
    final = run / f"controlnet_{scheme}"
    final_cn = load_controlnet(final) if final.exists() else None
    return ServerView(scheme, cfg, load_pickled(seen), ctx.base, ctx.scheduler, ctx.controlnet,
                      final_cn, history=message_history(run, scheme), connect=session(run, scheme))


def attack_view(view: ServerView, spec: str, cfg: ExperimentConfig, out: Path | None = None) -> dict:
    """Run one attack on one view, then score it against the private data of ``cfg`` (the whole
    config, which the view never holds); returns a row (scores, or N/A and the reason)."""
    attack = make_attack(spec)
    row = {"scheme": view.scheme, "attack": repr(attack), "defenses": list(view.cfg.defenses)}
    reason = attack.not_applicable(view)
    if reason:
        return {**row, "status": "N/A", "reason": reason}
    t0 = time.perf_counter()
    rec = attack.run(view)
    messages = rec.info.pop("messages", view.messages)  # an active attack (fsha) brings its own session's
    row.update(status="ok", wall_s=round(time.perf_counter() - t0, 2), **rec.info)
    history = view.history if messages is view.messages else None
    truth = private_samples(cfg, view.scheme, messages, rec.refs, history)
    grid = {}
    if rec.images is not None:
        row["image"] = image_scores(rec.images, truth["target"], signed=True)
        grid.update(private=truth["target"], reconstructed=rec.images)
    if rec.hints is not None:
        row["hint"] = image_scores(rec.hints, truth["hint"], signed=False)
        grid.update({"private hint": truth["hint"] * 2 - 1, "reconstructed hint": rec.hints * 2 - 1})
    if rec.prompts is not None:
        # against the prompt the sample was trained with (after prompt dropout: "" carries no text), or the
        # record's own prompt for an attack that reads it off the record's image
        used = truth["prompt"] if attack.prompt_of == "record" else truth["prompt_used"]
        row["prompt"] = prompt_scores(rec.prompts, used, rec.info.get("candidates", []))
        row.pop("candidates", None)
    if out is not None and grid:
        path = out / f"attack_{view.scheme}_{attack.name}.png"
        save_rows_grid({k: to_uint8(v[:16].float()) for k, v in grid.items()}, path,
                       title=f"{attack.name} attack on {view.scheme}: private samples and the server's "
                             "reconstructions (same column = same sample)")
        row["grid"] = path.name
    return row


def run_attacks(run_dir: str | Path, specs: list[str], schemes: list[str] | None = None) -> list[dict]:
    """Every attack in ``specs`` on every scheme of the run (or ``schemes``); writes attacks.json
    and merges the rows into summary.json."""
    run = Path(run_dir)
    cfg = load_run_config(run)
    rows = []
    for scheme in schemes or cfg.schemes:
        view = server_view(run, scheme)
        for spec in specs:
            row = attack_view(view, spec, cfg, run)
            scores = "  ".join(f"{k} ssim {row[k]['ssim']:.3f}" for k in ("image", "hint") if k in row)
            print(f"{scheme:>8} {row['attack']:<24} " + (row["reason"] if row["status"] == "N/A" else
                  scores + "  " +
                  (f"prompt acc {row['prompt']['accuracy']:.2f} (chance {row['prompt']['chance']:.3f})"
                   if "prompt" in row else "")))
            rows.append(row)
    old = jsonio.read(run / "attacks.json") if (run / "attacks.json").exists() else []
    keep = [r for r in old if (r["scheme"], r["attack"]) not in {(r2["scheme"], r2["attack"]) for r2 in rows}]
    (run / "attacks.json").write_text(jsonio.dumps(keep + rows, indent=2))
    summary_path = run / "summary.json"
    if summary_path.exists():
        summary = jsonio.read(summary_path)
        summary["attacks"] = {s: [r for r in keep + rows if r["scheme"] == s] for s in cfg.schemes}
        summary_path.write_text(jsonio.dumps(summary, indent=2))
    return rows


def blind_scores(cfg: ExperimentConfig, n: int = 64) -> dict:
    """What a server guesses without any transcript: the better (by mean SSIM) of the mean auxiliary
    image and mid-grey for images, of the mean auxiliary hint and an all-black hint for hints, scored
    against the first ``n`` private training samples. Attack scores mean something only above these."""
    ctx = context_for(cfg)
    clients = ctx.client_data(cfg)
    target = torch.cat([c.target for c in clients])[:n]
    hint = torch.cat([c.condition for c in clients])[:n]
    aux = aux_set(cfg, ctx.base.preset.image_size, 256)
    out = {}
    for key, private, guesses, signed in (
            ("image", target, (aux["target"].mean(0), torch.zeros_like(target[0])), True),
            ("hint", hint, (aux["condition"].mean(0), torch.zeros_like(hint[0])), False)):
        out[key] = max((image_scores(g.expand_as(private), private, signed) for g in guesses), key=lambda s: s["ssim"])
    return out

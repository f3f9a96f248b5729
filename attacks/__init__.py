"""Attacks on what the server sees: one file per attack over :class:`attacks.base.Attack`.

``splitcontrol attacks --json`` lists them with their declared threat models;
``splitcontrol attack --run RUN_DIR --attack NAME`` runs one on a finished run (which
must have kept messages: ``--set keep-messages=N``, or ``--set attacks=[...]`` on
``compare``, which keeps them and attacks right after training).

:func:`run_attacks` builds each scheme's :class:`ServerView`, asks each attack whether
it applies (N/A with the reason if not), runs it, scores the reconstruction against
the private samples (replayed outside the attack: attacks/truth.py), saves a
private | reconstructed grid per (scheme, attack) and writes ``attacks.json``; the rows
are also merged into ``summary.json`` under ``"attacks"``.

Why there is no label-inference attack
--------------------------------------
In split learning of a classifier the labels are private and leak through gradients.
Here the "label" of a training step is the noise target eps: random noise the client
draws afresh every step, independent of its data. Recovering it reveals nothing about
the client; what eps does enable is removing the noise from x_t, which the noise-target
attack measures.
"""
from __future__ import annotations

import importlib
import json
import pkgutil
import time
from pathlib import Path

from .base import REGISTRY, Attack, Reconstruction, ServerView, make_attack, register  # noqa: F401  (re-exported)

for _m in pkgutil.iter_modules(__path__):
    if _m.name not in ("base", "truth", "scoring", "common"):
        importlib.import_module(f"{__name__}.{_m.name}")


def list_attacks() -> list[dict]:
    return [cls().describe() for cls in REGISTRY.values()]


def attack_view(view: ServerView, spec: str, out: Path | None = None) -> dict:
    """Run one attack on one view and score it; returns a row (scores, or N/A and the reason)."""
    from .scoring import image_scores, prompt_scores
    from .truth import private_samples

    attack = make_attack(spec)
    row = {"scheme": view.scheme, "attack": repr(attack), "defenses": list(view.cfg.defenses)}
    reason = attack.not_applicable(view)
    if reason:
        return {**row, "status": "N/A", "reason": reason}
    t0 = time.perf_counter()
    rec = attack.run(view)
    messages = rec.info.pop("messages", view.messages)  # an active attack (fsha) brings its own session's
    row.update(status="ok", wall_s=round(time.perf_counter() - t0, 2), **rec.info)
    history = None
    if messages is view.messages and view.run_dir is not None and (Path(view.run_dir) / "transcript.jsonl").exists():
        history = [s for s in map(json.loads, (Path(view.run_dir) / "transcript.jsonl").read_text().splitlines())
                   if s["scheme"] == view.scheme]
    truth = private_samples(view.cfg, view.scheme, messages, rec.refs, history)
    grid = {}
    if rec.images is not None:
        row["image"] = image_scores(rec.images, truth["target"], signed=True)
        grid.update(private=truth["target"], reconstructed=rec.images)
    if rec.hints is not None:
        row["hint"] = image_scores(rec.hints, truth["hint"], signed=False)
        grid.update({"private hint": truth["hint"] * 2 - 1, "reconstructed hint": rec.hints * 2 - 1})
    if rec.prompts is not None:
        # against the prompt the sample was trained with (after prompt dropout: "" carries no text)
        row["prompt"] = prompt_scores(rec.prompts, truth["prompt_used"], rec.info.get("candidates", []))
        row.pop("candidates", None)
    if out is not None and grid:
        from sim.diffusion import to_uint8
        from sim.plots import save_rows_grid

        path = out / f"attack_{view.scheme}_{attack.name}.png"
        save_rows_grid({k: to_uint8(v[:16].float()) for k, v in grid.items()}, path,
                       title=f"{attack.name} on {view.scheme}: private | reconstructed")
        row["grid"] = path.name
    return row


def best_ssim(row: dict) -> float | None:
    """The headline privacy number of a row: its best mean SSIM over image and hint (None if N/A)."""
    vals = [row[k]["ssim"] for k in ("image", "hint") if k in row]
    return max(vals) if vals else None


def run_attacks(run_dir: str | Path, specs: list[str], schemes: list[str] | None = None) -> list[dict]:
    """Every attack in ``specs`` on every scheme of the run (or ``schemes``); writes attacks.json
    and merges the rows into summary.json."""
    from sim.config import load_run_config

    run = Path(run_dir)
    cfg = load_run_config(run)
    rows = []
    for scheme in schemes or cfg.schemes:
        view = ServerView.from_run(run, scheme)
        for spec in specs:
            row = attack_view(view, spec, run)
            print(f"{scheme:>8} {row['attack']:<24} " + (row["reason"] if row["status"] == "N/A" else
                  f"ssim {best_ssim(row) if best_ssim(row) is not None else '-'}  " +
                  (f"prompt acc {row['prompt']['accuracy']:.2f} (chance {row['prompt']['chance']:.3f})"
                   if "prompt" in row else "")))
            rows.append(row)
    old = json.loads((run / "attacks.json").read_text()) if (run / "attacks.json").exists() else []
    keep = [r for r in old if (r["scheme"], r["attack"]) not in {(r2["scheme"], r2["attack"]) for r2 in rows}]
    (run / "attacks.json").write_text(json.dumps(keep + rows, indent=2))
    summary_path = run / "summary.json"
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
        summary["attacks"] = {s: [r for r in keep + rows if r["scheme"] == s] for s in cfg.schemes}
        summary_path.write_text(json.dumps(summary, indent=2))
    return rows

"""What the lab notebooks share: where runs go, running or reusing a run, showing figures, self-checks.

A notebook imports it from lab/ (the notebook's folder). Everything else a notebook uses is
the project's public API (sim.engine, sim.commands, attacks, defenses, strategies).

Runs go under ``$LAB_OUT`` (CI sets a temporary folder) or ``lab/runs/``. A run whose folder
already holds a finished run of the same configuration is reused, so re-running a notebook
costs nothing twice.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from sim.core.plots import plot_run
from sim.engine.context import load_experiment
from sim.engine.ray_sim import run_ray
from sim.engine.runfolder import config_differences, is_complete
from sim.engine.runner import run_compare

LAB = Path(__file__).resolve().parent
PROJECT = LAB.parent


def out_dir(name: str) -> Path:
    """The folder of the run ``name`` (under $LAB_OUT, else lab/runs/)."""
    root = Path(os.environ.get("LAB_OUT") or LAB / "runs")
    return root / name


def run(name: str, preset: str = "lab", overrides: list[str] = (), engine: str = "in-process") -> dict:
    """Run (or reuse) ``splitcontrol compare --preset PRESET --set ...`` into ``out_dir(name)``; returns summary.json.

    The same as the command line: ``splitcontrol compare --preset lab --set KEY=VALUE --out DIR``
    (its figures included); ``engine="ray"``: ``splitcontrol flower-sim`` (Flower's Ray simulation)."""
    cfg = load_experiment(preset, list(overrides))
    out = out_dir(name)
    if is_complete(out) and not config_differences(cfg, out):
        print(f"reusing the finished run in {out}")
        return json.loads((out / "summary.json").read_text())
    if engine == "ray":
        if (out / "config.toml").exists():  # another configuration, or unfinished: run_ray has no overwrite
            shutil.rmtree(out)
        return run_ray(cfg, out)  # draws the figures itself
    summary = run_compare(cfg, out, overwrite=True)
    plot_run(out)  # loss, bytes, client cost and sample figures, as the command draws them
    return summary


def show(path) -> object:
    """A PNG for the notebook to display."""
    from IPython.display import Image  # only inside a notebook

    return Image(filename=str(path))


def table(rows: list[dict], keys: list[str]) -> object:
    """Rows as a markdown table for the notebook (numbers to 3 significant digits)."""
    from IPython.display import Markdown  # only inside a notebook

    def cell(v):
        if isinstance(v, float):
            return f"{v:.3g}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(cell(r.get(k)) for k in keys) + " |" for r in rows]
    return Markdown("\n".join(lines))


def check(exercise: str, ok: bool, hint: str) -> None:
    """A self-check: prints that ``exercise`` is right, or fails with ``hint`` (what to look at)."""
    if not ok:
        raise AssertionError(f"{exercise}: not yet. {hint}")
    print(f"{exercise}: correct.")


def check_close(exercise: str, got, want, tol: float, hint: str) -> None:
    """``check`` that ``got`` equals ``want`` to within ``tol`` (numbers or arrays)."""
    got_a, want_a = np.asarray(got, dtype=float), np.asarray(want, dtype=float)
    if got_a.shape != want_a.shape:
        raise AssertionError(f"{exercise}: not yet. Expected shape {want_a.shape}, got {got_a.shape}. {hint}")
    err = float(np.max(np.abs(got_a - want_a))) if got_a.size else 0.0
    check(exercise, err <= tol, f"Off by {err:.3g} (allowed {tol:g}). {hint}")

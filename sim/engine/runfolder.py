"""A run folder's life: one writer at a time, one configuration per folder, a marker when it is finished.

``run_compare`` (:mod:`sim.engine.runner`) writes a folder in this order:

1. :class:`RunLock` takes ``.lock`` (the writer's pid; a second writer is refused while
   that pid lives; a dead writer's lock is taken over);
2. :func:`prepare` checks what the folder already holds: nothing (a new run); a finished
   run of the same configuration (refused: ``--overwrite`` redoes it); a run of another
   configuration (refused unless ``--overwrite``, which empties it); an unfinished run of
   the same configuration (``--resume`` finishes it: the jobs whose results are in
   ``.parts/`` are not run again, everything after them -- the summary, the figures, the
   attacks -- is redone); a folder that is not a run folder is never emptied;
3. ``.incomplete`` is written, and each finished job's result goes to ``.parts/<job>.pkl``;
4. after the summary and the attacks, :func:`mark_complete` writes ``complete.json`` and
   removes ``.incomplete`` and ``.parts/``.

``plot``, ``evaluate`` and ``attack`` call :func:`require_complete`. Folders written before
the marker existed (no ``complete.json`` and no ``.incomplete``) count as finished when
they hold a ``summary.json``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pickle
import shutil
import time
from pathlib import Path

from sim.core.config import FRESH, ExperimentConfig
from sim.engine.clientside import load_run_config

LOCK, INCOMPLETE, COMPLETE, PARTS = ".lock", ".incomplete", "complete.json", ".parts"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


class RunLock:
    """``with RunLock(out):`` -- the only writer of ``out`` until the block ends."""

    def __init__(self, out: Path):
        self.path = Path(out) / LOCK

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    pid = int(self.path.read_text().strip() or 0)
                except (OSError, ValueError):
                    pid = 0
                if pid and pid != os.getpid() and _alive(pid):
                    raise ValueError(f"{self.path.parent} is being written by another run (pid {pid}); wait for "
                                     "it to finish or choose another --out") from None
                self.path.unlink(missing_ok=True)  # a dead writer's lock
                continue
            with os.fdopen(fd, "w") as f:
                f.write(f"{os.getpid()}\n")
            return self
        raise ValueError(f"could not take the lock {self.path}")

    def __exit__(self, *exc) -> None:
        self.path.unlink(missing_ok=True)


def training_key(cfg, client_seed: int | None = None):
    """What a run's outputs depend on: everything but the process split and the attack list (and,
    with ``client_seed``, the client seed replaced by it)."""
    key = dataclasses.replace(cfg, jobs=1, attacks=())
    return key if client_seed is None else key.with_client_seed(client_seed)


def config_differences(cfg, run: Path) -> list[str]:
    """The config keys in which the run in ``run`` differs from ``cfg`` (jobs and attacks aside;
    an unset client seed in ``cfg`` accepts whichever the run drew), client-side keys included."""
    try:
        other = training_key(load_run_config(run))
    except (ValueError, TypeError, KeyError, FileNotFoundError) as e:  # an older or foreign configuration
        return [f"unreadable config.toml ({e})"]
    key = training_key(cfg, other.client_seed if cfg.client_seed == FRESH else None)
    return [f.name.replace("_", "-") for f in dataclasses.fields(key) if getattr(key, f.name) != getattr(other, f.name)]


def is_complete(run: Path) -> bool:
    run = Path(run)
    return (run / COMPLETE).exists() or ((run / "summary.json").exists() and not (run / INCOMPLETE).exists())


def require_complete(run: Path, what: str) -> None:
    """Refuse to ``what`` a folder that is not a finished run (ValueError: the CLI exits 2)."""
    run = Path(run)
    if not (run / "config.toml").exists():
        raise FileNotFoundError(f"{run} is not a run folder (no config.toml): give the --out of a finished "
                                "`splitcontrol compare`")
    if not is_complete(run):
        raise ValueError(f"cannot {what} {run}: the run is unfinished (interrupted, or still running); "
                         f"`splitcontrol compare --preset {run / 'config.toml'} --out {run} --resume` finishes it")


def prepare(out: Path, cfg, overwrite: bool = False, resume: bool = False) -> ExperimentConfig | None:
    """Check what ``out`` holds against ``cfg`` (module doc); empty it where ``overwrite`` allows.

    Returns the configuration to resume with (the folder's own, client seed included) when an
    unfinished run of ``cfg`` is resumed, else None (a fresh run)."""
    out = Path(out)
    if overwrite and resume:
        raise ValueError("--overwrite and --resume exclude each other")
    held = [p for p in out.iterdir() if p.name != LOCK] if out.exists() else []
    if not held:
        return None
    if not (out / "config.toml").exists():
        raise ValueError(f"{out} is not empty and holds no run (no config.toml): choose an empty or new --out "
                         "(it is never emptied)")
    diff = config_differences(cfg, out) if isinstance(cfg, ExperimentConfig) else _public_differences(cfg, out)
    done = is_complete(out)
    if overwrite:
        for p in held:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        return None
    if diff:
        raise ValueError(f"{out} holds a {'finished' if done else 'unfinished'} run of another configuration "
                         f"(it differs in {diff}): choose another --out, or pass --overwrite to replace it")
    if done:
        raise ValueError(f"{out} already holds a finished run of this configuration: choose another --out, or "
                         "pass --overwrite to run it again")
    if not resume:
        raise ValueError(f"{out} holds an unfinished run of this configuration: pass --resume to finish it, or "
                         "--overwrite to start again")
    return load_run_config(out) if isinstance(cfg, ExperimentConfig) else None


def _public_differences(cfg, out: Path) -> list[str]:
    """As :func:`config_differences` for a public configuration (a ServerApp's), on config.toml alone."""
    theirs = (out / "config.toml").read_text()
    return [] if theirs == cfg.to_toml() else ["config.toml"]


def begin(out: Path) -> None:
    (Path(out) / INCOMPLETE).write_text(f"started {time.strftime('%Y-%m-%d %H:%M:%S')} by pid {os.getpid()}\n")
    (Path(out) / PARTS).mkdir(exist_ok=True)


def part_path(out: Path, job: str) -> Path:
    return Path(out) / PARTS / f"{job.split()[0]}.pkl"


def save_part(out: Path, job: str, result: dict) -> None:
    """One finished job's result, written atomically (a kill leaves the old file or none)."""
    path = part_path(out, job)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        pickle.dump(result, f)
    tmp.replace(path)


def load_part(out: Path, job: str) -> dict | None:
    path = part_path(out, job)
    if not path.exists():
        return None
    try:
        with open(path, "rb") as f:
            return pickle.load(f)
    except (OSError, EOFError, pickle.UnpicklingError):  # torn: run the job again
        return None


def mark_complete(out: Path, summary: dict) -> None:
    """The last write of a run: ``complete.json``; then the in-progress files go."""
    out = Path(out)
    (out / COMPLETE).write_text(json.dumps({"finished": time.strftime("%Y-%m-%d %H:%M:%S"),
                                            "schemes": [r["scheme"] for r in summary.get("rows", [])],
                                            "attacks": sum(len(v) for v in summary.get("attacks", {}).values())},
                                           indent=1))
    (out / INCOMPLETE).unlink(missing_ok=True)
    shutil.rmtree(out / PARTS, ignore_errors=True)

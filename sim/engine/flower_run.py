"""``flwr run`` without its rough edges: the project's FLWR_HOME, an absolute ``out``, nothing left running.

``flwr run . local-sim`` starts a SuperLink (and SuperExec, ServerApp and Ray processes,
detached from the caller) and leaves them running when it returns; the ServerApp runs in the
SuperLink's folder, so a relative ``out`` lands there. :func:`flwr_run` runs ``flwr`` with

* ``FLWR_HOME`` = the project's ``flower-home/`` (its federations) unless one is set,
* ``out`` in ``--run-config`` made absolute against the caller's folder (``results/<date>``
  when none is given),
* a marker in the environment of every process it starts, and stops all of them
  (:func:`stop_marked`) when ``flwr`` returns, fails or is interrupted.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import psutil

MARK = "SPLITCONTROL_FLOWER_RUN"  # env var carried by every process a run starts
FLOWER_HOME = Path(__file__).resolve().parents[2] / "flower-home"


def _marked(p: psutil.Process, mark: str, tag: str) -> bool:
    try:
        return p.pid != os.getpid() and p.environ().get(mark) == tag
    except (psutil.Error, OSError):  # gone, a zombie, or not ours
        return False


def _gone(p: psutil.Process) -> bool:
    try:
        return p.status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True


def stop_marked(tag: str, mark: str = MARK, grace: float = 10.0) -> list[str]:
    """Stop every process whose environment carries ``mark=tag`` (SIGTERM, then SIGKILL); returns their names."""
    stopped = []
    for _ in range(3):  # a dying parent may still have spawned a child
        procs = [p for p in psutil.process_iter() if _marked(p, mark, tag)]
        if not procs:
            break
        for sig in ("terminate", "kill"):
            for p in procs:
                try:
                    stopped.append(p.name())
                    getattr(p, sig)()
                except psutil.Error:
                    pass
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and not all(_gone(p) for p in procs):
                time.sleep(0.2)
            procs = [p for p in procs if not _gone(p)]
            if not procs:
                break
    return stopped


def absolute_out(run_config: str, cwd: Path) -> str:
    """``run_config`` (``flwr run --run-config``'s string) with ``out`` absolute against ``cwd``; added if absent."""
    pattern = re.compile(r'(^|\s)out\s*=\s*"([^"]*)"')
    match = pattern.search(run_config)
    if match is None:
        out = cwd / "results" / time.strftime("flower-%Y%m%d-%H%M%S")
        return (run_config + " " if run_config.strip() else "") + f'out="{out}"'
    out = Path(match.group(2)).expanduser()
    out = out if out.is_absolute() else (cwd / out).resolve()
    return run_config[:match.start(2)] + str(out) + run_config[match.end(2):]


def flwr_run(args: list[str], cwd: Path | None = None) -> int:
    """``flwr run ARGS`` as the module doc says; returns flwr's exit code."""
    cwd = Path(cwd or Path.cwd())
    flwr = shutil.which("flwr")
    if flwr is None:
        raise FileNotFoundError("the `flwr` command is not on PATH (install the project: pip install -e .)")
    args = list(args)
    if "--run-config" in args:
        i = args.index("--run-config") + 1
        if i >= len(args):
            raise ValueError("--run-config needs a value")
        args[i] = absolute_out(args[i], cwd)
    else:
        args += ["--run-config", absolute_out("", cwd)]
    tag = uuid.uuid4().hex
    env = {**os.environ, MARK: tag, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    env.setdefault("FLWR_HOME", str(FLOWER_HOME))
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    try:
        return subprocess.run([flwr, "run", *args], cwd=cwd, env=env).returncode
    finally:
        stop_marked(tag)

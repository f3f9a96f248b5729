"""`flwr run` for this project: the shipped FLWR_HOME config, an absolute out, nothing left running."""
from __future__ import annotations

import os
import subprocess
import sys
import time
import tomllib
import uuid
from pathlib import Path

import psutil
import pytest

from sim.engine.flower_run import MARK, absolute_out, stop_marked
from sim.engine.server_app import results_dir

REPO = Path(__file__).parents[1]


def test_flower_home_config_has_the_readme_federations():
    cfg = tomllib.loads((REPO / "flower-home" / "config.toml").read_text())
    links = cfg["superlink"]
    assert links["default"] == "local-sim"
    assert links["local-sim"]["address"] == ":local-in-memory:"
    assert links["local-deployment"] == {"address": "127.0.0.1:18000", "insecure": True}
    readme = (REPO / "README.md").read_text()
    assert "export FLWR_HOME=$PWD/flower-home" in readme
    for name in ("local-sim", "local-deployment"):
        assert f"flwr run . {name}" in readme


def test_a_flower_run_needs_an_absolute_out():
    """The ServerApp runs in the SuperLink's folder: a relative or missing `out` is refused, naming the fix."""
    for bad in ("", "results/flower"):
        with pytest.raises(ValueError, match="absolute path"):
            results_dir(bad)
    assert results_dir("/tmp/x") == Path("/tmp/x")


def test_flwr_run_makes_out_absolute_at_submission(tmp_path):
    assert absolute_out('steps=8 out="results/x"', tmp_path) == f'steps=8 out="{tmp_path / "results" / "x"}"'
    assert absolute_out('out="/abs/y" steps=8', tmp_path) == 'out="/abs/y" steps=8'
    added = absolute_out("steps=8", tmp_path)
    assert added.startswith('steps=8 out="') and str(tmp_path / "results") in added


def _env(p: psutil.Process) -> dict:
    try:
        return p.environ()
    except (psutil.Error, OSError):
        return {}


def test_stop_marked_stops_every_process_carrying_the_marker():
    tag = uuid.uuid4().hex
    # a parent that starts a detached child, as `flwr run` starts a SuperLink that outlives it
    code = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], "
            "start_new_session=True); time.sleep(60)")
    parent = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, MARK: tag})
    time.sleep(1.5)
    stopped = stop_marked(tag)
    parent.wait(timeout=10)
    assert len(stopped) >= 2  # the parent and its detached child
    assert not [p for p in psutil.process_iter() if _env(p).get(MARK) == tag]

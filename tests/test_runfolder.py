"""Run folders: one writer, one configuration, a completion marker, and --resume (sim/engine/runfolder.py)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from sim.commands.cli import main
from sim.engine import runner
from sim.engine.context import load_experiment
from sim.engine.runfolder import COMPLETE, INCOMPLETE, LOCK, PARTS, is_complete

KEYS = ["schemes=[\"vanilla\", \"nograd\"]", "baseline=false", "eval-samples=2", "ddim-steps=2", "steps=4",
        "client-seed=11"]


def _cfg(*more):
    return load_experiment("smoke", KEYS + list(more))


def test_a_finished_run_is_marked_and_refuses_a_second_configuration(tmp_path):
    out = tmp_path / "run"
    runner.run_compare(_cfg(), out)
    assert (out / COMPLETE).exists() and not (out / INCOMPLETE).exists() and not (out / PARTS).exists()
    assert not (out / LOCK).exists() and is_complete(out)
    with pytest.raises(ValueError, match=r"another configuration \(it differs in \['steps'\]\)"):
        runner.run_compare(_cfg("steps=6"), out)
    with pytest.raises(ValueError, match="already holds a finished run of this configuration"):
        runner.run_compare(_cfg(), out)
    assert json.loads((out / "summary.json").read_text())["rows"][0]["steps"] == 4  # untouched
    summary = runner.run_compare(_cfg("steps=6"), out, overwrite=True)
    assert summary["rows"][0]["steps"] == 6 and "steps = 6" in (out / "config.toml").read_text()


def test_a_folder_that_is_not_a_run_is_never_emptied(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds no run"):
        runner.run_compare(_cfg(), tmp_path, overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_a_second_writer_is_refused_and_a_dead_ones_lock_taken_over(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / LOCK).write_text(f"{other.pid}\n")
        with pytest.raises(ValueError, match=f"being written by another run \\(pid {other.pid}\\)"):
            runner.run_compare(_cfg(), out)
    finally:
        other.kill()
        other.wait()
    runner.run_compare(_cfg(), out)  # its pid is gone: the lock is stale
    assert is_complete(out)


def test_resume_finishes_an_interrupted_run_without_redoing_its_finished_jobs(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    real, calls = runner.run_job, []

    def dies_on_second(cfg, scheme, *args, **kw):
        calls.append(scheme)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as a kill would, after vanilla finished
        return real(cfg, scheme, *args, **kw)

    monkeypatch.setattr(runner, "run_job", dies_on_second)
    with pytest.raises(KeyboardInterrupt):
        runner.run_compare(_cfg(), out)
    assert (out / INCOMPLETE).exists() and not is_complete(out) and not (out / LOCK).exists()
    assert sorted(p.name for p in (out / PARTS).iterdir()) == ["vanilla.pkl"]
    # what reads a run refuses the unfinished one, naming the fix
    with pytest.raises(SystemExit) as e:
        main(["plot", str(out)])
    assert e.value.code == 2 and "--resume" in capsys.readouterr().err
    with pytest.raises(ValueError, match="pass --resume to finish it"):
        runner.run_compare(_cfg(), out)

    calls.clear()
    monkeypatch.setattr(runner, "run_job", lambda cfg, scheme, *a, **kw: calls.append(scheme) or real(cfg, scheme, *a, **kw))
    summary = runner.run_compare(_cfg(), out, resume=True)
    assert calls == ["nograd"]  # vanilla came from its saved part
    assert [r["scheme"] for r in summary["rows"]] == ["vanilla", "nograd"] and is_complete(out)
    fresh = runner.run_compare(_cfg(), tmp_path / "fresh")
    assert [r["final_loss"] for r in summary["rows"]] == [r["final_loss"] for r in fresh["rows"]]

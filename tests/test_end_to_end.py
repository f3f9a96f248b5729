"""End-to-end: the CLI on the committed base model (slow: ~1 min each on 2 cores)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from sim.commands.cli import main
from sim.core.models import TINY_BASE_DIR

pytestmark = pytest.mark.slow

ROW_KEYS = {"outline_iou", "colour_acc", "final_loss", "client_trainable_params", "bytes_up_per_step",
            "bytes_down_per_step", "steps", "wall_s"}


def test_committed_base_model_card_and_size():
    card = (TINY_BASE_DIR / "MODEL_CARD.md").read_text()
    assert "splitcontrol pretrain-base" in card and "fg_colour_acc" in card
    weights = TINY_BASE_DIR / "unet" / "diffusion_pytorch_model.safetensors"
    assert weights.stat().st_size <= 20 * 2**20


def test_compare_smoke_writes_a_row_per_scheme(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["compare", "--preset", "smoke", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    rows = {r["scheme"]: r for r in summary["rows"]}
    assert set(rows) == {"base (no control)", "fedavg", "vanilla", "nograd"}
    for s in ("fedavg", "vanilla", "nograd"):
        assert ROW_KEYS <= set(rows[s]), ROW_KEYS - set(rows[s])
        assert rows[s]["steps"] == 8 and 0 <= rows[s]["outline_iou"] <= 1
        assert (out / f"samples_{s}.png").stat().st_size > 0
    assert rows["nograd"]["client_trainable_params"] == 0
    assert rows["vanilla"]["bytes_down_per_step"] > 0 and rows["vanilla"]["client_trainable_params"] > 0
    assert rows["fedavg"]["client_trainable_params"] == summary["controlnet_params"]
    assert summary["frozen_base_unchanged"] is True
    per = json.loads((out / "per_condition.json").read_text())  # paired comparisons of every pair of models
    assert set(per) == {"base", "fedavg", "vanilla", "nograd"} and len(per["nograd"]["outline_iou"]) == 4
    pairs = {(c["a"], c["b"], c["metric"]) for c in summary["comparisons"]}
    assert ("base", "nograd", "outline_iou") in pairs and ("fedavg", "vanilla", "colour_acc") in pairs
    assert "Paired comparisons over the same 4 conditions" in (out / "summary.md").read_text()
    public = (out / "config.toml").read_text()
    assert "fedavg" in public and "data-seed" not in public and "client-seed" not in public
    clients = (out / "clients.toml").read_text()  # the client-side keys, the fresh client seed drawn
    assert "data-seed = 1" in clients and "client-seed = " in clients and "client-seed = -1" not in clients
    assert "outline_iou" in capsys.readouterr().out  # the table printed at the end
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert {r["scheme"] for r in rounds} == {"fedavg", "vanilla", "nograd"}
    assert all(sum(r["steps"] for r in rounds if r["scheme"] == s) == 8 for s in ("fedavg", "vanilla", "nograd"))
    transcript = [json.loads(line) for line in (out / "transcript.jsonl").read_text().splitlines()]
    up = sum(t["bytes_up"] for t in transcript if t["scheme"] == "nograd")
    assert up == pytest.approx(rows["nograd"]["bytes_up_per_step"] * 8)
    # re-evaluating the saved ControlNets with the run's own settings reproduces its metrics
    capsys.readouterr()
    assert main(["evaluate", str(out), "--json"]) == 0
    again = {r["scheme"]: r for r in json.loads(capsys.readouterr().out.strip().splitlines()[-1])}
    for s, r in rows.items():
        assert again[s]["outline_iou"] == r["outline_iou"] and again[s]["colour_acc"] == r["colour_acc"]
    assert main(["evaluate", str(out), "--json", "--set", "control-boost=3", "--set", "control-boost-above=500",
                 "--set", "release-check=4"]) == 0
    checked = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert all(isinstance(r["released"], bool) and r["release_metric"] == "outline_iou"
               for r in checked if r["scheme"] != "base (no control)")
    with pytest.raises(SystemExit) as e:  # only evaluation keys may change
        main(["evaluate", str(out), "--set", "steps=3"])
    assert e.value.code == 2
    for fig in ("loss.png", "bytes.png", "client_cost.png", "samples.png"):  # drawn at the end of the run
        (out / fig).unlink()
    assert main(["plot", str(out)]) == 0  # and again from the files alone
    assert all((out / fig).stat().st_size > 10_000 for fig in ("loss.png", "bytes.png", "client_cost.png",
                                                                 "samples.png"))


def _measured(key: str) -> bool:
    """Timings and memory: what legitimately differs between two identical runs."""
    return key.endswith("_s") or key.endswith("_s_per_step") or "rss" in key


def test_same_seed_same_metrics_with_one_or_two_worker_processes(tmp_path):
    """Determinism: the schemes are independent, so running them in 2 processes changes nothing."""
    runs = []
    for jobs in (1, 2):
        out = tmp_path / f"jobs{jobs}"
        assert main(["compare", "--preset", "smoke", "--set", f"jobs={jobs}", "--set", "client-seed=7",
                     "--out", str(out)]) == 0  # the same client seed too: only the process split differs
        rows = json.loads((out / "summary.json").read_text())["rows"]
        runs.append([{k: v for k, v in r.items() if not _measured(k)} for r in rows])
    assert runs[0] == runs[1]


def test_eval_base_prints_colour_accuracy_json(capsys):
    assert main(["eval-base", "--n", "4", "--steps", "3", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"fg_colour_acc", "bg_colour_acc", "n"} <= set(res) and res["n"] == 4


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text(errors="ignore")
    except OSError:
        return ""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_no_worker_survives_kill_9_of_its_parent(tmp_path):
    """`compare` with jobs=2 killed with SIGKILL mid-training: its worker processes die with it."""
    import os
    import signal
    import subprocess
    import time

    out = tmp_path / "run"
    parent = subprocess.Popen([sys.executable, "-m", "sim.commands.cli", "compare", "--preset", "smoke", "--set",
                               "jobs=2", "--set", "steps=2000", "--out", str(out)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def children() -> list[int]:
        found = subprocess.run(["pgrep", "-P", str(parent.pid)], capture_output=True, text=True).stdout.split()
        return [int(p) for p in found]

    deadline = time.time() + 120
    workers = []
    while time.time() < deadline and len(workers) < 2:  # the pool's workers (the resource tracker aside)
        workers = [p for p in children() if "spawn_main" in _cmdline(p)]
        time.sleep(0.5)
    assert len(workers) >= 2, "the pool's workers never started"
    time.sleep(20)  # past their imports: training (unchecked, 2,000 steps would take them minutes)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    def running(pid: int) -> bool:  # alive and not a zombie waiting to be reaped
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    deadline = time.time() + 30
    while time.time() < deadline and any(running(p) for p in workers):
        time.sleep(0.5)
    alive = [p for p in workers if running(p)]
    for p in alive:  # do not leave them behind on failure
        os.kill(p, signal.SIGKILL)
    assert not alive, f"workers {alive} outlived their parent by 30 s"


def test_compare_with_worker_processes_ends_cleanly(tmp_path):
    """`compare` with jobs=2 finishes without the resource tracker's "leaked semaphore" warning: the
    idle workers exit on their own after a normal finish (killing them left their tqdm locks behind)."""
    import subprocess

    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "sim.commands.cli", "compare", "--preset", "smoke", "--set", "jobs=2",
                           "--set", "baseline=false", "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (out / "summary.json").exists()
    assert "leaked semaphore" not in done.stderr

"""scripts/gpu_check.py: runs on CPU at a tiny size (one JSON, every scheme), refuses a missing GPU with exit 2."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"


def _run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600)


def test_cpu_tiny_run_prints_one_json_with_every_scheme():
    from strategies import SCHEMES

    r = _run("--device", "cpu", "--preset", "sd15-mini", "--size", "64", "--batch", "1", "--steps", "0")
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(out["schemes"]) == set(SCHEMES) and out["latent"] == [4, 8, 8]
    assert out["bare_diffusers_step"]["step_s"] > 0
    assert out["schemes"]["fedavg"]["server"] is None and out["schemes"]["nograd"]["server"]["step_s"] > 0
    assert all(r["ratio_to_bare"] > 0 for r in out["schemes"].values())


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_a_gpu_it_exits_2_with_a_message():
    r = _run()
    assert r.returncode == 2 and "no CUDA device" in r.stderr and "Traceback" not in r.stderr
    r = _run("--device", "cpu")  # the full 512 px size on a CPU is refused
    assert r.returncode == 2 and "tiny sizes" in r.stderr

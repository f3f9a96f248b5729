"""End-to-end: the CLI on the committed base model (slow: ~1 min each on 2 cores)."""
from __future__ import annotations

import json

import pytest

from sim.cli import main
from sim.models import TINY_BASE_DIR

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
    assert "fedavg" in (out / "config.toml").read_text()
    assert "outline_iou" in capsys.readouterr().out  # the table printed at the end


def test_same_seed_same_metrics_with_one_or_two_worker_processes(tmp_path):
    """Determinism: the schemes are independent, so running them in 2 processes changes nothing."""
    runs = []
    for jobs in (1, 2):
        out = tmp_path / f"jobs{jobs}"
        assert main(["compare", "--preset", "smoke", "--set", f"jobs={jobs}", "--set", "schemes=vanilla,nograd",
                     "--out", str(out)]) == 0
        rows = json.loads((out / "summary.json").read_text())["rows"]
        runs.append([{k: v for k, v in r.items() if not k.endswith("_s")} for r in rows])  # drop timings
    assert runs[0] == runs[1]


def test_eval_base_prints_colour_accuracy_json(capsys):
    assert main(["eval-base", "--n", "4", "--steps", "3", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"fg_colour_acc", "bg_colour_acc", "n"} <= set(res) and res["n"] == 4

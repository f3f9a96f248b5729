"""Every sweep preset in baselines/ parses, and its smoke variant runs end to end (CI-sized)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

PRESETS = sorted((Path(__file__).parents[1] / "baselines").glob("*.toml"))


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_sweep_preset_variants_are_valid_configs(preset):
    from sim.sweep import load_sweep, variant_config

    spec = load_sweep(preset)
    for v in spec["variant"]:
        variant_config(spec, v)  # raises on unknown keys, bad values, inapplicable defenses
        variant_config(spec, v, smoke=True)


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_sweep_preset_smoke_runs(preset, tmp_path):
    from sim.cli import main

    from sim.sweep import load_sweep

    spec = load_sweep(preset)
    assert main(["sweep", str(preset), "--smoke", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "sweep.json").read_text())
    assert {r["variant"] for r in rows} == {v["name"] for v in spec["variant"]}
    for r in rows:
        assert 0 <= r["outline_iou"] <= 1 and r["final_loss"] > 0
        for a in spec.get("attacks", []):
            assert f"attack:{a}" in r
    assert (tmp_path / "sweep.md").read_text().startswith("| variant")


def test_pareto_front_keeps_only_undominated_points(tmp_path):
    from sim.plots import pareto_front, plot_privacy_utility

    pts = [(0.9, 0.7), (0.3, 0.6), (0.5, 0.5), (0.1, 0.2), (0.3, 0.65)]
    assert pareto_front(pts) == [3, 4, 0]  # (0.5, 0.5) and (0.3, 0.6) are dominated
    rows = [{"variant": f"v{i}", "scheme": "nograd", "outline_iou": y, "attack:noise-target": x}
            for i, (x, y) in enumerate(pts)]
    (tmp_path / "sweep.json").write_text(json.dumps(rows))
    assert plot_privacy_utility(tmp_path / "sweep.json").stat().st_size > 10_000

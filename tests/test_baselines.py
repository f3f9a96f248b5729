"""Every sweep preset in baselines/ parses, and its smoke variant runs end to end (CI-sized)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

PRESETS = sorted((Path(__file__).parents[1] / "baselines").glob("*.toml"))


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_sweep_preset_variants_are_valid_configs(preset):
    from sim.commands.sweep import load_sweep, variant_config

    spec = load_sweep(preset)
    for v in spec["variant"]:
        variant_config(spec, v)  # raises on unknown keys, bad values, inapplicable defenses
        variant_config(spec, v, smoke=True)


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_sweep_preset_smoke_runs(preset, tmp_path):
    from sim.commands.cli import main

    from sim.commands.sweep import load_sweep

    spec = load_sweep(preset)
    # the sweep's out under this test's own tmp_path: sweep.find_identical searches out.parent (the
    # results root), which must hold no other test's runs to copy from
    out = tmp_path / "sweep"
    assert main(["sweep", str(preset), "--smoke", "--out", str(out)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep"]
    rows = json.loads((out / "sweep.json").read_text())
    assert {r["variant"] for r in rows} == {v["name"] for v in spec["variant"]}
    for r in rows:
        if r.get("outline_iou") is not None:  # circles; other data (faces) are scored against their targets
            assert 0 <= r["outline_iou"] <= 1
        else:
            assert -1 <= r["ssim"] <= 1 and r["psnr"] > 0
        assert r["final_loss"] > 0
        for a in spec.get("attacks", []):
            assert f"attack:{a.split(':')[0]}" in r
    assert (out / "sweep.md").read_text().startswith("| variant")
    if spec.get("matrix"):  # every variant's row, with the transcript-free baseline beside the attacks
        matrix = (out / "matrix.md").read_text()
        assert all(f"| {v['name']} |" in matrix for v in spec["variant"]) and "| blind |" in matrix
    if spec.get("x_label"):
        assert (out / "sweep_utility.png").stat().st_size > 10_000
    if spec.get("frontier"):  # every row with its strongest attacks and the blind guesses, and both figures
        assert all(r["best_image"] >= 0 and r["blind_image"] > 0 and r["blind_hint"] > 0 for r in rows)
        assert all((out / f"frontier_{t}.png").stat().st_size > 10_000 for t in ("image", "hint"))
    if "schemes" in spec.get("figures", []):
        assert all((out / f).stat().st_size > 10_000 for f in ("bytes.png", "client_cost.png", "loss.png"))


def test_pareto_front_keeps_only_undominated_points(tmp_path):
    from sim.core.plots import pareto_front, plot_privacy_utility

    pts = [(0.9, 0.7), (0.3, 0.6), (0.5, 0.5), (0.1, 0.2), (0.3, 0.65)]
    assert pareto_front(pts) == [3, 4, 0]  # (0.5, 0.5) and (0.3, 0.6) are dominated
    rows = [{"variant": f"v{i}", "scheme": "nograd", "outline_iou": y, "attack:noise-target": x}
            for i, (x, y) in enumerate(pts)]
    (tmp_path / "sweep.json").write_text(json.dumps(rows))
    assert plot_privacy_utility(tmp_path / "sweep.json").stat().st_size > 10_000


@pytest.mark.slow
def test_sweep_copies_a_finished_run_of_the_same_configuration_and_runs_missing_attacks(tmp_path):
    """A variant equal to a finished run (the ``jobs`` split aside) is copied, not trained; the
    attacks the copy lacks run on it; --no-reuse trains it anyway."""
    from sim.commands.sweep import run_sweep

    small = ["num-samples=32", "steps=8", "batch-size=4", "local-steps=2", "eval-samples=2", "ddim-steps=2",
             "schemes=[\"nograd\", \"vanilla\", \"fedavg\"]", "baseline=false", "keep-messages=2", "keep-from=end",
             "fedavg-keep-optimizer=false"]
    preset = tmp_path / "p.toml"
    preset.write_text(f"name = 'p'\nbase = {json.dumps(small)}\n"
                      "[[variant]]\nname = 'a'\nset = ['jobs=1']\n"
                      "[[variant]]\nname = 'b'\nset = ['jobs=2', 'attacks=[\"noise-target\", \"grad-inversion:iters=2\"]']\n")
    rows = run_sweep(preset, tmp_path / "out")
    a, b = (tmp_path / "out" / n for n in ("a", "b"))
    assert (b / "reused_from").read_text().strip() == str(a.resolve())
    assert not (a / "attacks.json").exists()
    attacks = {(r["scheme"], r["attack"].split(":")[0]): r for r in json.loads((b / "attacks.json").read_text())}
    assert len(attacks) == 6 and attacks["fedavg", "grad-inversion"]["status"] == "ok"
    # keep-from=end: the kept round trips are the run's last; the ground-truth replay still finds them
    for scheme in ("nograd", "vanilla"):
        assert attacks[scheme, "noise-target"]["image"]["ssim"] > 0.99
    assert [r["reused_from"] for r in rows] == [None] * 3 + [str(a)] * 3
    assert [r["final_loss"] for r in rows[:3]] == [r["final_loss"] for r in rows[3:]]
    seen = __import__("torch").load(b / "seen_nograd.pt", weights_only=False)
    assert [m["stat"]["index"] for m in seen][0] > 0
    fresh = run_sweep(preset, tmp_path / "fresh", reuse=False, only=["b"])
    assert [r["final_loss"] for r in fresh] == [r["final_loss"] for r in rows[3:]]  # deterministic
    assert all(r["reused_from"] is None for r in fresh)


def test_sweep_table_names_the_strongest_attack_per_target_and_the_accounted_epsilon():
    from sim.commands.sweep import markdown

    rows = [{"variant": "none", "scheme": "nograd", "outline_iou": 0.7, "attack:noise-target": 1.0,
             "best_image": 1.0, "best_image_attack": "noise-target", "best_hint": 0.99, "best_hint_attack": "rmle",
             "prompt:prompt-inference": 0.5, "prompt:prompt-from-image": 0.81, "blind_image": 0.31, "blind_hint": 0.57,
             "epsilon": None, "delta": None},
            {"variant": "one-shot", "scheme": "vanilla", "outline_iou": 0.6, "attack:diffusion-prior": 0.72,
             "best_image": 0.72, "best_image_attack": "diffusion-prior", "blind_image": 0.31, "blind_hint": 0.57,
             "epsilon": 782.0, "delta": 1e-5},
            {"variant": "server-dp", "scheme": "fedavg", "outline_iou": 0.6, "attack:grad-inversion": 0.4,
             "epsilon": None, "delta": 1e-5}]  # accounted, but no finite epsilon (written as null)
    lines = markdown(rows).splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    cells = [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]
    assert cells[0]["best image"] == "1.00 (noise-target)" and cells[0]["best hint"] == "0.99 (rmle)"
    assert cells[0]["best prompt"] == "0.81 (prompt-from-image)" and cells[0]["epsilon"] == "-"
    assert cells[1]["best hint"] == "N/A" and cells[1]["best prompt"] == "N/A" and cells[1]["epsilon"] == "782"
    assert cells[1]["blind image / hint"] == "0.31 / 0.57"
    assert cells[2]["epsilon"] == "inf" and cells[2]["delta"] == "1e-05"
    assert "best image" not in markdown([{"variant": "a", "scheme": "x", "outline_iou": 0.5}])  # no attacks ran

"""Guided sampling with a ControlNet: where the control runs and how strongly it counts, and the
paired comparison of models sampled on the same conditions."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import perturb_zero_convs

PROMPTS = ["a red circle on a blue background", "a green circle on a white background"]


@pytest.fixture(scope="module")
def controlled(tiny_base):
    from sim.core.models import build_controlnet

    cn = perturb_zero_convs(build_controlnet(tiny_base.unet, tiny_base.preset), std=0.2)
    return cn, torch.rand(len(PROMPTS), 3, 32, 32)


def _gen(base, cn, hints, **kw):
    from sim.engine.evaluate import generate

    return generate(base, PROMPTS, "nograd" if cn is not None else None, cn, hints, steps=3, guidance=5.0,
                    progress=False, **kw)


def _controlnet_batches(cn, run) -> list[int]:
    batches = []
    handle = cn.controlnet_mid_block.register_forward_pre_hook(lambda m, args: batches.append(args[0].shape[0]))
    try:
        run()
    finally:
        handle.remove()
    return batches


def test_controlnet_runs_only_where_its_output_is_used(tiny_base, controlled):
    cn, hints = controlled
    n = len(PROMPTS)
    # riding on the prompt's guidance: once per step, on the conditional half only
    assert _controlnet_batches(cn, lambda: _gen(tiny_base, cn, hints)) == [n] * 3
    # its own guidance: the conditional branch and the prompt-less one with the hint
    assert _controlnet_batches(cn, lambda: _gen(tiny_base, cn, hints, control_guidance=2.0)) == [n] * 6
    # nowhere below control-from (3 DDIM steps at T=1000, "leading": t = 666, 333, 0)
    assert _controlnet_batches(cn, lambda: _gen(tiny_base, cn, hints, control_from=300)) == [n] * 2


def test_control_guidance_equal_to_guidance_is_the_guess_mode_prediction(tiny_base, controlled):
    cn, hints = controlled
    ride = _gen(tiny_base, cn, hints)
    split = _gen(tiny_base, cn, hints, control_guidance=5.0 + 1e-9)  # takes the three-pass formula
    assert torch.allclose(ride, split, atol=1e-4)
    assert not torch.allclose(ride, _gen(tiny_base, None, None), atol=1e-3)  # the control does something
    assert not torch.allclose(ride, _gen(tiny_base, cn, hints, control_guidance=2.0), atol=1e-3)


def test_a_late_control_window_samples_the_base_model(tiny_base, controlled):
    cn, hints = controlled
    assert torch.equal(_gen(tiny_base, cn, hints, control_from=1000), _gen(tiny_base, None, None))


def test_control_weight_is_boosted_only_at_the_high_noise_steps():
    from sim.engine.evaluate import control_weight

    assert control_weight(900, 20.0, 7.5, boost=2.0, boost_above=800) == 15.0
    assert control_weight(800, 20.0, 7.5, boost=2.0, boost_above=800) == 7.5  # t > above only
    assert control_weight(900, 20.0, None, boost=2.0, boost_above=800) == 40.0  # riding: the prompt's weight
    assert control_weight(900, 20.0, 7.5) == 7.5  # boost 1: off


def test_control_boost_changes_only_the_steps_above_its_timestep(tiny_base, controlled):
    cn, hints = controlled
    plain = _gen(tiny_base, cn, hints, control_guidance=2.0)
    # 3 DDIM steps: t = 666, 333, 0; none above 700, so nothing changes
    assert torch.equal(_gen(tiny_base, cn, hints, control_guidance=2.0, control_boost=3.0, control_boost_above=700),
                       plain)
    boosted = _gen(tiny_base, cn, hints, control_guidance=2.0, control_boost=3.0, control_boost_above=500)
    assert not torch.allclose(boosted, plain, atol=1e-4)
    # riding on the prompt's guidance, a boosted step takes the three-pass formula (the ControlNet twice)
    n = len(PROMPTS)
    assert _controlnet_batches(cn, lambda: _gen(tiny_base, cn, hints, control_boost=2.0,
                                                control_boost_above=500)) == [n] * 4


def test_control_boost_is_checked():
    from sim.core.config import ExperimentConfig

    with pytest.raises(ValueError, match="control-boost must be >= 0"):
        ExperimentConfig(control_boost=-1.0)
    with pytest.raises(ValueError, match="uncond-control"):
        ExperimentConfig(control_boost=2.0, uncond_control=True)


def test_control_guidance_scales_the_control_linearly(tiny_base, controlled):
    """One DDIM step is linear in the noise prediction, so a step's change from the base model grows
    linearly with the control's weight."""
    cn, hints = controlled
    from sim.engine.evaluate import generate

    def one(w):
        return generate(tiny_base, PROMPTS, "nograd", cn, hints, steps=1, guidance=5.0, progress=False,
                        control_guidance=w)

    d1, d2 = one(1.0) - one(0.0), one(2.0) - one(0.0)
    assert d1.abs().max() > 1e-4
    assert torch.allclose(d2, 2 * d1, atol=1e-4)


def test_paired_comparison_resolves_what_the_pairing_shows():
    from sim.core.stats import paired_comparison

    rng = np.random.default_rng(0)
    hard = rng.uniform(0, 1, 128)  # the spread between conditions, shared by both models
    a, b = hard + 0.05, hard + rng.normal(0, 0.01, 128)
    r = paired_comparison(a, b)
    assert r["resolved"] and r["p"] < 1e-6 and r["diff"] == pytest.approx(0.05, abs=0.005)
    assert r["diff_se"] == pytest.approx(np.std(a - b, ddof=1) / np.sqrt(128))
    same = paired_comparison(a, a)
    assert same["diff"] == 0.0 and same["p"] == 1.0 and not same["resolved"]
    noise = paired_comparison(hard + rng.normal(0, 0.2, 128), hard + rng.normal(0, 0.2, 128))
    assert not noise["resolved"]
    with pytest.raises(ValueError, match="same length"):
        paired_comparison(a, b[:10])


def test_paired_comparisons_cover_every_pair_and_metric():
    from sim.core.data import COLOURS
    from sim.engine.evaluate import paired_comparisons, per_condition

    n = 4
    cond = torch.zeros(n, 3, 32, 32)
    cond[:, :, 8:24, 8:24] = 1.0  # a white square per condition
    right = np.zeros((n, 32, 32, 3), np.uint8)
    right[:] = COLOURS["blue"]
    right[:, 8:24, 8:24] = COLOURS["red"]
    wrong = np.zeros_like(right)
    wrong[:] = COLOURS["green"]
    eval_set = {"condition": cond, "fg": ["red"] * n, "bg": ["blue"] * n}
    rows = paired_comparisons({k: per_condition(v, eval_set) for k, v in {"base": wrong, "x": right, "y": right}.items()})
    assert {(r["a"], r["b"], r["metric"]) for r in rows} == {
        (a, b, m) for a, b in (("base", "x"), ("base", "y"), ("x", "y")) for m in ("outline_iou", "colour_acc")}
    xy = {r["metric"]: r for r in rows if (r["a"], r["b"]) == ("x", "y")}
    assert xy["colour_acc"]["diff"] == 0.0 and not xy["colour_acc"]["resolved"]
    bx = {r["metric"]: r for r in rows if (r["a"], r["b"]) == ("base", "x")}
    assert bx["colour_acc"]["mean_a"] == 0.0 and bx["colour_acc"]["mean_b"] == 1.0 and bx["colour_acc"]["diff"] == -1.0
    assert bx["outline_iou"]["mean_b"] == pytest.approx(1.0) and bx["outline_iou"]["resolved"]
    assert [r["metric"] for r in paired_comparisons({"a": {"outline_iou": [0.1, 0.2]}, "b": {}})] == []
    assert paired_comparisons({"a": {"outline_iou": [0.1]}, "b": {"outline_iou": [0.2]}}) == []  # one condition


def test_sweep_rows_are_compared_with_their_schemes_reference_variant(tmp_path):
    from sim.commands.sweep import markdown, paired_with_reference
    from sim.core import jsonio

    rng = np.random.default_rng(1)
    hard = rng.uniform(0, 1, 64)
    per = {"none": {"nograd": hard, "fedavg": hard}, "strong": {"nograd": hard - 0.2, "fedavg": hard},
           "weak": {"nograd": hard + rng.normal(0, 0.3, 64)}}
    for variant, schemes in per.items():
        (tmp_path / variant).mkdir()
        (tmp_path / variant / "per_condition.json").write_text(jsonio.dumps(
            {s: {"outline_iou": v.tolist()} for s, v in schemes.items()}))
    rows = [{"variant": v, "scheme": s} for v in per for s in per[v]] + [{"variant": "old", "scheme": "nograd"}]
    paired_with_reference(tmp_path, rows)
    by = {(r["variant"], r["scheme"]): r for r in rows}
    assert "outline_iou_vs_ref" not in by["none", "nograd"]  # the reference itself
    strong = by["strong", "nograd"]
    assert strong["ref_variant"] == "none" and strong["outline_iou_vs_ref"] == pytest.approx(-0.2)
    assert strong["outline_iou_vs_ref_resolved"]
    assert by["strong", "fedavg"]["outline_iou_vs_ref"] == 0.0 and not by["strong", "fedavg"]["outline_iou_vs_ref_resolved"]
    assert not by["weak", "nograd"]["outline_iou_vs_ref_resolved"]
    assert "outline_iou_vs_ref" not in by["old", "nograd"]  # a run without per_condition.json
    assert "-0.200 ± 0.000 vs none" in markdown([{**r, "outline_iou": 0.5} for r in rows])


def test_sampling_bench_times_every_layout_on_the_same_conditions():
    from sim.commands.bench import sampling_bench
    from sim.engine.context import load_experiment

    res = sampling_bench(load_experiment("smoke", ["eval-samples=2"]), steps=2, repeats=1)
    assert set(res["seconds"]) == {"doubled", "ride", "decoupled"} and res["conditions"] == 2
    assert res["ratio_to_doubled"]["doubled"] == 1.0 and all(v > 0 for v in res["seconds"].values())
    assert res["max_image_diff"] < 1e-4  # the same prediction as the former layout

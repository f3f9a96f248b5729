"""sim.engine.release: the server withholds a ControlNet that controls no better than none."""
from __future__ import annotations

import pytest
import torch

from conftest import perturb_zero_convs

PROMPTS = ["a red circle on a blue background", "a green circle on a white background"]


@pytest.fixture
def circles():
    from sim.core import data as data_mod

    return data_mod.to_tensors(data_mod.load_dataset("fill50k", n=4, size=32, seed=3))


def _perturbed(tiny_base):
    from sim.core.models import build_controlnet

    return perturb_zero_convs(build_controlnet(tiny_base.unet, tiny_base.preset), std=0.2)


def test_a_withheld_controlnet_samples_exactly_the_base_model(tiny_base):
    from sim.engine.evaluate import generate
    from sim.engine.release import withhold

    cn = _perturbed(tiny_base)
    hints = torch.rand(len(PROMPTS), 3, 32, 32)
    kw = dict(steps=2, guidance=5.0, progress=False, control_guidance=2.0)
    base_only = generate(tiny_base, PROMPTS, **kw)
    assert not torch.allclose(generate(tiny_base, PROMPTS, "nograd", cn, hints, **kw), base_only, atol=1e-4)
    withhold(cn)
    assert torch.equal(generate(tiny_base, PROMPTS, "nograd", cn, hints, **kw), base_only)


@pytest.mark.parametrize("case", ["better", "worse", "unresolved"])
def test_the_check_releases_only_a_controlnet_that_resolvably_beats_no_control(tiny_base, circles, monkeypatch, case):
    """The decision, with the sampler replaced by images whose scores are known: the targets (filled
    discs on the outlines, IoU ~1) or blank images (IoU 0). better: controlled = targets, plain = blank;
    worse: the other way round; unresolved: both the targets but for one plain image, a higher mean that
    a paired test over 4 conditions cannot tell from chance."""
    import sim.engine.release as release

    good, blank = circles["target"], torch.zeros_like(circles["target"])
    partly = torch.cat([good[:3], blank[3:]])
    images = {"better": (good, blank), "worse": (blank, good), "unresolved": (good, partly)}[case]

    def fake_generate(base, prompts, scheme=None, controlnet=None, hints=None, **kw):
        return images[0] if scheme is not None else images[1]

    monkeypatch.setattr(release, "generate", fake_generate)
    cn = _perturbed(tiny_base)
    before = [p.clone() for m in release.output_projections(cn) for p in m.parameters()]
    record = release.release_check(tiny_base, circles, "nograd", cn, circles=True, steps=2, guidance=5.0, seed=0)
    assert record["metric"] == "outline_iou" and record["conditions"] == 4
    assert record["released"] is (case == "better")
    assert (record["with_control"] > record["without"]) is (case != "worse")
    assert (record["p"] < 0.05) is (case != "unresolved")
    after = [p for m in release.output_projections(cn) for p in m.parameters()]
    if case == "better":
        assert all(torch.equal(a, b) for a, b in zip(after, before))
    else:
        assert all(torch.count_nonzero(a) == 0 for a in after)


def test_a_tie_is_withheld(tiny_base, circles):
    """A ControlNet that adds nothing (zero output projections) samples like the base model: not better, withheld."""
    from sim.core.models import build_controlnet
    from sim.engine.release import release_check

    cn = build_controlnet(tiny_base.unet, tiny_base.preset)
    record = release_check(tiny_base, circles, "nograd", cn, circles=True, steps=2, guidance=5.0, seed=0,
                           control_guidance=2.0)
    assert record["with_control"] == record["without"] and record["released"] is False


def test_release_check_is_refused_below_zero():
    from sim.core.config import ExperimentConfig

    with pytest.raises(ValueError, match="release-check must be >= 0"):
        ExperimentConfig(release_check=-1)

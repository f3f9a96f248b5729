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


@pytest.mark.parametrize("control_better", [True, False])
def test_the_check_releases_only_a_controlnet_that_beats_no_control(tiny_base, circles, monkeypatch, control_better):
    """The decision, with the sampler replaced: the controlled images are the targets (filled discs on
    the outlines: IoU ~1) or blank, the uncontrolled ones the other way round."""
    import sim.engine.release as release

    good, blank = circles["target"], torch.zeros_like(circles["target"])

    def fake_generate(base, prompts, scheme=None, controlnet=None, hints=None, **kw):
        controlled = scheme is not None
        return good if controlled == control_better else blank

    monkeypatch.setattr(release, "generate", fake_generate)
    cn = _perturbed(tiny_base)
    before = [p.clone() for m in release.output_projections(cn) for p in m.parameters()]
    record = release.release_check(tiny_base, circles, "nograd", cn, circles=True, steps=2, guidance=5.0, seed=0)
    assert record["metric"] == "outline_iou" and record["conditions"] == 4
    assert record["released"] is control_better
    assert (record["with_control"] > record["without"]) is control_better
    after = [p for m in release.output_projections(cn) for p in m.parameters()]
    if control_better:
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

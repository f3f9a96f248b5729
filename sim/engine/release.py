"""The release check: the server withholds a ControlNet that controls no better than none.

Before a trained ControlNet is released (evaluated, saved), the server samples ``n`` public
auxiliary conditions (:func:`sim.core.splits.aux_set`: disjoint from every client's data and
from the eval set) with it and without it, under the run's own sampling recipe, and scores how
well the images follow their conditions (outline IoU on circles, edge SSIM otherwise). Where the
ControlNet does not beat the base model on that score it is withheld: its output projections
(the zero-initialised convolutions) are set to zero, as at initialisation, so every residual is
exactly 0 and sampling with it is exactly the base model's. "Beat" is a paired test over the
same conditions and initial noise (:func:`sim.core.stats.paired_comparison`): the ControlNet is
released only when it scores higher and the difference is resolved (p < 0.05), so a ControlNet
whose effect the check cannot tell from none is withheld too. A defense may then remove control;
it cannot leave a model worse than none, up to what ``n`` conditions can resolve.

What it needs: the released ControlNet and public data, nothing of any client. It is
post-processing of what the server already holds, so it changes no message, no attack's view and
no (epsilon, delta) (differential privacy is closed under post-processing). What it assumes:
public conditions drawn like the private ones (the auxiliary data of this simulation are).
"""
from __future__ import annotations

import numpy as np
import torch

from sim.core.condition_metrics import infer_condition_kind
from sim.core.diffusion import to_uint8
from sim.core.fidelity import edge_ssim_per_image
from sim.core.metrics import outline_iou_per_image
from sim.core.stats import paired_comparison
from sim.engine.evaluate import conditions_uint8, generate


def output_projections(controlnet) -> list[torch.nn.Module]:
    """The ControlNet's zero-initialised output convolutions: every residual it adds passes one."""
    return list(controlnet.controlnet_down_blocks) + [controlnet.controlnet_mid_block]


def withhold(controlnet) -> None:
    """Zero the output projections in place: the ControlNet then adds exactly nothing."""
    with torch.no_grad():
        for module in output_projections(controlnet):
            for p in module.parameters():
                p.zero_()


def fidelity(images_uint8, conditions_uint8, circles: bool) -> tuple[str, np.ndarray]:
    """(name, per-image scores) of how well images follow their conditions: outline IoU on circles,
    else the SSIM of their Canny edges against the condition's (edge maps only)."""
    if circles:
        return "outline_iou", outline_iou_per_image(images_uint8, conditions_uint8)
    if infer_condition_kind(conditions_uint8) == "none":
        raise ValueError("release-check scores how well images follow their conditions: it needs circles or edge "
                         "maps (outline / canny conditions), and these conditions are neither; set release-check=0")
    return "edge_ssim", edge_ssim_per_image(images_uint8, conditions_uint8)


def base_scores(base, aux: dict, circles: bool, steps: int, guidance: float, seed: int) -> np.ndarray:
    """Per image, how well the base model alone follows ``aux``'s conditions (:func:`fidelity`): what
    every ControlNet of a run is checked against, so a caller may compute it once."""
    plain = to_uint8(generate(base, aux["prompt"], steps=steps, guidance=guidance, seed=seed, progress=False))
    return fidelity(plain, conditions_uint8(aux["condition"]), circles)[1]


def release_check(base, aux: dict, scheme: str, controlnet, circles: bool, steps: int, guidance: float,
                  seed: int, without: np.ndarray | None = None, **sampling) -> dict:
    """Sample ``aux`` (public conditions: ``prompt``, ``condition``) with ``controlnet`` and without it;
    withhold it (:func:`withhold`, in place) unless it scores higher, resolved by a paired test.
    ``without``: :func:`base_scores` of the same arguments, if already computed. ``sampling``:
    :func:`generate`'s keywords for the control and the defenses at inference, as the run samples.
    Returns the record: ``metric``, the means ``with_control`` and ``without``, the paired test's
    ``p``, ``conditions`` and ``released`` (bool)."""
    conds = conditions_uint8(aux["condition"])
    controlled = to_uint8(generate(base, aux["prompt"], scheme, controlnet, aux["condition"], steps=steps,
                                   guidance=guidance, seed=seed, progress=False, **sampling))
    metric, with_control = fidelity(controlled, conds, circles)
    if without is None:
        without = base_scores(base, aux, circles, steps, guidance, seed)
    test = paired_comparison(with_control, without)
    released = bool(test["diff"] > 0 and test["resolved"])
    if not released:
        withhold(controlnet)
    return {"metric": metric, "with_control": float(with_control.mean()), "without": float(without.mean()),
            "p": test["p"], "conditions": len(conds), "released": released}

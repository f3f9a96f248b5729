"""Generate images with (or without) a trained ControlNet and score them.

Scores (see :func:`score`): on circles ``outline_iou`` (IoU of the generated circle with the
condition's disc) and prompt-colour accuracy (``fg_colour_acc``, ``bg_colour_acc`` and
``colour_acc`` = both right), on any data condition fidelity and similarity to the target.
Sampling is DDIM with classifier-free guidance; every model of a run is sampled on the same
conditions from the same initial noise, so :func:`paired_comparisons` compares two of them
condition by condition.

Where the control goes under guidance
-------------------------------------
With ``u = eps(x, "")`` the base model without prompt, ``h = eps_control(x, "", hint)`` the
controlled model without prompt and ``c = eps_control(x, prompt, hint)``, the default is the
two-condition guidance of InstructPix2Pix (Brooks et al., CVPR 2023), the hint first::

    eps = u + control_guidance * (h - u) + guidance * (c - h)

The control's direction ``h - u`` carries no prompt, and the prompt's ``c - h`` is taken with
the control in place, so each gets its own weight. With ``control_guidance == guidance`` this is
``u + guidance * (c - u)``: the ControlNet only in the conditional branch (diffusers'
``guess_mode``), computed in two passes; then the control is amplified with the prompt, and so is
whatever colour error the ControlNet's residuals carry (README, "Control without
compromise"). ``uncond_control=True`` puts the control in both branches
(``eps = h + guidance * (c - h)``): guidance then amplifies only the prompt. The ControlNet
runs only in the branches that use it, each branch as its own batch (faster here than one
doubled batch).

``control_boost`` raises the control's weight at the first, high-noise steps (t >
``control_boost_above``): there the prompt's guidance draws the base model's own circle wherever the
initial noise puts it, and a control weaker than that leaves it as a second, half-erased blob beside
the controlled one (README, "Control without compromise").
"""
from __future__ import annotations

import numpy as np
import torch

from defenses import DefenseStack, HookContext
from sim.core.condition_metrics import (condition_fidelity, infer_condition_kind, target_similarity,
                                        target_similarity_per_image)
from sim.core.config import ExperimentConfig
from sim.core.diffusion import bar_position, cfg_combine, ddim_sample, to_uint8
from sim.core.feature_net import load_feature_net
from sim.core.fidelity import clip_score, fid_project, standard_fid
from sim.core.metrics import colour_accuracy, colours_right, outline_iou_per_image
from sim.core.models import ddpm_scheduler
from sim.core.stats import paired_comparison, standard_error
from strategies import get_strategy
from strategies.base import client_secret, composed_eps


def inference_secret(cfg) -> int | None:
    """The secret of client 0, which samples in the evaluation (its fixed per-client values, e.g.
    fp16's offset, apply at inference as in training); None where the client-side keys are not held."""
    if isinstance(cfg, ExperimentConfig) and cfg.client_seed >= 0:
        return client_secret(cfg.client_seed, 0, stream=1)
    return None


@torch.no_grad()
def generate(base, prompts: list[str], scheme: str | None = None, controlnet=None,
             hints: torch.Tensor | None = None, steps: int = 20, guidance: float = 5.0, seed: int = 0,
             progress: bool = True, desc: str = "sampling", uncond_control: bool = False,
             defenses: tuple[str, ...] = (), secret: int | None = None,
             control_guidance: float | None = None, control_from: int = 0, control_boost: float = 1.0,
             control_boost_above: int = 800) -> torch.Tensor:
    """Images in [-1, 1] from the frozen base model, controlled by ``controlnet`` when given.

    ``scheme`` decides how the ControlNet reads the hint (its strategy's ``cut_features``).
    Guidance (module doc): ``guidance`` weighs the prompt, ``control_guidance`` the control
    (None: the same weight, the control riding on the prompt's guidance: two passes per step;
    otherwise three). ``uncond_control`` puts the control in both branches instead
    (``control_guidance`` unused). ``control_boost`` multiplies the control's weight (``control_guidance``,
    or ``guidance`` where the control rides on it) at the high-noise steps t > ``control_boost_above``,
    where the layout is decided (:func:`control_weight`). The ControlNet runs only in the branches whose
    output uses it, and acts only at sampling steps t >= ``control_from``; below, the base model samples alone.
    ``defenses`` (the run's defense specs) apply the split client's pipeline at inference
    as in training (activation, wire quantisation, offsets, noise; the ControlNet gets the
    empty prompt when prompts stay home), from the generating client 0's side (``secret``: its
    secret, for fixed per-client values; its inference noise comes from the public ``seed``:
    what it samples is not private training data). Under a
    timestep policy (t_start > 0, or a latent defense that moves the sent timesteps) the
    ControlNet acts only from the smallest timestep it was trained on
    (``DefenseStack.trained_from``) if that is above ``control_from``. (Measured on the
    defense sweep: applied at every step, a ControlNet trained at t >= 993 pushed outline
    IoU from 0.27 without control to 0.11.)
    """
    p = base.preset
    n = len(prompts)
    ctx = base.encode_prompts(prompts)
    null = base.encode_prompts([""]).expand(n, -1, -1)
    strategy = get_strategy(scheme) if scheme is not None else None
    stack = DefenseStack(defenses, strategy, p.latent_channels * p.latent_size ** 2) \
        if defenses and strategy is not None else None
    defense_gen = torch.Generator().manual_seed(seed + 1)
    sched = ddpm_scheduler(p)
    first = max(control_from, stack.trained_from(sched) if stack is not None else 0)

    def plain(x, t, c):  # the base model without control
        return composed_eps(None, base, None, x, t, c, None)

    def controlled(x, t, c):
        if stack is None:
            return composed_eps(strategy, base, controlnet, x, t, c, hints)
        hook_ctx = HookContext(t, sched, 0, defense_gen, inference=True, secret=secret)
        return composed_eps(strategy, base, controlnet, x, t, c, hints, None, stack, hook_ctx,
                            None if stack.sends_prompt else null)

    def guided(x, step: int):
        t = torch.full((n,), step, dtype=torch.int64)
        model = controlled if controlnet is not None and step >= first else plain
        if guidance == 1.0:
            return model(x, t, ctx)
        if model is plain or uncond_control:
            return cfg_combine(model(x, t, null), model(x, t, ctx), guidance)
        uncond, cond = plain(x, t, null), controlled(x, t, ctx)
        weight = control_weight(step, guidance, control_guidance, control_boost, control_boost_above)
        if weight == guidance:  # the control rides on the prompt's guidance
            return cfg_combine(uncond, cond, guidance)
        hint_only = controlled(x, t, null)  # the control's direction, then the prompt's on top of it
        return cfg_combine(uncond, hint_only, weight) + guidance * (cond - hint_only)

    g = torch.Generator().manual_seed(seed)
    shape = (n, p.latent_channels, p.latent_size, p.latent_size)
    z = ddim_sample(guided, sched, shape, steps=steps, generator=g, progress=progress, desc=desc,
                    position=bar_position())
    return base.autoencoder.decode(z)


def control_weight(step: int, guidance: float, control_guidance: float | None = None, boost: float = 1.0,
                   boost_above: int = 800) -> float:
    """The control's guidance weight at sampling timestep ``step``: ``control_guidance`` (None: ``guidance``,
    the control riding on the prompt's), times ``boost`` where ``step`` > ``boost_above``."""
    weight = guidance if control_guidance is None else control_guidance
    return weight * boost if step > boost_above else weight


def conditions_uint8(conditions: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) hints in [0, 1] -> (N, H, W, 3) uint8."""
    return (conditions * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def score(images_uint8, conditions_uint8, fgs=None, bgs=None, targets_uint8=None, prompts=None,
          inception_weights=None, clip_weights=None, condition_kind: str | None = None,
          circles: bool | None = None, feature_net: str | None = None) -> dict:
    """Task metrics of generated images against their conditions, their targets and (circles) their prompts.

    Condition fidelity by the condition's kind (:mod:`sim.core.condition_metrics`):
    ``condition_kind`` ``"outline"`` / ``"canny"`` re-extract Canny edges from each image and
    compare them with the condition's (``edge_ssim``, as in the paper, and ``edge_f1``);
    ``"none"`` scores no fidelity. None infers it: ``"outline"`` for circle data, else
    ``"canny"`` when the conditions look like edge maps, else ``"none"``.

    The circle metrics, only on circle data (``circles``; None = when ``fgs`` are given):
    ``outline_iou`` (Fill50K circles) with its standard error ``outline_iou_se`` over the
    eval images (:func:`standard_error`) and prompt-colour accuracy.

    With ``targets_uint8``: ``psnr`` / ``ssim`` of each image against its target, and
    ``fid_project``: the Frechet distance on the project's own feature network
    (sim/feature_net.py) -- "FID (project features)", not Inception FID; few samples inflate
    it, so compare runs at equal ``eval-samples``.

    Only with local weights the user points to (nothing is downloaded):
    ``inception_weights`` (a TorchScript Inception file) adds ``fid_inception``, "FID
    (Inception)" of the targets vs the images (:func:`sim.core.fidelity.standard_fid`);
    ``clip_weights`` (a Hugging Face CLIP folder) adds ``clip_score`` of each image vs
    its prompt in ``prompts`` (:func:`sim.core.fidelity.clip_score`). Both see 32x32 images
    upsampled, so neither is comparable with papers' values at 512 px."""
    circles = fgs is not None if circles is None else circles
    if condition_kind is None:
        condition_kind = "outline" if circles else infer_condition_kind(conditions_uint8)
    out = {}
    if circles:
        ious = outline_iou_per_image(images_uint8, conditions_uint8)
        out.update(outline_iou=float(ious.mean()), outline_iou_se=standard_error(ious))
    out.update(condition_fidelity(images_uint8, conditions_uint8, condition_kind))
    if circles and fgs is not None:
        out.update(colour_accuracy(images_uint8, fgs, bgs))
    if targets_uint8 is not None:
        out.update(target_similarity(images_uint8, targets_uint8))
    if targets_uint8 is not None and len(targets_uint8) >= 2:
        out["fid_project"] = float(fid_project(targets_uint8, images_uint8, net=load_feature_net(feature_net)))
        if inception_weights:
            out["fid_inception"] = float(standard_fid(targets_uint8, images_uint8, inception_weights))
    if clip_weights:
        if prompts is None:
            raise ValueError("clip_score needs the prompts the images were generated from")
        out["clip_score"] = clip_score(images_uint8, prompts, clip_weights)
    return out


def evaluate(base, eval_set: dict, scheme: str | None, controlnet, steps: int, guidance: float, seed: int,
             desc: str, uncond_control: bool = False, defenses: tuple[str, ...] = (),
             inception_weights=None, clip_weights=None, secret: int | None = None,
             control_guidance: float | None = None, control_from: int = 0, control_boost: float = 1.0,
             control_boost_above: int = 800, feature_net: str | None = None) -> tuple[dict, np.ndarray]:
    """Generate one image per eval condition (:func:`generate`) and score it; returns (metrics, uint8 images).

    ``inception_weights`` / ``clip_weights``: local weights for ``fid_inception`` and
    ``clip_score`` (see :func:`score`); None or "" leaves them out."""
    images = generate(base, eval_set["prompt"], scheme, controlnet, eval_set["condition"], steps=steps,
                      guidance=guidance, seed=seed, desc=desc, uncond_control=uncond_control, defenses=defenses,
                      secret=secret, control_guidance=control_guidance, control_from=control_from,
                      control_boost=control_boost, control_boost_above=control_boost_above)
    imgs = to_uint8(images)
    conds = conditions_uint8(eval_set["condition"])
    return score(imgs, conds, eval_set.get("fg"), eval_set.get("bg"), to_uint8(eval_set["target"]),
                 prompts=eval_set["prompt"], inception_weights=inception_weights, clip_weights=clip_weights,
                 feature_net=feature_net,
                 condition_kind=eval_set.get("condition_kind")), imgs


def per_condition(images_uint8, eval_set: dict) -> dict[str, np.ndarray]:
    """Per eval condition: on circle data (prompts naming colours) ``outline_iou`` and ``colour_acc``
    (1 = both colours right); on any other data ``psnr`` and ``ssim`` against the target."""
    if eval_set.get("fg") is None:
        return target_similarity_per_image(images_uint8, to_uint8(eval_set["target"]))
    fg_ok, bg_ok = colours_right(images_uint8, eval_set["fg"], eval_set["bg"])
    return {"outline_iou": outline_iou_per_image(images_uint8, conditions_uint8(eval_set["condition"])),
            "colour_acc": (fg_ok & bg_ok).astype(np.float64)}


def paired_comparisons(scores: dict[str, dict]) -> list[dict]:
    """Every pair of sampled models (``scores``: name -> :func:`per_condition` scores on the same
    conditions and initial noise), compared condition by condition
    (:func:`sim.core.stats.paired_comparison`) on each metric both have: one row per (a, b, metric);
    none with fewer than two conditions."""
    names, rows = list(scores), []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            for metric in [m for m in scores[a] if m in scores[b] and len(scores[a][m]) >= 2]:
                rows.append({"a": a, "b": b, "metric": metric, "mean_a": float(np.mean(scores[a][metric])),
                             "mean_b": float(np.mean(scores[b][metric])),
                             **paired_comparison(scores[a][metric], scores[b][metric])})
    return rows


def comparisons_markdown(rows: list[dict]) -> str:
    """The paired comparisons as a Markdown table (what summary.md shows under the summary)."""
    lines = ["| a | b | metric | a | b | a - b ± SE | p | resolved |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['a']} | {r['b']} | {r['metric']} | {r['mean_a']:.3f} | {r['mean_b']:.3f} | "
              f"{r['diff']:+.3f} ± {r['diff_se']:.3f} | {r['p']:.3g} | {'yes' if r['resolved'] else 'no'} |"
              for r in rows]
    return "\n".join(lines)

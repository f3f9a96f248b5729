"""Generate images with (or without) a trained ControlNet and score them.

Scores (see :mod:`sim.core.metrics`): ``outline_iou`` (IoU of the generated circle with the
condition's disc), prompt-colour accuracy (``fg_colour_acc``, ``bg_colour_acc`` and
``colour_acc`` = both right). Sampling is DDIM with classifier-free guidance.

Where the control goes under guidance
-------------------------------------
By default the ControlNet's residuals are added in the conditional branch only and the
unconditional branch is the base model alone (what diffusers' ControlNet pipeline does
in ``guess_mode``), so guidance ``w`` amplifies the control together with the prompt:
``eps = eps_base(x, "") + w * (eps_control(x, prompt) - eps_base(x, ""))``. With
``uncond_control=True`` both branches get the control and guidance amplifies only the
prompt. Measured on the ControlNets of an earlier default run (1,200 steps, DDIM-50,
guidance 5, 32 conditions): outline IoU 0.49 -> 0.64 (nograd), 0.47 -> 0.64 (vanilla),
0.43 -> 0.58 (fedavg) when moving from both branches to the conditional one only.
"""
from __future__ import annotations

import numpy as np
import torch

from defenses import DefenseStack, HookContext
from sim.core.condition_metrics import condition_fidelity, infer_condition_kind, target_similarity
from sim.core.config import ExperimentConfig
from sim.core.diffusion import bar_position, ddim_sample, to_uint8
from sim.core.fidelity import clip_score, fid_project, standard_fid
from sim.core.metrics import colour_accuracy, outline_iou_per_image
from sim.core.models import ddpm_scheduler
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
             defenses: tuple[str, ...] = (), secret: int | None = None) -> torch.Tensor:
    """Images in [-1, 1] from the frozen base model, controlled by ``controlnet`` when given.

    ``scheme`` decides how the ControlNet reads the hint (its strategy's ``cut_features``);
    ``uncond_control`` whether guidance's unconditional branch gets the control too (module doc).
    ``defenses`` (the run's defense specs) apply the split client's pipeline at inference
    as in training (activation, wire quantisation, offsets, noise; the ControlNet gets the
    empty prompt when prompts stay home), from the generating client 0's side (``secret``: its
    secret, for fixed per-client values; its inference noise comes from the public ``seed``:
    what it samples is not private training data). Under a
    timestep policy (t_start > 0, or a latent defense that moves the sent timesteps) the
    ControlNet acts only at sampling steps t >= the smallest timestep it was trained on
    (``DefenseStack.trained_from``); below, the base model samples alone. (Measured on the
    defense sweep: applied at every step, a ControlNet trained at t >= 993 pushed outline
    IoU from 0.27 without control to 0.11.)
    """
    p = base.preset
    ctx = base.encode_prompts(prompts)
    null = base.encode_prompts([""])
    n = len(prompts)
    strategy = get_strategy(scheme) if scheme is not None else None
    stack = DefenseStack(defenses, strategy, p.latent_channels * p.latent_size ** 2) \
        if defenses and strategy is not None else None
    defense_gen = torch.Generator().manual_seed(seed + 1)
    sched = ddpm_scheduler(p)
    t_start = stack.trained_from(sched) if stack is not None else 0

    def eps_fn(x, t, c):
        h = None if hints is None else hints.repeat(x.shape[0] // hints.shape[0], 1, 1, 1)
        scale = None
        if controlnet is not None and not uncond_control and x.shape[0] == 2 * n:  # [cond, uncond] halves
            scale = torch.cat([torch.ones(n), torch.zeros(n)])
        if t_start > 0:  # the ControlNet acts only at the timesteps it was trained on
            scale = (scale if scale is not None else torch.ones(x.shape[0])) * (t >= t_start).float()
        if stack is None:
            return composed_eps(strategy, base, controlnet, x, t, c, h, scale)
        hook_ctx = HookContext(t, sched, 0, defense_gen, inference=True, secret=secret)
        cn_ctx = None if stack.sends_prompt else null.expand(x.shape[0], *null.shape[1:])
        return composed_eps(strategy, base, controlnet, x, t, c, h, scale, stack, hook_ctx, cn_ctx)

    g = torch.Generator().manual_seed(seed)
    shape = (len(prompts), p.latent_channels, p.latent_size, p.latent_size)
    z = ddim_sample(eps_fn, sched, shape, ctx, null, steps=steps, guidance=guidance,
                    generator=g, progress=progress, desc=desc,
                    position=bar_position())
    return base.autoencoder.decode(z)


def conditions_uint8(conditions: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) hints in [0, 1] -> (N, H, W, 3) uint8."""
    return (conditions * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def standard_error(values) -> float:
    """Standard error of the mean of per-image scores (sample std / sqrt(n)); 0 for one image.

    The eval set is a sample of conditions, so a mean score is an estimate: at the default
    32 conditions the outline IoU of a trained ControlNet (per image ~0 or ~1, std ~0.4)
    has a standard error of ~0.07, at 128 of ~0.035; differences below ~2 SE are noise."""
    v = np.asarray(values, dtype=np.float64)
    return float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0


def score(images_uint8, conditions_uint8, fgs=None, bgs=None, targets_uint8=None, prompts=None,
          inception_weights=None, clip_weights=None, condition_kind: str | None = None,
          circles: bool | None = None) -> dict:
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
        out["fid_project"] = float(fid_project(targets_uint8, images_uint8))
        if inception_weights:
            out["fid_inception"] = float(standard_fid(targets_uint8, images_uint8, inception_weights))
    if clip_weights:
        if prompts is None:
            raise ValueError("clip_score needs the prompts the images were generated from")
        out["clip_score"] = clip_score(images_uint8, prompts, clip_weights)
    return out


def evaluate(base, eval_set: dict, scheme: str | None, controlnet, steps: int, guidance: float, seed: int,
             desc: str, uncond_control: bool = False, defenses: tuple[str, ...] = (),
             inception_weights=None, clip_weights=None, secret: int | None = None) -> tuple[dict, np.ndarray]:
    """Generate one image per eval condition and score it; returns (metrics, uint8 images).

    ``inception_weights`` / ``clip_weights``: local weights for ``fid_inception`` and
    ``clip_score`` (see :func:`score`); None or "" leaves them out."""
    images = generate(base, eval_set["prompt"], scheme, controlnet, eval_set["condition"], steps=steps,
                      guidance=guidance, seed=seed, desc=desc, uncond_control=uncond_control, defenses=defenses,
                      secret=secret)
    imgs = to_uint8(images)
    conds = conditions_uint8(eval_set["condition"])
    return score(imgs, conds, eval_set.get("fg"), eval_set.get("bg"), to_uint8(eval_set["target"]),
                 prompts=eval_set["prompt"], inception_weights=inception_weights, clip_weights=clip_weights), imgs

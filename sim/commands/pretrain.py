"""Pretrain and evaluate the tiny frozen base model (the laptop-sized "Stable Diffusion").

``splitcontrol pretrain-base`` trains the ``tiny`` preset's UNet on Fill50K-style
circles (text -> image, no control) and writes a diffusers folder with the EMA
weights (``unet/``), a JSON-lines training log and ``train_state.json`` (last step,
loss, wall time and the config). The committed model card (sim/assets/tiny-base/
MODEL_CARD.md) records the command, these numbers and ``eval-base``'s metrics. ``splitcontrol eval-base``
generates images with DDIM + classifier-free guidance and measures whether the
generated circle and background have the colours the prompt names.

Recipe (chosen from the team's offline measurements; see the model card): epsilon prediction, cosine
schedule, min-SNR-5 loss weighting (colour is decided at high noise, which plain
epsilon MSE under-weights), AdamW 1e-3 with warm-up, EMA of the weights, 10% prompt
dropout to the empty prompt for classifier-free guidance.
"""
from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from sim.core import data as data_mod
from sim.core.diffusion import (
    min_snr_weights,
    noisy_latents,
    sample_timesteps,
    to_uint8,
    weighted_mse,
)
from sim.core.metrics import colour_accuracy
from sim.core.models import (
    build_text_encoder,
    build_unet,
    ddpm_scheduler,
    get_preset,
    load_base,
)
from sim.core.plots import save_image_grid
from sim.engine.evaluate import generate

PRETRAIN_DATA_SEED = 1000  # base-model data; client data use other seeds
PRETRAIN_MAX_RADIUS = 0.35  # the base learns the full size range; client data use its lower part


@dataclass(frozen=True)
class PretrainConfig:
    out: str
    steps: int = 6000
    minutes: float | None = None
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 200
    ema_decay: float = 0.999
    min_snr_gamma: float | None = 5.0
    prompt_dropout: float = 0.1
    num_samples: int = 20000
    seed: int = 0
    threads: int | None = None
    save_every: int = 500


def _save(ema_unet, out: Path, log: dict) -> None:
    (out / "unet").mkdir(parents=True, exist_ok=True)
    ema_unet.save_pretrained(out / "unet")
    (out / "train_state.json").write_text(json.dumps(log, indent=2))


def pretrain_base(cfg: PretrainConfig) -> dict:
    """Train the tiny base UNet; returns the final log entry (also written to disk)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    preset = get_preset("tiny")
    ds = data_mod.load_dataset("fill50k", n=cfg.num_samples, size=preset.image_size, seed=PRETRAIN_DATA_SEED,
                               max_radius=PRETRAIN_MAX_RADIUS)
    tensors = data_mod.to_tensors(ds)
    images, prompts = tensors["target"], tensors["prompt"]
    text = build_text_encoder(preset)
    context = text(prompts)  # (N, L, D): the encoder is frozen, so encode once
    null_context = text([""])
    unet = build_unet(preset, seed=cfg.seed).train()
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    sched = ddpm_scheduler(preset)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(cfg.seed)
    start = time.time()
    log_path = out / "train_log.jsonl"
    log_path.write_text("")
    running = None
    bar = tqdm(range(1, cfg.steps + 1), desc="pretrain-base", mininterval=5)
    entry: dict = {}
    for step in bar:
        idx = torch.randint(0, images.shape[0], (cfg.batch_size,), generator=g)
        z0 = images[idx]
        ctx = context[idx].clone()
        drop = torch.rand(cfg.batch_size, generator=g) < cfg.prompt_dropout
        ctx[drop] = null_context[0]
        eps = torch.randn(z0.shape, generator=g)
        t = sample_timesteps(cfg.batch_size, sched.config.num_train_timesteps, g)
        x_t = noisy_latents(sched, z0, eps, t)
        eps_hat = unet(x_t, t, encoder_hidden_states=ctx).sample
        loss = weighted_mse(eps_hat, eps, min_snr_weights(sched, t, cfg.min_snr_gamma))
        for group in opt.param_groups:
            group["lr"] = cfg.lr * min(1.0, step / cfg.warmup)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - decay)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        bar.set_postfix(loss=f"{running:.4f}")
        elapsed = time.time() - start
        done = step == cfg.steps or (cfg.minutes is not None and elapsed > cfg.minutes * 60)
        if step % 50 == 0 or done:
            entry = {"step": step, "loss_ema": running, "wall_s": round(elapsed, 1)}
            with log_path.open("a") as f:
                f.write(json.dumps(entry) + "\n")
        if step % cfg.save_every == 0 or done:
            _save(ema, out, {**entry, "config": asdict(cfg)})
        if done:
            break
    return entry


def generate_base(base, prompts: list[str], steps: int = 25, guidance: float = 5.0, seed: int = 0,
                  progress: bool = True) -> torch.Tensor:
    """Text -> image with the frozen base model only (no control). Returns images in [-1, 1]."""
    return generate(base, prompts, steps=steps, guidance=guidance, seed=seed, progress=progress, desc="eval-base")


def eval_prompts(n: int, seed: int = 0) -> tuple[list[str], list[str], list[str]]:
    """n (fg, bg) colour pairs cycling through all ordered pairs in a seeded order."""
    names = list(data_mod.COLOURS)
    pairs = [(a, b) for a in names for b in names if a != b]
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(pairs))
    chosen = [pairs[order[i % len(pairs)]] for i in range(n)]
    fgs = [a for a, _ in chosen]
    bgs = [b for _, b in chosen]
    return [f"a {a} circle on a {b} background" for a, b in chosen], fgs, bgs


def eval_base(folder: str | None = None, n: int = 64, steps: int = 25, guidance: float = 5.0,
              seed: int = 0, save_grid: str | None = None) -> dict:
    """Generate ``n`` images and measure prompt-colour accuracy (the base model's bar: >= 0.70)."""
    base = load_base("tiny", folder=folder)
    prompts, fgs, bgs = eval_prompts(n, seed)
    t0 = time.time()
    images = generate_base(base, prompts, steps=steps, guidance=guidance, seed=seed)

    imgs = to_uint8(images)
    result = colour_accuracy(imgs, fgs, bgs)
    result.update(n=n, ddim_steps=steps, guidance=guidance, seed=seed,
                  chance_colour_acc=1 / len(data_mod.COLOURS), sample_s=round(time.time() - t0, 1))
    if save_grid:
        save_image_grid(imgs, save_grid, ncol=int(math.ceil(math.sqrt(n))))
    return result

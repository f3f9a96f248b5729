"""``splitcontrol bench``: what the Flower engine costs on top of the training itself.

For each scheme, the same model trains the same steps on the same client batches twice,
in one process and one run:

- **flower**: the strategy and the ClientApp talking typed messages over the in-process
  grid (serialisation to Flower records, validation, transcript, ``context.state``);
- **bare**: a plain PyTorch loop of the same computation with no messages at all (the
  client's encoders, the cut, the server step; for FedAvg local training and averaging):
  each scheme's own ``bare`` (strategies/<name>.py).

``overhead_ratio`` = flower wall time / bare wall time (best of ``repeats`` alternating
runs, to damp the noise of a shared machine). Goal: <= 1.10. The bare loop draws the same
batches from the same client generators, so both paths compute the same losses; the
report includes the largest difference as a check that the two did the same work.
"""
from __future__ import annotations

import time

import torch

from sim.core.diffusion import cfg_combine, ddim_sample
from sim.engine.client_app import client_app_for
from sim.engine.clientside import resolved
from sim.engine.context import context_for
from sim.engine.evaluate import generate
from sim.engine.grid import InProcessGrid, discover, quiet_flower_logs
from sim.engine.runner import run_strategy
from sim.engine.transcript import Transcript
from strategies import get_strategy
from strategies.base import composed_eps, turn_schedule


def bench(cfg, repeats: int = 3, progress: bool = True) -> dict:
    """Flower-vs-bare wall time per scheme of ``cfg`` (same steps, same batches)."""
    quiet_flower_logs()
    cfg = resolved(cfg)  # defenses draw from the clients' private generators
    ctx = context_for(cfg)
    envs = [ctx.client_env(cfg, cid) for cid in range(cfg.num_clients)]
    turns = turn_schedule(cfg.steps, cfg.num_clients, cfg.local_steps)
    rows = []
    for scheme in cfg.schemes:
        bare_s, flower_s, bare_losses, flower_losses, transcript = [], [], None, None, None
        for _ in range(repeats):
            t0 = time.perf_counter()
            bare_losses = get_strategy(scheme).bare(envs, ctx.controlnet, ctx.settings, turns)
            bare_s.append(time.perf_counter() - t0)

            grid = InProcessGrid(client_app_for(envs), len(envs), {})
            node_ids = discover(grid, len(envs))
            transcript = Transcript()
            t0 = time.perf_counter()
            res = run_strategy(scheme, ctx, grid, node_ids, transcript)
            flower_s.append(time.perf_counter() - t0)
            flower_losses = res.losses
        diff = max(abs(a - b) for a, b in zip(bare_losses, flower_losses))
        row = {"scheme": scheme, "steps": cfg.steps, "bare_s": round(min(bare_s), 3),
               "flower_s": round(min(flower_s), 3), "overhead_ratio": round(min(flower_s) / min(bare_s), 3),
               "messages_per_step": transcript.messages / cfg.steps,
               "max_loss_diff": diff, "repeats": repeats}
        rows.append(row)
        if progress:
            print(f"{scheme:>8}: bare {row['bare_s']:.2f} s, flower {row['flower_s']:.2f} s, "
                  f"ratio {row['overhead_ratio']:.3f}, {row['messages_per_step']:.2f} messages/step, "
                  f"max |loss diff| {diff:.2e}", flush=True)
    return {"rows": rows, "goal": 1.10, "threads": cfg.threads, "batch_size": cfg.batch_size,
            "local_steps": cfg.local_steps, "num_clients": cfg.num_clients}


def sampling_bench(cfg, steps: int = 5, repeats: int = 3, scheme: str = "nograd") -> dict:
    """Sampling time of the ``eval-samples`` held-out conditions, ``steps`` DDIM steps, per guidance
    layout, best of ``repeats`` alternating runs in one process (ratios to the former layout):

    - **doubled** (the former layout): one batch of [conditional, unconditional] halves, the
      ControlNet run on both and its unconditional residuals multiplied by 0;
    - **ride**: the control riding on the prompt's guidance (``control-guidance`` = ``guidance``),
      each branch its own batch, the ControlNet on the conditional one only (the same prediction
      as doubled: ``max_image_diff`` reports it);
    - **decoupled**: the default, the control's own guidance (three passes, two with the ControlNet).
    """
    ctx = context_for(cfg)
    base, es, cn = ctx.base, ctx.eval_set, ctx.controlnet
    strategy, sched = get_strategy(scheme), ctx.scheduler
    n, hints, prompts = len(es["prompt"]), es["condition"], es["prompt"]
    prompt_ctx, null = base.encode_prompts(prompts), base.encode_prompts([""]).expand(n, -1, -1)
    scale = torch.cat([torch.ones(n), torch.zeros(n)])

    def doubled(x, step: int):
        both = composed_eps(strategy, base, cn, torch.cat([x, x]), torch.full((2 * n,), step),
                            torch.cat([prompt_ctx, null]), torch.cat([hints, hints]), scale)
        cond, uncond = both.chunk(2)
        return cfg_combine(uncond, cond, cfg.guidance)

    layouts = {
        "doubled": lambda: ddim_sample(doubled, sched, tuple(es["target"].shape), steps=steps,
                                       generator=torch.Generator().manual_seed(cfg.seed)),
        "ride": lambda: generate(base, prompts, scheme, cn, hints, steps=steps, guidance=cfg.guidance,
                                 seed=cfg.seed, progress=False),
        "decoupled": lambda: generate(base, prompts, scheme, cn, hints, steps=steps, guidance=cfg.guidance,
                                      seed=cfg.seed, progress=False, control_guidance=cfg.control_guidance),
    }
    times: dict[str, list[float]] = {k: [] for k in layouts}
    images = {}
    with torch.no_grad():
        for _ in range(repeats):
            for name, run in layouts.items():
                t0 = time.perf_counter()
                images[name] = run()
                times[name].append(time.perf_counter() - t0)
    best = {k: min(v) for k, v in times.items()}
    return {"conditions": n, "ddim_steps": steps, "repeats": repeats, "threads": torch.get_num_threads(),
            "seconds": {k: round(v, 3) for k, v in best.items()},
            "ratio_to_doubled": {k: round(v / best["doubled"], 3) for k, v in best.items()},
            "max_image_diff": float((images["ride"] - images["doubled"]).abs().max())}

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

from sim.engine.client_app import client_app_for
from sim.engine.clientside import resolved
from sim.engine.context import context_for
from sim.engine.grid import InProcessGrid, discover, quiet_flower_logs
from sim.engine.runner import run_strategy
from sim.engine.transcript import Transcript
from strategies import get_strategy
from strategies.base import turn_schedule


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

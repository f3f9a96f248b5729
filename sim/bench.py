"""``splitcontrol bench``: what the Flower engine costs on top of the training itself.

For each scheme, the same model trains the same steps on the same client batches twice,
in one process and one run:

- **flower**: the strategy and the ClientApp talking typed messages over the in-process
  grid (serialisation to Flower records, validation, transcript, ``context.state``);
- **bare**: a plain PyTorch loop of the same computation with no messages at all (the
  client's encoders, the cut, the server step; for FedAvg local training and averaging).

``overhead_ratio`` = flower wall time / bare wall time (best of ``repeats`` alternating
runs, to damp the noise of a shared machine). Goal: <= 1.10. The bare loop draws the same
batches from the same client generators, so both paths compute the same losses; the
report includes the largest difference as a check that the two did the same work.
"""
from __future__ import annotations

import copy
import time

import torch

from .models import ddpm_scheduler


# ----------------------------------------------------------------------------- bare loops
def _bare_nograd(envs, controlnet, settings, turns) -> list[float]:
    from sim.cuts import CUTS, nograd_control_input, unet_first_conv
    from strategies.base import SplitServer, client_generator, sample_batch

    base = envs[0].base
    server = SplitServer(base.unet, controlnet, envs[0].scheduler, settings, off_server=CUTS["nograd"].unused)
    gens = [client_generator(e.seed, c) for c, e in enumerate(envs)]
    losses = []
    for cid, k in turns:
        for _ in range(k):
            b = sample_batch(base, envs[cid].scheduler, envs[cid].data, settings.batch_size, gens[cid],
                             settings.prompt_dropout)
            with torch.no_grad():
                ci = nograd_control_input(base.autoencoder, b.x_t, b.hint)
                uf = unet_first_conv(base.unet, b.x_t)
            losses.append(server.server_step(server.controlnet.conv_in(ci), uf, b.t, b.noise, b.context))
    return losses


def _bare_vanilla(envs, controlnet, settings, turns) -> list[float]:
    from sim.cuts import CUTS, unet_first_conv
    from strategies.base import SplitServer, client_generator, sample_batch
    from strategies.vanilla import ControlHead

    base = envs[0].base
    server = SplitServer(base.unet, controlnet, envs[0].scheduler, settings, off_server=CUTS["vanilla"].client_trainable)
    head = ControlHead(controlnet).train()
    gens = [client_generator(e.seed, c) for c, e in enumerate(envs)]
    losses = []
    for cid, k in turns:
        opt = torch.optim.AdamW(head.parameters(), lr=settings.lr)  # as the client: fresh per turn
        for _ in range(k):
            b = sample_batch(base, envs[cid].scheduler, envs[cid].data, settings.batch_size, gens[cid],
                             settings.prompt_dropout)
            act = head(b.x_t, b.hint)
            with torch.no_grad():
                uf = unet_first_conv(base.unet, b.x_t)
            opt.zero_grad(set_to_none=True)
            losses.append(server.server_step(act, uf, b.t, b.noise, b.context))  # backprop reaches the head
            opt.step()
    return losses


def _bare_fedavg(envs, controlnet, settings, turns) -> list[float]:
    from sim.cuts import controlled_eps
    from strategies.base import client_generator, diffusion_loss, sample_batch

    base = envs[0].base
    n = len(envs)
    global_sd = copy.deepcopy(controlnet.state_dict())
    local = copy.deepcopy(controlnet).train()
    gens = [client_generator(e.seed, c) for c, e in enumerate(envs)]
    opt_states = [None] * n  # keep-optimizer: each client's AdamW state from its last round
    losses = []
    for r in range(0, len(turns), n):
        states, weights = [], []
        for cid, k in turns[r:r + n]:
            local.load_state_dict(global_sd)
            opt = torch.optim.AdamW(local.parameters(), lr=settings.lr)
            if settings.keep_optimizer and opt_states[cid] is not None:
                opt.load_state_dict(opt_states[cid])
            for _ in range(k):
                b = sample_batch(base, envs[cid].scheduler, envs[cid].data, settings.batch_size, gens[cid],
                                 settings.prompt_dropout)
                eps = controlled_eps("fedavg", base.unet, local, base.autoencoder, b.x_t, b.t, b.context, b.hint)
                loss = diffusion_loss(eps, b.noise, b.t, envs[cid].scheduler, settings)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(loss.item())
            if settings.keep_optimizer:
                opt_states[cid] = copy.deepcopy(opt.state_dict())
            states.append({k: v.clone() for k, v in local.state_dict().items()})
            weights.append(len(envs[cid].data))
        total = float(sum(weights))
        global_sd = {k: sum(s[k] * (w / total) for s, w in zip(states, weights)) for k in global_sd}
    return losses


BARE = {"fedavg": _bare_fedavg, "vanilla": _bare_vanilla, "nograd": _bare_nograd}


# ----------------------------------------------------------------------------- the benchmark
def bench(cfg, repeats: int = 3, progress: bool = True) -> dict:
    """Flower-vs-bare wall time per scheme of ``cfg`` (same steps, same batches)."""
    from strategies.base import ClientEnv, TrainSettings, turn_schedule

    from .client_app import client_app_for
    from .compare import _setup, client_datasets, discover, run_strategy
    from .grid import InProcessGrid, quiet_flower_logs
    from .transcript import Transcript

    quiet_flower_logs()
    base, _, controlnet, _ = _setup(cfg)
    clients, _ = client_datasets(cfg, base.preset.image_size)
    settings = TrainSettings.from_config(cfg)
    sched = ddpm_scheduler(base.preset)
    envs = [ClientEnv(base, sched, settings, d, cfg.seed, controlnet) for d in clients]
    turns = turn_schedule(cfg.steps, cfg.num_clients, cfg.local_steps)
    rows = []
    for scheme in cfg.schemes:
        bare_s, flower_s, bare_losses, flower_losses, transcript = [], [], None, None, None
        for _ in range(repeats):
            t0 = time.perf_counter()
            bare_losses = BARE[scheme](envs, controlnet, settings, turns)
            bare_s.append(time.perf_counter() - t0)

            grid = InProcessGrid(client_app_for(envs), len(envs), {})
            node_ids = discover(grid, len(envs))
            transcript = Transcript()
            t0 = time.perf_counter()
            res = run_strategy(scheme, base, controlnet, settings, cfg.seed, grid, node_ids, transcript)
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

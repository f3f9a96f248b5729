"""Ground truth for scoring: which private sample each sent sample was (never given to attacks).

The simulation can replay a client: its batches come from its own generator, seeded by
(seed, client id), and defenses draw from a separate stream, so drawing the same number
of batches per message in message order yields the very indices the client used. This
module does that outside any attack; attacks only ever see a :class:`attacks.base.ServerView`.
"""
from __future__ import annotations

import torch


def batches_in(message: dict, scheme: str) -> int:
    """How many training batches the client drew to answer ``message``."""
    up = message["up"].get("tensors", {})
    if scheme == "nograd":
        return int(up["t"].shape[0]) if "t" in up else 0
    if scheme == "vanilla":
        return 1 if "control_features" in up else 0
    return int(message["down"]["config"]["local-steps"]) if "config" in message["down"] else 0


def private_samples(cfg, scheme: str, messages: list[dict], refs: list[tuple[int, int, int]]) -> dict:
    """The private target image ([-1, 1]), hint ([0, 1]) and prompt (as in the data, and as
    used after prompt dropout) of every ``(message, batch, sample)`` in ``refs``."""
    from sim.compare import _setup, client_datasets
    from sim.models import ddpm_scheduler
    from strategies import get_strategy
    from strategies.base import ClientEnv, TrainSettings

    base, _, controlnet, _ = _setup(cfg)
    clients, _ = client_datasets(cfg, base.preset.image_size)
    sched = ddpm_scheduler(base.preset)
    settings = TrainSettings.from_config(cfg)
    cls = get_strategy(scheme).client_class
    replay = {}
    drawn: dict[tuple[int, int], object] = {}
    wanted = {(i, k) for i, k, _ in refs}
    last = max((i for i, _, _ in refs), default=-1)
    for i, m in enumerate(messages[:last + 1]):
        cid = m["stat"]["client"]
        if cid not in replay:
            replay[cid] = cls(cid, ClientEnv(base, sched, settings, clients[cid], cfg.seed, controlnet))
        for k in range(batches_in(m, scheme)):
            b = replay[cid].next_batch()
            if (i, k) in wanted:
                drawn[(i, k)] = (cid, b)
    target, hint, prompt, used = [], [], [], []
    for i, k, j in refs:
        cid, b = drawn[(i, k)]
        n = int(b.idx[j])
        target.append(clients[cid].target[n])
        hint.append(clients[cid].condition[n])
        prompt.append(clients[cid].prompts[n])
        used.append(b.prompts[j])
    stack = lambda xs: torch.stack(xs) if xs else torch.empty(0)  # noqa: E731
    return {"target": stack(target), "hint": stack(hint), "prompt": prompt, "prompt_used": used}

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


def batches_of(stat: dict, scheme: str, cfg) -> int:
    """How many training batches the client drew for a message, from its statistics alone (a FedAvg
    message's window is its whole round, so its client's share comes from the public turn schedule)."""
    if scheme != "fedavg":
        return int(stat["num_steps"])
    from strategies.base import turn_schedule

    n = cfg.num_clients
    turns = turn_schedule(cfg.steps, n, cfg.local_steps)
    return dict(turns[(stat["round"] - 1) * n: stat["round"] * n]).get(stat["client"], 0)


def private_samples(cfg, scheme: str, messages: list[dict], refs: list[tuple[int, int, int]],
                    history: list[dict] | None = None) -> dict:
    """The private target image ([-1, 1]), hint ([0, 1]) and prompt (as in the data, and as
    used after prompt dropout) of every ``(message, batch, sample)`` in ``refs``.

    ``messages`` are the kept round trips (``ref`` indexes them). When they are not the run's
    first ones (``keep-from = "end"``), ``history`` (every message's statistics, from
    transcript.jsonl) tells how many batches each client drew for the messages not kept."""
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
    kept = {m["stat"]["index"]: (i, m) for i, m in enumerate(messages)}
    last = max((messages[i]["stat"]["index"] for i, _, _ in refs), default=-1)
    if history is None:
        history = [m["stat"] for m in messages]
    missing = sorted(set(range(last + 1)) - {s["index"] for s in history})
    if missing:
        raise ValueError(f"cannot replay the clients up to message {last}: no statistics of messages {missing[:5]}...; "
                         "pass the run's transcript.jsonl rows as history")
    for stat in sorted(history, key=lambda s: s["index"]):
        if stat["index"] > last:
            break
        cid = stat["client"]
        if cid not in replay:
            replay[cid] = cls(cid, ClientEnv(base, sched, settings, clients[cid], cfg.seed, controlnet))
        i, m = kept.get(stat["index"], (None, None))
        n = batches_of(stat, scheme, cfg)
        if m is not None and batches_in(m, scheme) != n:
            raise AssertionError(f"message {stat['index']}: {batches_in(m, scheme)} batches in the payload, "
                                 f"{n} from its statistics")
        for k in range(n):
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

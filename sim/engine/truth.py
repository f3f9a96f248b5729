"""Ground truth for scoring: which private sample each sent sample was (never given to attacks).

The harness can replay a client: its batches come from its own generator, seeded by
(seed, client id), and defenses draw from a separate stream, so drawing the same number
of batches per message in message order yields the very indices the client used. Each
scheme says how many batches a message made its client draw (``batches_in`` /
``batches_drawn`` on its strategy class). This module needs the clients' data (the
client-side ``data-seed``), so it lives in the engine, above attacks/: the scorer calls it
after an attack returns; attacks only ever see a :class:`attacks.base.ServerView`.
"""
from __future__ import annotations

import torch

from sim.core.config import ExperimentConfig
from sim.engine.context import context_for
from strategies import get_strategy


def private_samples(cfg: ExperimentConfig, scheme: str, messages: list[dict], refs: list[tuple[int, int, int]],
                    history: list[dict] | None = None) -> dict:
    """The private target image ([-1, 1]), hint ([0, 1]) and prompt (as in the data, and as
    used after prompt dropout) of every ``(message, batch, sample)`` in ``refs``.

    ``messages`` are the kept round trips (``ref`` indexes them). When they are not the run's
    first ones (``keep-from = "end"``), ``history`` (every message's statistics, from
    transcript.jsonl) tells how many batches each client drew for the messages not kept."""
    ctx = context_for(cfg)
    clients = ctx.client_data(cfg)
    strategy = get_strategy(scheme)
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
            replay[cid] = strategy.client_class(cid, ctx.client_env(cfg, cid))
        i, m = kept.get(stat["index"], (None, None))
        n = strategy.batches_drawn(stat, ctx.settings, cfg.num_clients)
        if m is not None and strategy.batches_in(m) != n:
            raise AssertionError(f"message {stat['index']}: {strategy.batches_in(m)} batches in the payload, "
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

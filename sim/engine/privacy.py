"""The run-level privacy guarantee of a trained scheme: (epsilon, delta) for the most-exposed record or client.

An accounted defense states its mechanism per release (a step's features, a FedAvg client's
local step, a round); a run sends a record many times (batches are drawn with replacement:
at the default recipe a record is sent about 4 times on average and up to 12), so the
guarantee a user gets is the composition over the most releases any record (or client)
had. The counts are client-side facts: this replays each client's batch stream (needs the
client-side keys, so it lives in the engine) for the batches the transcript says it drew,
and asks each accounted defense for :meth:`defenses.base.Defense.guarantee` at the largest
count of the unit it is accounted in.
"""
from __future__ import annotations

import dataclasses

from defenses import DefenseStack
from sim.core.config import ExperimentConfig
from sim.engine.context import context_for
from strategies import get_strategy
from strategies.base import turn_schedule


def release_counts(cfg: ExperimentConfig, scheme: str, stats: list[dict]) -> dict[str, int]:
    """The largest per-record send count, per-client step count and per-client round count of a run."""
    ctx = context_for(cfg)
    strategy = get_strategy(scheme)
    batches: dict[int, int] = {}
    rounds: dict[int, set] = {}
    for s in stats:
        n = strategy.batches_drawn(s, ctx.settings, cfg.num_clients)
        batches[s["client"]] = batches.get(s["client"], 0) + n
        if n:
            rounds.setdefault(s["client"], set()).add(s["round"])
    record = 0
    for cid, n in batches.items():
        if n:
            client = strategy.client_class(cid, ctx.client_env(cfg, cid))
            record = max(record, int(client.releases(n).max()))
    return {"record": record, "client-step": max(batches.values(), default=0),
            "round": max((len(r) for r in rounds.values()), default=0)}


def planned_record_sends(cfg: ExperimentConfig) -> int:
    """The most times any record will be sent by a split scheme under ``cfg``'s recipe (every split
    scheme draws the same batch stream: one batch per step, clients in turns), before training."""
    ctx = context_for(cfg)
    batches: dict[int, int] = {}
    for cid, k in turn_schedule(cfg.steps, cfg.num_clients, cfg.local_steps):
        batches[cid] = batches.get(cid, 0) + k
    client_class = get_strategy("nograd").client_class
    return max(int(client_class(cid, ctx.client_env(cfg, cid)).releases(n).max()) for cid, n in batches.items())


def run_guarantees(cfg, scheme: str, stats: list) -> list[dict]:
    """One guarantee per accounted defense of ``scheme`` in the run (empty without one). With only the
    public config (a ServerApp under Flower) the counts are unknown: per-release figures, epsilon None."""
    ctx = context_for(cfg)
    p = ctx.base.preset
    stack = DefenseStack(cfg.defenses, get_strategy(scheme), p.latent_channels * p.latent_size ** 2)
    accounted = [d for d in stack.defenses if d.accounted]
    if not accounted:
        return []
    stats = [s if isinstance(s, dict) else dataclasses.asdict(s) for s in stats]
    if not isinstance(cfg, ExperimentConfig):
        return [{**d.guarantee(ctx.scheduler, 1), "epsilon": None, "releases": None,
                 "note": "release counts are client-side; per-release figure in 'epsilon_per_release'",
                 "epsilon_per_release": d.guarantee(ctx.scheduler, 1)["epsilon"]} for d in accounted]
    counts = release_counts(cfg, scheme, stats)
    return [d.guarantee(ctx.scheduler, counts[d.releases_per]) for d in accounted]


def guarantee_columns(guarantees: list[dict]) -> dict:
    """The summary row's flat columns: the weakest guarantee (largest epsilon) with its delta."""
    if not guarantees:
        return {}
    known = [g for g in guarantees if g["epsilon"] is not None]
    worst = max(known, key=lambda g: g["epsilon"]) if known else guarantees[0]
    return {"epsilon": worst["epsilon"], "delta": worst["delta"], "privacy": guarantees}

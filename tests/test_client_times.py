"""Client time: the handler's compute apart from building the client's models and data (a process's start-up)."""
from __future__ import annotations

import time

from sim.engine.client_app import make_client_app, partition_id
from sim.engine.context import context_for, load_experiment
from sim.engine.grid import InProcessGrid, discover
from sim.engine.runner import run_strategy


def test_a_slow_start_up_is_setup_time_not_compute():
    cfg = load_experiment("smoke", ["schemes=[\"nograd\"]", "client-seed=3"])
    ctx = context_for(cfg)
    envs = [ctx.client_env(cfg, c) for c in range(cfg.num_clients)]

    def slow_env(context):  # as a fresh process loading its models would be
        time.sleep(0.4)
        return envs[partition_id(context)]

    grid = InProcessGrid(make_client_app(slow_env), cfg.num_clients, {})
    res = run_strategy("nograd", ctx, grid, discover(grid, cfg.num_clients))
    stats = res.transcript.stats
    assert stats and all(s.client_setup_s >= 0.4 for s in stats)
    assert all(s.client_s < s.client_setup_s for s in stats)  # 2 batches of 4 take far less than the sleep
    assert res.transcript.client_setup_s >= 0.4 * len(stats)

"""Faults at the clients: a client that never replies is named after message-timeout, not waited on forever."""
from __future__ import annotations

import threading
import time

import pytest

from sim.engine.client_app import client_app_for
from sim.engine.context import context_for, load_experiment
from sim.engine.grid import InProcessGrid, discover
from sim.engine.runner import run_strategy
from sim.engine.transcript import ClientTimeout


@pytest.mark.parametrize("scheme", ["nograd", "vanilla", "fedavg"])
def test_a_hanging_client_is_named_after_the_message_timeout(scheme):
    cfg = load_experiment("smoke", [f"schemes=[\"{scheme}\"]", "message-timeout=5", "client-seed=3"])
    ctx = context_for(cfg)
    real = client_app_for([ctx.client_env(cfg, c) for c in range(cfg.num_clients)])

    release = threading.Event()

    def app(msg, context):  # client 1 hangs on its first training message; hello and client 0 are fine
        if context.node_config["partition-id"] == 1 and "hello" not in msg.metadata.message_type:
            release.wait(40)
            raise RuntimeError("released by the test")  # its thread ends; nobody reads this
        return real(msg, context)

    grid = InProcessGrid(app, cfg.num_clients, {})
    t0 = time.monotonic()
    # (FedAvg asks both clients at once: client 0 is named too if it was slower than 5 s on a busy machine)
    with pytest.raises(ClientTimeout, match=r"no reply from client\(s\) \[(0, )?1\].*within 5 s; raise message-timeout"):
        run_strategy(scheme, ctx, grid, discover(grid, cfg.num_clients), timeout=cfg.message_timeout)
    assert time.monotonic() - t0 < 30  # named at the timeout, not after the client's 40 s
    release.set()


def test_message_timeout_must_not_be_negative():
    with pytest.raises(ValueError, match="message-timeout must be >= 0"):
        load_experiment("smoke", ["message-timeout=-1"])

"""Faults at the clients: a client that never replies is named after message-timeout, not waited on forever."""
from __future__ import annotations

import math
import threading
import time

import pytest

from sim.engine.client_app import client_app_for
from sim.engine.context import context_for, load_experiment
from sim.engine.grid import InProcessGrid, discover
from sim.engine.runner import run_strategy
from sim.core.wire import ClientFailure, ClientTimeout


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


def _failing_grid(cfg, ctx, failing_client: int, on_message: int = 1):
    """An in-process grid whose client ``failing_client`` raises on its ``on_message``-th training message."""
    real = client_app_for([ctx.client_env(cfg, c) for c in range(cfg.num_clients)])
    count = {"n": 0}

    def app(msg, context):
        if context.node_config["partition-id"] == failing_client and "hello" not in msg.metadata.message_type:
            count["n"] += 1
            if count["n"] == on_message:
                raise RuntimeError("injected failure")
        return real(msg, context)

    return InProcessGrid(app, cfg.num_clients, {})


def test_fedavg_goes_on_without_a_failed_client_above_the_minimum_fraction():
    keys = ["schemes=[\"fedavg\"]", "num-clients=3", "steps=12", "local-steps=2", "client-seed=3"]
    cfg = load_experiment("smoke", keys + ["min-reply-fraction=0.6"])
    ctx = context_for(cfg)
    grid = _failing_grid(cfg, ctx, failing_client=2)
    res = run_strategy("fedavg", ctx, grid, discover(grid, cfg.num_clients), timeout=cfg.message_timeout)
    failures = res.transcript.failures
    assert [(f["round"], f["client"]) for f in failures] == [(1, 2)] and "injected failure" in failures[0]["reason"]
    assert res.extra["failed_replies"] == 1 and res.extra["failures"] == failures
    assert res.steps == 12 - 2  # client 2's two steps of round 1 are lost, the other rounds are whole
    # by default every client must reply: the same failure stops the run, naming the client
    strict = load_experiment("smoke", keys)
    ctx = context_for(strict)
    grid = _failing_grid(strict, ctx, failing_client=2)
    with pytest.raises(RuntimeError, match="injected failure"):
        run_strategy("fedavg", ctx, grid, discover(grid, strict.num_clients), timeout=strict.message_timeout)


def test_fedavg_stops_when_fewer_clients_reply_than_the_minimum():
    cfg = load_experiment("smoke", ["schemes=[\"fedavg\"]", "num-clients=3", "steps=12", "local-steps=2",
                                    "client-seed=3", "min-reply-fraction=0.9"])
    ctx = context_for(cfg)
    grid = _failing_grid(cfg, ctx, failing_client=1, on_message=2)
    with pytest.raises(ClientFailure, match=r"round 2: 2 of 3 clients replied, fewer than min-reply-fraction=0.9"):
        run_strategy("fedavg", ctx, grid, discover(grid, cfg.num_clients), timeout=cfg.message_timeout)


def test_min_reply_fraction_is_a_fraction():
    with pytest.raises(ValueError, match="min-reply-fraction must be in"):
        load_experiment("smoke", ["min-reply-fraction=0"])


@pytest.mark.parametrize("scheme, on_message", [("nograd", 1), ("vanilla", 2), ("splitfed", 2)])
def test_split_schemes_skip_a_failed_clients_turn_when_asked(scheme, on_message):
    keys = [f"schemes=[\"{scheme}\"]", "num-clients=2", "steps=8", "local-steps=2", "client-seed=3"]
    cfg = load_experiment("smoke", keys + ["on-client-failure=skip"])
    ctx = context_for(cfg)
    grid = _failing_grid(cfg, ctx, failing_client=1, on_message=on_message)
    res = run_strategy(scheme, ctx, grid, discover(grid, cfg.num_clients), timeout=cfg.message_timeout)
    failures = res.transcript.failures
    assert len(failures) == 1 and failures[0]["client"] == 1 and "injected failure" in failures[0]["reason"]
    assert res.extra["failed_replies"] == 1 and res.extra["failures"] == failures
    assert 8 - 2 <= res.steps < 8  # at most the failed turn's steps are lost; the run went on
    assert all(math.isfinite(v) for v in res.losses)
    # by default (stop) the same failure stops the run with the client's own error
    strict = load_experiment("smoke", keys)
    ctx = context_for(strict)
    grid = _failing_grid(strict, ctx, failing_client=1, on_message=on_message)
    with pytest.raises(RuntimeError, match="injected failure"):
        run_strategy(scheme, ctx, grid, discover(grid, strict.num_clients), timeout=strict.message_timeout)

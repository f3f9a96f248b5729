"""The wall-clock simulator (sim/core/timeline.py) against closed forms, and `splitcontrol timeline`."""
from __future__ import annotations

import json
import math

import pytest

from sim.commands import timeline as tl
from sim.commands.cli import main
from sim.core.timeline import (
    Network,
    Workload,
    bottleneck,
    epoch_plan,
    plan_from_turns,
    simulate,
    wall_if_free,
)
from strategies import SCHEMES
from strategies.base import turn_schedule

INF = math.inf
FREE_NET = Network(INF, INF, 0.0, INF)


def _w(concurrency, **kw):
    return Workload(scheme=concurrency, concurrency=concurrency, **{"client_fwd_s": 0.0, **kw})


def test_every_scheme_declares_a_simulated_concurrency():
    from sim.core.timeline import PROCESSES

    for name, cls in SCHEMES.items():
        assert cls.concurrency in PROCESSES, name


def test_epoch_plan_covers_every_sample_once():
    for samples, n, b, k in [(50_000, 100, 8, 10), (2_000, 3, 8, 10), (64, 64, 8, 10), (50_000, 1, 8, 10)]:
        plan = epoch_plan(samples, n, b, k)
        assert sum(t.samples for t in plan) == pytest.approx(samples)
        assert {t.client for t in plan} == set(range(n))
        assert max(t.batches for t in plan) <= k
    # a run's own schedule: the strategies' turns, batch-size samples per step
    turns = turn_schedule(25, 2, 10)
    plan = plan_from_turns(turns, 8)
    assert [(t.client, t.batches, t.samples) for t in plan] == [(0, 10, 80), (1, 10, 80), (0, 5, 40)]


def test_sequential_is_the_sum_of_every_step_and_round_trip():
    # 3 clients, 2 turns each of 4 batches of 8: every step is client fwd, up, server, down, client bwd
    plan = epoch_plan(192, 3, 8, 4)
    w = _w("sequential", client_fwd_s=0.01, client_bwd_s=0.02, server_s=0.03, up_bytes=1000, down_bytes=500,
           message_bytes=100, relay_bytes=4000)
    net = Network(up_Bps=1e5, down_Bps=2e5, rtt_s=0.05, message_s=0.001)
    res = simulate(w, net, plan, 3)
    turns, k, s = len(plan), 4, 8
    per_step = s * (0.01 + 0.02 + 0.03) + (s * 1000 + 100) / 1e5 + (s * 500 + 100) / 2e5
    # per turn: k + 1 round trips (latency + framework cost each); the head rides down on the first request
    # and up on the last reply (each a message of its own bytes + the fixed 100)
    per_turn = k * per_step + (k + 1) * (0.05 + 0.001) + 4100 / 2e5 + 4100 / 1e5
    assert res["wall_s"] == pytest.approx(turns * per_turn, rel=1e-9)
    assert res["messages"] == turns * (k + 1)  # what the code sends: vanilla's k + 1 round trips per turn
    assert res["steps"] == turns * k
    # strictly sequential: more clients, same data, same time
    assert simulate(w, net, epoch_plan(192, 6, 8, 4), 6)["wall_s"] >= res["wall_s"] * 0.999


def test_rounds_wait_for_every_client_and_share_the_servers_link():
    w = _w("rounds", client_fwd_s=0.5, relay_bytes=1e6)
    plan = epoch_plan(800, 4, 8, 5)  # 25 batches each: 5 rounds of 5
    net = Network(up_Bps=1e5, down_Bps=1e6, rtt_s=0.0)
    res = simulate(w, net, plan, 4)
    per_round = 1e6 / 1e6 + 5 * 8 * 0.5 + 1e6 / 1e5  # all clients at once: each on its own link
    assert res["wall_s"] == pytest.approx(5 * per_round)
    assert res["messages"] == 20
    # a server link of the clients' total bandwidth: uploads queue behind each other, 4x slower
    slow = simulate(w, Network(up_Bps=1e5, down_Bps=1e6, server_Bps=1e5), plan, 4)
    assert slow["wall_s"] > res["wall_s"] + 5 * 2 * 1e6 / 1e5


def test_stream_is_server_bound_or_uplink_bound():
    plan = epoch_plan(1600, 10, 8, 10)  # 20 batches per client, 2 turns
    # server-bound: clients and links free, the server trains every sample once
    w = _w("stream", client_fwd_s=1e-6, server_s=0.01, up_bytes=1.0)
    res = simulate(w, FREE_NET, plan, 10)
    assert res["wall_s"] == pytest.approx(1600 * 0.01, rel=0.01)
    assert res["server_busy"] > 0.99
    assert res["messages"] == len(plan)  # one request per turn, as the code sends
    # uplink-bound: every client streams its share in parallel, so twice the clients halve the time
    w = _w("stream", client_fwd_s=0.0, server_s=1e-6, up_bytes=1e4)
    net = Network(up_Bps=1e5, down_Bps=1e6)
    t10 = simulate(w, net, epoch_plan(1600, 10, 8, 10), 10)["wall_s"]
    t20 = simulate(w, net, epoch_plan(1600, 20, 8, 10), 20)["wall_s"]
    assert t10 == pytest.approx(160 * 1e4 / 1e5, rel=0.01)
    assert t20 == pytest.approx(t10 / 2, rel=0.01)
    free = wall_if_free(w, net, epoch_plan(1600, 10, 8, 10), 10)
    assert bottleneck(t10, free) == "bandwidth"


def test_parallel_split_serves_every_client_on_one_server_model():
    # server-bound: N clients' steps queue on one server, so the wall is the total server work
    w = _w("parallel-split", client_fwd_s=1e-6, server_s=0.01)
    plan = epoch_plan(1600, 4, 8, 10)
    res = simulate(w, FREE_NET, plan, 4)
    assert res["wall_s"] == pytest.approx(1600 * 0.01, rel=0.01)
    # client-bound: the clients compute in parallel, the way vanilla's one-at-a-time cannot
    w = _w("parallel-split", client_fwd_s=0.01, server_s=1e-6)
    par = simulate(w, FREE_NET, plan, 4)["wall_s"]
    seq = simulate(_w("sequential", client_fwd_s=0.01, server_s=1e-6), FREE_NET, plan, 4)["wall_s"]
    assert par == pytest.approx(seq / 4, rel=0.02)


@pytest.mark.parametrize("concurrency", ["rounds", "sequential", "parallel-split", "stream"])
def test_one_shared_processor_adds_up_all_work(concurrency):
    plan = plan_from_turns(turn_schedule(30, 3, 4), 8)
    w = _w(concurrency, client_fwd_s=0.002, client_bwd_s=0.001, server_s=0.003, server_round_s=0.05)
    net = Network(INF, INF, 0.0, INF, message_s=0.01, shared=True)
    res = simulate(w, net, plan, 3)
    rounds = math.ceil(len(plan) / 3) if concurrency == "rounds" else 0
    server = 0.0 if concurrency == "rounds" else 30 * 8 * 0.003
    expected = 30 * 8 * 0.003 + server + rounds * 0.05 + res["messages"] * 0.01
    assert res["wall_s"] == pytest.approx(expected)


def test_unknown_concurrency_is_refused():
    with pytest.raises(ValueError, match="unknown concurrency"):
        simulate(_w("telepathy"), FREE_NET, epoch_plan(8, 1, 8, 1), 1)


@pytest.fixture(scope="module")
def tiny_table():
    from sim.commands.cost import cost_table

    return cost_table("tiny")


def test_timeline_rows_from_the_cost_table(tiny_table):
    res = tl.timeline("tiny", clients=4, client_device="laptop-cpu", server_device="a100", network_name="4g",
                      table=tiny_table)
    rows = {r["scheme"]: r for r in res["rows"]}
    assert set(rows) == set(SCHEMES)
    for r in rows.values():
        assert r["wall_s_per_epoch"] > 0 and r["bottleneck"] in ("client compute", "server compute", "bandwidth",
                                                                   "latency", "none")
        assert set(r["wall_s_if_free"]) == {"client compute", "server compute", "bandwidth", "latency"}
        assert all(v <= r["wall_s_per_epoch"] * (1 + 1e-9) for v in r["wall_s_if_free"].values())
    # nothing comes back to a nograd client but its 8-byte requests
    assert rows["nograd"]["down_bytes_per_client"] < 1e3
    assert rows["nograd"]["wall_s_per_epoch"] < rows["vanilla"]["wall_s_per_epoch"]
    # the fp16 wire halves most of the split schemes' upload
    half = tl.timeline("tiny", clients=4, client_device="laptop-cpu", server_device="a100", network_name="4g",
                       wire="fp16", table=tiny_table)
    up16 = {r["scheme"]: r["up_bytes_per_client"] for r in half["rows"]}
    assert up16["nograd"] < 0.7 * rows["nograd"]["up_bytes_per_client"]
    assert res["validation"]["status"] in ("measured", "not run here")


def test_profiles_name_their_sources():
    profiles = tl.load_profiles()
    assert {"phone", "laptop", "laptop-cpu", "edge-gpu", "a100", "h100"} <= set(profiles["device"])
    assert {"4g", "wifi", "datacenter"} <= set(profiles["network"])
    for kind in profiles.values():
        for p in kind.values():
            assert p["source"] and p["description"]
    for d in profiles["device"].values():
        assert 0 < d["utilisation"] <= 1 and d["peak-flops"] > 1e11


@pytest.mark.parametrize("argv, message", [
    (["--clients", "0"], "clients"),
    (["--client-device", "toaster"], "unknown device profile 'toaster'"),
    (["--network", "carrier-pigeon"], "unknown network profile"),
    (["--utilisation", "1.5"], "utilisation"),
    (["--samples", "10", "--clients", "20"], "every client needs data"),
])
def test_bad_input_exits_2_naming_it(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(["timeline", "--preset", "tiny", *argv])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_timeline_command_json_and_figure(tmp_path, capsys):
    fig = tmp_path / "timeline.png"
    assert main(["timeline", "--preset", "tiny", "--clients", "10", "--json", "--figure", str(fig)]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["clients"] == 10 and len(res["rows"]) == len(SCHEMES)
    assert fig.stat().st_size > 10_000
    curves = res["figure"]["wall_s_per_epoch"]
    assert len(curves) == 2
    for per_scheme in curves.values():
        assert {len(v) for v in per_scheme.values()} == {len(tl.CLIENT_COUNTS)}
        # vanilla serialises its clients: more of them never makes an epoch faster
        van = [w for _, w in per_scheme["vanilla"]]
        assert van[-1] >= 0.99 * van[0]


@pytest.mark.slow
def test_validation_predicts_a_run_it_did_not_measure(tmp_path):
    """The machinery of `timeline --validate` at smoke size: the message counts must match exactly."""
    res = tl.validate(tmp_path, extra=["num-samples=64", "batch-size=4", "eval-samples=2"],
                      calibration={"steps": 6, "num-clients": 2, "local-steps": 3},
                      target={"steps": 8, "num-clients": 3, "local-steps": 2})
    assert {r["scheme"] for r in res["rows"]} == set(SCHEMES)
    for r in res["rows"]:
        assert r["predicted_messages"] == r["measured_messages"], r["scheme"]
        assert r["predicted_wall_s"] > 0 and math.isfinite(r["relative_error"])
    assert (tmp_path / "validation.json").exists()

"""Flower's own engines end to end (slow: ~2 and ~5 min on 2 cores).

The ServerApp and ClientApp of pyproject.toml run under

1. the Ray simulation engine: ``flwr run . <federation>`` with 2 simulated SuperNodes;
2. the Deployment Engine on localhost: ``flower-superlink`` and 2 ``flower-supernode``
   processes, then ``flwr run . <federation> --stream`` (a fresh ClientApp process per
   message, ~20 s each: so fewer steps);

and each results folder is checked against the in-process ``splitcontrol compare`` on the
same config, run beside it in a subprocess: a row per scheme with the same keys, the same
protocol (messages and bytes per step, trainable parameters) and the same final loss.

The trust boundary under Flower: the run config (what the ServerApp sees) holds the public
keys only; the client-side ``data-seed`` and ``client-seed`` travel in each SuperNode's node
config (simulation: absent, so the defaults: data-seed 1, a client seed each node draws and
keeps). The Flower run's folder has config.toml and no clients.toml; the in-process one both.

Hermetic: every Flower process gets a temporary ``FLWR_HOME`` (its config.toml names the
federation, so nothing in ``~/.flwr`` is read or written), free ports, ``RAY_ADDRESS=local``
(never attach to a Ray cluster that happens to run) and a marker in its environment. At the
end, pass or fail, every process carrying the marker is stopped by its pid: ``flwr run``
leaves the SuperLink it started running, and SuperExec, ServerApp and Ray processes are
detached from the test's process tree.
"""
from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request
import uuid
from pathlib import Path

import psutil
import pytest

from sim.core.config import CLIENT_KEYS, load_config, to_run_config
from sim.engine.flower_run import stop_marked as _stop_marked
from strategies import STRATEGIES

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's bin: flwr, flower-superlink, splitcontrol
SCHEMES = ("fedavg", "vanilla", "nograd")  # the smoke preset's; the Ray test runs every registered scheme
ALL_SCHEMES = tuple(STRATEGIES)  # splitfed included: the ClientApp dispatches on the registry
MARK = "SPLITCONTROL_FLOWER_TEST"  # env var carried by every process a test starts
# Deterministic in the protocol, so equal under every engine (timings and memory are not).
PROTOCOL_KEYS = ("steps", "messages_per_step", "bytes_up_per_step", "bytes_down_per_step",
                 "client_trainable_params", "server_trainable_params")
# The deployment engine costs ~20 s per message: 4 steps = 1 FedAvg round, 2 turns of each
# split scheme (vanilla: local-steps + 1 messages per turn, nograd: 1).
DEPLOYMENT_OVERRIDES = ["steps=4", "local-steps=2"]
# Client-side keys: given to the in-process reference with --set and to each SuperNode in its node
# config (never in the run config), so both runs provision the clients alike.
DATA_SEED, CLIENT_SEED = 1, 271828
CLIENT_OVERRIDES = [f"data-seed={DATA_SEED}", f"client-seed={CLIENT_SEED}"]


# ------------------------------------------------------------------------------ helpers
def free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def run_config_arg(overrides: list[str], out: Path) -> str:
    """The smoke preset (plus overrides) as a ``--run-config`` string: every key, as in-process."""
    rc = to_run_config(load_config("smoke", overrides))
    assert not set(rc) & set(CLIENT_KEYS), rc  # the ServerApp sees the run config: public keys only
    # base-model stays "": the FAB that `flwr run` ships holds no weights (code and text only,
    # 10 MB cap), so this also checks that the apps find the committed ones (committed_tiny_base)
    rc["out"] = str(out)

    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            assert '"' not in v and "\\" not in v, v
            return f'"{v}"'
        return repr(v)

    return " ".join(f"{k}={value(v)}" for k, v in rc.items())


def tail(path: Path, n: int = 4000) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"--- {path.name}: (none)\n"
    return f"--- {path.name} (last {n} chars):\n{text[-n:]}\n"


def stop_marked(tag: str) -> list[str]:
    """Stop every process this test started (the package's helper, with the tests' own marker)."""
    return _stop_marked(tag, mark=MARK)


def _marked(p: psutil.Process, tag: str) -> bool:
    try:
        return p.pid != os.getpid() and p.environ().get(MARK) == tag
    except (psutil.Error, OSError):  # gone, a zombie, or not ours
        return False


class Flower:
    """A test's Flower environment: FLWR_HOME, env vars, started processes, logs; stops them all."""

    def __init__(self, tmp_path: Path):
        self.dir = tmp_path
        self.tag = uuid.uuid4().hex
        self.home = tmp_path / "flwr-home"
        self.home.mkdir()
        self.env = {
            **os.environ,  # SPLITCONTROL_CACHE, HF_*_OFFLINE, ... pass through
            MARK: self.tag,
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "FLWR_HOME": str(self.home),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_LOG_LEVEL": "WARNING",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",  # never let Flower `uv sync` (CUDA torch)
            "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
            "RAY_ADDRESS": "local",  # start a private Ray instance, never join a running one
            "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
        }
        self.procs: list[subprocess.Popen] = []
        self.logs: list[Path] = []

    def write_config(self, text: str) -> None:
        (self.home / "config.toml").write_text(text)

    def start(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = self.dir / f"{name}.log"
        self.logs.append(log)
        with log.open("wb") as f:
            p = subprocess.Popen(cmd, cwd=REPO, env=self.env, stdout=f, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL)
        self.procs.append(p)
        return p

    def wait(self, p: subprocess.Popen, timeout: float, what: str) -> int:
        try:
            return p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{what} did not finish within {timeout:.0f} s\n{self.tails()}")

    def tails(self) -> str:
        return "".join(tail(log) for log in self.logs)

    def start_in_process(self, overrides: list[str]) -> tuple[subprocess.Popen, Path]:
        """The reference: ``splitcontrol compare --preset smoke`` in-process, to a tmp folder."""
        out = self.dir / "in-process"
        cmd = [str(BIN / "splitcontrol"), "compare", "--preset", "smoke", "--out", str(out)]
        for o in overrides:
            cmd += ["--set", o]
        return self.start("in-process", cmd), out

    def flwr_run(self, federation: str, overrides: list[str], extra: list[str] = ()) -> tuple[subprocess.Popen, Path]:
        out = self.dir / "flower"
        cmd = [str(BIN / "flwr"), "run", ".", federation, "--run-config", run_config_arg(overrides, out),
               *extra, "--stream"]
        return self.start("flwr-run", cmd), out

    def close(self) -> None:
        stop_marked(self.tag)
        for p in self.procs:  # reap our own children
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()


@pytest.fixture
def flower(tmp_path):
    f = Flower(tmp_path)
    try:
        yield f
    finally:
        f.close()
        leftovers = [p for p in psutil.process_iter() if _marked(p, f.tag)]
        assert not leftovers, f"processes left running: {[(p.pid, p.name()) for p in leftovers]}"


def rows_of(out: Path) -> dict[str, dict]:
    return {r["scheme"]: r for r in json.loads((out / "summary.json").read_text())["rows"]}


def check_against_in_process(flower: Flower, out: Path, ref_out: Path, steps: int,
                             schemes: tuple[str, ...] = SCHEMES) -> None:
    assert (out / "summary.json").exists(), f"the Flower run wrote no summary.json\n{flower.tails()}"
    assert (ref_out / "summary.json").exists(), f"the in-process run wrote no summary.json\n{flower.tails()}"
    rows, ref = rows_of(out), rows_of(ref_out)
    assert set(rows) == set(ref) == {"base (no control)", *schemes}
    for scheme, row in rows.items():
        assert set(row) == set(ref[scheme]), (scheme, set(row) ^ set(ref[scheme]))
    for scheme in schemes:
        row = rows[scheme]
        assert math.isfinite(row["outline_iou"]) and 0 <= row["outline_iou"] <= 1, row
        assert row["steps"] == steps
        for key in PROTOCOL_KEYS:
            assert row[key] == ref[scheme][key], (scheme, key, row[key], ref[scheme][key])
        # the same computation in other processes (replies sorted by partition): equal up to float noise
        assert row["final_loss"] == pytest.approx(ref[scheme]["final_loss"], rel=1e-3), scheme
        assert (out / f"samples_{scheme}.png").stat().st_size > 0
    for name in ("rounds.jsonl", "transcript.jsonl", "losses.jsonl", "config.toml", "complete.json",
                 "loss.png", "bytes.png"):  # a Flower run also marks itself finished and draws its figures
        assert (out / name).stat().st_size > 0, name
    # the client-side keys stay with the clients: the ServerApp's folder has none; the in-process runner,
    # which provisions the clients, keeps them apart in clients.toml
    for folder in (out, ref_out):
        assert not set(tomllib.loads((folder / "config.toml").read_text())) & set(CLIENT_KEYS), folder
    assert not (out / "clients.toml").exists()
    assert set(tomllib.loads((ref_out / "clients.toml").read_text())) == set(CLIENT_KEYS)
    schemes_in_transcript = {json.loads(line)["scheme"] for line in (out / "transcript.jsonl").open()}
    assert schemes_in_transcript == set(schemes)


# -------------------------------------------------------------------------------- tests
def test_ray_simulation_matches_in_process(flower):
    """``flwr run . local-sim``: a SuperLink started by ``flwr`` itself, 2 simulated SuperNodes on Ray."""
    http_port, control_port = free_ports(2)
    # Private SuperLink ports: `flwr run` reuses any SuperLink on the default port (39091),
    # which could be another user's, with another FLWR_HOME and environment.
    flower.env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"] = str(http_port)
    flower.env["FLWR_LOCAL_CONTROL_API_PORT"] = str(control_port)
    flower.write_config((REPO / "flower-home" / "config.toml").read_text())  # the FLWR_HOME config the project ships
    every = ["schemes=[" + ", ".join(f'"{s}"' for s in ALL_SCHEMES) + "]"]
    ref, ref_out = flower.start_in_process(every)
    run, out = flower.flwr_run("local-sim", every, ["--federation-config",
                                                    "num-supernodes=2 client-resources-num-cpus=1"])
    assert flower.wait(run, 480, "flwr run (simulation)") == 0, flower.tails()
    assert flower.wait(ref, 300, "splitcontrol compare") == 0, flower.tails()
    check_against_in_process(flower, out, ref_out, steps=8, schemes=ALL_SCHEMES)


def test_deployment_engine_on_localhost_matches_in_process(flower):
    """``flower-superlink`` + 2 ``flower-supernode`` processes (partition-id 0 and 1), then ``flwr run --stream``."""
    link_port, *node_ports = free_ports(3)
    flower.write_config(f'[superlink]\ndefault = "local-deployment"\n\n'
                        f'[superlink.local-deployment]\naddress = "127.0.0.1:{link_port}"\ninsecure = true\n')
    ref, ref_out = flower.start_in_process(DEPLOYMENT_OVERRIDES + CLIENT_OVERRIDES)
    link = flower.start("superlink", [str(BIN / "flower-superlink"), "--insecure",
                                      "--disable-runtime-dependency-installation", "--port", str(link_port)])
    deadline = time.monotonic() + 60
    while True:
        assert link.poll() is None, f"flower-superlink exited\n{flower.tails()}"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{link_port}/health", timeout=1) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        assert time.monotonic() < deadline, f"flower-superlink not healthy after 60 s\n{flower.tails()}"
        time.sleep(0.5)
    for pid, port in enumerate(node_ports):
        flower.start(f"supernode{pid}", [str(BIN / "flower-supernode"), "--insecure",
                                         "--superlink", f"127.0.0.1:{link_port}", "--port", str(port),
                                         "--node-config", (f"partition-id={pid} num-partitions=2 "
                                                           f"data-seed={DATA_SEED} client-seed={CLIENT_SEED}")])
    # The ServerApp asks the nodes it sees for their partition ids once: wait for both.
    deadline = time.monotonic() + 90
    while True:
        ls = subprocess.run([str(BIN / "flwr"), "supernode", "list", "local-deployment", "--format", "json"],
                            cwd=REPO, env=flower.env, capture_output=True, text=True, timeout=60)
        try:
            nodes = json.loads(ls.stdout)["nodes"]
        except (ValueError, KeyError):
            nodes = []
        if sum(n["status"] == "online" for n in nodes) == 2:
            break
        assert time.monotonic() < deadline, f"SuperNodes not online after 90 s: {ls.stdout}{ls.stderr}\n{flower.tails()}"
        time.sleep(1)
    run, out = flower.flwr_run("local-deployment", DEPLOYMENT_OVERRIDES)
    assert flower.wait(run, 720, "flwr run (deployment)") == 0, flower.tails()
    assert flower.wait(ref, 300, "splitcontrol compare") == 0, flower.tails()
    check_against_in_process(flower, out, ref_out, steps=4)
    clients = tomllib.loads((ref_out / "clients.toml").read_text())
    assert clients == {"data-seed": DATA_SEED, "client-seed": CLIENT_SEED}  # what the SuperNodes were given

"""A comparison under Flower's Ray simulation engine, from Python: many virtual clients, one call.

``run_ray(cfg, out)`` runs the project's ServerApp logic and ClientApp under
``flwr.simulation.run_simulation`` with ``cfg.num_clients`` SuperNodes (Ray actors, one CPU
each, reused across the virtual nodes), so a sweep variant can say ``engine = "ray"``
(``baselines/clients-scaling.toml``'s 100-client rows). What differs from ``flwr run .``:
the public configuration is handed to both apps in code (``run_simulation`` takes no run
config), and no SuperLink process is started. As under ``flwr run``, the clients hold
their own keys: each virtual node draws its ``client-seed`` on its first message and keeps
it in its state, so no ``clients.toml`` is written and attacks are refused (their scorer
needs the clients' data); ``data-seed`` is the default on every node.
"""
from __future__ import annotations

import functools
import json
import os
import time
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

from sim.core import jsonio
from sim.core.config import PublicConfig
from sim.core.plots import plot_run
from sim.engine.client_app import env_from_run_config, make_client_app
from sim.engine.grid import discover, quiet_flower_logs
from sim.engine.runner import run_compare


def server_app_for(public: PublicConfig, out: Path, resume: bool = False) -> ServerApp:
    """The ServerApp of :mod:`sim.engine.server_app`, with its configuration and folder given in code."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        quiet_flower_logs()
        run_compare(public, out, grid=grid, node_ids=discover(grid, public.num_clients), resume=resume)
        plot_run(out)

    return app


def run_ray(cfg: PublicConfig, out: str | Path, cpus_per_client: int = 1, resume: bool = False) -> dict:
    """Train and evaluate every scheme of ``cfg`` under Ray with ``cfg.num_clients`` virtual SuperNodes."""
    public = cfg.public() if hasattr(cfg, "public") else cfg
    if public.attacks:
        raise ValueError("engine=ray: the clients keep their own keys there, so attacks cannot be scored; "
                         "run the variant in-process to attack it")
    out = Path(out).resolve()
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    t0 = time.time()
    run_simulation(server_app=server_app_for(public, out, resume),
                   client_app=make_client_app(functools.partial(env_from_run_config, public=public)),
                   num_supernodes=public.num_clients,
                   backend_config={"client_resources": {"num_cpus": cpus_per_client, "num_gpus": 0.0}})
    path = out / "summary.json"
    if not path.exists():
        raise RuntimeError(f"the Ray simulation ended without writing {path}; see its log above")
    summary = json.loads(path.read_text())
    summary.update(engine="ray", engine_wall_s=round(time.time() - t0, 1))
    path.write_text(jsonio.dumps(summary, indent=2))
    return summary

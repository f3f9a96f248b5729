"""The Flower ServerApp: every scheme of the run config, through whatever grid Flower gives.

``flwr run .`` (Ray simulation) and ``flwr run . <deployment-federation>`` (Deployment
Engine) load ``app`` (see ``[tool.flwr.app.components]`` in pyproject.toml). Its main
reads the public experiment config from the run config (every key of
:class:`sim.core.config.PublicConfig`, plus ``out``: the results folder; the client-side
keys are the SuperNodes' own, in their node configs), asks the nodes
for their partition ids, trains each scheme in turn through the grid, evaluates, and
writes the same results folder as ``splitcontrol compare`` (``flwr run`` returns
nothing, so the files are the result).
"""
from __future__ import annotations

import time
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from sim.core.config import from_run_config
from sim.core.plots import plot_run
from sim.engine.context import check_components
from sim.engine.grid import discover, quiet_flower_logs
from sim.engine.runner import run_compare

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    quiet_flower_logs()
    cfg = check_components(from_run_config(context.run_config))
    out = str(context.run_config.get("out", "") or "")
    out_dir = Path(out) if out else Path("results") / cfg.experiment / time.strftime("flower-%Y%m%d-%H%M%S")
    node_ids = discover(grid, cfg.num_clients)
    run_compare(cfg, out_dir, grid=grid, node_ids=node_ids)
    plot_run(out_dir)  # the same figures as `splitcontrol compare` draws

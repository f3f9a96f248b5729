"""The Flower ServerApp: every scheme of the run config, through whatever grid Flower gives.

``flwr run .`` (Ray simulation) and ``flwr run . <deployment-federation>`` (Deployment
Engine) load ``app`` (see ``[tool.flwr.app.components]`` in pyproject.toml). Its main
reads the public experiment config from the run config (every key of
:class:`sim.core.config.PublicConfig`, plus ``out``: the results folder, an absolute path; the client-side
keys are the SuperNodes' own, in their node configs), asks the nodes
for their partition ids, trains each scheme in turn through the grid, evaluates, and
writes the same results folder as ``splitcontrol compare`` (``flwr run`` returns
nothing, so the files are the result).
"""
from __future__ import annotations

from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from sim.core.config import from_run_config
from sim.core.plots import plot_run
from sim.engine.context import check_components
from sim.engine.grid import discover, quiet_flower_logs
from sim.engine.runner import run_compare

app = ServerApp()


def results_dir(out: str) -> Path:
    """The run config's ``out``, which must be absolute: the ServerApp runs in the SuperLink's working
    folder, which need not be the submitter's (a relative path once landed in another clone)."""
    if not out or not Path(out).is_absolute():
        raise ValueError(f"out={out!r}: give the results folder as an absolute path, e.g. "
                         '--run-config "out=\\"$PWD/results/flower\\"" (the ServerApp runs in the '
                         "SuperLink's folder, not yours)")
    return Path(out)


@app.main()
def main(grid: Grid, context: Context) -> None:
    quiet_flower_logs()
    cfg = check_components(from_run_config(context.run_config))
    out_dir = results_dir(str(context.run_config.get("out", "") or ""))
    node_ids = discover(grid, cfg.num_clients)
    run_compare(cfg, out_dir, grid=grid, node_ids=node_ids)
    plot_run(out_dir)  # the same figures as `splitcontrol compare` draws

"""The shipped FLWR_HOME config names the federations the README's `flwr run` commands use."""
from __future__ import annotations

import tomllib
from pathlib import Path

REPO = Path(__file__).parents[1]


def test_flower_home_config_has_the_readme_federations():
    cfg = tomllib.loads((REPO / "flower-home" / "config.toml").read_text())
    links = cfg["superlink"]
    assert links["default"] == "local-sim"
    assert links["local-sim"]["address"] == ":local-in-memory:"
    assert links["local-deployment"] == {"address": "127.0.0.1:18000", "insecure": True}
    readme = (REPO / "README.md").read_text()
    assert "export FLWR_HOME=$PWD/flower-home" in readme
    for name in ("local-sim", "local-deployment"):
        assert f"flwr run . {name}" in readme


def test_a_flower_run_needs_an_absolute_out():
    """The ServerApp runs in the SuperLink's folder: a relative or missing `out` is refused, naming the fix."""
    import pytest

    from sim.engine.server_app import results_dir

    for bad in ("", "results/flower"):
        with pytest.raises(ValueError, match="absolute path"):
            results_dir(bad)
    assert results_dir("/tmp/x") == Path("/tmp/x")

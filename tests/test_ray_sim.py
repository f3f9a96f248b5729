"""`engine = "ray"` sweep variants: the apps under Flower's Ray simulation engine, called from Python."""
from __future__ import annotations

import json

import pytest

from sim.engine.context import load_experiment


@pytest.mark.slow
def test_run_ray_matches_the_in_process_run(tmp_path):
    """4 virtual SuperNodes on Ray and the in-process grid: same rows (the clients draw their own seeds,
    which an undefended run never uses)."""
    from sim.commands.cli import main
    from sim.engine.runner import run_compare

    keys = ["num-clients=4", "schemes=[\"fedavg\", \"nograd\"]", "baseline=false"]
    argv = ["flower-sim", "--preset", "smoke", "--out", str(tmp_path / "ray")]
    for k in keys:
        argv += ["--set", k]
    assert main(argv) == 0  # `splitcontrol flower-sim`: no federation to configure, no SuperLink left
    ray = json.loads((tmp_path / "ray" / "summary.json").read_text())
    local = run_compare(load_experiment("smoke", keys + ["client-seed=7"]), tmp_path / "local")
    assert ray["engine"] == "ray" and not (tmp_path / "ray" / "clients.toml").exists()
    assert (tmp_path / "ray" / "loss.png").stat().st_size > 0 and (tmp_path / "ray" / "complete.json").exists()
    rows = {r["scheme"]: r for r in local["rows"]}
    for r in ray["rows"]:
        want = rows[r["scheme"]]
        for key in ("steps", "messages_per_step", "bytes_up_per_step", "bytes_down_per_step",
                    "client_trainable_params"):
            assert r[key] == want[key], (r["scheme"], key)
        assert r["final_loss"] == pytest.approx(want["final_loss"], rel=1e-5)


def test_ray_refuses_attacks(tmp_path):
    from sim.engine.ray_sim import run_ray

    with pytest.raises(ValueError, match="attacks cannot be scored"):
        run_ray(load_experiment("smoke", ["attacks=[\"noise-target\"]"]), tmp_path)


def test_sweep_rejects_an_unknown_engine(tmp_path):
    from sim.commands.sweep import load_sweep

    p = tmp_path / "p.toml"
    p.write_text('name = "x"\n[[variant]]\nname = "a"\nengine = "spark"\nset = []\n')
    with pytest.raises(ValueError, match="engine='spark'"):
        load_sweep(p)

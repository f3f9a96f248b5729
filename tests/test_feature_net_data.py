"""FID (project features) on the user's data: `splitcontrol feature-net --set dataset=PATH` trains the
feature network on a local dataset's rows (never the eval rows), and the `feature-net` key points a run at it.
Tiny sizes: a 16-row imagefolder dataset in tmp_path, a few optimiser steps."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_local_data import imagefolder_dataset

DATA_KEYS = ["resolution=32", "eval-samples=4", "num-samples=4"]


def _main(*args) -> int:
    from sim.commands.cli import main

    return main(["feature-net", *args])


def _sets(data) -> list[str]:
    out = []
    for kv in [f"dataset={data}", *DATA_KEYS]:
        out += ["--set", kv]
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A dataset of 16 rows (4 eval, 4 pool, 8 aux) and a net trained on its aux rows."""
    root = tmp_path_factory.mktemp("fn")
    data = imagefolder_dataset(root / "data", n=16)
    out = root / "net"
    assert _main(*_sets(data), "--steps", "3", "--batch-size", "4", "--out", str(out), "--json") == 0
    return data, out


def test_the_network_trains_on_the_public_rows_only(trained):
    from sim.core.config import load_config
    from sim.core.feature_net import USER_HEADS, load_feature_net
    from sim.core.splits import local_split

    data, out = trained
    record = json.loads((out / "train_log.json").read_text())
    split = local_split(load_config("smoke", [f"dataset={data}", *DATA_KEYS]))
    assert record["source"]["rows"] == "aux" and record["source"]["num_rows"] == len(split["aux"]) == 8
    assert record["source"]["resolution"] == 32 and record["config"]["num_train_images"] == 8
    net = load_feature_net(out)
    assert net.head_sizes == USER_HEADS
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    assert net.features(x).shape == (3, 128)
    assert not torch.allclose(net.features(x), load_feature_net().features(x))  # not the committed weights


def test_all_but_eval_adds_the_pool_and_never_the_eval_rows(tmp_path):
    from sim.core.config import load_config
    from sim.commands.feature_net import feature_rows
    from sim.core.splits import local_split

    data = imagefolder_dataset(tmp_path / "data", n=12)
    cfg = load_config("smoke", [f"dataset={data}", *DATA_KEYS])
    split = local_split(cfg)
    rows = feature_rows(cfg, "all-but-eval")
    assert len(rows) == 8 and not set(rows) & set(split["eval"])
    assert set(feature_rows(cfg, "aux")) == set(split["aux"])


def test_a_run_points_at_the_weights_with_the_feature_net_key(trained, tmp_path):
    from sim.core.config import load_config

    _, out = trained
    cfg = load_config("smoke", [f"feature-net={out}"])
    assert cfg.feature_net == str(out.resolve())
    assert load_config("smoke", [f"feature-net={out / 'feature_net.safetensors'}"]).feature_net.endswith(".safetensors")
    assert load_config("smoke").feature_net == ""
    with pytest.raises(ValueError, match="feature-net=.*no feature_net.safetensors"):
        load_config("smoke", [f"feature-net={tmp_path}"])


def test_fid_on_the_users_features_differs_from_the_committed_ones(trained):
    from sim.core.feature_net import load_feature_net
    from sim.core.fidelity import fid_project

    _, out = trained
    rng = np.random.default_rng(0)
    a, b = (rng.integers(0, 255, (6, 32, 32, 3), dtype=np.uint8) for _ in range(2))
    ours, committed = fid_project(a, b, net=load_feature_net(out)), fid_project(a, b)
    assert np.isfinite(ours) and ours != pytest.approx(committed)


def test_report_on_local_data(trained, capsys):
    data, out = trained
    capsys.readouterr()
    assert _main(*_sets(data), "--out", str(out), "--report", "--n", "4", "--json") == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert set(rows) == {"real (other rows)", "blur", "noise", "colour"}
    assert all(np.isfinite(r["fid_project"]) for r in rows.values())


def test_local_data_needs_an_out_folder_and_enough_rows(tmp_path, capsys):
    data = imagefolder_dataset(tmp_path / "data", n=9)
    with pytest.raises(SystemExit) as e:  # never over the committed weights
        _main(*_sets(data), "--steps", "1")
    assert e.value.code == 2 and "--out" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # 9 rows - 4 eval - 4 pool = 1 aux row
        _main(*_sets(data), "--steps", "1", "--out", str(tmp_path / "net"))
    assert e.value.code == 2 and "all-but-eval" in capsys.readouterr().err


def test_nt_xent_prefers_matching_views():
    from sim.core.feature_net import nt_xent

    a = torch.randn(8, 16)
    assert nt_xent(a, a + 0.01 * torch.randn(8, 16)) < nt_xent(a, torch.randn(8, 16))

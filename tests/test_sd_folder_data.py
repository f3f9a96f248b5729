"""Bring your own data and base model: a local dataset in diffusers' layout on a tiny diffusers SD folder
(sd15 preset, 64 px), through `compare`. The folder and the data are built in tmp_path (tests/sd_folder.py)."""
from __future__ import annotations

import json

import numpy as np
from sd_folder import make_sd_folder
from test_local_data import imagefolder_dataset


def test_compare_on_a_local_dataset_and_a_tiny_sd_folder_at_64px(tmp_path, monkeypatch):
    from sim.commands.cli import main

    monkeypatch.setenv("SPLITCONTROL_CACHE", str(tmp_path / "cache"))
    folder = make_sd_folder(tmp_path / "sd")
    data = imagefolder_dataset(tmp_path / "data", n=10)
    out = tmp_path / "run"
    assert main(["compare", "--preset", "smoke", "--set", "model=sd15", "--set", f"base-model={folder}",
                 "--set", f"dataset={data}", "--set", "resolution=64", "--set", "steps=2", "--set", "local-steps=1",
                 "--set", "batch-size=2", "--set", "num-samples=6", "--set", "eval-samples=2", "--set", "ddim-steps=1",
                 "--set", "baseline=false", "--set", 'schemes=["fedavg", "vanilla", "nograd", "splitfed"]',
                 "--out", str(out)]) == 0
    rows = {r["scheme"]: r for r in json.loads((out / "summary.json").read_text())["rows"]}
    assert set(rows) == {"fedavg", "vanilla", "nograd", "splitfed"}
    for r in rows.values():
        assert r["steps"] == 2 and np.isfinite(r["final_loss"]) and {"edge_f1", "psnr", "fid_project"} <= set(r)
    samples = np.load(out / "samples.npz")
    assert samples["target"].shape[1:] == (64, 64, 3) and samples["nograd"].shape[1:] == (64, 64, 3)


def test_a_split_scheme_trains_at_a_resolution_other_than_the_folders(tmp_path, monkeypatch):
    """The folder's UNet says 64 px; at resolution=128 the server's wire check expects 16x16 latents."""
    from sim.commands.cli import main

    monkeypatch.setenv("SPLITCONTROL_CACHE", str(tmp_path / "cache"))
    folder = make_sd_folder(tmp_path / "sd")
    out = tmp_path / "run"
    assert main(["compare", "--preset", "smoke", "--set", "model=sd15", "--set", f"base-model={folder}",
                 "--set", "resolution=128", "--set", "steps=2", "--set", "local-steps=1", "--set", "batch-size=2",
                 "--set", "num-samples=4", "--set", "eval-samples=2", "--set", "ddim-steps=1",
                 "--set", "baseline=false", "--set", 'schemes=["vanilla"]', "--out", str(out)]) == 0
    rows = json.loads((out / "summary.json").read_text())["rows"]
    assert rows[0]["steps"] == 2 and np.isfinite(rows[0]["final_loss"])
    assert np.load(out / "samples.npz")["vanilla"].shape[1:] == (128, 128, 3)

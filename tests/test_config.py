"""Config: presets load, overrides are typed, bad keys and values fail naming the key."""
from __future__ import annotations

import dataclasses
import tomllib

import pytest

from sim.core.config import ExperimentConfig, PublicConfig, list_presets, load_config
from sim.engine.context import load_experiment


def test_presets_load_and_round_trip_through_toml(tmp_path):
    assert {"default", "smoke"} <= set(list_presets())
    cfg = load_config("smoke", ["num-clients=3", "schemes=vanilla,nograd", "lr=0.01"])
    assert cfg.num_clients == 3 and cfg.schemes == ("vanilla", "nograd") and cfg.lr == 0.01
    path = tmp_path / "c.toml"
    path.write_text(cfg.to_toml())
    assert load_config(str(path)) == cfg
    assert tomllib.loads(cfg.to_toml())["num-clients"] == 3


@pytest.mark.parametrize("override, needle", [
    ("no-such-key=1", "no-such-key"),
    ("steps=many", "steps"),
    ("steps=0", "steps"),
    ("partition=random", "partition"),
    ("schemes=fedavg,nosuch", "schemes"),
    ("schemes=fedavg,fedavg", "schemes"),
    ("dataset=cifar", "dataset"),
    ("num-clients=5000", "num-clients"),
    ("dirichlet-alpha=0", "dirichlet-alpha"),
    ("steps", "key=value"),
    ("max-radius=0.1", "max-radius"),
    ("high-noise-weight=0.5", "high-noise-weight"),
    ("dataset=faces", "num-samples"),
    # inf and nan pass every range check, so they are refused on their own (before any work)
    ("guidance=inf", "guidance must be a finite number"),
    ("lr=inf", "lr must be a finite number"),
    ("high-noise-weight=nan", "high-noise-weight must be a finite number"),
    ("max-radius=nan", "max-radius must be a finite number"),
    ("defenses=noise:std=inf", "std='inf' must be a finite number"),
    ("defenses=latent-dp:epsilon=nan", "epsilon='nan' must be a finite number"),
    ("attacks=inverse-net:lr=inf", "lr='inf' must be a finite number"),
    ("ddim-steps=5000", "ddim-steps=5000 exceeds"),
])
def test_bad_overrides_fail_naming_the_key(override, needle):
    with pytest.raises(ValueError, match=needle):
        load_experiment("default", [override])  # types and ranges, then the component names


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ValueError, match="smoke"):
        load_config("nonexistent")


def test_a_run_folder_keeps_the_client_side_keys_out_of_config_toml(tmp_path):
    """config.toml (what the server knew) names no client-side key; clients.toml holds exactly them;
    load_run_config puts both parts back together; the Flower run config refuses a client-side key."""
    from sim.core.config import CLIENT_KEYS, from_run_config, load_public_config, to_run_config
    from sim.engine.clientside import load_run_config, write_run_config

    cfg = load_config("smoke", ["data-seed=7", "client-seed=12345", "eval-seed=3"])
    write_run_config(tmp_path, cfg)
    public = tomllib.loads((tmp_path / "config.toml").read_text())
    clients = tomllib.loads((tmp_path / "clients.toml").read_text())
    assert not set(CLIENT_KEYS) & set(public), public
    assert clients == {"data-seed": 7, "client-seed": 12345}
    assert public["eval-seed"] == 3 and public["steps"] == cfg.steps  # the public keys are all there
    assert set(public) | set(clients) == {f.name.replace("_", "-") for f in dataclasses.fields(ExperimentConfig)}
    back = load_run_config(tmp_path)
    assert isinstance(back, ExperimentConfig) and back == cfg
    assert back.public() == load_public_config(tmp_path) == cfg.public()
    assert not hasattr(load_public_config(tmp_path), "data_seed")
    assert not set(CLIENT_KEYS) & set(to_run_config(cfg))
    with pytest.raises(ValueError, match="data-seed"):
        from_run_config({**to_run_config(cfg), "data-seed": 7})
    with pytest.raises(ValueError, match="client-seed"):
        from_run_config({**to_run_config(cfg), "client-seed": 1})
    with pytest.raises(ValueError, match="resolved"):  # a fresh (unset) client seed is drawn before writing
        write_run_config(tmp_path, cfg.with_client_seed(-1))


def test_flower_run_config_declares_every_key_with_the_default_values():
    """pyproject's [tool.flwr.app.config] (what `flwr run` accepts) mirrors ExperimentConfig."""
    import tomllib
    from pathlib import Path

    from sim.core.config import from_run_config, load_config, to_run_config

    declared = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    default = to_run_config(load_config("default"))
    assert set(declared) == set(default) | {"out"}
    assert {k: declared[k] for k in default} == default
    assert from_run_config(declared) == load_config("default").public()
    assert isinstance(from_run_config(declared), PublicConfig)
    smoke = load_config("smoke")
    assert from_run_config(to_run_config(smoke)) == smoke.public()  # lists survive as comma-separated strings
    with pytest.raises(ValueError, match="steps"):
        from_run_config({"steps": "many"})


def test_an_older_run_config_without_a_key_keeps_the_behaviour_it_was_made_with(tmp_path):
    """fedavg-keep-optimizer became true by default after runs were written without the key
    (stateless FedAvg clients): such a run still reads as stateless, a preset gets the new default."""
    from sim.engine.runfolder import config_differences
    from sim.engine.clientside import load_run_config

    cfg = load_config("smoke")
    text = "\n".join(l for l in cfg.public().to_toml().splitlines() if not l.startswith("fedavg-keep-optimizer"))
    (tmp_path / "config.toml").write_text(text + "\n")
    assert cfg.fedavg_keep_optimizer is True
    assert load_config(str(tmp_path / "config.toml")).fedavg_keep_optimizer is True
    assert load_run_config(tmp_path).fedavg_keep_optimizer is False
    assert load_run_config(tmp_path, ["guidance=5"]).guidance == 5
    assert config_differences(cfg, tmp_path) == ["fedavg-keep-optimizer"]
    assert config_differences(dataclasses.replace(cfg, fedavg_keep_optimizer=False, jobs=3), tmp_path) == []
    with pytest.raises(FileNotFoundError, match="config.toml"):
        load_run_config(tmp_path / "nothing")


def test_bad_numbers_exit_2_before_any_work(tmp_path, capsys):
    from sim.commands.cli import main

    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        main(["compare", "--preset", "smoke", "--set", "guidance=inf", "--out", str(out)])
    assert e.value.code == 2 and "guidance must be a finite number" in capsys.readouterr().err
    assert not out.exists()


def test_strict_json_writes_null_and_says_where():
    import json

    from sim.core import jsonio

    text = jsonio.dumps({"rows": [{"final_loss": float("nan"), "x": 1.0}], "wall": float("inf")})
    back = json.loads(text)  # valid JSON: no bare NaN / Infinity
    assert "NaN" not in text and "Infinity" not in text
    assert back["rows"][0] == {"final_loss": None, "x": 1.0} and back["wall"] is None
    assert back["non_finite"] == ["rows.0.final_loss", "wall"]
    assert json.loads(jsonio.dumps([1.0, 2])) == [1.0, 2]  # nothing to flag: unchanged


def test_a_diverged_run_is_refused_before_evaluation():
    from sim.engine.runner import check_finite_losses

    cfg = load_experiment("smoke")
    check_finite_losses("nograd", [0.5, 0.4], cfg)
    with pytest.raises(ValueError, match="nograd: the training loss is nan at step 2 of 3: the run diverged"):
        check_finite_losses("nograd", [0.5, float("nan"), 0.3], cfg)

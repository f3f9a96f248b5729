"""`splitcontrol defenses` binds the defenses at the chosen model's latent size (the default DP
sensitivities scale with it: 2 sqrt(C*H*W) for latents in [-1, 1])."""
from __future__ import annotations

import json

import pytest


def _listing(capsys, *args) -> dict:
    from sim.commands.cli import main

    assert main(["defenses", "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


def _sensitivity(res: dict, name: str) -> float:
    (row,) = [d for d in res["defenses"] if d["name"] == name]
    return row["accounting"]["sensitivity"]


@pytest.mark.parametrize("args, shape", [((), [3, 32, 32]), (("--model", "sd15"), [4, 64, 64]),
                                         (("--model", "sd15", "--resolution", "256"), [4, 32, 32])])
def test_defenses_are_bound_at_the_models_latent_size(capsys, args, shape):
    res = _listing(capsys, *args)
    dim = shape[0] * shape[1] * shape[2]
    assert res["latent_shape"] == shape and res["timestep_table"]["sensitivity"] == pytest.approx(2 * dim ** 0.5)
    for name in ("latent-dp", "one-shot"):  # both default to the replace-one sensitivity of one latent
        assert _sensitivity(res, name) == pytest.approx(2 * dim ** 0.5)


def test_list_defenses_takes_the_latent_size():
    from defenses import list_defenses
    from sim.core.models import ddpm_scheduler, get_preset

    sched = ddpm_scheduler(get_preset("tiny"))
    (tiny,) = [d for d in list_defenses(sched) if d["name"] == "one-shot"]
    (big,) = [d for d in list_defenses(sched, latent_dim=4 * 64 * 64) if d["name"] == "one-shot"]
    assert tiny["params"] == big["params"]  # the same defaults, bound at another size
    assert tiny["accounting"]["sensitivity"] == pytest.approx(2 * (3 * 32 * 32) ** 0.5)
    assert big["accounting"]["sensitivity"] == pytest.approx(2 * (4 * 64 * 64) ** 0.5)


def test_a_resolution_the_model_cannot_take_exits_2(capsys):
    from sim.commands.cli import main

    with pytest.raises(SystemExit) as e:
        main(["defenses", "--model", "sd15", "--resolution", "100"])
    assert e.value.code == 2 and "resolution=100" in capsys.readouterr().err

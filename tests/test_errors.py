"""Bad files and paths end in exit 2 with a message naming the file, never a traceback."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from sim.commands.cli import main

REPO = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("errors") / "run"
    assert main(["compare", "--preset", "smoke", "--out", str(out), "--set", "schemes=[\"nograd\"]",
                 "--set", "baseline=false", "--set", "eval-samples=2", "--set", "ddim-steps=2",
                 "--set", "steps=4", "--set", "keep-messages=2"]) == 0
    return out


@pytest.fixture
def run(finished, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(finished, dst)
    return dst


def _fails(argv, capsys, *needles):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert "Traceback" not in err
    for n in needles:
        assert n in err, err


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_a_truncated_summary_is_named(run, capsys):
    _truncate(run / "summary.json")
    _fails(["plot", str(run)], capsys, f"{run / 'summary.json'} is not valid JSON")


def test_a_truncated_checkpoint_is_named_before_any_sampling(run, capsys):
    weights = next((run / "controlnet_nograd").glob("*.safetensors"))
    _truncate(weights)
    _fails(["evaluate", str(run)], capsys, f"{run / 'controlnet_nograd'}: cannot load the saved ControlNet")


def test_truncated_kept_messages_are_named(run, capsys):
    _truncate(run / "seen_nograd.pt")
    _fails(["attack", "--run", str(run), "--attack", "noise-target"], capsys,
           f"{run / 'seen_nograd.pt'}: cannot read it")


def test_an_out_under_a_regular_file(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    _fails(["compare", "--preset", "smoke", "--out", str(tmp_path / "afile" / "run")], capsys, "Not a directory")


def test_malformed_toml_and_unknown_variants_are_named(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("steps = = 3\n")
    _fails(["compare", "--preset", str(bad), "--out", str(tmp_path / "o")], capsys, "bad.toml: not valid TOML")
    _fails(["sweep", str(REPO / "baselines" / "clients-scaling.toml"), "--only", "nosuch", "--out",
            str(tmp_path / "sw")], capsys, "no variant(s) ['nosuch']", "nograd-2-iid")


@pytest.mark.slow
def test_an_unguarded_script_with_worker_processes_fails_instead_of_hanging(tmp_path):
    """A script that calls run_compare with jobs > 1 at module level is re-imported by every spawned
    worker; the run ends with an error that says what to do (it used to respawn workers forever)."""
    import subprocess
    import sys

    script = tmp_path / "script.py"
    script.write_text("from sim.engine.context import load_experiment\n"
                      "from sim.engine.runner import run_compare\n"
                      f"run_compare(load_experiment('smoke', ['jobs=2', 'baseline=false']), {str(tmp_path / 'out')!r})\n")
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode != 0
    assert 'if __name__ == "__main__":' in done.stderr

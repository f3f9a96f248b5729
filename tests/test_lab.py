"""The teaching lab (lab/): the notebooks are current with their sources, hide their answers from the
student, and run top to bottom with the answers (what a teacher checks before the lab)."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAB = ROOT / "lab"
sys.path.insert(0, str(LAB))
import build  # noqa: E402  (lab/build.py: not a package of the project)

def _kernel_env(monkeypatch, tmp_path) -> None:
    """Runs under $LAB_OUT, and the kernel's connection files and IPython's history under the test's temp root."""
    monkeypatch.setenv("LAB_OUT", str(tmp_path / "runs"))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "jupyter-runtime"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))


SOURCES = sorted((LAB / "src").glob("[0-9][0-9]_*.py"))
NAMES = [p.stem for p in SOURCES]


def test_there_are_four_notebooks_with_goals_and_exercises():
    assert len(NAMES) >= 4, NAMES
    for src in SOURCES:
        cells = build.cells(src.read_text())
        assert cells[0][0] == "markdown" and "Learning goals" in cells[0][1], src.name
        exercises = [s for k, s in cells if k == "code" and build.BEGIN in s]
        assert 2 <= len(exercises), (src.name, len(exercises))
        checks = [s for k, s in cells if k == "code" and ("check(" in s or "check_close(" in s)]
        assert len(checks) >= len(exercises), f"{src.name}: an exercise without a self-check"


def test_committed_notebooks_are_built_from_the_sources(tmp_path):
    """`python lab/build.py` was run after the last edit of lab/src/ (the .ipynb files are generated)."""
    for path in build.build(tmp_path):
        committed = LAB / path.relative_to(tmp_path)
        assert committed.exists(), f"{committed} is missing: run python lab/build.py"
        assert committed.read_text() == path.read_text(), f"{committed} is stale: run python lab/build.py"


def test_student_notebooks_hold_no_answers():
    import nbformat

    for name in NAMES:
        student = nbformat.read(LAB / f"{name}.ipynb", as_version=4)
        solution = nbformat.read(LAB / "solutions" / f"{name}.ipynb", as_version=4)
        text = "\n".join(c.source for c in student.cells)
        assert build.BEGIN not in text and build.END not in text
        placeholders = text.count("raise NotImplementedError")
        assert placeholders == (LAB / "src" / f"{name}.py").read_text().count(build.BEGIN), name
        assert "raise NotImplementedError(\"your code here\")" not in "\n".join(c.source for c in solution.cells)


@pytest.mark.parametrize("bad, match", [
    ("# %%\nx = 1\n# BEGIN SOLUTION\ny = 2\n", "without"),
    ("# %%\n# END SOLUTION\n", "without"),
    ("# %%\n# BEGIN SOLUTION\n# BEGIN SOLUTION\n# END SOLUTION\n", "nested"),
])
def test_unbalanced_solution_markers_fail_naming_the_cell(tmp_path, bad, match):
    src = tmp_path / "99_bad.py"
    src.write_text(bad)
    with pytest.raises(ValueError, match=match):
        build.notebook(src, student=True)


def test_student_placeholder_keeps_the_indentation():
    out = build.strip_solutions("def f():\n    # BEGIN SOLUTION\n    return 1\n    # END SOLUTION\n", "x")
    assert out.splitlines() == ["def f():", "    # YOUR CODE HERE", "    raise NotImplementedError(\"your code here\")"]


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_solution_notebook_runs_top_to_bottom(name, tmp_path, monkeypatch):
    """What CI checks: every cell of the solution notebook runs (its self-checks pass) on a fresh
    output folder; the wall time is printed (the lab's goal: 5 minutes each on 2 cores)."""
    import nbformat
    from nbclient import NotebookClient

    _kernel_env(monkeypatch, tmp_path)
    nb = nbformat.read(LAB / "solutions" / f"{name}.ipynb", as_version=4)
    t0 = time.perf_counter()
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(LAB)}}).execute()
    wall = time.perf_counter() - t0
    outputs = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "correct." in outputs and "not yet" not in outputs
    print(f"{name}: {wall:.0f} s", file=sys.__stderr__)
    assert os.listdir(tmp_path / "runs"), "the notebook wrote no run under $LAB_OUT"


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_student_notebook_stops_at_its_first_exercise(name, tmp_path, monkeypatch):
    """The student's notebook runs as far as the first exercise and stops there, asking for the answer."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    _kernel_env(monkeypatch, tmp_path)
    nb = nbformat.read(LAB / f"{name}.ipynb", as_version=4)
    first = next(i for i, c in enumerate(nb.cells) if "# YOUR CODE HERE" in c.source)
    with pytest.raises(CellExecutionError, match="NotImplementedError"):
        NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(LAB)}}).execute()
    ran = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and c.get("execution_count")]
    assert max(ran) == first, (name, first, max(ran))

"""Build the lab's notebooks from their sources: `python lab/build.py` (tests/test_lab.py checks they are current).

Each notebook is written once, as a Python file in lab/src/ in the "percent" format that
Jupyter, VS Code and jupytext read (``# %%`` starts a code cell, ``# %% [markdown]`` a
markdown cell whose lines start with ``# ``). Inside a code cell, the lines between
``# BEGIN SOLUTION`` and ``# END SOLUTION`` are an exercise's answer. The build writes

* ``lab/NN_name.ipynb``: the student's notebook, each answer replaced by
  ``raise NotImplementedError`` under a "your code here" line (nbgrader's convention);
* ``lab/solutions/NN_name.ipynb``: the same notebook with the answers, which CI executes
  top to bottom (tests/test_lab.py).

Outputs are not committed: a notebook shows its results when it is run.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import nbformat

LAB = Path(__file__).resolve().parent
SRC = LAB / "src"
BEGIN, END = "# BEGIN SOLUTION", "# END SOLUTION"
CELL = re.compile(r"^# %%(.*)$")


def cells(text: str) -> list[tuple[str, str]]:
    """(kind, source) per cell of a percent-format file; kind is "code" or "markdown"."""
    out, kind, lines = [], None, []
    for line in text.splitlines():
        m = CELL.match(line)
        if m:
            if kind is not None:
                out.append((kind, "\n".join(lines).strip("\n")))
            kind, lines = ("markdown" if "[markdown]" in m.group(1) else "code"), []
        elif kind is None:
            if line.strip():
                raise ValueError(f"text before the first '# %%' cell marker: {line!r}")
        else:
            lines.append(line)
    if kind is not None:
        out.append((kind, "\n".join(lines).strip("\n")))
    return out


def markdown(source: str) -> str:
    """A markdown cell's text: the leading '# ' (or a bare '#') of every line removed."""
    return "\n".join(re.sub(r"^# ?", "", line) for line in source.splitlines())


def strip_solutions(source: str, where: str) -> str:
    """A code cell with every BEGIN/END SOLUTION block replaced by a placeholder the student fills in."""
    out, inside, indent = [], False, ""
    for line in source.splitlines():
        stripped = line.strip()
        if stripped == BEGIN:
            if inside:
                raise ValueError(f"{where}: nested '{BEGIN}'")
            inside, indent = True, line[:len(line) - len(line.lstrip())]
            out += [f"{indent}# YOUR CODE HERE", f"{indent}raise NotImplementedError(\"your code here\")"]
        elif stripped == END:
            if not inside:
                raise ValueError(f"{where}: '{END}' without '{BEGIN}'")
            inside = False
        elif not inside:
            out.append(line)
    if inside:
        raise ValueError(f"{where}: '{BEGIN}' without '{END}'")
    return "\n".join(out)


def solution(source: str) -> str:
    """A code cell with the solution markers removed (the answers kept)."""
    return "\n".join(line for line in source.splitlines() if line.strip() not in (BEGIN, END))


def notebook(path: Path, student: bool):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    for i, (kind, source) in enumerate(cells(path.read_text())):
        if kind == "markdown":
            nb.cells.append(nbformat.v4.new_markdown_cell(markdown(source)))
        else:
            text = strip_solutions(source, f"{path.name} cell {i}") if student else solution(source)
            nb.cells.append(nbformat.v4.new_code_cell(text))
    for i, cell in enumerate(nb.cells):  # stable ids, so a rebuild changes nothing
        cell["id"] = f"{path.stem[:2]}-{i:03d}"
    return nb


def build(out: Path = LAB) -> list[Path]:
    """Write every source's student and solution notebook under ``out``; returns the paths written."""
    written = []
    for src in sorted(SRC.glob("[0-9][0-9]_*.py")):
        for student, folder in ((True, out), (False, out / "solutions")):
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{src.stem}.ipynb"
            path.write_text(nbformat.writes(notebook(src, student)) + "\n")
            written.append(path)
    return written


if __name__ == "__main__":
    for p in build(Path(sys.argv[1]) if len(sys.argv) > 1 else LAB):
        print(p)

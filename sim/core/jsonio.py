"""Strict JSON for everything the project writes: never a bare NaN or Infinity.

Python's ``json`` writes ``NaN`` and ``Infinity``, which are not JSON (other readers reject
the file). :func:`dumps` writes each non-finite number as ``null`` and, when the top level
is an object, lists where they were under ``"non_finite"`` (paths like ``rows.2.final_loss``),
so the information is kept and the file stays valid.
"""
from __future__ import annotations

import json
import math
from pathlib import Path


def finite(obj, path: str = "", found: list | None = None):
    """``obj`` with every non-finite float replaced by None; their paths appended to ``found``."""
    if isinstance(obj, float) and not math.isfinite(obj):
        if found is not None:
            found.append(path or ".")
        return None
    if isinstance(obj, dict):
        return {k: finite(v, f"{path}.{k}" if path else str(k), found) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v, f"{path}.{i}" if path else str(i), found) for i, v in enumerate(obj)]
    return obj


def dumps(obj, **kw) -> str:
    """``json.dumps`` that refuses NaN/Infinity: they become null, listed under ``non_finite``."""
    found: list[str] = []
    clean = finite(obj, found=found)
    if found and isinstance(clean, dict):
        clean["non_finite"] = found
    return json.dumps(clean, allow_nan=False, **kw)


def read(path) -> object:
    """A JSON file's content, or a ValueError naming the file (a truncated file: an interrupted writer)."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}): was its run interrupted while writing it? "
                         "Re-run it (compare --resume) or delete the file") from None

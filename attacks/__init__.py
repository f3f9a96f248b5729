"""Attacks on what the server sees: one file per attack over :class:`attacks.base.Attack`.

``splitcontrol attacks --json`` lists them with their declared threat models;
``splitcontrol attack --run RUN_DIR --attack NAME`` runs one on a finished run (which
must have kept messages: ``--set keep-messages=N``, or ``--set attacks=[...]`` on
``compare``, which keeps them and attacks right after training).

:func:`run_attacks` builds each scheme's :class:`ServerView`, asks each attack whether
it applies (N/A with the reason if not), runs it, scores the reconstruction against
the private samples (replayed outside the attack: attacks/truth.py), saves a
private | reconstructed grid per (scheme, attack) and writes ``attacks.json``; the rows
are also merged into ``summary.json`` under ``"attacks"``.

Why there is no label-inference attack
--------------------------------------
In split learning of a classifier the labels are private and leak through gradients.
Here the "label" of a training step is the noise target eps: random noise the client
draws afresh every step, independent of its data. Recovering it reveals nothing about
the client; what eps does enable is removing the noise from x_t, which the noise-target
attack measures.
"""
from __future__ import annotations

import importlib
import pkgutil

from .base import REGISTRY, Attack, Reconstruction, ServerView, make_attack, register  # noqa: F401  (re-exported)

for _m in pkgutil.iter_modules(__path__):
    if _m.name not in ("base", "scoring", "common"):
        importlib.import_module(f"{__name__}.{_m.name}")


def list_attacks() -> list[dict]:
    return [cls().describe() for cls in REGISTRY.values()]


def best_ssim(row: dict) -> float | None:
    """The headline privacy number of a row: its best mean SSIM over image and hint (None if N/A)."""
    vals = [row[k]["ssim"] for k in ("image", "hint") if k in row]
    return max(vals) if vals else None

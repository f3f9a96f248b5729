"""Averaging the iterates of a training run: the released weights are the mean of the model at
the ends of the run's last turns (or rounds), not its last state.

A ControlNet's last iterate fluctuates: how much of the prompt's colour the control overrides
swings between checkpoints of one run at the same outline IoU (measured in the README, "Control
without compromise"). The mean over the tail of the
trajectory (Polyak-Ruppert averaging; stochastic weight averaging samples it at a fixed
interval the same way) is the usual remedy. Here the samples are the turn ends (a split
client's turn, a FedAvg round): the points where every scheme's server holds the whole model.

:class:`TailAverage` keeps a running mean, in float32, of the snapshots from turn
``first(turns, start)`` on; ``start=1`` keeps only the last turn's, the last iterate itself.
Averaging changes no training step (losses, messages and the transcript are the same); it
runs on the server from what the server holds anyway (the weights after each turn), so it
reveals nothing more to it.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn


def first(turns: int, start: float) -> int:
    """The first turn (1-based) of ``turns`` whose end enters the average from fraction ``start``
    of the run on: the turns after ``floor(start * turns)``, and at least the last one."""
    if not 0 <= start <= 1:
        raise ValueError(f"the averaging start must be a fraction of the run in [0, 1], got {start}")
    return min(turns, math.floor(start * turns) + 1)


class TailAverage:
    """The running mean of a model's state at the ends of turns ``first(turns, start)..turns``."""

    def __init__(self, turns: int, start: float):
        self.first = first(turns, start)
        self.count = 0
        self.mean: dict[str, torch.Tensor] = {}  # the floating tensors, in float32
        self.dtypes: dict[str, torch.dtype] = {}
        self.other: dict[str, torch.Tensor] = {}  # the others (integer buffers): the last turn's

    def add(self, turn: int, state: Callable[[], dict[str, torch.Tensor]]) -> None:
        """The model's state at the end of ``turn`` (1-based), from ``state()``; it is called only for
        the turns the average holds (the earlier ones cost nothing)."""
        if turn < self.first:
            return
        self.count += 1
        for k, v in state().items():
            v = v.detach()
            self.dtypes[k] = v.dtype
            if not v.is_floating_point():
                self.other[k] = v.clone()
            elif k not in self.mean:
                self.mean[k] = v.float().clone()
            else:
                self.mean[k].add_((v.float() - self.mean[k]) / self.count)

    def state(self) -> dict[str, torch.Tensor]:
        """The averaged state (floating tensors in their own dtype; others as at the last turn)."""
        if not self.count:
            raise RuntimeError("no turn reached the average: add() the state at the end of every turn")
        return {k: self.mean[k].to(dtype) if k in self.mean else self.other[k] for k, dtype in self.dtypes.items()}

    def apply(self, model: nn.Module) -> nn.Module:
        """``model`` with the averaged weights loaded (in place); returned for chaining."""
        model.load_state_dict(self.state())
        return model

"""The paper's privacy-preserving activation: symsigmoid(x) = |x| (2 sigmoid(x) - 1) = |x| tanh(x/2).

Hook: feature ("control": the client's control-branch output, h = E(hint) + x_t under
nograd, the head's output under vanilla). Odd, strictly monotone, parameter-free
(~x|x|/2 near 0, ~x far out); applied identically at inference. Being monotone it is
invertible (:func:`inverse`), so against an attacker who knows it (the weights and the
design are public) it adds no privacy by itself; it shrinks small values toward 0
(fewer bits survive fp16) and makes learning-based inversion harder to train.
Schemes: every split scheme (those whose clients offer the hook).
"""
from __future__ import annotations

import torch

from .base import Defense, HookContext, register


def symsigmoid(x: torch.Tensor) -> torch.Tensor:
    return x.abs() * torch.tanh(x / 2)


def inverse(y: torch.Tensor, iters: int = 60) -> torch.Tensor:
    """Solve symsigmoid(x) = y elementwise (bisection on the monotone map; public knowledge)."""
    y = y.double()
    lo = torch.where(y >= 0, torch.zeros_like(y), y.clamp(max=0) - 2)
    hi = torch.where(y >= 0, y.clamp(min=0) + 2, torch.zeros_like(y))
    for _ in range(iters):
        mid = (lo + hi) / 2
        up = symsigmoid(mid) < y
        lo, hi = torch.where(up, mid, lo), torch.where(up, hi, mid)
    return ((lo + hi) / 2).float()


@register
class SymSigmoid(Defense):
    """Apply |x| tanh(x/2) to the control branch's features before they leave the client."""

    name = "symsigmoid"
    hooks = ("feature",)
    why_not = "FedAvg sends weights, not features"
    threat_model = "invertible by anyone who knows it; hinders learned inversion, no formal guarantee"

    def feature(self, name: str, x: torch.Tensor, ctx: HookContext) -> torch.Tensor:
        return symsigmoid(x) if name == "control" else x

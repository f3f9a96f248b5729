"""Wire quantisation to fp16, with the reference code's optional fixed per-client offset.

Hooks: wire (every sent feature tensor travels as float16: half the bytes; the
round-trip is straight-through for the vanilla client's backward pass) and, with
``offset=true``, feature: one fixed N(0, 1) tensor per client is added to the control
features before quantisation (the Plato code's per-client offset). The offset is drawn
once per client from a client-private seed and kept; at inference the generating
client's own offset is used (train/test consistency). Schemes: every split scheme (those whose clients offer the hook).
The offset's seed is the client's secret (``HookContext.secret``, from the client-side
``client-seed``), never a constant of the code or a key of the public config.
Threat model: quantisation removes low-order bits only; a fixed offset is one unknown
per client that an attacker can estimate from many batches (e.g. the mean of what a
client sends), so neither is a formal protection.
"""
from __future__ import annotations

import torch

from .base import Defense, HookContext, register


def client_offset(secret: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The fixed per-client offset, drawn from the client's secret (same every call: the client keeps one)."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(int(secret)))


def fp16_round_trip(x: torch.Tensor) -> torch.Tensor:
    """x as the server receives it in float16, with a straight-through gradient."""
    return x + (x.half().float() - x).detach()


@register
class Fp16Wire(Defense):
    """Send features as float16 (optionally with a fixed per-client N(0,1) offset on the control branch)."""

    name = "fp16"
    hooks = ("wire", "feature")
    why_not = "FedAvg's wire carries weights; quantising them is a compression choice, not this defense"
    params = {"offset": False}
    wire_dtype = torch.float16
    threat_model = "no formal protection: quantisation noise is tiny and a fixed offset is estimable"

    def feature(self, name: str, x: torch.Tensor, ctx: HookContext) -> torch.Tensor:
        if self.p["offset"] and name == "control":
            if ctx.secret is None:
                raise ValueError("fp16:offset=true needs the client's secret (its client-seed) to draw its offset; "
                                 "this pipeline runs without one")
            return x + client_offset(ctx.secret, tuple(x.shape[1:]))
        return x

    def wire(self, x: torch.Tensor, ctx: HookContext) -> torch.Tensor:
        return fp16_round_trip(x)

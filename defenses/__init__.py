"""Defenses: swappable components at declared hook points (see defenses/base.py).

Select them per run with the config key ``defenses`` (a list of spec strings such as
``"symsigmoid"``, ``"noise:std=0.5"`` or a bundle name) and list them with
``splitcontrol defenses --json``. A defense selected for a scheme it cannot serve fails
at config time with the reason. :class:`DefenseStack` runs the client-side pipeline of
the split schemes in hook order (timestep, latent, feature, wire, prompt); FedAvg
defenses hook into the client's local training or the server's aggregation.

Bundles
-------
``pp-reference``: the paper's privacy-preserving variant as its Plato code does it: t ~
U{226..T-1}, symsigmoid on the control branch, fp16 wire with the fixed per-client
offset, prompts kept home -- and, as in the reference, the noise target eps, t and the
UNet first-conv features of x_t still go to the server (so the algebraic attack works).
``pp-protected``: ours. Client-private noise on x_t accounted as (epsilon, delta)-DP for z0
with eps known to the server (latent-dp: one draw both branches read, sent as a valid
sample of a later timestep; it also sets t_start), symsigmoid, fp16 and prompts kept home.
"""
from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from sim.core.cuts import unet_first_conv

from .base import HOOKS, REGISTRY, Defense, HookContext, Latents, make_defense, register  # noqa: F401

BUNDLES: dict[str, tuple[str, ...]] = {
    "pp-reference": ("timestep:t-start=226", "symsigmoid", "fp16:offset=true", "prompt-local"),
    "pp-protected": ("latent-dp", "symsigmoid", "fp16", "prompt-local"),
}

for _m in pkgutil.iter_modules(__path__):
    if _m.name not in ("base", "accounting"):
        importlib.import_module(f"{__name__}.{_m.name}")


def expand(specs: Sequence[str]) -> list[str]:
    """Replace bundle names by their members."""
    out = []
    for s in specs:
        out += list(BUNDLES[s.strip()]) if s.strip() in BUNDLES else [s]
    return out


class DefenseStack:
    """The defenses of one scheme in a run, applied in hook order (listed order within a hook).

    Parameters
    ----------
    specs : defense spec strings or bundle names (``()``: undefended)
    scheme : the strategy class they serve (its ``name`` and the ``hooks`` its client offers);
        an inapplicable defense raises ValueError with the reason
    latent_dim : size of one latent (C*H*W), for defaults such as the DP sensitivity
    """

    def __init__(self, specs: Sequence[str], scheme, latent_dim: int = 3 * 32 * 32):
        self.specs = tuple(specs)
        self.scheme = scheme.name
        self.defenses: list[Defense] = [make_defense(s) for s in expand(specs)]
        names = [d.name for d in self.defenses]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"defense(s) {dup} selected twice for scheme {scheme.name!r}: {list(self.specs)}")
        for d in self.defenses:
            d.check_scheme(scheme)
            d.bind(latent_dim)
        if len(self.with_hook("latent")) > 1:
            raise ValueError(f"at most one defense may act on x_t (hook 'latent'), got "
                             f"{[d.name for d in self.with_hook('latent')]}")

    def __bool__(self) -> bool:
        return bool(self.defenses)

    def with_hook(self, hook: str) -> list[Defense]:
        return [d for d in self.defenses if hook in d.hooks]

    # ------------------------------------------------------------------ the client pipeline
    def t_start(self, scheduler) -> int:
        return max((d.t_start(scheduler) for d in self.with_hook("timestep")), default=0)

    def trained_from(self, scheduler) -> int:
        """The smallest timestep the ControlNet sees in training (0: every timestep); sampling applies
        the control from there up."""
        return max((d.trained_from(scheduler) for d in self.with_hook("timestep") + self.with_hook("latent")),
                   default=0)

    def latent(self, x_t: torch.Tensor, ctx: HookContext) -> Latents:
        """The branch inputs and the sent t and target (``ctx.t`` and ``ctx.noise`` where unchanged)."""
        out = Latents(x_t, x_t)
        for d in self.with_hook("latent"):
            if not (ctx.inference and not d.at_inference):
                out = d.latent(x_t, ctx)
        return out._replace(t=ctx.t if out.t is None else out.t,
                            target=ctx.noise if out.target is None else out.target)

    def estimate_z0(self, x: torch.Tensor, t: torch.Tensor, target: torch.Tensor,
                    scheduler) -> tuple[torch.Tensor, torch.Tensor]:
        """The server's best z0 estimate from one release's unet input ``x``, sent ``t`` and ``target``,
        and the per-sample std of the client-private noise left in it (:meth:`Defense.estimate_z0` of
        the latent defense; exact, std 0, without one). Public knowledge only."""
        return self._latent_defense().estimate_z0(x, t, target, scheduler)

    def target_weights(self, t: torch.Tensor, target: torch.Tensor, scheduler) -> torch.Tensor | None:
        """Per-sample loss weights for the sent ``target`` (:meth:`Defense.target_weights`; None: plain)."""
        return self._latent_defense().target_weights(t, target, scheduler)

    def source_timestep(self, t: torch.Tensor, target: torch.Tensor, scheduler) -> torch.Tensor:
        """The batch timesteps behind the sent ``t`` (:meth:`Defense.source_timestep`; public knowledge)."""
        return self._latent_defense().source_timestep(t, target, scheduler)

    def _latent_defense(self) -> Defense:
        latent = self.with_hook("latent")
        return latent[0] if latent else Defense()

    def feature(self, name: str, x: torch.Tensor, ctx: HookContext) -> torch.Tensor:
        for d in self.with_hook("feature"):
            if not (ctx.inference and not d.at_inference):
                x = d.feature(name, x, ctx)
        return x

    def wire(self, x: torch.Tensor, ctx: HookContext) -> torch.Tensor:
        for d in self.with_hook("wire"):
            x = d.wire(x, ctx)
        return x

    @property
    def wire_dtype(self) -> torch.dtype:
        return torch.float16 if any(d.wire_dtype == torch.float16 for d in self.defenses) else torch.float32

    @property
    def sends_prompt(self) -> bool:
        return all(d.sends_prompt for d in self.defenses)

    def client_loss(self, inputs: torch.Tensor, activation: torch.Tensor) -> torch.Tensor | None:
        terms = [t for d in self.with_hook("loss") if (t := d.client_loss(inputs, activation)) is not None]
        return sum(terms) if terms else None

    def describe(self, scheduler=None, releases: float = 1.0) -> list[dict]:
        return [d.describe(scheduler, releases) for d in self.defenses]


@dataclass
class Release:
    """What a split client sends at the cut for one batch (float32 values, before the wire dtype):
    the control branch's features, the UNet first-conv features, and the t and noise target sent
    with them (the batch's own unless the latent defense changed them)."""

    control: torch.Tensor
    unet_features: torch.Tensor
    t: torch.Tensor
    target: torch.Tensor | None


def client_release(stack: DefenseStack, control_fn: Callable[[torch.Tensor], torch.Tensor], unet,
                   x_t: torch.Tensor, ctx: HookContext) -> Release:
    """One batch through the defense pipeline (hooks in order: latent, feature, wire).

    ``control`` is ``control_fn`` (the scheme's control branch: h = E(hint) + x for nograd,
    the head's output for vanilla) of the control branch's input, after the feature and wire
    hooks; ``unet_features`` is ``unet.conv_in`` of the unet branch's input, likewise. Used by
    the clients in training (``ctx`` with the batch's noise, z0 and record ids) and by sampling
    (``ctx.inference``), so both see the same transform.
    """
    lat = stack.latent(x_t, ctx)
    control = stack.wire(stack.feature("control", control_fn(lat.control), ctx), ctx)
    feats = stack.wire(stack.feature("unet", unet_first_conv(unet, lat.unet), ctx), ctx)
    return Release(control, feats, lat.t, lat.target)


def split_client_features(stack: DefenseStack, control_fn: Callable[[torch.Tensor], torch.Tensor], unet,
                          x_t: torch.Tensor, ctx: HookContext) -> tuple[torch.Tensor, torch.Tensor]:
    """``(control, unet_features)`` of :func:`client_release` (where only the features matter:
    sampling, attacks simulating the client)."""
    r = client_release(stack, control_fn, unet, x_t, ctx)
    return r.control, r.unet_features


def list_defenses(scheduler=None, schemes: Sequence = (), latent_dim: int = 3 * 32 * 32) -> list[dict]:
    """Every registered defense with its declarations (defaults), bound at ``latent_dim`` (C*H*W of one
    latent of the model in question: the default DP sensitivities scale with it); with ``schemes``
    (strategy classes) also which of them it serves and why not the others."""
    rows = []
    for cls in REGISTRY.values():
        d = cls()
        d.bind(latent_dim)
        row = d.describe(scheduler)
        reasons = {s.name: d.not_applicable(s) for s in schemes}
        row["schemes"] = [n for n, r in reasons.items() if r is None]
        row["not_applicable"] = {n: r for n, r in reasons.items() if r is not None}
        rows.append(row)
    return rows

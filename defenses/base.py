"""The defense interface: one base class, hook points, typed parameters, a registry.

A defense is a small object with a name, the hook point(s) where it acts, the schemes
it can serve, typed parameters with defaults, and the methods of its hooks. The
client-side pipeline of both split schemes (:class:`defenses.DefenseStack`) calls the
hooks in this order for every batch it sends::

    timestep  t ~ U{t_start..T-1}                     (t_start(scheduler))
    latent    x_t -> what the unet / control branch read, and the t and target sent with them
              (latent(...) -> Latents, before anything reads x_t)
    feature   each sent feature: "control", "unet"    (feature(...): activation, noise, shuffle, ...)
    wire      quantise what is sent                    (wire(...), wire_dtype)
    prompt    whether the text context is sent at all  (sends_prompt)
    loss      a client-side loss term (vanilla)        (client_loss(...))

FedAvg defenses act at ``fl-client`` (the client's local training, e.g. DP-SGD) or
``fl-server`` (the server's aggregation, e.g. Flower's DP clipping wrapper).

A defense never names a scheme. Each scheme declares the hook points its client offers
(``hooks`` on its strategy class, in strategies/); a defense applies to a scheme when the
scheme offers every hook it acts at, and fails naming the missing hooks otherwise.

Private randomness: a hook draws only from ``HookContext.gen`` (the client's private
generator, seeded by the client-side ``client-seed``, never by anything in the public
config) or derives fixed per-client values from ``HookContext.secret``.

A spec string selects a defense and sets its parameters:
``"noise:std=0.5"``, ``"timestep:t-start=226"``, ``"fp16:offset=true"``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from sim.core.components import Component, Registry
from sim.core.diffusion import clean_latents

HOOKS = ("timestep", "latent", "feature", "wire", "prompt", "loss", "fl-client", "fl-server")


@dataclass
class HookContext:
    """What a hook may use: the batch's timesteps, the public scheduler, the client id, the
    client-private generator (seeded by the client-side ``client-seed``; never the batch
    generator: defenses must not change which images, t and noise a batch draws), the
    client's ``secret`` (an integer derived from ``client-seed`` and the client id, for fixed
    per-client values; None where no client secret is held) and whether this is training or
    inference."""

    t: torch.Tensor
    scheduler: object
    cid: int
    gen: torch.Generator
    inference: bool = False
    secret: int | None = None
    z0: torch.Tensor | None = None  # training only: the batch's clean latents (client-side)
    idx: torch.Tensor | None = None  # training only: which of the client's records the batch holds
    noise: torch.Tensor | None = None  # training only: the batch's noise target eps (from the batch stream)


class Latents(NamedTuple):
    """What the latent hook makes of a batch's x_t: the inputs of the unet and control branches,
    and the timesteps and noise target sent with them (None: the batch's own, unchanged)."""

    unet: torch.Tensor
    control: torch.Tensor
    t: torch.Tensor | None = None
    target: torch.Tensor | None = None


class Defense(Component):
    """Base class. Subclasses set the class attributes and override the hooks they declare.

    Class attributes
    ----------------
    name : registry name used in config (``defenses = ["name:key=value"]``)
    hooks : the hook points it acts at (see :data:`HOOKS`); it serves the schemes that offer them all
    why_not : one line: why a scheme without those hooks cannot use it
    params : parameter defaults (their types are the parameters' types; keys kebab-case)
    at_inference : whether the same transform is applied when sampling (train/test consistency)
    threat_model : one line: what it protects against and what it assumes
    """

    kind = "defense"
    hooks: tuple[str, ...] = ()
    why_not: str = ""
    at_inference: bool = True
    threat_model: str = ""
    accounted: bool = False  # does it make a differential-privacy claim (epsilon, delta)?
    per_record: bool = False  # are its private draws keyed by record (fixed per private sample) rather than per step?

    def not_applicable(self, scheme) -> str | None:
        """None if ``scheme`` (a strategy class: ``name``, ``hooks``) offers every hook this defense
        acts at, else the reason."""
        missing = [h for h in self.hooks if h not in scheme.hooks]
        if not missing:
            return None
        return (f"acts at hook(s) {missing}, which scheme {scheme.name!r} does not offer (it offers "
                f"{list(scheme.hooks)})" + (f": {self.why_not}" if self.why_not else ""))

    def check_scheme(self, scheme) -> None:
        reason = self.not_applicable(scheme)
        if reason:
            raise ValueError(f"defense {self.name!r} does not apply to scheme {scheme.name!r}: {reason}")

    # ------------------------------------------------------------------ hooks (defaults: no-ops)
    def t_start(self, scheduler) -> int:
        return 0

    def trained_from(self, scheduler) -> int:
        """The smallest timestep the ControlNet is trained at (sampling applies control from there up):
        t_start unless the defense moves the sent timesteps."""
        return self.t_start(scheduler)

    def bind(self, latent_dim: int) -> None:
        """Called once with the size of one latent (e.g. to set a default sensitivity)."""

    def latent(self, x_t: torch.Tensor, ctx: HookContext) -> Latents:
        """x_t as the (unet, control) branches will read it, with the t and target sent along."""
        return Latents(x_t, x_t)

    def target_weights(self, t: torch.Tensor, target: torch.Tensor, scheduler) -> torch.Tensor | None:
        """latent hook, the server's side: per-sample loss weights for a sent (unbiased but noisier) target,
        e.g. its inverse variance relative to the true noise's; None: unweighted. Weights that depend
        only on what identifies a sample's input distribution keep the loss's minimiser unchanged."""
        return None

    def source_timestep(self, t: torch.Tensor, target: torch.Tensor, scheduler) -> torch.Tensor:
        """latent hook, the server's side: the batch timestep behind each sent ``t`` (the same unless the
        defense moves timesteps), from public knowledge."""
        return t

    def estimate_z0(self, x: torch.Tensor, t: torch.Tensor, target: torch.Tensor,
                    scheduler) -> tuple[torch.Tensor, torch.Tensor]:
        """latent hook, the server's side: the best estimate of z0 one release allows from the sent unet
        input ``x`` (e.g. conv_in inverted), ``t`` and ``target``, with public parameters only; returns
        (z0_hat, per-sample std of the client-private noise left in it). Default: the forward process
        solved for z0, exact."""
        return clean_latents(scheduler, x, target, t), torch.zeros(x.shape[0])

    def feature(self, name: str, x: torch.Tensor, ctx: HookContext) -> torch.Tensor:
        return x

    def wire(self, x: torch.Tensor, ctx: HookContext) -> torch.Tensor:
        return x

    wire_dtype: torch.dtype = torch.float32
    sends_prompt: bool = True

    def client_loss(self, inputs: torch.Tensor, activation: torch.Tensor) -> torch.Tensor | None:
        return None

    def private_step(self, model: torch.nn.Module, per_sample_loss, opt: torch.optim.Optimizer,
                     gen: torch.Generator, records: torch.Tensor | None = None,
                     dataset_size: int | None = None) -> float | None:
        """fl-client: do one optimizer step of the FedAvg client's local training in the defense's
        own way (e.g. DP-SGD) and return the batch's mean loss. ``per_sample_loss()`` runs the
        forward pass and returns one loss per sample; ``records`` says which of the client's
        samples each one is (duplicates allowed); ``gen`` is the client-private generator.
        Default: None, i.e. not handled (the client takes its ordinary step)."""
        return None

    def wrap_strategy(self, strategy, num_clients: int):
        """fl-server: the Flower strategy the FedAvg server runs, wrapped (e.g. by a DP
        clipping wrapper). Default: unchanged."""
        return strategy

    # ------------------------------------------------------------------ description
    def accounting(self, scheduler, releases: float = 1.0) -> dict | None:
        """For accounted defenses: epsilon, delta, sensitivity, mechanism, assumptions."""
        return None

    releases_per: str = "record"  # what accounting()'s ``releases`` counts: "record" (sends of one record),
    # "client-step" (one client's local training steps), "round" (rounds one client takes part in)

    def guarantee(self, scheduler, releases: float) -> dict:
        """The run-level guarantee of an accounted defense, ``releases`` counted as :attr:`releases_per` says
        (the engine passes the most any record or client had): epsilon, delta and what it covers."""
        acc = self.accounting(scheduler, releases)
        return {"defense": self.name, "epsilon": acc["epsilon_per_run"], "delta": acc["delta"],
                "releases": releases, "releases_per": self.releases_per, "covers": acc["covers"]}

    def describe(self, scheduler=None, releases: float = 1.0) -> dict:
        doc = (type(self).__doc__ or "").strip().splitlines()
        out = {"name": self.name, "hooks": list(self.hooks), "why_not": self.why_not,
               "params": self.p, "at_inference": self.at_inference, "accounted": self.accounted,
               "threat_model": self.threat_model, "summary": doc[0] if doc else ""}
        if scheduler is not None and self.accounted:
            try:
                out["accounting"] = self.accounting(scheduler, releases)
            except ValueError as e:  # a target this schedule cannot reach (e.g. timestep-target at SD1.5's)
                out["accounting"] = {"unreachable": str(e)}
        return out


# ---------------------------------------------------------------------- registry
REGISTRY = Registry("defense")


def register(cls: type[Defense]) -> type[Defense]:
    """Class decorator: add a defense to the registry under ``cls.name``."""
    bad = set(cls.hooks) - set(HOOKS)
    if bad or not cls.hooks:
        raise ValueError(f"defense {cls.name!r} declares unknown hooks {sorted(bad)}; known: {HOOKS}")
    return REGISTRY.register(cls)


def make_defense(spec: str) -> Defense:
    return REGISTRY.make(spec)

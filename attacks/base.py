"""The attack interface: what an attacker may read, what it returns, how it declares itself.

Threat model, enforced by construction
--------------------------------------
An attack gets a :class:`ServerView` and nothing else: the round trips the server kept
(``seen_<scheme>.pt``: what it sent and what it received, decoded from Flower records),
the public recipe (the run's config, defenses included: Kerckhoffs), the public frozen
base model (UNet, autoencoder with its decoder, text encoder), the public initial
ControlNet, the server's own trained ControlNet, the noise schedule, and auxiliary data
disjoint from every client's data. It never gets client memory; scoring against the
private images happens afterwards, outside the attack (attacks/truth.py, attacks/scoring.py).

An attack declares
------------------
``needs``: what it requires, from :data:`NEEDS`; ``client_parts``: the client parts it can attack
(a scheme's ``client_part``: ``frozen``, ``head``, ``whole``);
``targets``: what it reconstructs (image, hint, prompt); ``active``: whether the server
deviates from the protocol. :meth:`Attack.not_applicable` returns the reason when a
(scheme, run) pair cannot be attacked: it is reported as N/A with that reason, never as
a score of 0.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

import torch

from defenses import DefenseStack
from sim.core.components import Component, Registry
from sim.core.splits import aux_set
from strategies import SCHEMES, get_strategy

NEEDS = {
    "sent-features": "per-step features sent by the clients (split learning)",
    "noise-target": "the noise target eps and t in what the clients send",
    "gradients-to-client": "the server returns cut-layer gradients (vanilla only)",
    "fl-updates": "model updates from FedAvg clients",
    "white-box-client": "the client's model weights (public frozen parts; vanilla's head as relayed via the server)",
    "aux-data": "public auxiliary data disjoint from every client's data",
    "active-server": "a malicious server that deviates from the protocol during training",
    "text-signal": "a text-dependent signal on the wire (context embeddings)",
}
TARGETS = ("image", "hint", "prompt")
CLIENT_PARTS = ("frozen", "head", "whole")


@dataclass
class Reconstruction:
    """What an attack recovered, per attacked sample.

    ``refs[i]`` = (message index, batch within the message, sample within the batch) of
    the sample that row i reconstructs, so the scorer can match it to private data.
    ``images`` are target images in [-1, 1] (N, 3, H, W); ``hints`` conditions in [0, 1];
    ``prompts`` strings. Any may be None.
    """

    refs: list[tuple[int, int, int]]
    images: torch.Tensor | None = None
    hints: torch.Tensor | None = None
    prompts: list[str] | None = None
    info: dict = field(default_factory=dict)


class ServerView:
    """Everything the (honest-but-curious or malicious) server knows after a run.

    The engine builds it (``sim.engine.scoring.server_view``). Attacks read :attr:`messages`
    (or the convenience views :meth:`batches`, :meth:`updates`, :meth:`gradients`),
    :attr:`history` (every message's statistics: client, round, steps, bytes), the public
    models and :meth:`aux`. An active attack that deviates from the protocol during training
    asks :attr:`connect` for a fresh session with the clients (a typed channel to them, as
    the server has; None where the harness offers none).
    """

    def __init__(self, scheme: str, cfg, messages: list[dict], base, scheduler, controlnet_init,
                 controlnet_final=None, history: list[dict] | None = None,
                 connect: Callable | None = None):
        if hasattr(cfg, "data_seed") or hasattr(cfg, "client_seed"):
            raise TypeError("a ServerView takes the public config only (PublicConfig), never the clients' keys")
        self.scheme, self.cfg, self.messages = scheme, cfg, messages
        self.base, self.scheduler = base, scheduler
        self.controlnet_init, self.controlnet_final = controlnet_init, controlnet_final
        self.history = history if history is not None else [m["stat"] for m in messages]
        self.connect = connect

    @property
    def strategy(self):
        """The scheme's strategy class (public: the protocol)."""
        return get_strategy(self.scheme)

    @property
    def client_part(self) -> str:
        return self.strategy.client_part

    # ------------------------------------------------------------------ public knowledge
    @cached_property
    def defenses(self) -> DefenseStack:
        """The run's defense stack for this scheme (public: the server knows the protocol)."""
        p = self.base.preset
        return DefenseStack(self.cfg.defenses, self.strategy, p.latent_channels * p.latent_size ** 2)

    def aux(self, n: int = 256) -> dict:
        """Public auxiliary data disjoint from the clients': tensors target [-1, 1], condition [0, 1], prompt.

        fill50k: a fresh procedural stream (seed eval-seed + 20,000); faces: the faces of the
        public split neither in the clients' pool nor in evaluation (:mod:`sim.core.splits`)."""
        return aux_set(self.cfg, self.base.preset.image_size, n)

    # ------------------------------------------------------------------ views of the transcript
    def batches(self) -> list[dict]:
        """Every per-step batch the clients sent, one dict per batch: ``control`` (h under nograd,
        the head's output under vanilla; float32), ``unet_features``, ``t``, ``noise`` (or None),
        ``context`` (or None), and ``ref`` = (message index, batch index within the message).
        Built once per view (every attack's applicability check reads it); do not modify."""
        if getattr(self, "_batches", None) is None:
            self._batches = self._collect_batches()
        return self._batches

    def _collect_batches(self) -> list[dict]:
        out = []
        for i, m in enumerate(self.messages):
            up = m["up"].get("tensors", {})
            control = up.get("control_input", up.get("control_features"))
            if control is None:
                continue
            if control.ndim == 4:  # vanilla: one batch per message
                up = {k: v.unsqueeze(0) for k, v in up.items()}
                control = up.get("control_features")
            for k in range(control.shape[0]):
                out.append({"ref": (i, k), "cid": m["stat"]["client"], "control": control[k].float(),
                            "unet_features": up["unet_features"][k].float(), "t": up["t"][k],
                            "noise": up["noise"][k] if "noise" in up else None,
                            "context": up["context"][k] if "context" in up else None})
        return out

    def gradients(self) -> list[dict]:
        """Cut-layer gradients the server returned (vanilla): ``grad`` and the ``ref`` of the batch it belongs to."""
        out, last = [], {}
        for i, m in enumerate(self.messages):
            cid = m["stat"]["client"]
            g = m["down"].get("tensors", {}).get("control_features_grad")
            if g is not None and cid in last:
                out.append({"ref": last[cid], "cid": cid, "grad": g})
            if "control_features" in m["up"].get("tensors", {}):
                last[cid] = (i, 0)
        return out

    def updates(self) -> list[dict]:
        """FedAvg round trips: ``global`` (sent weights), ``local`` (returned weights), ``local_steps``, ``ref``."""
        out = []
        for i, m in enumerate(self.messages):
            if "arrays" in m["down"] and "arrays" in m["up"]:
                out.append({"ref": (i, 0), "cid": m["stat"]["client"], "global": m["down"]["arrays"],
                            "local": m["up"]["arrays"],
                            "local_steps": int(m["down"]["config"]["local-steps"]),
                            "num_examples": int(m["up"]["metrics"]["num-examples"])})
        return out

    def available(self) -> set[str]:
        """The :data:`NEEDS` this view can satisfy (``active-server`` and ``aux-data`` always can in simulation)."""
        have = {"aux-data", "active-server", "white-box-client"}
        b = self.batches()
        if b:
            have.add("sent-features")
            if b[0]["noise"] is not None:
                have.add("noise-target")
            if b[0]["context"] is not None:
                have.add("text-signal")
        if self.gradients():
            have.add("gradients-to-client")
        if self.updates():
            have.add("fl-updates")
        return have


class Attack(Component):
    """Base class of the attacks. Subclasses set the declarations and implement :meth:`run`.

    Class attributes
    ----------------
    name, params : registry name and parameter defaults (spec strings as for defenses)
    needs : keys of :data:`NEEDS`
    client_parts : the scheme client parts it applies to (:data:`CLIENT_PARTS`); ``why_not`` says why not others
    targets : what it reconstructs (subset of :data:`TARGETS`)
    active : True if the server deviates from the protocol
    prompt_of : "step" or "record": which prompt a recovered prompt is scored against
    threat_model : one line
    """

    kind = "attack"
    needs: tuple[str, ...] = ()
    client_parts: tuple[str, ...] = CLIENT_PARTS
    why_not: str = ""
    targets: tuple[str, ...] = ("image",)
    active: bool = False
    threat_model: str = ""
    prompt_of: str = "step"  # a recovered prompt is scored against the step's prompt (after dropout: "" carries
    # no text) or, with "record", the record's own prompt (what an image of the record reveals)

    def not_applicable(self, view: ServerView) -> str | None:
        """None if the attack can run on ``view``, else the reason (reported as N/A)."""
        if view.client_part not in self.client_parts:
            return self.why_not or f"applies to clients that hold {list(self.client_parts)} only"
        missing = [n for n in self.needs if n not in view.available()]
        if missing:
            return "needs " + "; ".join(NEEDS[n] for n in missing) + f", absent under {view.scheme}" + \
                (f" with defenses {list(view.cfg.defenses)}" if view.cfg.defenses else "")
        return None

    def run(self, view: ServerView) -> Reconstruction:
        raise NotImplementedError

    def describe(self) -> dict:
        doc = (type(self).__doc__ or "").strip().splitlines()
        return {"name": self.name, "needs": list(self.needs), "client_parts": list(self.client_parts),
                "schemes": [s for s, cls in SCHEMES.items() if cls.client_part in self.client_parts],
                "not_applicable": {s: self.why_not for s, cls in SCHEMES.items()
                                   if cls.client_part not in self.client_parts},
                "targets": list(self.targets), "active": self.active, "params": self.p,
                "threat_model": self.threat_model, "summary": doc[0] if doc else ""}


REGISTRY = Registry("attack")
register = REGISTRY.register


def make_attack(spec: str) -> Attack:
    return REGISTRY.make(spec)

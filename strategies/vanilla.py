"""Vanilla split learning with cut-layer gradient return (sequential, as in Plato).

Client: autoencoder, text encoder, frozen UNet ``conv_in`` and the trainable ControlNet
head (``controlnet_cond_embedding`` + ``conv_in``) with its own AdamW. Per step it
sends the head's output, the UNet first-conv output, t, the noise target and the
context; the server runs the rest of the ControlNet and the frozen UNet, steps its own
optimizer and returns the gradient of the head's output. The client applies it to *the
very activation the server used* (same batch, t and noise: it keeps that activation's
graph), fixing the reference code, which re-ran its forward pass with fresh t and noise.

Efficiency: the gradient of step i rides on the request for step i+1, so a turn of k
steps costs k + 1 round trips. Clients take turns; the head's weights are relayed
through the server at each turn (Plato's sequential split learning), and each turn
starts a fresh client optimizer, so a client keeps no state between turns.

Threat model: the server sees everything the nograd server sees except the raw hint
path (the head is trained and private), and it chooses the gradients it returns, which
is what an active attacker (FSHA, a later issue) exploits.
"""
from __future__ import annotations

import copy
import time

import torch
from torch import nn

from sim.cuts import CUTS, control_head, resolve, unet_first_conv

from .base import (InProcessTransport, Payload, SchemeClient, SchemeResult, SplitServer, TrainSettings,
                   payload_to_state, progress, state_to_payload, turn_schedule)

CUT = CUTS["vanilla"]


class ControlHead(nn.Module):
    """The client-side ControlNet head: copies of the modules ``CUTS["vanilla"].client_trainable``
    names (the hint block and the first conv), under their diffusers names."""

    def __init__(self, controlnet: nn.Module):
        super().__init__()
        for name in CUT.client_trainable:
            setattr(self, name.partition(".")[2], copy.deepcopy(resolve(name, controlnet=controlnet)))

    def forward(self, x_t: torch.Tensor, hint: torch.Tensor) -> torch.Tensor:
        return control_head(self, x_t, hint)


class VanillaClient(SchemeClient):
    def __init__(self, *args, controlnet: nn.Module, **kwargs):
        super().__init__(*args, **kwargs)
        self.head = ControlHead(controlnet).train()
        self.opt = None
        self.pending: torch.Tensor | None = None  # the activation the server is working on

    def held_modules(self) -> list[nn.Module]:
        return super().held_modules() + [self.head]

    def on_step(self, payload: Payload) -> Payload:
        """Optionally load the relayed head, apply the previous gradient, then send the next batch."""
        if any(k.startswith("head/") for k in payload):
            self.head.load_state_dict(payload_to_state(payload, "head"))
            self.opt = torch.optim.AdamW(self.head.parameters(), lr=self.settings.lr)
        if "control_features_grad" in payload:
            if self.pending is None:
                raise RuntimeError(f"client {self.cid} got a gradient but has no pending activation")
            self.opt.zero_grad(set_to_none=True)
            self.pending.backward(payload["control_features_grad"])
            self.opt.step()
            self.pending = None
        if not payload.get("want_batch", True):
            return state_to_payload(self.head, "head")
        b = self.next_batch()
        self.pending = self.head(b.x_t, b.hint)
        with torch.no_grad():
            unet_features = unet_first_conv(self.base.unet, b.x_t)
        return dict(control_features=self.pending, unet_features=unet_features, t=b.t, noise=b.noise,
                    context=b.context)


class VanillaStrategy(SplitServer):
    """Server side: the ControlNet after its head, trained with the cut-layer gradient returned."""

    name = "vanilla"
    client_class = VanillaClient

    def __init__(self, unet, controlnet, scheduler, settings: TrainSettings):
        super().__init__(unet, controlnet, scheduler, settings, off_server=CUT.client_trainable)
        self.head_state = state_to_payload(ControlHead(controlnet), "head")
        self.initial = controlnet

    def client_kwargs(self) -> dict:
        """What a client needs from the server at start-up besides the recipe: the initial ControlNet."""
        return {"controlnet": self.initial}

    def train_step(self, control_features, unet_features, t, noise, context) -> tuple[float, torch.Tensor]:
        control_features = control_features.requires_grad_(True)
        loss = self.server_step(control_features, unet_features, t, noise, context)
        return loss, control_features.grad

    def start(self, transport: InProcessTransport) -> SchemeResult:
        t0 = time.perf_counter()
        server_s, losses = 0.0, []
        bar = progress(self.settings.steps, self.name)
        for cid, k in turn_schedule(self.settings.steps, transport.num_clients, self.settings.local_steps):
            request: Payload = dict(self.head_state)
            for _ in range(k):
                reply = transport.call(cid, "step", request)
                s0 = time.perf_counter()
                loss, grad = self.train_step(**reply)
                server_s += time.perf_counter() - s0
                losses.append(loss)
                request = {"control_features_grad": grad}
                bar.update()
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            self.head_state = transport.call(cid, "step", {**request, "want_batch": False})
        bar.close()
        head = ControlHead(self.controlnet)
        head.load_state_dict(payload_to_state(self.head_state, "head"))
        final = copy.deepcopy(self.controlnet)
        for name in CUT.client_trainable:
            resolve(name, controlnet=final).load_state_dict(resolve(name, controlnet=head).state_dict())
        return SchemeResult(self.name, final.eval(), losses, len(losses), time.perf_counter() - t0, server_s,
                            transport.stats, server_trainable_params=self.server_trainable_params())

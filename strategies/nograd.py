"""No-gradient-return split learning (the paper's scheme; Yao, arXiv 2409.08503).

Client: holds only frozen, public, pretrained parts (autoencoder encoder, text encoder,
UNet ``conv_in``); it has 0 trainable parameters and no optimizer. Per batch it sends
``control_input = E(hint) + x_t``, ``unet_features = unet.conv_in(x_t)``, t, the noise
target and the text context. Server: trains the whole ControlNet from its ``conv_in`` on
(the hint block is unused) on top of the frozen UNet. Nothing flows back, so a client
can stream a whole turn of batches in one message.

Threat model: the server is honest-but-curious and sees every sent tensor, including
the noise target and t; this is the reference design, whose leak (solve the public
first conv for x_t, subtract the noise) later issues measure and defend against.
"""
from __future__ import annotations

import time

import torch

from sim.cuts import CUTS, nograd_control_input, unet_first_conv

from .base import (InProcessTransport, Payload, SchemeClient, SchemeResult, SplitServer, TrainSettings, progress,
                   turn_schedule)


class NoGradClient(SchemeClient):
    """Frozen feature producer: answers ``features`` with ``k`` batches of what the server needs."""

    @torch.no_grad()
    def on_features(self, payload: Payload) -> Payload:
        parts = []
        for _ in range(int(payload["k"])):
            b = self.next_batch()
            parts.append(dict(
                control_input=nograd_control_input(self.base.autoencoder, b.x_t, b.hint),
                unet_features=unet_first_conv(self.base.unet, b.x_t),
                t=b.t, noise=b.noise, context=b.context,
            ))
        return {k: torch.stack([p[k] for p in parts]) for k in parts[0]}


class NoGradStrategy(SplitServer):
    """Server side: trains the ControlNet on the features clients stream, sends nothing back."""

    name = "nograd"
    client_class = NoGradClient

    def __init__(self, unet, controlnet, scheduler, settings: TrainSettings):
        super().__init__(unet, controlnet, scheduler, settings, off_server=CUTS["nograd"].unused)

    def client_kwargs(self) -> dict:
        """What a client needs from the server at start-up besides the recipe: nothing."""
        return {}

    def train_step(self, control_input, unet_features, t, noise, context) -> float:
        return self.server_step(self.controlnet.conv_in(control_input), unet_features, t, noise, context)

    def start(self, transport: InProcessTransport) -> SchemeResult:
        t0 = time.perf_counter()
        server_s, losses = 0.0, []
        bar = progress(self.settings.steps, self.name)
        for cid, k in turn_schedule(self.settings.steps, transport.num_clients, self.settings.local_steps):
            reply = transport.call(cid, "features", {"k": k})
            s0 = time.perf_counter()
            for i in range(k):
                losses.append(self.train_step(*(reply[n][i] for n in
                                                 ("control_input", "unet_features", "t", "noise", "context"))))
                bar.update()
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            server_s += time.perf_counter() - s0
        bar.close()
        return SchemeResult(self.name, self.controlnet.eval(), losses, len(losses), time.perf_counter() - t0,
                            server_s, transport.stats, server_trainable_params=self.server_trainable_params())

"""No-gradient-return split learning (the paper's scheme; Yao, arXiv 2409.08503).

Client: holds only frozen, public, pretrained parts (autoencoder encoder, text encoder,
UNet ``conv_in``); it has 0 trainable parameters and no optimizer. Per batch it sends
``control_input = E(hint) + x_t``, ``unet_features = unet.conv_in(x_t)``, t, the noise
target and the text context. Server: trains the whole ControlNet from its ``conv_in`` on
(the hint block is unused) on top of the frozen UNet. Nothing flows back, so a client
can stream a whole turn of ``local-steps`` batches in one message (K batches per
message: 10x fewer messages than one per step at the default K = 10).

Threat model: the server is honest-but-curious and sees every sent tensor, including
the noise target and t; this is the reference design, whose leak (solve the public
first conv for x_t, subtract the noise) later issues measure and defend against.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from sim.cuts import CUTS
from sim.wire import FEATURE_DTYPES, config, same_leading_dims, tensor

from .base import Channel, SchemeClient, SchemeResult, SplitServer, TrainSettings, progress, turn_schedule

MESSAGE_TYPE = "query.nograd"


@dataclass
class FeaturesRequest:
    """Server -> client: send the next ``k`` batches."""

    k: int = config(int)

    def check(self) -> None:
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")


@dataclass
class Features:
    """Client -> server: ``k`` batches of what the server needs, stacked on a leading K axis."""

    control_input: torch.Tensor = tensor(FEATURE_DTYPES, 5)  # (K, B, C, H, W): E(hint) + x_t (after defenses)
    unet_features: torch.Tensor = tensor(FEATURE_DTYPES, 5)  # (K, B, C0, H, W): frozen unet.conv_in(x_t)
    t: torch.Tensor = tensor(torch.int64, 2)  # (K, B)
    noise: torch.Tensor = tensor(torch.float32, 5)  # (K, B, C, H, W): the epsilon target
    context: torch.Tensor | None = tensor(torch.float32, 4, optional=True)  # (K, B, L, D); None: prompt kept home

    def check(self) -> None:
        same_leading_dims(self, ["control_input", "unet_features", "t", "noise", "context"], 2)


class NoGradClient(SchemeClient):
    """Frozen feature producer: answers a :class:`FeaturesRequest` with ``k`` batches."""

    request_type = FeaturesRequest
    scheme = "nograd"

    @torch.no_grad()
    def serve(self, request: FeaturesRequest) -> Features:
        from defenses import split_client_features

        parts = []
        dtype = self.defenses.wire_dtype
        for _ in range(request.k):
            b = self.next_batch()
            control, feats = split_client_features(self.defenses, "nograd", self.base.autoencoder, self.base.unet,
                                                   b.x_t, b.hint, self.hook_context(b))
            parts.append(dict(control_input=control.to(dtype), unet_features=feats.to(dtype), t=b.t, noise=b.noise,
                              context=b.context if self.defenses.sends_prompt else None))
        return Features(**{k: None if parts[0][k] is None else torch.stack([p[k] for p in parts]) for k in parts[0]})


class NoGradStrategy(SplitServer):
    """Server side: trains the ControlNet on the features clients stream, sends nothing back."""

    name = "nograd"
    client_class = NoGradClient
    message_type = MESSAGE_TYPE

    def __init__(self, unet, controlnet, scheduler, settings: TrainSettings, null_context=None):
        super().__init__(unet, controlnet, scheduler, settings, off_server=CUTS["nograd"].unused,
                         null_context=null_context)

    def train_step(self, control_input, unet_features, t, noise, context) -> float:
        return self.server_step(self.controlnet.conv_in(control_input.float()), unet_features, t, noise, context)

    def start(self, channel: Channel) -> SchemeResult:
        t0 = time.perf_counter()
        server_s, losses = 0.0, []
        bar = progress(self.settings.steps, self.name)
        turns = turn_schedule(self.settings.steps, channel.num_clients, self.settings.local_steps)
        for turn, (cid, k) in enumerate(turns, start=1):
            reply = channel.call(cid, FeaturesRequest(k), Features, steps=(len(losses), k), round=turn)
            s0 = time.perf_counter()
            for i in range(k):
                context = None if reply.context is None else reply.context[i]
                losses.append(self.train_step(reply.control_input[i], reply.unet_features[i], reply.t[i],
                                              reply.noise[i], context))
                bar.update()
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            server_s += time.perf_counter() - s0
        bar.close()
        return SchemeResult(self.name, self.controlnet.eval(), losses, len(losses), time.perf_counter() - t0,
                            server_s, channel.transcript, server_trainable_params=self.server_trainable_params())

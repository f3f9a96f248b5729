"""No-gradient-return split learning (the paper's scheme; Yao, arXiv 2409.08503).

Client: holds only frozen, public, pretrained parts (autoencoder encoder, text encoder,
UNet ``conv_in``); it has 0 trainable parameters and no optimizer. Per batch it sends
``control_input = E(hint) + x_t``, ``unet_features = unet.conv_in(x_t)``, t, the noise
target and the text context (z0 and E(hint) are encoded once per record and cached,
:mod:`sim.core.encodings`; so per step the client runs only ``conv_in``). Server: trains the whole ControlNet from its ``conv_in`` on
(the hint block is unused) on top of the frozen UNet. Nothing flows back, so a client
can stream a whole turn of ``local-steps`` batches in one message (K batches per
message: 10x fewer messages than one per step at the default K = 10).

Threat model: the server is honest-but-curious and sees every sent tensor, including
the noise target and t; this is the reference design, whose leak (solve the public
first conv for x_t, subtract the noise) the noise-target attack measures.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from defenses import client_release, split_client_features
from sim.core.averaging import TailAverage
from sim.core.cuts import (
    CONTROLNET_REST,
    UNET_REST,
    Cut,
    nograd_control,
    nograd_control_input,
    unet_first_conv,
)
from sim.core.wire import FEATURE_DTYPES, config, same_leading_dims, tensor

from .base import (
    Channel,
    ClientTrace,
    SchemeClient,
    SchemeResult,
    SplitServer,
    TrainSettings,
    client_generator,
    progress,
    register,
    sample_batch,
    turn_schedule,
)

MESSAGE_TYPE = "query.nograd"
CUT = Cut(
    scheme="nograd",
    client=("autoencoder", "text_encoder", "unet.conv_in"),
    client_trainable=(),
    server=UNET_REST + ("controlnet.conv_in",) + CONTROLNET_REST,
    server_trainable=("controlnet.conv_in",) + CONTROLNET_REST,
    unused=("controlnet.controlnet_cond_embedding",),
    up=("control_input", "unet_features", "t", "noise", "context"),
    down=(),
)


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
    sends_hint_latent = True  # E(2 hint - 1) from the per-record cache: the VAE runs once per record

    @torch.no_grad()
    def serve(self, request: FeaturesRequest) -> Features:
        parts = []
        dtype = self.defenses.wire_dtype
        for _ in range(request.k):
            b = self.next_batch()
            r = client_release(
                self.defenses, lambda x: nograd_control(b.hint_latent, x), self.base.unet,  # E(hint) cached
                b.x_t, self.hook_context(b.t, b.z0, b.idx, b.noise))
            parts.append(dict(control_input=r.control.to(dtype), unet_features=r.unet_features.to(dtype), t=r.t,
                              noise=r.target, context=b.context if self.defenses.sends_prompt else None))
        return Features(**{k: None if parts[0][k] is None else torch.stack([p[k] for p in parts]) for k in parts[0]})


@register
class NoGradStrategy(SplitServer):
    """Server side: trains the ControlNet on the features clients stream, sends nothing back."""

    name = "nograd"
    order = 2
    client_class = NoGradClient
    message_type = MESSAGE_TYPE
    cut = CUT
    client_part = "frozen"
    concurrency = "stream"  # nothing returns, so every client can stream into the server's queue at once
    up_message, down_message = Features, FeaturesRequest

    def __init__(self, unet, controlnet, scheduler, settings: TrainSettings, null_context=None):
        super().__init__(unet, controlnet, scheduler, settings, off_server=CUT.unused, null_context=null_context)

    @staticmethod
    def server_features(controlnet, control: torch.Tensor) -> torch.Tensor:
        return controlnet.conv_in(control.float())

    @staticmethod
    def control_channels(controlnet) -> int:
        return controlnet.conv_in.in_channels  # E(hint) + x_t: a latent

    def train_step(self, control_input, unet_features, t, noise, context) -> float:
        return self.server_step(self.server_features(self.controlnet, control_input), unet_features, t, noise, context)

    @classmethod
    def cut_features(cls, controlnet, base, x_t, hint, stack=None, ctx=None):
        branch = lambda x: nograd_control_input(base.autoencoder, x, hint)  # noqa: E731
        if stack:
            control, feats = split_client_features(stack, branch, base.unet, x_t, ctx)
        else:
            control, feats = branch(x_t), unet_first_conv(base.unet, x_t)
        return cls.server_features(controlnet, control), feats

    @staticmethod
    def bare(envs, controlnet, settings, turns) -> list[float]:
        base = envs[0].base
        server = SplitServer(base.unet, controlnet, envs[0].scheduler, settings, off_server=CUT.unused)
        gens = [client_generator(e.seed, c) for c, e in enumerate(envs)]
        losses = []
        for cid, k in turns:
            for _ in range(k):
                b = sample_batch(base, envs[cid].scheduler, envs[cid].data, settings.batch_size, gens[cid],
                                 settings.prompt_dropout, encodings=envs[cid].encodings, hints=True)
                with torch.no_grad():
                    ci = nograd_control(b.hint_latent, b.x_t)
                    uf = unet_first_conv(base.unet, b.x_t)
                losses.append(server.server_step(server.controlnet.conv_in(ci), uf, b.t, b.noise, b.context))
        return losses

    @classmethod
    def trace_client(cls, models, batch: dict, meter) -> ClientTrace:
        with torch.no_grad():  # E(hint) comes from the per-record cache, as in NoGradClient.serve
            up = dict(control_input=batch["hint_latent"] + batch["x_t"],
                      unet_features=unet_first_conv(models.unet, batch["x_t"]),
                      t=batch["t"], noise=batch["noise"], context=batch["context"])
        return ClientTrace(up, {})

    @staticmethod
    def batches_in(message: dict) -> int:
        up = message["up"].get("tensors", {})
        return int(up["t"].shape[0]) if "t" in up else 0

    def start(self, channel: Channel) -> SchemeResult:
        t0 = time.perf_counter()
        server_s, losses = 0.0, []
        bar = progress(self.settings.steps, self.name)
        turns = turn_schedule(self.settings.steps, channel.num_clients, self.settings.local_steps)
        expect = self.reply_expect()
        channel.tolerate_failures(self.settings.on_client_failure == "skip")
        average = TailAverage(len(turns), self.settings.average_from)
        for turn, (cid, k) in enumerate(turns, start=1):
            with channel.guard():  # on-client-failure=skip: a failed client's turn is skipped (recorded)
                reply = channel.call(cid, FeaturesRequest(k), Features, steps=(len(losses), k), round=turn,
                                     expect=expect)
                s0 = time.perf_counter()
                for i in range(k):
                    context = None if reply.context is None else reply.context[i]
                    losses.append(self.train_step(reply.control_input[i], reply.unet_features[i], reply.t[i],
                                                  reply.noise[i], context))
                    bar.update()
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
                server_s += time.perf_counter() - s0
            average.add(turn, self.controlnet.state_dict)
        bar.close()
        return SchemeResult(self.name, average.apply(self.controlnet).eval(), losses, len(losses),
                            time.perf_counter() - t0, server_s, channel.transcript,
                            server_trainable_params=self.server_trainable_params())

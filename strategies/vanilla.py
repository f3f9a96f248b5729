"""Vanilla split learning with cut-layer gradient return (sequential, as in Plato).

Client: autoencoder, text encoder, frozen UNet ``conv_in`` and the trainable ControlNet
head (``controlnet_cond_embedding`` + ``conv_in``) with its own AdamW. Per step it
sends the head's output, the UNet first-conv output, t, the noise target and the
context; the server runs the rest of the ControlNet and the frozen UNet, steps its own
optimizer and returns the gradient of the head's output. The client applies it to *the
very activation the server used* (same batch, t and noise: it keeps the head's inputs
in its state and recomputes the identical activation), fixing the reference code,
which re-ran its forward pass with fresh t and noise.

Efficiency: the gradient of step i rides on the request for step i+1, so a turn of k
steps costs k + 1 round trips. Clients take turns; the head's weights are relayed
through the server at each turn (Plato's sequential split learning), and each turn
starts a fresh client optimizer, so a client keeps no state between turns (within a
turn: the head, its optimizer and the pending inputs, in Flower's ``context.state``).

Threat model: the server sees everything the nograd server sees except the raw hint
path (the head is trained and private), and it chooses the gradients it returns, which
is what an active attacker (FSHA, a later issue) exploits.
"""
from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass

import torch
from torch import nn

from defenses import Release, client_release, split_client_features
from sim.core.averaging import TailAverage
from sim.core.cuts import (
    CONTROLNET_REST,
    UNET_REST,
    Cut,
    control_head,
    resolve,
    unet_first_conv,
)
from sim.core.wire import (
    FEATURE_DTYPES,
    Expect,
    config,
    same_leading_dims,
    shapes_of,
    state,
    tensor,
)

from .base import (
    Channel,
    ClientTrace,
    SchemeClient,
    SchemeResult,
    SplitServer,
    TrainSettings,
    client_generator,
    load_optimizer_tensors,
    optimizer_tensors,
    prefixed,
    progress,
    register,
    sample_batch,
    turn_schedule,
    whole_features,
)

CUT = Cut(
    scheme="vanilla",
    client=("autoencoder", "text_encoder", "unet.conv_in", "controlnet.controlnet_cond_embedding",
            "controlnet.conv_in"),
    client_trainable=("controlnet.controlnet_cond_embedding", "controlnet.conv_in"),
    server=UNET_REST + CONTROLNET_REST,
    server_trainable=CONTROLNET_REST,
    unused=(),
    up=("control_features", "unet_features", "t", "noise", "context"),
    down=("control_features_grad",),
)
MESSAGE_TYPE = "query.vanilla"
BATCH_FIELDS = ["control_features", "unet_features", "t", "noise", "context"]


@dataclass
class VanillaRequest:
    """Server -> client: (at a turn's start) the relayed head; the gradient of the last
    batch's head output; whether to send the next batch (else: return the head)."""

    head: dict | None = state(torch.float32, optional=True)
    control_features_grad: torch.Tensor | None = tensor(torch.float32, 4, optional=True)
    want_batch: bool = config(bool, default=True)


@dataclass
class VanillaReply:
    """Client -> server: the next batch at the cut, or (end of turn) the trained head."""

    control_features: torch.Tensor | None = tensor(FEATURE_DTYPES, 4, optional=True)  # head(x_t, hint), defended
    unet_features: torch.Tensor | None = tensor(FEATURE_DTYPES, 4, optional=True)  # frozen unet.conv_in(x_t)
    t: torch.Tensor | None = tensor(torch.int64, 1, optional=True)
    noise: torch.Tensor | None = tensor(torch.float32, 4, optional=True)
    context: torch.Tensor | None = tensor(torch.float32, 3, optional=True)
    head: dict | None = state(torch.float32, optional=True)

    def check(self) -> None:
        present = [n for n in BATCH_FIELDS if getattr(self, n) is not None]
        required = [n for n in BATCH_FIELDS if n != "context"]  # no context: the prompt stayed home
        if present and not set(required) <= set(present):
            raise ValueError(f"a batch needs all of {required}, got only {present}")
        if not present and self.head is None:
            raise ValueError("neither a batch nor the head")
        same_leading_dims(self, BATCH_FIELDS, 1)


PENDING = ("x_t", "hint", "t", "z0", "idx", "noise", "gen")  # a pending batch, as kept between messages


class ControlHead(nn.Module):
    """The client-side ControlNet head: copies of the modules ``CUT.client_trainable``
    names (the hint block and the first conv), under their diffusers names."""

    def __init__(self, controlnet: nn.Module):
        super().__init__()
        for name in CUT.client_trainable:
            setattr(self, name.partition(".")[2], copy.deepcopy(resolve(name, controlnet=controlnet)))

    def forward(self, x_t: torch.Tensor, hint: torch.Tensor) -> torch.Tensor:
        return control_head(self, x_t, hint)


class VanillaClient(SchemeClient):
    """Trains the head with the cut-layer gradients the server returns."""

    request_type = VanillaRequest
    scheme = "vanilla"

    def __init__(self, cid, env):
        super().__init__(cid, env)
        self.head = ControlHead(env.controlnet_template).train()
        self.opt: torch.optim.Optimizer | None = None
        # (x_t, hint, t, z0, idx, noise, defense generator state before the batch) of the batch the server has
        self.pending: tuple[torch.Tensor, ...] | None = None

    def held_modules(self) -> list[nn.Module]:
        return super().held_modules() + [self.head]

    def request_expect(self) -> Expect:
        """The relayed head has this head's tensors; a gradient has the head output's (C, H, W)."""
        size = self.base.preset.latent_size
        return Expect(shapes={"control_features_grad": (self.head.conv_in.out_channels, size, size)},
                      states={"head": shapes_of(self.head.state_dict())})

    # ----------------------------------------------------------- state between messages
    def get_state(self) -> dict[str, torch.Tensor]:
        out = super().get_state()
        out.update({f"head.{k}": v for k, v in self.head.state_dict().items()})
        if self.opt is not None:
            out.update(optimizer_tensors(self.opt))
        if self.pending is not None:
            out.update({f"pending.{k}": v for k, v in zip(PENDING, self.pending)})
        return out

    def set_state(self, st: dict[str, torch.Tensor]) -> None:
        super().set_state(st)
        self.head.load_state_dict(prefixed(st, "head"))
        if "opt.present" in st:
            self.opt = torch.optim.AdamW(self.head.parameters(), lr=self.settings.lr)
            load_optimizer_tensors(self.opt, st)
        if "pending.x_t" in st:
            self.pending = tuple(st[f"pending.{k}"] for k in PENDING)

    # ----------------------------------------------------------- the step
    def serve(self, request: VanillaRequest) -> VanillaReply:
        """Optionally load the relayed head, apply the previous gradient, then send the next batch."""
        if request.head is not None:
            self.head.load_state_dict(request.head)
            self.opt = torch.optim.AdamW(self.head.parameters(), lr=self.settings.lr)
        if request.control_features_grad is not None:
            if self.pending is None or self.opt is None:
                raise RuntimeError(f"client {self.cid} got a gradient but has no pending batch")
            activation = self._release(*self.pending).control  # bit-identical to the one sent: same inputs and weights
            self.opt.zero_grad(set_to_none=True)
            extra = self.defenses.client_loss(self.pending[0], activation)  # e.g. NoPeek's decorrelation term
            if extra is not None:
                extra.backward(retain_graph=True)
            activation.backward(request.control_features_grad.float())
            self.opt.step()
            self.pending = None
        if not request.want_batch:
            return VanillaReply(head=self.head.state_dict())
        b = self.next_batch()
        self.pending = (b.x_t, b.hint, b.t, b.z0, b.idx, b.noise, self.defense_gen.get_state())
        with torch.no_grad():
            r = self._release(*self.pending)
        dtype = self.defenses.wire_dtype
        return VanillaReply(r.control.to(dtype), r.unet_features.to(dtype), r.t, r.target,
                            b.context if self.defenses.sends_prompt else None)

    def _release(self, x_t, hint, t, z0, idx, noise, gen_state) -> Release:
        """The batch through the defense pipeline, replaying its private randomness."""
        self.defense_gen.set_state(gen_state)
        return client_release(self.defenses, lambda x: control_head(self.head, x, hint), self.base.unet,
                              x_t, self.hook_context(t, z0, idx, noise))


class HeadSplitServer(SplitServer):
    """What the split schemes whose client trains a head share (vanilla, splitfed): the head
    returns its gradient, so the server's control features are a leaf of the server's graph."""

    hooks = SplitServer.hooks + ("loss",)  # a trainable client part can take a loss term (NoPeek)
    client_part = "head"
    up_message, down_message = VanillaReply, VanillaRequest
    relay = "turn"  # the head crosses once per turn each way

    def __init__(self, unet, controlnet, scheduler, settings: TrainSettings, null_context=None):
        super().__init__(unet, controlnet, scheduler, settings, off_server=CUT.client_trainable,
                         null_context=null_context)
        self.head_state = ControlHead(controlnet).state_dict()  # the head the clients start from

    @staticmethod
    def server_features(controlnet, control: torch.Tensor) -> torch.Tensor:
        return control.float().requires_grad_(True)

    @staticmethod
    def control_channels(controlnet) -> int:
        return controlnet.conv_in.out_channels  # the head's output: the ControlNet's first-conv features

    def reply_expect(self) -> Expect:
        """A batch as :meth:`SplitServer.reply_expect`; a returned head has the clients' starting head's tensors."""
        return dataclasses.replace(super().reply_expect(), states={"head": shapes_of(self.head_state)})

    def train_step(self, control_features, unet_features, t, noise, context) -> tuple[float, torch.Tensor]:
        control_features = self.server_features(self.controlnet, control_features)
        loss = self.server_step(control_features, unet_features, t, noise, context)
        return loss, control_features.grad

    def merged(self, head_state: dict) -> nn.Module:
        """The server's ControlNet with the client head ``head_state`` put back in place."""
        head = ControlHead(self.controlnet)
        head.load_state_dict(head_state)
        final = copy.deepcopy(self.controlnet)
        for name in CUT.client_trainable:
            resolve(name, controlnet=final).load_state_dict(resolve(name, controlnet=head).state_dict())
        return final.eval()

    @classmethod
    def cut_features(cls, controlnet, base, x_t, hint, stack=None, ctx=None):
        if stack:
            return split_client_features(stack, lambda x: control_head(controlnet, x, hint), base.unet, x_t, ctx)
        return whole_features(controlnet, base, x_t, hint)

    @classmethod
    def trace_client(cls, models, batch: dict, meter) -> ClientTrace:
        cn, x_t, hint = models.controlnet, batch["x_t"], batch["hint"]
        with torch.no_grad():
            up = dict(control_features=control_head(cn, x_t, hint), unet_features=unet_first_conv(models.unet, x_t),
                      t=batch["t"], noise=batch["noise"], context=batch["context"])
        grad = torch.empty_like(up["control_features"])  # arrives from the server: d loss / d control_features
        fwd = meter()
        activation = control_head(cn, x_t, hint)  # recomputed: the very activation the server used
        act_fwd = meter() - fwd
        activation.backward(grad)
        backward = meter() - fwd - act_fwd
        return ClientTrace(up, dict(control_features_grad=grad), backward)

    @classmethod
    def turn_state(cls, controlnet) -> dict:
        return ControlHead(controlnet).state_dict()

    @staticmethod
    def batches_in(message: dict) -> int:
        return 1 if "control_features" in message["up"].get("tensors", {}) else 0


@register
class VanillaStrategy(HeadSplitServer):
    """Server side: the ControlNet after its head, trained with the cut-layer gradient returned."""

    name = "vanilla"
    order = 1
    client_class = VanillaClient
    message_type = MESSAGE_TYPE
    cut = CUT
    concurrency = "sequential"  # one client at a time: the head passes from turn to turn

    def start(self, channel: Channel) -> SchemeResult:
        t0 = time.perf_counter()
        server_s, losses = 0.0, []
        bar = progress(self.settings.steps, self.name)
        turns = turn_schedule(self.settings.steps, channel.num_clients, self.settings.local_steps)
        expect = self.reply_expect()
        channel.tolerate_failures(self.settings.on_client_failure == "skip")
        average = TailAverage(len(turns), self.settings.average_from)
        for turn, (cid, k) in enumerate(turns, start=1):
            # on-client-failure=skip: a failed client's turn ends there (recorded); the head stays the one it got
            with channel.guard():
                request = VanillaRequest(head=self.head_state)
                for _ in range(k):
                    reply = channel.call(cid, request, VanillaReply, steps=(len(losses), 1), round=turn,
                                         expect=expect)
                    if reply.control_features is None:
                        raise RuntimeError(f"vanilla: client {cid} sent no batch")
                    s0 = time.perf_counter()
                    loss, grad = self.train_step(*(getattr(reply, n) for n in BATCH_FIELDS))
                    server_s += time.perf_counter() - s0
                    losses.append(loss)
                    request = VanillaRequest(control_features_grad=grad)
                    bar.update()
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
                request.want_batch = False
                reply = channel.call(cid, request, VanillaReply, steps=(len(losses), 0), round=turn, expect=expect)
                if reply.head is None:
                    raise RuntimeError(f"vanilla: client {cid} did not return its head at the end of its turn")
                self.head_state = reply.head
            average.add(turn, lambda: self.merged(self.head_state).state_dict())
        bar.close()
        return SchemeResult(self.name, average.apply(self.merged(self.head_state)), losses, len(losses),
                            time.perf_counter() - t0, server_s, channel.transcript,
                            server_trainable_params=self.server_trainable_params())

    @staticmethod
    def bare(envs, controlnet, settings, turns) -> list[float]:
        base = envs[0].base
        server = SplitServer(base.unet, controlnet, envs[0].scheduler, settings, off_server=CUT.client_trainable)
        head = ControlHead(controlnet).train()
        gens = [client_generator(e.seed, c) for c, e in enumerate(envs)]
        losses = []
        for cid, k in turns:
            opt = torch.optim.AdamW(head.parameters(), lr=settings.lr)  # as the client: fresh per turn
            for _ in range(k):
                b = sample_batch(base, envs[cid].scheduler, envs[cid].data, settings.batch_size, gens[cid],
                                 settings.prompt_dropout, encodings=envs[cid].encodings)
                act = head(b.x_t, b.hint)
                with torch.no_grad():
                    uf = unet_first_conv(base.unet, b.x_t)
                opt.zero_grad(set_to_none=True)
                losses.append(server.server_step(act, uf, b.t, b.noise, b.context))  # backprop reaches the head
                opt.step()
        return losses

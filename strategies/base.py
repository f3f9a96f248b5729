"""What every scheme shares: client data and noise streams, the wire, the in-process transport.

Transport independence
----------------------
A scheme is a *strategy* (server side, drives training through ``transport.call``) plus a
*client* class whose ``handle(method, payload)`` answers messages. Payloads are flat
dicts of tensors and numbers. ``InProcessTransport`` calls the client directly and is
the default (deterministic, used by tests); the Flower engine (sim/, next issue) will
carry the same payloads in Flower records. Every payload is copied and detached when it
crosses, so no autograd graph links the two sides, and a strategy gets neither the
clients nor their data: only the frozen UNet, the public initial ControlNet, the config
and the replies. (In one process the frozen modules are the same Python objects on both
sides; the simulation assumes an honest-but-curious server that does not tamper with
them. The attack interface of a later issue will read only the transcript.)

Identical data and seeds
------------------------
Every scheme uses the same turn schedule (client c trains ``local_steps`` batches, then
the next client, cycling) and each client draws its batches, timesteps and noise from
its own generator seeded by (seed, client id). So batch i of client c is the same
images, t and noise under FedAvg, vanilla and no-gradient-return split learning.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from sim.cuts import control_rest, resolve, unet_rest
from sim.diffusion import bar_position, high_noise_weights, noisy_latents, sample_timesteps, weighted_mse

Payload = dict[str, object]


# ----------------------------------------------------------------------------- data
@dataclass
class ClientData:
    """One client's private triples: target images in [-1, 1], conditions in [0, 1], prompts."""

    target: torch.Tensor
    condition: torch.Tensor
    prompts: list[str]

    def __len__(self) -> int:
        return self.target.shape[0]


@dataclass
class Batch:
    """One training batch as the client prepares it (never sent as such)."""

    z0: torch.Tensor
    noise: torch.Tensor
    t: torch.Tensor
    x_t: torch.Tensor
    context: torch.Tensor
    hint: torch.Tensor


def client_generator(seed: int, cid: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed) * 100_003 + int(cid))


def sample_batch(base, scheduler, data: ClientData, batch_size: int, gen: torch.Generator,
                 prompt_dropout: float = 0.0) -> Batch:
    """Draw a batch, t ~ U{0..T-1} and noise from the client's generator; encode with the frozen parts.

    With ``prompt_dropout`` > 0 that fraction of prompts (drawn from the same generator)
    is replaced by the empty prompt, as ControlNet training does, so the ControlNet also
    works in classifier-free guidance's unconditional branch.
    """
    idx = torch.randint(0, len(data), (batch_size,), generator=gen)
    prompts = [data.prompts[i] for i in idx.tolist()]
    drop = torch.rand(batch_size, generator=gen) < prompt_dropout
    prompts = ["" if d else p for p, d in zip(prompts, drop.tolist())]
    with torch.no_grad():
        z0 = base.autoencoder.encode(data.target[idx])
        context = base.encode_prompts(prompts)
    noise = torch.randn(z0.shape, generator=gen)
    t = sample_timesteps(batch_size, scheduler.config.num_train_timesteps, gen)
    return Batch(z0, noise, t, noisy_latents(scheduler, z0, noise, t), context, data.condition[idx])


def turn_schedule(steps: int, num_clients: int, local_steps: int) -> list[tuple[int, int]]:
    """(client id, number of steps) per turn: blocks of ``local_steps``, clients cycling, ``steps`` in all."""
    turns, done, c = [], 0, 0
    while done < steps:
        n = min(local_steps, steps - done)
        turns.append((c, n))
        done += n
        c = (c + 1) % num_clients
    return turns


def progress(steps: int, scheme: str) -> tqdm:
    """The training progress bar every strategy shows (one tick per training batch)."""
    return tqdm(total=steps, desc=f"training {scheme}", unit="step", mininterval=2, leave=False,
                position=bar_position())


@dataclass(frozen=True)
class TrainSettings:
    """The public training recipe every scheme shares (server and clients alike)."""

    lr: float
    steps: int
    local_steps: int
    batch_size: int
    high_noise_weight: float = 1.0  # see sim.diffusion.high_noise_weights; 1 = plain epsilon MSE
    prompt_dropout: float = 0.0  # fraction of training prompts replaced by the empty prompt


def diffusion_loss(eps_hat: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, scheduler,
                   settings: TrainSettings) -> torch.Tensor:
    """The ControlNet objective: epsilon MSE, optionally up-weighted at high noise."""
    return weighted_mse(eps_hat, noise, high_noise_weights(scheduler, t, settings.high_noise_weight))


# ----------------------------------------------------------------------------- wire
def nbytes(payload: Payload | None) -> int:
    """Bytes a payload occupies on the wire: tensor storage plus 8 bytes per scalar."""
    total = 0
    for v in (payload or {}).values():
        total += v.numel() * v.element_size() if isinstance(v, torch.Tensor) else 8
    return total


def to_wire(payload: Payload | None) -> Payload:
    """Copy a payload as it would cross a network: detached tensor copies, no autograd graph."""
    out: Payload = {}
    for k, v in (payload or {}).items():
        out[k] = v.detach().clone() if isinstance(v, torch.Tensor) else v
    return out


def state_to_payload(module: nn.Module, prefix: str) -> Payload:
    return {f"{prefix}/{k}": v for k, v in module.state_dict().items()}


def payload_to_state(payload: Payload, prefix: str) -> dict[str, torch.Tensor]:
    p = f"{prefix}/"
    return {k[len(p):]: v for k, v in payload.items() if k.startswith(p)}


@dataclass
class WireStats:
    """Bytes and messages each way, and the client compute time inside handlers."""

    bytes_up: int = 0  # client -> server
    bytes_down: int = 0  # server -> client
    messages: int = 0  # round trips
    client_s: float = 0.0


class InProcessTransport:
    """Calls each client's ``handle`` directly, copying payloads both ways and counting bytes."""

    def __init__(self, clients: list):
        self._clients = clients  # private: strategies talk to clients only through call()
        self.stats = WireStats()

    @property
    def num_clients(self) -> int:
        return len(self._clients)

    def call(self, cid: int, method: str, payload: Payload | None = None) -> Payload:
        down = to_wire(payload)
        self.stats.bytes_down += nbytes(down)
        t0 = time.perf_counter()
        reply = self._clients[cid].handle(method, down)
        self.stats.client_s += time.perf_counter() - t0
        up = to_wire(reply)
        self.stats.bytes_up += nbytes(up)
        self.stats.messages += 1
        return up


class SchemeClient:
    """Base class of the scheme clients: data, generator, and message dispatch by name."""

    def __init__(self, cid: int, base, scheduler, data: ClientData, settings: "TrainSettings", seed: int):
        self.cid = cid
        self.base = base
        self.scheduler = scheduler
        self.data = data
        self.settings = settings
        self.gen = client_generator(seed, cid)

    def next_batch(self) -> Batch:
        return sample_batch(self.base, self.scheduler, self.data, self.settings.batch_size, self.gen,
                            self.settings.prompt_dropout)

    def handle(self, method: str, payload: Payload) -> Payload:
        fn = getattr(self, f"on_{method}", None)
        if fn is None:
            raise ValueError(f"{type(self).__name__} has no handler for message {method!r}")
        return fn(payload)

    def held_modules(self) -> list[nn.Module]:
        """The modules this client holds and runs (frozen ones included)."""
        return [m for m in (self.base.autoencoder, self.base.text_encoder, self.base.unet.conv_in) if m is not None]

    def trainable_parameters(self) -> int:
        """Parameters this client trains: requires_grad over the modules it holds."""
        return sum(p.numel() for m in self.held_modules() for p in m.parameters() if p.requires_grad)


class SplitServer:
    """What both split-learning servers share: the frozen UNet, a trainable ControlNet copy
    minus the modules the scheme's cut keeps off the server, one AdamW, and the loss
    from the ControlNet's first-conv features on."""

    def __init__(self, unet, controlnet, scheduler, settings: TrainSettings, off_server: tuple[str, ...]):
        self.unet = unet  # the server's frozen UNet
        self.scheduler, self.settings = scheduler, settings
        self.controlnet = copy.deepcopy(controlnet).train()
        for name in off_server:
            resolve(name, controlnet=self.controlnet).requires_grad_(False)
        self.opt = torch.optim.AdamW([p for p in self.controlnet.parameters() if p.requires_grad], lr=settings.lr)

    def server_step(self, control_features, unet_features, t, noise, context) -> float:
        """One optimizer step of the server's ControlNet part; returns the loss."""
        down, mid = control_rest(self.controlnet, control_features, t, context)
        loss = diffusion_loss(unet_rest(self.unet, unet_features, t, context, down, mid), noise, t,
                              self.scheduler, self.settings)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss.item()

    def server_trainable_params(self) -> int:
        return sum(p.numel() for p in self.controlnet.parameters() if p.requires_grad)


@dataclass
class SchemeResult:
    """What a strategy's ``start`` returns: the trained ControlNet and what it cost."""

    scheme: str
    controlnet: nn.Module
    losses: list[float]
    steps: int
    wall_s: float
    server_s: float
    wire: WireStats
    server_trainable_params: int
    client_trainable_params: int = 0  # filled in by the simulation harness, which can see clients
    extra: dict = field(default_factory=dict)

    @property
    def final_loss(self) -> float:
        tail = self.losses[-max(1, min(50, len(self.losses) // 5)):]
        return float(sum(tail) / len(tail))

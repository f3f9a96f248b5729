"""What every scheme shares: the scheme interface and registry, data and noise streams, clients, the channel.

A scheme owns itself
--------------------
A scheme is one file in strategies/ that defines a *strategy* class (server side) and
registers it with :func:`register`. The class names or holds everything the rest of the
project needs, so the engine, bench, cost and evaluation dispatch on the registry and
never on a scheme's name:

``name``, ``message_type``, ``client_class``
    registry name, the Flower message type its requests travel as, and the client
    (``serve(request) -> reply``, typed messages: :mod:`sim.core.wire`);
``cut``
    a :class:`sim.core.cuts.Cut`: what each side holds, trains and sends;
``hooks``
    the defense hook points its client offers (a defense applies where all its hooks are);
``client_part``
    what the client runs of the ControlNet: ``"frozen"`` (nothing trainable: it sends
    h = E(hint) + x_t), ``"head"`` (a trainable head whose output it sends) or ``"whole"``
    (the whole model; nothing is sent per step). Attacks declare the parts they apply to.
``concurrency``
    how clients and server overlap when deployed (``rounds``, ``sequential``,
    ``parallel-split``, ``stream``): the process :mod:`sim.core.timeline` simulates;
``start(channel)``
    the server loop; returns a :class:`SchemeResult`;
``reply_expect()`` (and its client's ``request_expect()``)
    what the receiver's own models fix about a message it decodes (trailing shapes, the
    timestep range, state names and shapes: :class:`sim.core.wire.Expect`);
``cut_features(controlnet, base, x_t, hint, stack, ctx)``
    the two cut-layer tensors of the composed model (evaluation, attacks);
``bare(envs, controlnet, settings, turns)``
    the same training as a plain PyTorch loop without messages (``splitcontrol bench``);
``trace_client(models, batch, meter)`` / ``trace_server(models, up)``
    one step on meta tensors for ``splitcontrol cost``; ``up_message`` / ``down_message``
    (and ``turn_state``) the message classes whose bytes it counts;
``batches_in(message)`` / ``batches_drawn(stat, settings, num_clients)``
    how many training batches a client drew for a message (the scorer replays clients).

Transport independence
----------------------
Strategies talk to clients over a Flower grid (the in-process grid by default, Flower's
Ray simulation or Deployment Engine otherwise: :mod:`sim.engine.server_app`,
:mod:`sim.engine.client_app`). Payloads are serialised to Flower records and back, so no
tensor or autograd graph links the two sides, and a strategy gets neither the clients nor
their data: only the frozen UNet, the public initial ControlNet, the public recipe and
the replies. (In one process the frozen modules are the same Python objects on both
sides; the simulation assumes an honest-but-curious server that does not tamper with them.)

Identical data and seeds, private randomness apart
--------------------------------------------------
Every scheme uses the same turn schedule (client c trains ``local_steps`` batches, then
the next client, cycling) and each client draws its batches, timesteps and noise from a
generator seeded by the public ``seed`` and its id, so batch i of client c is the same
images, t and noise under every scheme. Everything a defense calls private (noise, the
fp16 offset, mixing partners, ...) comes from a second generator seeded by the
client-side ``client-seed`` (:func:`private_generator`), which no public key determines.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from flwr.app import Message
from torch import nn
from tqdm.auto import tqdm

from defenses import DefenseStack, HookContext
from sim.core.cuts import (
    Cut,
    control_head,
    control_rest,
    controlled_eps,
    resolve,
    unet_first_conv,
    unet_rest,
)
from sim.core.diffusion import (
    bar_position,
    high_noise_weights,
    noisy_latents,
    sample_timesteps,
    weighted_mse,
)
from sim.core.encodings import RecordEncodings
from sim.core.splits import ClientData
from sim.core.wire import ClientFailure, Expect, WireError, decode, encode

# ----------------------------------------------------------------------------- registry
SCHEMES: dict[str, type] = {}


def register(cls: type) -> type:
    """Class decorator: add a strategy class to the scheme registry under ``cls.name``."""
    declared = ("name", "message_type", "client_class", "cut", "hooks", "client_part", "concurrency")
    missing = [a for a in declared if not getattr(cls, a, None)]
    if missing or not cls.name or cls.name in SCHEMES:
        raise ValueError(f"scheme {getattr(cls, 'name', cls)!r}: name empty or taken, or missing {missing}")
    if cls.cut.scheme != cls.name:
        raise ValueError(f"scheme {cls.name!r} declares the cut of {cls.cut.scheme!r}")
    SCHEMES[cls.name] = cls
    return cls


def get_strategy(name: str):
    if name not in SCHEMES:
        raise ValueError(f"unknown scheme {name!r}; choose one of {list(SCHEMES)}")
    return SCHEMES[name]


@dataclass
class Batch:
    """One training batch as the client prepares it (never sent as such)."""

    z0: torch.Tensor
    noise: torch.Tensor
    t: torch.Tensor
    x_t: torch.Tensor
    context: torch.Tensor
    hint: torch.Tensor
    idx: torch.Tensor | None = None  # which of the client's samples (for scoring attacks; never sent)
    prompts: list[str] | None = None  # the prompts after dropout (never sent as text)
    hint_latent: torch.Tensor | None = None  # E(2 hint - 1), for clients that send it (nograd); cached per record


def client_generator(seed: int, cid: int) -> torch.Generator:
    """The client's batch generator (batches, t, noise, prompt dropout), from the public ``seed``:
    the same under every scheme, so the schemes train on identical streams."""
    return torch.Generator().manual_seed(int(seed) * 100_003 + int(cid))


def client_secret(client_seed: int, cid: int, stream: int = 0) -> int:
    """An integer only the client can know, from the client-side ``client-seed``, its id and a stream
    number (0: its private generator; 1: fixed per-client values such as fp16's offset)."""
    if client_seed < 0:
        raise ValueError("client-seed is unset (-1): the runner or the ClientApp draws one before clients start")
    digest = hashlib.sha256(f"splitcontrol-private:{int(client_seed)}:{int(cid)}:{int(stream)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % 2**63


def private_generator(client_seed: int, cid: int) -> torch.Generator:
    """The client's private generator: every defense's randomness (never the batch generator, so a
    defense never changes which images, t and noise a batch gets)."""
    return torch.Generator().manual_seed(client_secret(client_seed, cid))


def sample_batch(base, scheduler, data: ClientData, batch_size: int, gen: torch.Generator,
                 prompt_dropout: float = 0.0, t_start: int = 0, encodings: RecordEncodings | None = None,
                 hints: bool = False) -> Batch:
    """Draw a batch, t ~ U{t_start..T-1} and noise from the client's generator; encode with the frozen parts.

    With ``prompt_dropout`` > 0 that fraction of prompts (drawn from the same generator)
    is replaced by the empty prompt, as ControlNet training does, so the ControlNet also
    works in classifier-free guidance's unconditional branch. ``encodings``: the client's
    per-record cache of its latents (:class:`sim.core.encodings.RecordEncodings`; without
    one, a fresh one, so nothing outlives the call); ``hints``: also the hint latents.
    Prompts are encoded through the text encoder's per-prompt cache.
    """
    encodings = encodings if encodings is not None else RecordEncodings(base.autoencoder, data)
    p = base.preset
    idx, drop, noise, t = draw_batch(gen, len(data), batch_size, (p.latent_channels, p.latent_size, p.latent_size),
                                     scheduler.config.num_train_timesteps, prompt_dropout, t_start)
    prompts = ["" if d else data.prompts[i] for i, d in zip(idx.tolist(), drop.tolist())]
    with torch.no_grad():
        z0 = encodings.target(idx)
        context = base.encode_prompts(prompts)
        hint_latent = encodings.hint(idx) if hints else None
    return Batch(z0, noise, t, noisy_latents(scheduler, z0, noise, t), context, data.condition[idx], idx, prompts,
                 hint_latent)


def draw_batch(gen: torch.Generator, records: int, batch_size: int, latent_shape: tuple[int, ...],
               num_train_timesteps: int, prompt_dropout: float = 0.0,
               t_start: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The random draws of one batch, in the batch stream's order: record ids (with replacement),
    prompt-dropout flags, noise, timesteps."""
    idx = torch.randint(0, records, (batch_size,), generator=gen)
    drop = torch.rand(batch_size, generator=gen) < prompt_dropout
    noise = torch.randn((batch_size, *latent_shape), generator=gen)
    return idx, drop, noise, sample_timesteps(batch_size, num_train_timesteps, gen, t_start)


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
    high_noise_weight: float = 1.0  # see sim.core.diffusion.high_noise_weights; 1 = plain epsilon MSE
    prompt_dropout: float = 0.0  # fraction of training prompts replaced by the empty prompt
    defenses: tuple[str, ...] = ()  # defense specs (public: the server knows which defenses run)
    keep_optimizer: bool = True  # fedavg: a client keeps its AdamW state between rounds (else a fresh one per round)
    min_reply_fraction: float = 1.0  # fedavg: a round goes on with this fraction of its clients' replies
    on_client_failure: str = "stop"  # split schemes: "skip" ends a failed client's turn and goes on
    average_from: float = 1.0  # released weights: the mean at turn (round) ends from this fraction on (sim.core.averaging)

    @classmethod
    def from_config(cls, cfg) -> "TrainSettings":
        """The recipe of a :class:`sim.core.config.ExperimentConfig`."""
        return cls(lr=cfg.lr, steps=cfg.steps, local_steps=cfg.local_steps, batch_size=cfg.batch_size,
                   high_noise_weight=cfg.high_noise_weight, prompt_dropout=cfg.prompt_dropout,
                   defenses=tuple(cfg.defenses), keep_optimizer=cfg.fedavg_keep_optimizer,
                   min_reply_fraction=cfg.min_reply_fraction, on_client_failure=cfg.on_client_failure,
                   average_from=cfg.average_from)


def diffusion_loss(eps_hat: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, scheduler,
                   settings: TrainSettings, target_weights: torch.Tensor | None = None) -> torch.Tensor:
    """The ControlNet objective: epsilon MSE, optionally up-weighted at high noise, times a latent
    defense's per-sample ``target_weights`` where given."""
    w = high_noise_weights(scheduler, t, settings.high_noise_weight)
    return weighted_mse(eps_hat, noise, w if target_weights is None else w * target_weights)


# ----------------------------------------------------------------------------- clients
@dataclass
class ClientEnv:
    """What a client device has before any message: the frozen public model, the public
    recipe and seed, and its own private data. The ClientApp builds it from the run config
    (or a test injects it); it is never mutated, so a process may cache it."""

    base: object
    scheduler: object
    settings: TrainSettings
    data: ClientData
    seed: int  # public: the batch stream
    controlnet_template: nn.Module | None = None  # the public ControlNet architecture (weights arrive by message)
    client_seed: int = -1  # client-side: the seed of this client's private randomness (-1: none, e.g. a public client)
    # the client's per-record cache of its latents (a memo of the frozen encoder on its own data, never
    # sent); None: a fresh one for this env. Pass one to keep it across envs built per message.
    encodings: RecordEncodings | None = None

    def __post_init__(self):
        if self.encodings is None and self.data is not None:
            self.encodings = RecordEncodings(self.base.autoencoder, self.data)


def prefixed(d: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of ``d`` under ``prefix.``, with the prefix removed."""
    p = f"{prefix}."
    return {k[len(p):]: v for k, v in d.items() if k.startswith(p)}


def optimizer_tensors(opt: torch.optim.Optimizer, prefix: str = "opt") -> dict[str, torch.Tensor]:
    """An optimizer's per-parameter state (e.g. AdamW's moments and step) as flat tensors for
    Flower's ``context.state``; :func:`load_optimizer_tensors` restores it."""
    out = {f"{prefix}.{i}.{k}": torch.as_tensor(v) for i, st in opt.state_dict()["state"].items() for k, v in st.items()}
    out[f"{prefix}.present"] = torch.ones(1)
    return out


def load_optimizer_tensors(opt: torch.optim.Optimizer, st: dict[str, torch.Tensor], prefix: str = "opt") -> None:
    sd = opt.state_dict()
    n = len(sd["param_groups"][0]["params"])
    sd["state"] = {i: prefixed(st, f"{prefix}.{i}") for i in range(n) if f"{prefix}.{i}.step" in st}
    opt.load_state_dict(sd)


class SchemeClient:
    """Base class of the scheme clients.

    A client object lives for one message: the ClientApp builds it from its
    :class:`ClientEnv`, restores what must outlive a message with :meth:`set_state`
    (Flower's ``context.state``), answers the request with :meth:`serve` and saves
    :meth:`get_state` back. So a client can run in a fresh process per message, as
    under Flower's Deployment Engine. Subclasses set ``request_type`` and implement
    :meth:`serve`; their state is their generator plus what they add.
    """

    request_type: type = object
    scheme: str = ""
    sends_hint_latent: bool = False  # batches carry E(2 hint - 1) (from the per-record cache)

    def __init__(self, cid: int, env: ClientEnv):
        self.cid = cid
        self.env = env
        self.base, self.scheduler, self.data, self.settings = env.base, env.scheduler, env.data, env.settings
        self.gen = client_generator(env.seed, cid)
        p = self.base.preset
        self.defenses = DefenseStack(self.settings.defenses, get_strategy(self.scheme),
                                     p.latent_channels * p.latent_size ** 2)
        # private randomness only where a client seed is held (a "public client", built to count
        # parameters or bytes, has none and must not pretend to)
        self.has_secret = env.client_seed >= 0
        self.defense_gen = private_generator(env.client_seed, cid) if self.has_secret else torch.Generator()
        self.secret = client_secret(env.client_seed, cid, stream=1) if self.has_secret else None

    def next_batch(self) -> Batch:
        return sample_batch(self.base, self.scheduler, self.data, self.settings.batch_size, self.gen,
                            self.settings.prompt_dropout, self.defenses.t_start(self.scheduler),
                            self.env.encodings, self.sends_hint_latent)

    def releases(self, batches: int) -> torch.Tensor:
        """How often each of this client's records is sent in its first ``batches`` batches (the batch
        stream replayed without encoding anything)."""
        p, gen = self.base.preset, client_generator(self.env.seed, self.cid)
        counts = torch.zeros(len(self.data), dtype=torch.int64)
        for _ in range(batches):
            idx = draw_batch(gen, len(self.data), self.settings.batch_size,
                             (p.latent_channels, p.latent_size, p.latent_size), self.scheduler.config.num_train_timesteps,
                             self.settings.prompt_dropout, self.defenses.t_start(self.scheduler))[0]
            counts += torch.bincount(idx, minlength=len(self.data))
        return counts

    def check_secret(self) -> None:
        """Refuse to run defenses without a client seed: their draws would come from a generator with
        a public (default) seed."""
        if not self.has_secret and self.defenses:
            raise RuntimeError(f"client {self.cid} runs defenses {list(self.defenses.specs)} without a client-seed")

    def hook_context(self, t: torch.Tensor, z0: torch.Tensor | None = None, idx: torch.Tensor | None = None,
                     noise: torch.Tensor | None = None) -> HookContext:
        """What the defense hooks of this client may use for a batch with timesteps ``t`` (and, in
        training, its clean latents ``z0``, record ids ``idx`` and noise target ``noise``)."""
        self.check_secret()
        return HookContext(t, self.scheduler, self.cid, self.defense_gen, secret=self.secret, z0=z0, idx=idx,
                           noise=noise)

    def serve(self, request):
        raise NotImplementedError

    def request_expect(self) -> Expect | None:
        """What this client's own models fix about a request (:class:`sim.core.wire.Expect`; None: nothing)."""
        return None

    def get_state(self) -> dict[str, torch.Tensor]:
        return {"generator": self.gen.get_state(), "defense-generator": self.defense_gen.get_state()}

    def set_state(self, state: dict[str, torch.Tensor]) -> None:
        self.gen.set_state(state["generator"])
        self.defense_gen.set_state(state["defense-generator"])

    def held_modules(self) -> list[nn.Module]:
        """The modules this client holds and runs (frozen ones included)."""
        return [m for m in (self.base.autoencoder, self.base.text_encoder, self.base.unet.conv_in) if m is not None]

    def trainable_parameters(self) -> int:
        """Parameters this client trains: requires_grad over the modules it holds."""
        return sum(p.numel() for m in self.held_modules() for p in m.parameters() if p.requires_grad)

    def model_state_bytes(self) -> int:
        """Memory the client's models need at rest and in training, activations excluded: every
        parameter and buffer it holds, plus a gradient and AdamW's two moments per trainable one."""
        seen, total = set(), 0
        for m in self.held_modules():
            for t in list(m.parameters()) + list(m.buffers()):
                if id(t) not in seen:
                    seen.add(id(t))
                    total += t.numel() * t.element_size() * (4 if t.requires_grad else 1)
        return total


class Channel:
    """The server's typed connection to its clients over a (recording) Flower grid.

    ``call(cid, request, reply_type, steps)`` sends one typed request to client ``cid``
    (a partition id) as a ``message_type`` message, waits for the reply and decodes it,
    validating every field (and, given ``expect``, what the server's model fixes about it:
    :class:`sim.core.wire.Expect`). ``steps`` = (first step, number of steps) the round trip
    serves and ``round`` the turn it belongs to, for the transcript. ``node_ids[cid]`` is client cid's node.
    """

    def __init__(self, grid, node_ids: list[int], message_type: str):
        if not hasattr(grid, "transcript"):
            raise TypeError("Channel needs a recording grid (sim.engine.transcript.RecordingGrid), so that every "
                            "message is recorded")
        self.grid, self.node_ids, self.message_type = grid, list(node_ids), message_type

    @property
    def num_clients(self) -> int:
        return len(self.node_ids)

    @property
    def transcript(self):
        return self.grid.transcript

    def tolerate_failures(self, on: bool) -> None:
        """With ``on``, a failed or silent client is recorded by the grid and :meth:`call` raises
        :class:`~sim.core.wire.ClientFailure`, which :meth:`guard` lets a strategy skip."""
        self.grid.tolerate = on

    def guard(self):
        """Around one client's turn: when failures are tolerated, a :class:`ClientFailure` ends the turn
        there (the grid recorded it) and the strategy goes on; otherwise it propagates."""
        return contextlib.suppress(ClientFailure) if getattr(self.grid, "tolerate", False) else contextlib.nullcontext()

    def call(self, cid: int, request, reply_type, steps: tuple[int, int] = (0, 0), round: int = 0,
             expect: Expect | None = None):
        self.grid.window, self.grid.round = steps, round
        msg = Message(encode(request), dst_node_id=self.node_ids[cid], message_type=self.message_type,
                      group_id=str(steps[0]))
        replies = list(self.grid.send_and_receive([msg]))
        if not replies:  # a tolerant grid recorded the failure and dropped it
            reason = self.transcript.failures[-1]["reason"] if self.transcript.failures else "no reply"
            raise ClientFailure(f"client {cid} (node {self.node_ids[cid]}) failed on {self.message_type!r}: {reason}")
        (reply,) = replies
        try:
            return decode(reply.content, reply_type, expect)
        except WireError as e:  # a corrupt reply stops the run naming the client and the message type
            raise WireError(f"client {cid} (node {self.node_ids[cid]}) sent an invalid reply to "
                            f"{self.message_type!r}: {e}") from e


@dataclass
class ClientTrace:
    """One client step traced on meta tensors (``Scheme.trace_client``, for ``splitcontrol cost``):
    the tensors it sends up and receives down at batch 1 and the backward FLOPs it computes. The
    batch it is given holds the cached encodings (latents, context; ``hint_latent`` for a client
    class with ``sends_hint_latent``): their one-time cost is metered apart."""

    up: dict
    down: dict
    backward_flops: int = 0


class Scheme:
    """The interface every strategy class implements (module docstring), with the shared defaults."""

    name: str = ""
    order: int = 100  # where it is listed in tables and figures
    message_type: str = ""
    client_class: type = object
    cut: Cut
    hooks: tuple[str, ...] = ()
    client_part: str = ""  # "frozen" | "head" | "whole"
    # how its clients and server overlap in a deployment, for `splitcontrol timeline` (sim/core/timeline.py):
    # "rounds" | "sequential" | "parallel-split" | "stream"
    concurrency: str = ""
    up_message: type | None = None  # the per-step (or per-turn) message classes, for the cost table
    down_message: type | None = None

    def start(self, channel: "Channel") -> "SchemeResult":
        raise NotImplementedError

    def reply_expect(self) -> Expect | None:
        """What the server's own models fix about a client's reply (:class:`sim.core.wire.Expect`; None: nothing)."""
        return None

    @classmethod
    def cut_features(cls, controlnet, base, x_t, hint, stack: DefenseStack | None = None,
                     ctx: HookContext | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(ControlNet first-conv features, UNet first-conv features) of the composed model; with a
        defense ``stack`` through the client's pipeline, as in training."""
        raise NotImplementedError

    @staticmethod
    def bare(envs, controlnet, settings, turns) -> list[float]:
        """The scheme's training as a plain PyTorch loop (no messages); returns the per-step losses."""
        raise NotImplementedError

    @classmethod
    def trace_client(cls, models, batch: dict, meter) -> ClientTrace:
        """One client step on meta tensors; ``meter()`` is the FLOP count so far."""
        raise NotImplementedError

    @classmethod
    def trace_server(cls, models, up: dict, meter) -> int | None:
        """The server's step on the received ``up`` tensors; returns the forward FLOPs (None: no server step)."""
        return None

    @classmethod
    def turn_state(cls, controlnet) -> dict | None:
        """Weights relayed once per turn (vanilla's head), for the cost table; None if none."""
        return None

    @staticmethod
    def batches_in(message: dict) -> int:
        """How many training batches the client drew to answer a kept ``message`` (its payload)."""
        raise NotImplementedError

    @classmethod
    def batches_drawn(cls, stat: dict, settings: TrainSettings, num_clients: int) -> int:
        """How many batches the client drew for a message, from its statistics alone."""
        return int(stat["num_steps"])


def composed_eps(scheme, base, controlnet, x_t, t, context, hint, control_scale=None,
                 stack: DefenseStack | None = None, ctx: HookContext | None = None,
                 control_context=None) -> torch.Tensor:
    """A scheme's whole model in one place: the noise prediction with control (``controlnet=None``:
    the base model without). With a defense ``stack`` the cut-layer features go through the
    client's pipeline (``ctx``: its hook context), as in training."""
    if controlnet is None:
        return controlled_eps(base.unet, None, None, unet_first_conv(base.unet, x_t), t, context)
    control, feats = scheme.cut_features(controlnet, base, x_t, hint, stack, ctx)
    return controlled_eps(base.unet, controlnet, control, feats, t, context, control_scale, control_context)


def whole_features(controlnet, base, x_t, hint) -> tuple[torch.Tensor, torch.Tensor]:
    """The undefended cut-layer tensors when the ControlNet's hint block reads the hint (fedavg, vanilla)."""
    return control_head(controlnet, x_t, hint), unet_first_conv(base.unet, x_t)


class SplitServer(Scheme):
    """What the split-learning servers share: the frozen UNet, a trainable ControlNet copy
    minus the modules the scheme's cut keeps off the server, one AdamW, and the loss
    from the ControlNet's first-conv features on. Subclasses say how the control tensor a
    client sends becomes those features (:meth:`server_features`)."""

    hooks = ("timestep", "latent", "feature", "wire", "prompt")  # the split client's pipeline

    @staticmethod
    def server_features(controlnet, control: torch.Tensor) -> torch.Tensor:
        """The ControlNet's first-conv features from the control tensor a client sent."""
        raise NotImplementedError

    @staticmethod
    def control_channels(controlnet) -> int:
        """Channels of the control tensor a client sends (what :meth:`server_features` takes)."""
        raise NotImplementedError

    def reply_expect(self) -> Expect:
        """What the server's own models fix about a client's batch: each sent tensor's trailing
        (C, H, W) or (L, D) shape and t in [0, T). Only the invariant parts: the dtypes (fp16 on the
        wire), a missing context (prompts kept home) and the leading batch dims may vary."""
        cfg = self.unet.config
        size = cfg.sample_size if isinstance(cfg.sample_size, int) else None
        if self.null_context is not None:  # the public embedding of "": every prompt's (L, D)
            context = tuple(self.null_context.shape[1:])
        else:
            dim = cfg.cross_attention_dim
            context = (None, dim if isinstance(dim, int) and getattr(cfg, "encoder_hid_dim", None) is None else None)
        latent, features = self.unet.conv_in.in_channels, self.unet.conv_in.out_channels
        return Expect(shapes={self.cut.up[0]: (self.control_channels(self.controlnet), size, size),
                              "unet_features": (features, size, size), "noise": (latent, size, size),
                              "context": context},
                      ranges={"t": (0, self.scheduler.config.num_train_timesteps)})

    @classmethod
    def trace_server(cls, models, up: dict, meter) -> int:
        up = {k: v.detach().clone() for k, v in up.items()}  # the received message: fresh tensors
        features = cls.server_features(models.controlnet, up.pop(cls.cut.up[0]))
        down, mid = control_rest(models.controlnet, features, up["t"], up["context"])
        eps_hat = unet_rest(models.unet, up["unet_features"], up["t"], up["context"], down, mid)
        loss = F.mse_loss(eps_hat, up["noise"])
        forward = meter()
        del down, mid, eps_hat
        loss.backward()
        return forward

    def __init__(self, unet, controlnet, scheduler, settings: TrainSettings, off_server: tuple[str, ...],
                 null_context: torch.Tensor | None = None):
        self.unet = unet  # the server's frozen UNet
        self.scheduler, self.settings = scheduler, settings
        self.null_context = null_context  # public embedding of "" (used when clients keep prompts home)
        self.controlnet = copy.deepcopy(controlnet).train()
        for name in off_server:
            resolve(name, controlnet=self.controlnet).requires_grad_(False)
        self.opt = torch.optim.AdamW([p for p in self.controlnet.parameters() if p.requires_grad], lr=settings.lr)

    def server_step(self, control_features, unet_features, t, noise, context) -> float:
        """One optimizer step of the server's ControlNet part; returns the loss.

        Features may arrive as float16 (wire quantisation); ``context`` None means the
        client kept its prompt: the server uses the empty prompt's public embedding."""
        control_features, unet_features = control_features.float(), unet_features.float()
        if context is None:
            if self.null_context is None:
                raise RuntimeError("the client sent no text context and the server has no empty-prompt embedding")
            context = self.null_context.expand(t.shape[0], *self.null_context.shape[1:])
        down, mid = control_rest(self.controlnet, control_features, t, context)
        loss = diffusion_loss(unet_rest(self.unet, unet_features, t, context, down, mid), noise, t,
                              self.scheduler, self.settings, self.target_weights(t, noise))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss.item()

    def target_weights(self, t: torch.Tensor, target: torch.Tensor) -> torch.Tensor | None:
        """Per-sample loss weights a latent defense asks for (inverse variance of its unbiased target;
        public: the server knows the defenses); None without one."""
        if not self.settings.defenses:
            return None
        if getattr(self, "_stack", None) is None:
            self._stack = DefenseStack(self.settings.defenses, type(self), target[0].numel())
        return self._stack.target_weights(t, target, self.scheduler)

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
    transcript: object  # sim.engine.transcript.Transcript
    server_trainable_params: int
    client_trainable_params: int = 0  # filled in by the simulation harness, which can see clients
    extra: dict = field(default_factory=dict)

    @property
    def final_loss(self) -> float:
        tail = self.losses[-max(1, min(50, len(self.losses) // 5)):]
        return float(sum(tail) / len(tail))

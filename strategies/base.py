"""What every scheme shares: client data and noise streams, clients, the server's channel.

Transport independence
----------------------
A scheme is a *strategy* (server side: ``start(channel)`` drives training) plus a
*client* class (``serve(request) -> reply``), talking in typed messages
(:mod:`sim.wire`) over a Flower grid: the in-process grid by default, Flower's Ray
simulation or Deployment Engine otherwise (``sim/server_app.py``, ``sim/client_app.py``).
Payloads are serialised to Flower records and back, so no tensor or autograd graph links
the two sides, and a strategy gets neither the clients nor their data: only the frozen
UNet, the public initial ControlNet, the config and the replies. Every message passes
through one :class:`sim.transcript.Transcript`. (In one process the frozen modules are the
same Python objects on both sides; the simulation assumes an honest-but-curious server
that does not tamper with them. Attacks read only the transcript.)

Identical data and seeds
------------------------
Every scheme uses the same turn schedule (client c trains ``local_steps`` batches, then
the next client, cycling) and each client draws its batches, timesteps and noise from
its own generator seeded by (seed, client id). So batch i of client c is the same
images, t and noise under FedAvg, vanilla and no-gradient-return split learning.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from sim.cuts import control_rest, resolve, unet_rest
from sim.diffusion import bar_position, high_noise_weights, noisy_latents, sample_timesteps, weighted_mse

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
    idx: torch.Tensor | None = None  # which of the client's samples (for scoring attacks; never sent)
    prompts: list[str] | None = None  # the prompts after dropout (never sent as text)


def client_generator(seed: int, cid: int, stream: int = 0) -> torch.Generator:
    """The client's generator: stream 0 draws batches, t and noise; stream 1 is the defenses'
    private randomness (so a defense never changes which images, t and noise a batch gets)."""
    return torch.Generator().manual_seed(int(seed) * 100_003 + int(cid) + 7_777_777 * int(stream))


def sample_batch(base, scheduler, data: ClientData, batch_size: int, gen: torch.Generator,
                 prompt_dropout: float = 0.0, t_start: int = 0) -> Batch:
    """Draw a batch, t ~ U{t_start..T-1} and noise from the client's generator; encode with the frozen parts.

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
    t = sample_timesteps(batch_size, scheduler.config.num_train_timesteps, gen, t_start)
    return Batch(z0, noise, t, noisy_latents(scheduler, z0, noise, t), context, data.condition[idx], idx, prompts)


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
    defenses: tuple[str, ...] = ()  # defense specs (public: the server knows which defenses run)
    keep_optimizer: bool = True  # fedavg: a client keeps its AdamW state between rounds (else a fresh one per round)

    @classmethod
    def from_config(cls, cfg) -> "TrainSettings":
        """The recipe of a :class:`sim.config.ExperimentConfig`."""
        return cls(lr=cfg.lr, steps=cfg.steps, local_steps=cfg.local_steps, batch_size=cfg.batch_size,
                   high_noise_weight=cfg.high_noise_weight, prompt_dropout=cfg.prompt_dropout,
                   defenses=tuple(cfg.defenses), keep_optimizer=cfg.fedavg_keep_optimizer)


def diffusion_loss(eps_hat: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, scheduler,
                   settings: TrainSettings) -> torch.Tensor:
    """The ControlNet objective: epsilon MSE, optionally up-weighted at high noise."""
    return weighted_mse(eps_hat, noise, high_noise_weights(scheduler, t, settings.high_noise_weight))


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
    seed: int
    controlnet_template: nn.Module | None = None  # the public ControlNet architecture (weights arrive by message)


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

    def __init__(self, cid: int, env: ClientEnv):
        from defenses import DefenseStack

        self.cid = cid
        self.env = env
        self.base, self.scheduler, self.data, self.settings = env.base, env.scheduler, env.data, env.settings
        self.gen = client_generator(env.seed, cid)
        self.defense_gen = client_generator(env.seed, cid, stream=1)
        p = self.base.preset
        self.defenses = DefenseStack(self.settings.defenses, self.scheme,
                                     p.latent_channels * p.latent_size ** 2)

    def next_batch(self) -> Batch:
        return sample_batch(self.base, self.scheduler, self.data, self.settings.batch_size, self.gen,
                            self.settings.prompt_dropout, self.defenses.t_start(self.scheduler))

    def hook_context(self, batch: Batch):
        """What the defense hooks of this client may use for ``batch``."""
        from defenses import HookContext

        return HookContext(batch.t, self.scheduler, self.cid, self.defense_gen)

    def serve(self, request):
        raise NotImplementedError

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
    validating every field. ``steps`` = (first step, number of steps) the round trip
    serves and ``round`` the turn it belongs to, for the transcript. ``node_ids[cid]`` is client cid's node.
    """

    def __init__(self, grid, node_ids: list[int], message_type: str):
        from sim.transcript import RecordingGrid

        if not isinstance(grid, RecordingGrid):
            raise TypeError("Channel needs a sim.transcript.RecordingGrid, so that every message is recorded")
        self.grid, self.node_ids, self.message_type = grid, list(node_ids), message_type

    @property
    def num_clients(self) -> int:
        return len(self.node_ids)

    @property
    def transcript(self):
        return self.grid.transcript

    def call(self, cid: int, request, reply_type, steps: tuple[int, int] = (0, 0), round: int = 0):
        from flwr.app import Message

        from sim.wire import decode, encode

        self.grid.window, self.grid.round = steps, round
        msg = Message(encode(request), dst_node_id=self.node_ids[cid], message_type=self.message_type,
                      group_id=str(steps[0]))
        (reply,) = self.grid.send_and_receive([msg])
        return decode(reply.content, reply_type)


class SplitServer:
    """What both split-learning servers share: the frozen UNet, a trainable ControlNet copy
    minus the modules the scheme's cut keeps off the server, one AdamW, and the loss
    from the ControlNet's first-conv features on."""

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
    transcript: object  # sim.transcript.Transcript
    server_trainable_params: int
    client_trainable_params: int = 0  # filled in by the simulation harness, which can see clients
    extra: dict = field(default_factory=dict)

    @property
    def final_loss(self) -> float:
        tail = self.losses[-max(1, min(50, len(self.losses) // 5)):]
        return float(sum(tail) / len(tail))

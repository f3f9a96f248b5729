"""Federated averaging (McMahan et al. 2017): every client trains its own ControlNet copy.

Client: holds everything (autoencoder, text encoder, frozen UNet, a ControlNet copy)
and, per round, loads the global ControlNet, trains ``local_steps`` batches with AdamW
and returns its weights and sample count. By default (``fedavg-keep-optimizer``) a client
keeps its AdamW moments between rounds in its Flower state, as a device that stays in
the federation would: the strongest FedAvg baseline we measured (outline IoU +0.03 over a
fresh optimizer per round, README). ``fedavg-keep-optimizer=false`` starts a fresh AdamW
every round (stateless clients). Server: Flower's own
``flwr.serverapp.strategy.FedAvg`` (example-weighted averaging; its robust variants
plug in the same way), with Flower's message layout (``"arrays"`` + ``"config"`` down,
``"arrays"`` + ``"metrics"`` up); we only tell each client its number of local steps
and validate every reply before Flower aggregates it. Nothing crosses per step; the whole ControlNet crosses each way
per round, and the device must hold and train the full model (the paper's objection at
SD1.5 scale: >1 B parameters, ~1.4 GB upload per round).

Threat model: the server sees model updates only; gradient-inversion attacks work on
those (``attacks/grad_inversion.py`` needs stateless clients: it unwinds one step of a
fresh AdamW, and a stateful client's moments are private state it does not see).

Defenses: an ``fl-client`` defense (e.g. ``dp-sgd``) takes each local optimizer step
itself, from per-sample losses (``Defense.private_step``); an ``fl-server`` defense
(e.g. ``server-dp``) wraps the Flower strategy (``Defense.wrap_strategy``). Without them
the code path is the plain one above.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from defenses import DefenseStack
from sim.core.averaging import TailAverage
from sim.core.cuts import Cut, controlled_eps
from sim.core.diffusion import high_noise_weights
from sim.core.wire import ClientFailure, Expect, config, decode, metric, shapes_of, state

from .base import (
    Channel,
    ClientTrace,
    Scheme,
    SchemeClient,
    SchemeResult,
    TrainSettings,
    client_generator,
    diffusion_loss,
    load_optimizer_tensors,
    optimizer_tensors,
    progress,
    register,
    sample_batch,
    turn_schedule,
    whole_features,
)

MESSAGE_TYPE = "train"  # Flower's MessageType.TRAIN: what its FedAvg sends
CUT = Cut(
    scheme="fedavg",
    client=("autoencoder", "text_encoder", "unet", "controlnet"),
    client_trainable=("controlnet",),
    server=(), server_trainable=(), unused=(),
    up=(), down=(),  # weights cross once per round, not per step
)


@dataclass
class FitIns:
    """Server -> client (Flower's layout): the global ControlNet, the round, the local steps."""

    arrays: dict = state(torch.float32, key="arrays")
    server_round: int = config(int, key="server-round")
    local_steps: int = config(int, key="local-steps")


@dataclass
class FitRes:
    """Client -> server (Flower's layout): the local ControlNet, its weight, its per-step losses."""

    arrays: dict = state(torch.float32, key="arrays")
    num_examples: int = metric(int, key="num-examples")
    losses: list = field(default_factory=list, metadata=metric(list, key="losses").metadata)

    def check(self) -> None:
        if self.num_examples < 1:
            raise ValueError(f"num-examples must be >= 1, got {self.num_examples}")


class FedAvgClient(SchemeClient):
    request_type = FitIns
    scheme = "fedavg"

    def __init__(self, cid, env):
        super().__init__(cid, env)
        self.controlnet = copy.deepcopy(env.controlnet_template)  # weights are loaded from each FitIns
        self.opt_state: dict[str, torch.Tensor] = {}  # AdamW state of the last round (keep-optimizer)

    def get_state(self) -> dict[str, torch.Tensor]:
        return {**super().get_state(), **self.opt_state}

    def set_state(self, state: dict[str, torch.Tensor]) -> None:
        super().set_state(state)
        self.opt_state = {k: v for k, v in state.items() if k.startswith("opt.")}

    def held_modules(self):
        return super().held_modules() + [self.base.unet, self.controlnet]

    def request_expect(self) -> Expect:
        """The global ControlNet has this client's ControlNet's tensors."""
        return Expect(states={"arrays": shapes_of(self.controlnet.state_dict())})

    def serve(self, request: FitIns) -> FitRes:
        self.controlnet.load_state_dict(request.arrays)
        self.controlnet.train()
        opt = torch.optim.AdamW(self.controlnet.parameters(), lr=self.settings.lr)
        if self.settings.keep_optimizer and self.opt_state:
            load_optimizer_tensors(opt, self.opt_state)
        losses = []
        private = self.defenses.with_hook("fl-client")  # e.g. dp-sgd: it takes the optimizer step
        if len(private) > 1:
            raise ValueError(f"at most one fl-client defense, got {[d.name for d in private]}")
        for _ in range(request.local_steps):
            b = self.next_batch()
            if private:
                losses.append(self._private_step(private[0], b, opt))
                continue
            eps_hat = FedAvgStrategy.eps(self.controlnet, self.base, b)
            loss = diffusion_loss(eps_hat, b.noise, b.t, self.scheduler, self.settings)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        if self.settings.keep_optimizer:
            self.opt_state = optimizer_tensors(opt)
        return FitRes(dict(self.controlnet.state_dict()), len(self.data), losses)

    def _private_step(self, defense, b, opt) -> float:
        """One local step taken by an fl-client defense, from per-sample losses (their mean is
        the ordinary step's loss); its randomness comes from the client-private generator."""
        self.check_secret()

        def per_sample_loss() -> torch.Tensor:
            eps_hat = FedAvgStrategy.eps(self.controlnet, self.base, b)
            mse = ((eps_hat.float() - b.noise.float()) ** 2).flatten(1).mean(1)
            return mse * high_noise_weights(self.scheduler, b.t, self.settings.high_noise_weight).to(mse)

        return defense.private_step(self.controlnet, per_sample_loss, opt, self.defense_gen, records=b.idx,
                                    dataset_size=len(self.data))


def _mean_scalar_metrics(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Example-weighted mean of the scalar train metrics (per-step loss lists differ in length)."""
    metrics = [next(iter(r.metric_records.values())) for r in records]
    w = [float(m[weight_key]) for m in metrics]
    out = MetricRecord()
    for k, v in metrics[0].items():
        if k != weight_key and not isinstance(v, list):
            out[k] = sum(float(m[k]) * wi for m, wi in zip(metrics, w)) / sum(w)
    return out


class _TurnFedAvg(FedAvg):
    """Flower's FedAvg, told the turn schedule: each client gets its own ``local-steps``
    (the last round may be short), and every reply is decoded (validated) before
    Flower aggregates it (``expect``: the global model's tensors); the per-step losses are kept
    in schedule order."""

    def __init__(self, turns: list[tuple[int, int]], partition_of: dict[int, int], bar, expect: Expect | None = None,
                 min_reply_fraction: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.turns, self.partition_of, self.bar, self.expect = turns, partition_of, bar, expect
        self.min_reply_fraction, self.sent = min_reply_fraction, 0
        self.losses: list[float] = []
        self.steps_done = 0

    def _round_turns(self, server_round: int) -> dict[int, int]:
        n = len(set(self.partition_of.values()))
        return dict(self.turns[(server_round - 1) * n: server_round * n])

    def configure_train(self, server_round, arrays, config, grid):
        messages = super().configure_train(server_round, arrays, config, grid)
        ks = self._round_turns(server_round)
        self.sent = sum(1 for k in ks.values() if k)
        out = []
        for m in messages:
            k = ks.get(self.partition_of[m.metadata.dst_node_id], 0)
            if k:
                cfg = ConfigRecord({**dict(config), "local-steps": k})
                out.append(Message(RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: cfg}),
                                   dst_node_id=m.metadata.dst_node_id, message_type=m.metadata.message_type,
                                   group_id=str(server_round)))
        grid.window, grid.round = (self.steps_done, sum(ks.values())), server_round
        return out

    def aggregate_train(self, server_round, replies):
        replies = list(replies)  # a tolerant grid has dropped (and recorded) the failed ones
        need = math.ceil(self.min_reply_fraction * self.sent - 1e-9)
        if len(replies) < need:
            raise ClientFailure(f"fedavg: round {server_round}: {len(replies)} of {self.sent} clients replied, fewer "
                                f"than min-reply-fraction={self.min_reply_fraction} needs ({need}); see the "
                                "transcript's failures")
        ks = self._round_turns(server_round)
        for r in replies:  # RecordingGrid ordered them by partition: the schedule's order
            res = decode(r.content, FitRes, self.expect)
            self.losses.extend(res.losses)
        k = sum(ks[self.partition_of[r.metadata.src_node_id]] for r in replies)
        self.steps_done += k
        self.bar.update(k)
        if self.losses:
            self.bar.set_postfix(loss=f"{self.losses[-1]:.4f}", round=server_round)
        return super().aggregate_train(server_round, replies)


@register
class FedAvgStrategy(Scheme):
    """Server side: Flower's FedAvg over the global ControlNet."""

    name = "fedavg"
    order = 0
    client_class = FedAvgClient
    message_type = MESSAGE_TYPE
    cut = CUT
    hooks = ("fl-client", "fl-server")
    client_part = "whole"
    concurrency = "rounds"  # clients train in parallel; the server waits for every reply of a round
    up_message, down_message = FitRes, FitIns

    def __init__(self, unet, controlnet, scheduler, settings: TrainSettings, null_context=None):
        self.unet = unet  # the server's frozen UNet (fedavg: unused)
        self.controlnet = controlnet
        self.settings = settings

    def reply_expect(self) -> Expect:
        """A client's ControlNet has the global ControlNet's tensors."""
        return Expect(states={"arrays": shapes_of(self.controlnet.state_dict())})

    def start(self, channel: Channel) -> SchemeResult:
        t0 = time.perf_counter()
        n = channel.num_clients
        turns = turn_schedule(self.settings.steps, n, self.settings.local_steps)
        bar = progress(self.settings.steps, self.name)
        # below 1, a round goes on without failed clients (Flower's FedAvg aggregates the replies it has)
        channel.grid.tolerate = self.settings.min_reply_fraction < 1
        flower = _TurnFedAvg(turns, channel.grid.partition_of, bar, self.reply_expect(),
                             min_reply_fraction=self.settings.min_reply_fraction, fraction_train=1.0,
                             fraction_evaluate=0.0, min_train_nodes=n, min_available_nodes=n,
                             train_metrics_aggr_fn=_mean_scalar_metrics)
        strategy = flower  # fl-server defenses (e.g. server-dp) wrap Flower's strategy
        for d in DefenseStack(self.settings.defenses, type(self)).with_hook("fl-server"):
            strategy = d.wrap_strategy(strategy, n)
        num_rounds = math.ceil(len(turns) / n)
        tail = TailAverage(num_rounds, self.settings.average_from)

        def after_round(server_round: int, arrays: ArrayRecord) -> None:  # Flower: the global model per round
            if server_round > 0:  # (round 0: the initial model)
                tail.add(server_round, arrays.to_torch_state_dict)

        result = strategy.start(grid=channel.grid,
                                initial_arrays=ArrayRecord(torch_state_dict=self.controlnet.state_dict()),
                                num_rounds=num_rounds, train_config=ConfigRecord(), evaluate_fn=after_round)
        bar.close()
        final = copy.deepcopy(self.controlnet)
        final.load_state_dict(result.arrays.to_torch_state_dict())
        tail.apply(final)
        wall = time.perf_counter() - t0
        server_s = wall - sum(s.round_trip_s for s in channel.transcript.stats if s.scheme == self.name)
        extra = {"rounds": num_rounds}
        if getattr(strategy, "noise_std", None):  # server-dp: the noise std it added per round
            extra["server_dp_noise_std"] = list(strategy.noise_std)
        return SchemeResult(self.name, final.eval(), flower.losses, len(flower.losses), wall, server_s,
                            channel.transcript, server_trainable_params=0, extra=extra)

    # ------------------------------------------------------------------ the scheme's other parts
    @classmethod
    def cut_features(cls, controlnet, base, x_t, hint, stack=None, ctx=None):
        return whole_features(controlnet, base, x_t, hint)  # no cut: fl defenses act on training only

    @classmethod
    def eps(cls, controlnet, base, b) -> torch.Tensor:
        """The client's whole model on a batch: noise prediction with its ControlNet."""
        control, feats = whole_features(controlnet, base, b.x_t, b.hint)
        return controlled_eps(base.unet, controlnet, control, feats, b.t, b.context)

    @staticmethod
    def bare(envs, controlnet, settings, turns) -> list[float]:
        base = envs[0].base
        n = len(envs)
        global_sd = copy.deepcopy(controlnet.state_dict())
        local = copy.deepcopy(controlnet).train()
        gens = [client_generator(e.seed, c) for c, e in enumerate(envs)]
        opt_states = [None] * n  # keep-optimizer: each client's AdamW state from its last round
        losses = []
        for r in range(0, len(turns), n):
            states, weights = [], []
            for cid, k in turns[r:r + n]:
                local.load_state_dict(global_sd)
                opt = torch.optim.AdamW(local.parameters(), lr=settings.lr)
                if settings.keep_optimizer and opt_states[cid] is not None:
                    opt.load_state_dict(opt_states[cid])
                for _ in range(k):
                    b = sample_batch(base, envs[cid].scheduler, envs[cid].data, settings.batch_size, gens[cid],
                                     settings.prompt_dropout, encodings=envs[cid].encodings)
                    loss = diffusion_loss(FedAvgStrategy.eps(local, base, b), b.noise, b.t, envs[cid].scheduler,
                                          settings)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    losses.append(loss.item())
                if settings.keep_optimizer:
                    opt_states[cid] = copy.deepcopy(opt.state_dict())
                states.append({k: v.clone() for k, v in local.state_dict().items()})
                weights.append(len(envs[cid].data))
            total = float(sum(weights))
            global_sd = {k: sum(s[k] * (w / total) for s, w in zip(states, weights)) for k in global_sd}
        return losses

    @classmethod
    def trace_client(cls, models, batch: dict, meter) -> ClientTrace:
        control, feats = whole_features(models.controlnet, models, batch["x_t"], batch["hint"])
        eps_hat = controlled_eps(models.unet, models.controlnet, control, feats, batch["t"], batch["context"])
        loss = F.mse_loss(eps_hat, batch["noise"])
        fwd = meter()
        loss.backward()
        return ClientTrace({}, {}, meter() - fwd)

    @staticmethod
    def batches_in(message: dict) -> int:
        return int(message["down"]["config"]["local-steps"]) if "config" in message["down"] else 0

    @classmethod
    def batches_drawn(cls, stat: dict, settings: TrainSettings, num_clients: int) -> int:
        """A FedAvg message's window is its whole round: its client's share comes from the public turn schedule."""
        turns = turn_schedule(settings.steps, num_clients, settings.local_steps)
        return dict(turns[(stat["round"] - 1) * num_clients: stat["round"] * num_clients]).get(stat["client"], 0)

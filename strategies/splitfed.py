"""SplitFed (Thapa et al., "SplitFed: When Federated Learning Meets Split Learning", AAAI 2022).

Vanilla split learning's cut (the client trains the ControlNet head: ``controlnet_cond_embedding``
+ ``conv_in``; the server trains the rest and returns the cut-layer gradient every step),
with FedAvg's parallelism: in every round all clients train at once from the same global
head, and at the round's end the server averages their heads into the next global head.

The rounds are FedAvg's (``local-steps`` steps per client per round, the same public turn
schedule, so every client draws the same batches, t and noise as under every other
scheme). Within a round the server interleaves the clients' steps (client 0's first step,
client 1's first step, ..., then everyone's second), as one server fed by parallel
clients would, and keeps one server-side model (SplitFed's V2 variant: the server part is
trained sequentially on the clients' activations; V1 would keep a copy per client and
average those too). Heads are averaged with equal weight per step trained (what the
server knows; the clients' data sizes are private). Each round starts a fresh client
optimizer, as vanilla does per turn. A round of k steps per client costs k + 1 round
trips per client (the gradient of step i rides on the request for step i + 1; the last
returns the head).

Threat model: as vanilla (the server sees each step's head output, UNet first-conv
features, t, noise target and context, and chooses the gradients it returns), and it
also receives every client's head once per round.
"""
from __future__ import annotations

import dataclasses
import time

import torch

from sim.core.averaging import TailAverage
from sim.core.cuts import unet_first_conv

from .base import (
    Channel,
    SchemeResult,
    SplitServer,
    client_generator,
    progress,
    register,
    sample_batch,
    turn_schedule,
)
from .vanilla import (
    BATCH_FIELDS,
    ControlHead,
    HeadSplitServer,
    VanillaClient,
    VanillaReply,
    VanillaRequest,
)
from .vanilla import CUT as VANILLA_CUT

CUT = dataclasses.replace(VANILLA_CUT, scheme="splitfed")  # vanilla's cut: the client trains the head
MESSAGE_TYPE = "query.splitfed"


class SplitFedClient(VanillaClient):
    """Vanilla's client: trains its head with the returned gradients; the head arrives each round."""

    scheme = "splitfed"


def average(states: list[dict], weights: list[float]) -> dict:
    """The weighted average of state dicts (FedAvg's aggregation)."""
    total = float(sum(weights))
    return {k: sum(s[k] * (w / total) for s, w in zip(states, weights)) for k in states[0]}


def rounds_of(turns: list[tuple[int, int]], num_clients: int) -> list[list[tuple[int, int]]]:
    """The turn schedule grouped into rounds: one turn per client each (the last round may be short)."""
    return [turns[i:i + num_clients] for i in range(0, len(turns), num_clients)]


def interleaved(round_turns: list[tuple[int, int]]) -> list[int]:
    """The order in which the server serves one round's steps: each client's j-th step, j = 0, 1, ..."""
    steps = dict(round_turns)
    return [cid for j in range(max(steps.values())) for cid in steps if steps[cid] > j]


@register
class SplitFedStrategy(HeadSplitServer):
    """Server side: one server-side ControlNet fed by all clients in parallel; heads averaged per round."""

    name = "splitfed"
    order = 3
    client_class = SplitFedClient
    message_type = MESSAGE_TYPE
    cut = CUT
    relay = "round"  # every client's head crosses once per round each way (sent, then averaged)
    concurrency = "parallel-split"  # every client's round trips at once, one server model

    def start(self, channel: Channel) -> SchemeResult:
        t0 = time.perf_counter()
        server_s, losses = 0.0, []
        bar = progress(self.settings.steps, self.name)
        turns = turn_schedule(self.settings.steps, channel.num_clients, self.settings.local_steps)
        expect = self.reply_expect()
        channel.tolerate_failures(self.settings.on_client_failure == "skip")
        all_rounds = rounds_of(turns, channel.num_clients)
        tail = TailAverage(len(all_rounds), self.settings.average_from)
        for rnd, round_turns in enumerate(all_rounds, start=1):
            pending = {cid: VanillaRequest(head=self.head_state) for cid, _ in round_turns}
            failed: set[int] = set()  # on-client-failure=skip: out of this round (recorded), head not averaged
            for cid in interleaved(round_turns):
                if cid in failed:
                    continue
                failed.add(cid)  # until its step succeeds
                with channel.guard():
                    reply = channel.call(cid, pending[cid], VanillaReply, steps=(len(losses), 1), round=rnd,
                                         expect=expect)
                    if reply.control_features is None:
                        raise RuntimeError(f"splitfed: client {cid} sent no batch")
                    s0 = time.perf_counter()
                    loss, grad = self.train_step(*(getattr(reply, n) for n in BATCH_FIELDS))
                    server_s += time.perf_counter() - s0
                    losses.append(loss)
                    pending[cid] = VanillaRequest(control_features_grad=grad)
                    bar.update()
                    failed.discard(cid)
            heads, weights = [], []
            for cid, k in round_turns:
                if cid in failed:
                    continue
                pending[cid].want_batch = False
                with channel.guard():
                    reply = channel.call(cid, pending[cid], VanillaReply, steps=(len(losses), 0), round=rnd,
                                         expect=expect)
                    if reply.head is None:
                        raise RuntimeError(f"splitfed: client {cid} did not return its head at the end of round {rnd}")
                    heads.append(reply.head)
                    weights.append(k)
            if heads:  # a round whose every client failed keeps the global head
                self.head_state = average(heads, weights)
            if losses:
                bar.set_postfix(loss=f"{losses[-1]:.4f}", round=rnd)
            tail.add(rnd, lambda: self.merged(self.head_state).state_dict())
        bar.close()
        return SchemeResult(self.name, tail.apply(self.merged(self.head_state)), losses, len(losses),
                            time.perf_counter() - t0, server_s, channel.transcript,
                            server_trainable_params=self.server_trainable_params(), extra={"rounds": len(all_rounds)})

    @staticmethod
    def bare(envs, controlnet, settings, turns) -> list[float]:
        base = envs[0].base
        server = SplitServer(base.unet, controlnet, envs[0].scheduler, settings, off_server=CUT.client_trainable)
        gens = [client_generator(e.seed, c) for c, e in enumerate(envs)]
        global_head = ControlHead(controlnet).state_dict()
        losses = []
        for round_turns in rounds_of(turns, len(envs)):
            heads, opts = {}, {}
            for cid, _ in round_turns:
                heads[cid] = ControlHead(controlnet).train()
                heads[cid].load_state_dict(global_head)
                opts[cid] = torch.optim.AdamW(heads[cid].parameters(), lr=settings.lr)
            for cid in interleaved(round_turns):
                b = sample_batch(base, envs[cid].scheduler, envs[cid].data, settings.batch_size, gens[cid],
                                 settings.prompt_dropout, encodings=envs[cid].encodings)
                act = heads[cid](b.x_t, b.hint)
                with torch.no_grad():
                    uf = unet_first_conv(base.unet, b.x_t)
                opts[cid].zero_grad(set_to_none=True)
                losses.append(server.server_step(act, uf, b.t, b.noise, b.context))  # backprop reaches the head
                opts[cid].step()
            global_head = average([heads[c].state_dict() for c, _ in round_turns], [k for _, k in round_turns])
        return losses

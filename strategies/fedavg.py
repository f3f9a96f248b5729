"""Federated averaging (McMahan et al. 2017): every client trains its own ControlNet copy.

Client: holds everything (autoencoder, text encoder, frozen UNet, a ControlNet copy)
and, per round, loads the global ControlNet, trains ``local_steps`` batches with a fresh
AdamW and returns its weights and sample count. Server: the example-weighted average of
the returned weights. Nothing crosses per step; the whole ControlNet crosses each way
per round, and the device must hold and train the full model (the paper's objection at
SD1.5 scale: >1 B parameters, ~1.4 GB upload per round).

Threat model: the server sees model updates only; gradient-inversion attacks (a later
issue) work on those.
"""
from __future__ import annotations

import copy
import time

import torch
from torch import nn

from sim.cuts import controlled_eps

from .base import (InProcessTransport, Payload, SchemeClient, SchemeResult, TrainSettings, diffusion_loss,
                   payload_to_state, progress, state_to_payload, turn_schedule)


class FedAvgClient(SchemeClient):
    def __init__(self, *args, controlnet: nn.Module, **kwargs):
        super().__init__(*args, **kwargs)
        self.controlnet = copy.deepcopy(controlnet).train()

    def held_modules(self) -> list[nn.Module]:
        return super().held_modules() + [self.base.unet, self.controlnet]

    def on_fit(self, payload: Payload) -> Payload:
        self.controlnet.load_state_dict(payload_to_state(payload, "controlnet"))
        opt = torch.optim.AdamW(self.controlnet.parameters(), lr=self.settings.lr)
        losses = []
        for _ in range(int(payload["local_steps"])):
            b = self.next_batch()
            eps_hat = controlled_eps("fedavg", self.base.unet, self.controlnet, self.base.autoencoder,
                                     b.x_t, b.t, b.context, b.hint)
            loss = diffusion_loss(eps_hat, b.noise, b.t, self.scheduler, self.settings)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return {**state_to_payload(self.controlnet, "controlnet"), "num_examples": len(self.data),
                "losses": torch.tensor(losses)}


def weighted_average(states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """FedAvg aggregation: sum_i w_i * state_i / sum_i w_i, key by key."""
    total = float(sum(weights))
    return {k: sum(s[k].float() * (w / total) for s, w in zip(states, weights)).to(states[0][k].dtype)
            for k in states[0]}


class FedAvgStrategy:
    """Server side: broadcast the global ControlNet, collect local updates, average."""

    name = "fedavg"
    client_class = FedAvgClient

    def __init__(self, unet, controlnet, scheduler, settings: TrainSettings):
        self.unet = unet  # the server's frozen UNet (fedavg: unused)
        self.controlnet = copy.deepcopy(controlnet)
        self.settings = settings
        self.initial = controlnet

    def client_kwargs(self) -> dict:
        """What a client needs from the server at start-up besides the recipe: the initial ControlNet."""
        return {"controlnet": self.initial}

    def start(self, transport: InProcessTransport) -> SchemeResult:
        t0 = time.perf_counter()
        server_s, losses, rounds = 0.0, [], 0
        turns = turn_schedule(self.settings.steps, transport.num_clients, self.settings.local_steps)
        n = transport.num_clients
        bar = progress(self.settings.steps, self.name)
        for r in range(0, len(turns), n):  # a round: every client once, from the same global model
            global_state = state_to_payload(self.controlnet, "controlnet")
            replies = [(transport.call(cid, "fit", {**global_state, "local_steps": k})) for cid, k in turns[r:r + n]]
            s0 = time.perf_counter()
            states = [payload_to_state(rep, "controlnet") for rep in replies]
            self.controlnet.load_state_dict(weighted_average(states, [rep["num_examples"] for rep in replies]))
            server_s += time.perf_counter() - s0
            for rep in replies:  # per-step losses in the order the turn schedule ran them
                losses.extend(rep["losses"].tolist())
            rounds += 1
            bar.update(sum(k for _, k in turns[r:r + n]))
            bar.set_postfix(loss=f"{losses[-1]:.4f}", round=rounds)
        bar.close()
        return SchemeResult(self.name, self.controlnet.eval(), losses, len(losses), time.perf_counter() - t0,
                            server_s, transport.stats, server_trainable_params=0, extra={"rounds": rounds})

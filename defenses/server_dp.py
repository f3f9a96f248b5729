"""Central DP for FedAvg with server-side fixed clipping: Flower's own wrapper.

The FedAvg server runs our Flower strategy (``strategies.fedavg._TurnFedAvg``, a
``flwr.serverapp.strategy.FedAvg``) wrapped in Flower's
``flwr.serverapp.strategy.DifferentialPrivacyServerSideFixedClipping`` (McMahan et al.
2018, "Learning differentially private recurrent language models"; Andrew et al. 2021):
each client's update (its weights minus the round's global weights) is clipped to L2
norm ``clipping-norm`` = C, the clipped updates are averaged by FedAvg, and Gaussian
noise of std ``noise-multiplier`` * C / m is added to the average (m = clients in the round).

Two small adaptations, both in :class:`TurnDPFixedClipping` (the clipping, the averaging
and the noise formula stay Flower's):

* m per round: the turn schedule's last round may train fewer clients than the others,
  so ``num_sampled_clients`` is set to the number of clients configured each round
  (Flower's fixed value would mis-scale the noise and warn about missing replies).
* the noise is drawn from a numpy generator seeded by the parameter ``seed`` (Flower draws
  from numpy's global RNG), so a run is reproducible; the noise distribution is
  unchanged. As with the clients' private noise elsewhere in this simulation, a known
  seed lets anyone regenerate the noise: a deployment must draw it from a secret source.

Flower's own accountant (``accountant=``) needs Google's ``dp-accounting`` package, which
is not installed, so it is not used; :meth:`ServerDP.accounting` does the same
no-amplification accounting (every client takes part in every round it is scheduled):
R rounds of a Gaussian mechanism with multiplier s compose to mu = sqrt(R)/s
(``accounting.composed_epsilon``).

What it protects: client-level (all of one client's data) (epsilon, delta)-DP for the
*released global model* (and anything computed from it), against other clients and the
model's users. It does nothing against the server itself, which sees every raw update
before clipping: use ``dp-sgd`` against the server. The noise calibration (sensitivity
C/m of the average) holds for equal client weights; FedAvg weights clients by their
number of examples, so with unequal partitions the worst-case sensitivity is C times the
largest weight share (reported by :meth:`ServerDP.accounting` when known).

Hook: fl-server (``wrap_strategy``). Schemes: fedavg (the scheme that offers the hook).
"""
from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping
from flwr.supercore.differential_privacy import compute_stdv

from . import accounting
from .base import Defense, register

NOISE_SEED = 4_242  # the server's noise stream: numpy default_rng(seed * NOISE_SEED + 1)


class TurnDPFixedClipping(DifferentialPrivacyServerSideFixedClipping):
    """Flower's server-side fixed-clipping DP wrapper, with m = the clients of each round and a seeded noise stream."""

    def __init__(self, strategy, noise_multiplier: float, clipping_norm: float, num_sampled_clients: int,
                 seed: int = 0):
        super().__init__(strategy, noise_multiplier, clipping_norm, num_sampled_clients)
        self.rng = np.random.default_rng(int(seed) * NOISE_SEED + 1)
        self.noise_std: list[float] = []  # per round, for the record

    def configure_train(self, server_round, arrays, config, grid):
        messages = list(super().configure_train(server_round, arrays, config, grid))
        if messages:
            self.num_sampled_clients = len(messages)
        return messages

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        want = list(self.current_arrays.keys())
        for r in replies:
            for rec in r.content.array_records.values():
                if list(rec.keys()) != want:  # Flower clips by position: the layouts must agree
                    raise ValueError("server-dp: a client's arrays are not in the global model's layout")
        return super().aggregate_train(server_round, replies)

    def _add_noise_to_aggregated_arrays(self, aggregated_arrays: ArrayRecord) -> ArrayRecord:
        std = compute_stdv(self.noise_multiplier, self.clipping_norm, self.num_sampled_clients)
        self.noise_std.append(std)
        out = {}
        for k, v in zip(aggregated_arrays.keys(), aggregated_arrays.to_numpy_ndarrays(), strict=True):
            out[k] = Array(np.asarray(v + self.rng.normal(0.0, std, v.shape).astype(v.dtype)))
        return ArrayRecord(out)


@register
class ServerDP(Defense):
    """Flower's central DP with server-side fixed clipping around FedAvg (client-level DP for the released model)."""

    name = "server-dp"
    hooks = ("fl-server",)
    why_not = "the split servers aggregate no client updates (use local-dp or latent-dp for the split schemes)"
    params = {"noise-multiplier": 1.0, "clipping-norm": 1.0, "delta": 1e-5, "seed": 0}
    at_inference = False
    accounted = True
    releases_per = "round"
    threat_model = ("protects the released global model against other clients and its users (client-level DP); "
                    "NOT against the server, which sees the raw updates")

    def validate(self) -> None:
        p = self.p
        if not p["noise-multiplier"] >= 0:
            raise ValueError(f"defense 'server-dp': noise-multiplier must be >= 0, got {p['noise-multiplier']}")
        if not p["clipping-norm"] > 0:
            raise ValueError(f"defense 'server-dp': clipping-norm must be > 0, got {p['clipping-norm']}")
        if not 0 < p["delta"] < 1:
            raise ValueError(f"defense 'server-dp': delta must be in (0, 1), got {p['delta']}")
        if p["seed"] < 0:
            raise ValueError(f"defense 'server-dp': seed must be >= 0, got {p['seed']}")

    def wrap_strategy(self, strategy, num_clients: int):
        return TurnDPFixedClipping(strategy, self.p["noise-multiplier"], self.p["clipping-norm"], num_clients,
                                   seed=self.p["seed"])

    def accounting(self, scheduler=None, releases: float = 1.0, weight_shares=None) -> dict:
        """``releases``: the rounds a client takes part in; ``weight_shares``: the clients' FedAvg weights
        (fractions), if known, for the sensitivity caveat."""
        s, delta = self.p["noise-multiplier"], self.p["delta"]
        out = {"mechanism": "Flower DifferentialPrivacyServerSideFixedClipping: clip each client update to C, "
                            "FedAvg, add N(0, (s C / m)^2); no sampling amplification; GDP composition over rounds",
               "epsilon_per_round": accounting.epsilon_for(s, delta) if s > 0 else float("inf"),
               "epsilon": accounting.composed_epsilon(s, releases, delta) if s > 0 else float("inf"),
               "epsilon_per_run": accounting.composed_epsilon(s, releases, delta) if s > 0 else float("inf"),
               "covers": "all of one client's data (client-level), over the rounds it takes part in",
               "delta": delta, "rounds": releases, "noise_multiplier": s, "clipping_norm": self.p["clipping-norm"],
               "level": "client (all of one client's data)",
               "assumes": "equal client weights (sensitivity C/m of the average); the server is trusted"}
        if weight_shares:
            m = len(weight_shares)
            out["sensitivity_factor_unequal_weights"] = max(weight_shares) * m  # 1 when the weights are equal
        return out

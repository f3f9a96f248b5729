"""Training schemes, one file each, registered by name.

``fedavg`` (federated averaging, through Flower's own FedAvg), ``vanilla`` (split
learning with cut-layer gradient return) and ``nograd`` (the paper's no-gradient-return
split learning). Each is a strategy class (server side, ``start(channel)``) plus a
client class (``serve(request) -> reply``) speaking typed messages (:mod:`sim.wire`);
see :mod:`strategies.base`.
"""
from .base import Channel, ClientEnv, SchemeResult
from .fedavg import FedAvgStrategy
from .nograd import NoGradStrategy
from .vanilla import VanillaStrategy

STRATEGIES = {s.name: s for s in (FedAvgStrategy, VanillaStrategy, NoGradStrategy)}


def get_strategy(name: str):
    if name not in STRATEGIES:
        raise ValueError(f"unknown scheme {name!r}; choose one of {list(STRATEGIES)}")
    return STRATEGIES[name]


__all__ = ["STRATEGIES", "get_strategy", "Channel", "ClientEnv", "SchemeResult"]

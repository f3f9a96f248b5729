"""Training schemes, one file each, registered by name.

``fedavg`` (federated averaging), ``vanilla`` (split learning with cut-layer gradient
return) and ``nograd`` (the paper's no-gradient-return split learning). Each is a
strategy class (server side, with ``start(transport)``) plus a client class whose
``handle(method, payload)`` answers messages; see :mod:`strategies.base`.
"""
from .base import InProcessTransport, SchemeResult
from .fedavg import FedAvgStrategy
from .nograd import NoGradStrategy
from .vanilla import VanillaStrategy

STRATEGIES = {s.name: s for s in (FedAvgStrategy, VanillaStrategy, NoGradStrategy)}


def get_strategy(name: str):
    if name not in STRATEGIES:
        raise ValueError(f"unknown scheme {name!r}; choose one of {list(STRATEGIES)}")
    return STRATEGIES[name]


__all__ = ["STRATEGIES", "get_strategy", "InProcessTransport", "SchemeResult"]

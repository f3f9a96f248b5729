"""Training schemes, one file each, registered by name.

``fedavg`` (federated averaging, through Flower's own FedAvg), ``vanilla`` (split
learning with cut-layer gradient return), ``nograd`` (the paper's no-gradient-return
split learning) and ``splitfed`` (Thapa et al.'s SplitFed: vanilla's cut, clients in
parallel, heads averaged each round). Each file defines a strategy class and registers
it (:func:`strategies.base.register`); every module of this package is imported here, so
a new scheme is one new file. The interface a scheme implements: :mod:`strategies.base`.
"""
import importlib
import pkgutil

from .base import (
    SCHEMES,
    Channel,
    ClientEnv,
    Scheme,
    SchemeResult,
    get_strategy,
    register,
)

for _m in pkgutil.iter_modules(__path__):
    if _m.name != "base":
        importlib.import_module(f"{__name__}.{_m.name}")

# listing order (tables, figures): each class's ``order``, then its name
for _name in sorted(SCHEMES, key=lambda n: (SCHEMES[n].order, n)):
    SCHEMES[_name] = SCHEMES.pop(_name)
STRATEGIES = SCHEMES  # name -> strategy class

__all__ = ["SCHEMES", "STRATEGIES", "get_strategy", "register", "Channel", "ClientEnv", "Scheme", "SchemeResult"]

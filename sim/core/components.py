"""What defenses and attacks share: named components with typed parameters, selected by spec strings.

A spec string names a registered component and sets parameters:
``"noise:std=0.5"``, ``"inverse-net:steps=300,width=64"``. Parameter types come from the
class's ``params`` defaults; unknown names and bad values fail naming the component.
"""
from __future__ import annotations

import math


class Component:
    """Base of :class:`defenses.base.Defense` and :class:`attacks.base.Attack`."""

    kind = "component"  # "defense" | "attack", for messages
    name: str = ""
    params: dict = {}

    def __init__(self, **params):
        unknown = set(params) - set(self.params)
        if unknown:
            raise ValueError(f"{self.kind} {self.name!r} has no parameter(s) {sorted(unknown)}; "
                             f"its parameters: {self.params or 'none'}")
        self.p = {**self.params, **{k: coerce(f"{self.kind} {self.name!r}", k, v, self.params[k])
                                    for k, v in params.items()}}
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming a bad parameter."""

    def __repr__(self) -> str:
        changed = {k: v for k, v in self.p.items() if v != self.params[k]}
        if not changed:
            return self.name
        return self.name + ":" + ",".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}"
                                          for k, v in changed.items())


def parse_bool(value) -> bool:
    """A bool from a TOML bool or a string true/false/1/0 (ValueError otherwise)."""
    if isinstance(value, str):
        if value.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"not a bool: {value!r}")
        return value.lower() in ("true", "1")
    return bool(value)


def coerce(owner: str, key: str, value, default):
    """``value`` (often a string from a spec) as the type of ``default``."""
    typ = type(default)
    try:
        if typ is bool:
            return parse_bool(value)
        if typ is int and isinstance(value, str):
            return int(value)
        out = typ(value)
    except (TypeError, ValueError):
        raise ValueError(f"{owner}: bad value {value!r} for {key!r} (expected {typ.__name__})") from None
    if typ is float and not math.isfinite(out):  # inf and nan pass range checks: refuse them here
        raise ValueError(f"{owner}: {key}={value!r} must be a finite number")
    return out


def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    """``"noise:std=0.5,seed=1"`` -> ("noise", {"std": "0.5", "seed": "1"})."""
    name, _, rest = spec.strip().partition(":")
    params = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"spec {spec!r}: parameter {item!r} needs the form key=value")
        params[key.strip().replace("_", "-")] = value.strip()
    return name.strip(), params


class Registry(dict):
    """name -> component class; ``register`` is a class decorator; ``make(spec)`` builds one."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def register(self, cls):
        if not cls.name or cls.name in self:
            raise ValueError(f"{self.kind} name {cls.name!r} is empty or taken")
        self[cls.name] = cls
        return cls

    def make(self, spec: str):
        name, params = parse_spec(spec)
        if name not in self:
            raise ValueError(f"unknown {self.kind} {name!r}; known: {sorted(self)}")
        return self[name](**params)

"""The client-side half of a run folder: the only reader and writer of ``clients.toml``.

A run folder keeps the two parts of its configuration apart: ``config.toml`` holds the
public keys (what the server knew), ``clients.toml`` the client-side ones
(:data:`sim.core.config.CLIENT_KEYS`: ``data-seed``, ``client-seed``). Only the harness
reads the second: the runner that provisions the clients, the scorer that replays them
after an attack returns, evaluation that samples as client 0. It sits in the engine
layer, above attacks/, so no attack can import it (tests/test_layers.py).

Under Flower's engines the same keys travel in each SuperNode's node config
(``--node-config "partition-id=0 num-partitions=2 data-seed=1 client-seed=..."``).
"""
from __future__ import annotations

import secrets
import tomllib
import typing
from pathlib import Path

from sim.core.config import CLIENT_KEYS, FRESH, ExperimentConfig, public_values

CLIENTS_FILE = "clients.toml"


def draw_client_seed() -> int:
    """A fresh client seed from the operating system's entropy (63 bits)."""
    return secrets.randbits(63)


def resolved(cfg: ExperimentConfig) -> ExperimentConfig:
    """``cfg`` with a concrete client seed: a fresh one where it is unset (-1), else unchanged."""
    return cfg.with_client_seed(draw_client_seed()) if cfg.client_seed == FRESH else cfg


def write_run_config(out: str | Path, cfg: ExperimentConfig) -> None:
    """config.toml (public keys only) and clients.toml (client-side keys) of a run folder."""
    out = Path(out)
    if cfg.client_seed == FRESH:
        raise ValueError("write_run_config needs a resolved client seed (see resolved())")
    (out / "config.toml").write_text(cfg.public().to_toml())
    (out / CLIENTS_FILE).write_text("# client-side keys: what only the clients know; never shown to the server\n"
                                    + cfg.client_toml())


def client_values(run_dir: str | Path) -> dict:
    """The client-side keys of a finished run (clients.toml; empty for runs made before it existed,
    whose data-seed was the default and whose private draws were seeded from the public seed)."""
    path = Path(run_dir) / CLIENTS_FILE
    if not path.exists():
        return {}
    try:
        values = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: not valid TOML ({e})") from None
    unknown = sorted(set(values) - set(CLIENT_KEYS))
    if unknown:
        raise ValueError(f"{path}: unknown client-side key(s) {unknown}; known: {list(CLIENT_KEYS)}")
    return {k.replace("-", "_"): int(v) for k, v in values.items()}


def load_run_config(run_dir: str | Path, overrides: typing.Iterable[str] = ()) -> ExperimentConfig:
    """The whole configuration a finished run was made with: config.toml + clients.toml, then
    ``overrides`` (public keys only; :func:`sim.core.config.public_values`)."""
    return ExperimentConfig(**public_values(run_dir, overrides), **client_values(run_dir))


def from_node_config(node_config: typing.Mapping) -> dict:
    """The client-side keys a SuperNode's node config gives (kebab-case -> field names, ints)."""
    out = {}
    for key in CLIENT_KEYS:
        if key in node_config:
            try:
                out[key.replace("-", "_")] = int(node_config[key])
            except (TypeError, ValueError):
                raise ValueError(f"node config {key}={node_config[key]!r} is not an integer") from None
    return out

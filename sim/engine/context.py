"""One run context: what a run loads once per process, for the runner, the Flower apps, bench and evaluation.

:func:`context_for` returns the :class:`RunContext` of a public configuration (cached per
process, so a ServerApp and the ClientApps it drives in the same process share one): the
frozen base model, its noise scheduler, the public initial ControlNet (seeded by the
public ``seed``), the public recipe, the public evaluation set and the fingerprint of the
frozen parts. The clients' private data is loaded only on request, from an
:class:`sim.core.config.ExperimentConfig` (which carries the client-side ``data-seed``):
:meth:`RunContext.client_data` for the harness and the ClientApp, never for the server.

:func:`check_components` checks a config's component names against the registries of the
layers below (schemes, defenses per scheme, attacks); :func:`load_experiment` is
:func:`sim.core.config.load_config` followed by it.
"""
from __future__ import annotations

import functools
import hashlib
import typing
from functools import cached_property

import torch

from attacks import make_attack
from defenses import DefenseStack
from sim.core.config import ExperimentConfig, PublicConfig, load_config
from sim.core.encodings import RecordEncodings
from sim.core.models import (
    build_controlnet,
    check_base_folder,
    configure_torch,
    ddpm_scheduler,
    get_preset,
    load_base,
)
from sim.core.splits import ClientData, client_partitions, eval_set
from strategies import SCHEMES, ClientEnv, get_strategy
from strategies.base import TrainSettings


def check_components(cfg: PublicConfig) -> PublicConfig:
    """Fail (ValueError naming the key) on an unknown scheme, a defense a scheme cannot serve, or an
    unknown attack or bad attack parameter; returns ``cfg``."""
    bad = [s for s in cfg.schemes if s not in SCHEMES]
    if bad:
        raise ValueError(f"schemes={list(cfg.schemes)} is not allowed: unknown {bad}; choose from {list(SCHEMES)}")
    # a base-model folder is checked against the model preset here, before any work (its configs only)
    preset = get_preset(cfg.model).at_resolution(cfg.resolution)
    preset = check_base_folder(preset, cfg.base_model) if cfg.base_model else preset
    timesteps = preset.num_train_timesteps
    if cfg.ddim_steps > timesteps:  # found before training, not after it
        raise ValueError(f"ddim-steps={cfg.ddim_steps} exceeds model={cfg.model!r}'s {timesteps} training timesteps")
    for scheme in cfg.schemes:  # fails naming the defense and why it cannot serve the scheme
        DefenseStack(cfg.defenses, get_strategy(scheme))
    for spec in cfg.attacks:
        make_attack(spec)
    return cfg


def load_experiment(preset: str = "default", overrides: typing.Iterable[str] = ()) -> ExperimentConfig:
    """A preset (name or .toml path) plus ``key=value`` overrides, type- and component-checked."""
    cfg = load_config(preset, overrides)
    check_components(cfg)
    return cfg


def fingerprint(*modules) -> str:
    """sha256 over every parameter and buffer: equal before and after training iff bit-identical."""
    h = hashlib.sha256()
    for m in modules:
        if m is None:
            continue
        for name, t in sorted(m.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class RunContext:
    """Models, recipe and public data of one public configuration, loaded once (see the module doc)."""

    def __init__(self, cfg: PublicConfig):
        if isinstance(cfg, ExperimentConfig):
            cfg = cfg.public()
        self.cfg = cfg
        configure_torch(cfg.threads)
        self.base = load_base(cfg.model, folder=cfg.base_model or None, image_size=cfg.resolution or None)
        self.scheduler = ddpm_scheduler(self.base.preset)
        self.settings = TrainSettings.from_config(cfg)
        torch.manual_seed(cfg.seed)
        self.controlnet = build_controlnet(self.base.unet, self.base.preset)  # the public initial ControlNet
        self.frozen_fingerprint = self.frozen_now()
        self._clients: dict[int, list[ClientData]] = {}
        self._encodings: dict[tuple[int, int], RecordEncodings] = {}

    def frozen_now(self) -> str:
        """The fingerprint of the frozen base (UNet, autoencoder, text encoder) as it is now."""
        return fingerprint(self.base.unet, self.base.autoencoder, self.base.text_encoder)

    @cached_property
    def eval_set(self) -> dict:
        """The public held-out evaluation set (:func:`sim.core.splits.eval_set`)."""
        return eval_set(self.cfg, self.base.preset.image_size)

    @cached_property
    def null_context(self) -> torch.Tensor:
        """The public embedding of the empty prompt (the server's context when prompts stay home)."""
        return self.base.encode_prompts([""])

    def client_data(self, cfg: ExperimentConfig) -> list[ClientData]:
        """Every client's private data; needs the client-side ``data-seed`` (cached per data seed)."""
        if not isinstance(cfg, ExperimentConfig):
            raise TypeError("client data needs the client-side keys (an ExperimentConfig), not the public config")
        if cfg.data_seed not in self._clients:
            self._clients[cfg.data_seed] = client_partitions(cfg, self.base.preset.image_size)
        return self._clients[cfg.data_seed]

    def client_env(self, cfg: ExperimentConfig, cid: int) -> ClientEnv:
        """Client ``cid``'s environment: the public model and recipe, its data and its client seed."""
        clients = self.client_data(cfg)
        if not 0 <= cid < len(clients):
            raise ValueError(f"partition-id={cid} but the run has num-clients={len(clients)}")
        key = (cfg.data_seed, cid)  # the client's per-record latents, kept across the envs of its messages
        if key not in self._encodings:
            self._encodings[key] = RecordEncodings(self.base.autoencoder, clients[cid])
        return ClientEnv(self.base, self.scheduler, self.settings, clients[cid], self.cfg.seed, self.controlnet,
                         cfg.client_seed, encodings=self._encodings[key])

    def public_client(self, scheme: str):
        """A client of ``scheme`` with no data and no secret: what the scheme makes a client hold and train."""
        cls = get_strategy(scheme).client_class
        return cls(0, ClientEnv(self.base, self.scheduler, self.settings, None, self.cfg.seed, self.controlnet))


def context_for(cfg: PublicConfig) -> RunContext:
    """The process's :class:`RunContext` for the public part of ``cfg`` (one per public configuration)."""
    return _context(cfg.public() if isinstance(cfg, ExperimentConfig) else cfg)


@functools.lru_cache(maxsize=2)
def _context(cfg: PublicConfig) -> RunContext:
    return RunContext(cfg)

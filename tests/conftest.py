"""Shared fixtures: tiny seeded models built from config (no committed weights needed)."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


class HashTextEncoder(torch.nn.Module):
    """A frozen stand-in text encoder for tests: a fixed random embedding per word."""

    def __init__(self, max_tokens: int, dim: int):
        super().__init__()
        self.max_tokens, self.dim = max_tokens, dim
        self.table = torch.nn.Embedding(4096, dim).requires_grad_(False)

    def forward(self, prompts):
        import zlib

        out = torch.zeros(len(prompts), self.max_tokens, self.dim)
        for i, p in enumerate(prompts):
            for j, w in enumerate(p.split()[: self.max_tokens]):
                out[i, j] = self.table.weight[zlib.crc32(w.encode()) % 4096]
        return out


def make_base(preset_name: str = "tiny", seed: int = 0):
    from sim.core.models import BaseModel, build_autoencoder, build_unet, get_preset

    p = get_preset(preset_name)
    unet = build_unet(p, seed=seed)
    return BaseModel(p, unet, build_autoencoder(p), HashTextEncoder(p.max_tokens, p.cross_attention_dim)).freeze()


def perturb_zero_convs(controlnet, std: float = 0.05, seed: int = 1):
    """ControlNet's zero convs make its residuals 0 at init; perturb them so tests see real residuals."""
    g = torch.Generator().manual_seed(seed)
    mods = list(controlnet.controlnet_down_blocks) + [controlnet.controlnet_mid_block,
                                                       controlnet.controlnet_cond_embedding.conv_out]
    with torch.no_grad():
        for m in mods:
            for prm in m.parameters():
                prm.copy_(torch.randn(prm.shape, generator=g) * std)
    return controlnet


def model_context(base, controlnet, settings, seed: int = 0, scheduler=None):
    """A :class:`sim.engine.context.RunContext` around given models (tests: tiny random bases, a chosen
    initial ControlNet, a recipe) instead of one loaded from a config: what ``run_strategy`` needs."""
    import types

    from sim.core.models import ddpm_scheduler
    from sim.engine.context import RunContext

    class ModelContext(RunContext):
        def __init__(self):  # RunContext's fields, from the given models (no config, no data)
            self.cfg = types.SimpleNamespace(seed=seed)
            self.base, self.controlnet, self.settings = base, controlnet, settings
            self.scheduler = scheduler if scheduler is not None else ddpm_scheduler(base.preset)
            self.frozen_fingerprint = self.frozen_now()
            self._clients = {}

    return ModelContext()


@pytest.fixture(scope="session")
def tiny_base():
    return make_base("tiny")


@pytest.fixture(scope="session")
def sd15_mini_base():
    return make_base("sd15-mini")


def through_wire(tensors: dict) -> dict:
    """Tensors as they arrive after crossing: serialised into a Flower ArrayRecord and back."""
    from flwr.app import ArrayRecord

    return ArrayRecord(torch_state_dict={k: v.detach() for k, v in tensors.items()}).to_torch_state_dict()

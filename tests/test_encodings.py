"""Cached encodings (sim.core.encodings): each client encodes each record once, and what it sends is unchanged."""
from __future__ import annotations

import torch

from sim.core.autoencoder import encode_hint
from sim.core.cuts import nograd_control_input
from sim.core.encodings import RecordEncodings
from sim.core.models import ddpm_scheduler
from sim.core.splits import ClientData
from strategies.base import ClientEnv, TrainSettings, sample_batch
from strategies.nograd import FeaturesRequest, NoGradClient


class CountingAE(torch.nn.Module):
    """Identity-like encoder that counts the images it encodes."""

    def __init__(self, deterministic: bool = True):
        super().__init__()
        self.deterministic = deterministic
        self.images = 0

    def encode(self, x):
        self.images += x.shape[0]
        return x * 0.5


def _data(n: int, size: int = 8, seed: int = 0) -> ClientData:
    g = torch.Generator().manual_seed(seed)
    return ClientData(torch.rand(n, 3, size, size, generator=g) * 2 - 1, torch.rand(n, 3, size, size, generator=g),
                      [f"p{i}" for i in range(n)])


def test_each_record_is_encoded_once_and_read_back_exactly():
    data, ae = _data(6), CountingAE()
    cache = RecordEncodings(ae, data)
    for idx in ([0, 1, 1, 2], [2, 3, 0], [5, 5, 4], [0, 1, 2, 3, 4, 5]):
        idx = torch.tensor(idx)
        assert torch.equal(cache.target(idx), data.target[idx] * 0.5)
        assert torch.equal(cache.hint(idx), encode_hint(CountingAE(), data.condition[idx]))
    assert ae.images == 2 * 6  # targets and hints: each record once
    assert cache.encoded == {"target": 6, "hint": 6}


def test_a_stochastic_encoder_is_not_cached():
    data, ae = _data(4), CountingAE(deterministic=False)
    cache = RecordEncodings(ae, data)
    for _ in range(3):
        cache.target(torch.tensor([0, 1]))
    assert ae.images == 6 and not cache.cached


def test_kl_latents_from_the_cache_match_a_direct_encoding(sd15_mini_base):
    ae = sd15_mini_base.autoencoder
    data = _data(3, size=sd15_mini_base.preset.image_size)
    cache = RecordEncodings(ae, data)
    cache.target(torch.tensor([2]))  # record 2 first, alone: the others come in a later call
    idx = torch.tensor([0, 2, 1])
    with torch.no_grad():
        torch.testing.assert_close(cache.target(idx), ae.encode(data.target[idx]), rtol=1e-5, atol=1e-5)
        x = torch.randn(3, *cache.hint(idx).shape[1:])
        torch.testing.assert_close(cache.hint(idx) + x, nograd_control_input(ae, x, data.condition[idx]),
                                   rtol=1e-5, atol=1e-5)


def test_nograd_client_sends_the_same_features_and_encodes_each_record_once(tiny_base):
    """Against a client whose cache is off (it re-encodes every draw, as the code did before): the same
    bytes, bit for bit, and the cached client's VAE ran once per record drawn (tiny: the identity)."""
    data = _data(5, size=tiny_base.preset.image_size)
    sched = ddpm_scheduler(tiny_base.preset)
    settings = TrainSettings(lr=1e-4, steps=8, local_steps=4, batch_size=3)
    cached = ClientEnv(tiny_base, sched, settings, data, 0)
    uncached = ClientEnv(tiny_base, sched, settings, data, 0)
    uncached.encodings.cached = False
    a, b = NoGradClient(0, cached), NoGradClient(0, uncached)
    for _ in range(2):  # two messages: the env's cache outlives the client object
        fa, fb = a.serve(FeaturesRequest(k=4)), b.serve(FeaturesRequest(k=4))
        for name in ("control_input", "unet_features", "t", "noise", "context"):
            assert torch.equal(getattr(fa, name), getattr(fb, name)), name
    drawn = 2 * 4 * 3
    assert uncached.encodings.encoded == {"target": drawn, "hint": drawn}
    assert cached.encodings.encoded["target"] == cached.encodings.encoded["hint"] <= len(data) < drawn


def test_sample_batch_without_a_cache_encodes_what_it_draws(tiny_base):
    data = _data(4, size=tiny_base.preset.image_size)
    b = sample_batch(tiny_base, ddpm_scheduler(tiny_base.preset), data, 3, torch.Generator().manual_seed(0),
                     hints=True)
    assert torch.equal(b.z0, data.target[b.idx]) and torch.equal(b.hint_latent, data.condition[b.idx] * 2 - 1)

"""A client's cached encodings: each private record's target and hint through the frozen autoencoder once.

What it does: :class:`RecordEncodings` memoises, per record of one client's data, the
latent of its target image ``E(target)`` and of its hint ``E(2 hint - 1)``
(:func:`sim.core.autoencoder.encode_hint`). A record is encoded the first time a batch
draws it (the records missing from the cache, in one call) and read from the cache after
that, so a client runs its VAE once per record, not once per step. Prompts need nothing
here: the text encoders cache their output per prompt string (:mod:`sim.core.text`).

What it needs: the frozen autoencoder and the client's data (``target`` in [-1, 1],
``condition`` in [0, 1]). Caching is exact only for a deterministic encoder: both
autoencoders of :mod:`sim.core.autoencoder` are (the KL one returns the posterior mean),
and they say so with ``deterministic = True``. An encoder without that mark is called on
every draw instead (a stochastic VAE would need its distribution's parameters cached and
a sample drawn per step, as diffusers' train_controlnet.py does; none is used here).

Threat model: the cache lives on the client, beside the data it is computed from, and is
never sent; it changes no value a client sends (the tiny preset's identity autoencoder
makes the training bit-identical with and without it).
"""
from __future__ import annotations

import torch

from sim.core.autoencoder import encode_hint


class RecordEncodings:
    """Per-record memo of ``E(target)`` and ``E(2 hint - 1)`` for one client's data (see the module doc).

    ``encoded`` counts the records encoded so far per kind (``target``, ``hint``): each record
    at most once with a deterministic encoder."""

    def __init__(self, autoencoder, data):
        self.autoencoder, self.data = autoencoder, data
        self.cached = bool(getattr(autoencoder, "deterministic", False))
        self._store: dict[str, torch.Tensor] = {}
        self._have: dict[str, torch.Tensor] = {}
        self.encoded = {"target": 0, "hint": 0}

    def target(self, idx: torch.Tensor) -> torch.Tensor:
        """The latents ``E(target)`` of records ``idx``."""
        return self._get("target", idx)

    def hint(self, idx: torch.Tensor) -> torch.Tensor:
        """The hint latents ``E(2 hint - 1)`` of records ``idx``."""
        return self._get("hint", idx)

    def _encode(self, kind: str, idx: torch.Tensor) -> torch.Tensor:
        self.encoded[kind] += len(idx)
        if kind == "target":
            return self.autoencoder.encode(self.data.target[idx])
        return encode_hint(self.autoencoder, self.data.condition[idx])

    @torch.no_grad()
    def _get(self, kind: str, idx: torch.Tensor) -> torch.Tensor:
        if not self.cached:
            return self._encode(kind, idx)
        have = self._have.get(kind)
        missing = idx.unique() if have is None else idx[~have[idx]].unique()
        if len(missing):
            z = self._encode(kind, missing)
            if have is None:
                n = len(self.data)
                self._store[kind] = torch.zeros((n, *z.shape[1:]), dtype=z.dtype, device=z.device)
                self._have[kind] = have = torch.zeros(n, dtype=torch.bool)
            self._store[kind][missing] = z
            have[missing] = True
        return self._store[kind][idx]

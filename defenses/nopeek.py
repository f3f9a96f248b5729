"""NoPeek (Vepakomma et al., "NoPeek: Information leakage reduction to share activations
in distributed deep learning", ICDMW 2020): decorrelate the sent activation from the input.

The vanilla client adds ``alpha * dCor(X, Z)`` to its objective, where X is the batch of
the client's inputs x_t (one flattened row per sample), Z the batch of its head's
outputs (flattened) and dCor the sample distance correlation (Szekely, Rizzo & Bakirov
2007), computed here from double-centred pairwise Euclidean distance matrices A, B:

    dCov^2(X, Z) = mean(A * B),   dCor(X, Z) = sqrt(dCov^2(X, Z) / sqrt(dCov^2(X, X) dCov^2(Z, Z)))

in [0, 1]; 0 iff independent (in the population limit). The client backpropagates this
term through its head together with the cut-layer gradient the server returns (the
server never sees it). Only x_t is decorrelated (the hint, the head's other input, is
not: VanillaClient passes x_t), and on a batch of B samples the estimate is biased
upward for small B. The term is a training-time regulariser: it changes the head, not
what is sent at inference, so nothing is applied when sampling.

Hook: loss, offered by the schemes whose client trains a head (vanilla, splitfed).
Threat model: makes learned inversion of the sent activation harder; no formal
guarantee, and the UNet branch still sends conv_in(x_t) unchanged.
"""
from __future__ import annotations

import torch

from .base import Defense, register


def _centred_distances(x: torch.Tensor) -> torch.Tensor:
    """Double-centred pairwise Euclidean distances of the rows of ``x`` (n, d)."""
    sq = (x * x).sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2 * x @ x.T).clamp_min(0)
    d = (d2 + 1e-12).sqrt() * (1 - torch.eye(x.shape[0], dtype=x.dtype, device=x.device))
    return d - d.mean(0, keepdim=True) - d.mean(1, keepdim=True) + d.mean()


def distance_correlation(x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Sample distance correlation of two batches (leading dim = samples; the rest is flattened)."""
    if x.shape[0] != z.shape[0]:
        raise ValueError(f"distance_correlation: batch sizes differ ({x.shape[0]} vs {z.shape[0]})")
    a = _centred_distances(x.flatten(1).double())
    b = _centred_distances(z.flatten(1).double())
    dcov_xz, dvar_x, dvar_z = (a * b).mean(), (a * a).mean(), (b * b).mean()
    denom = (dvar_x * dvar_z).sqrt()
    if denom <= 0:  # a constant batch: no dependence measurable
        return torch.zeros((), dtype=z.dtype, device=z.device) + 0 * z.sum()
    return (dcov_xz.clamp_min(0) / denom + 1e-12).sqrt().to(z.dtype)


@register
class NoPeek(Defense):
    """Add alpha x distance correlation between the client's input x_t and its sent activation to its loss."""

    name = "nopeek"
    hooks = ("loss",)
    why_not = "needs a trainable client part; nograd's client is frozen and FedAvg sends no features"
    params = {"alpha": 0.1}
    at_inference = False
    threat_model = "hinders inversion of the head's output by decorrelating it from x_t; no formal guarantee"

    def validate(self) -> None:
        if not self.p["alpha"] >= 0:
            raise ValueError(f"defense 'nopeek': alpha must be >= 0, got {self.p['alpha']}")

    def client_loss(self, inputs: torch.Tensor, activation: torch.Tensor) -> torch.Tensor | None:
        return self.p["alpha"] * distance_correlation(inputs.detach(), activation)

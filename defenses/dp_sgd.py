"""DP-SGD (Abadi et al., CCS 2016) in the FedAvg client's local training.

Each local step: one batched forward pass gives one loss per sample; the gradient of
each *record* (a sample of the client's data; a record drawn twice in a batch has its
occurrences summed first, so it still contributes at most C) is computed with its own
backward pass (``torch.autograd.grad`` on the shared graph, B passes for B records; the
diffusers UNet and ControlNet normalise per sample, so this equals a per-sample forward),
clipped to L2 norm ``clip`` = C, and the optimizer (the client's AdamW: post-processing)
steps on

    g = (sum_records clip_C(g_r) + N(0, (noise-multiplier * C)^2 I)) / B

with the noise from the client-private generator. Opacus is not installed, and
``torch.func`` is not needed for this loop.

Accounting: the RDP accountant of the sampled Gaussian mechanism (Mironov, Talwar &
Zhang 2019; the accountant of TF Privacy and Opacus), exact at integer orders 2..256,
with sampling rate q = B / n (n = the client's data), composed over the client's T
local steps and converted to (epsilon, delta) with the conversion of Balle et al. 2020
(``accounting(scheduler, releases=T)``; ``rdp_epsilon``). For comparison it also reports
the GDP central-limit estimate, mu = q sqrt(T (e^{1/sigma^2} - 1)) (Dong, Roth & Su 2019),
converted with accounting.epsilon_for(1/mu, delta). Assumptions, stated honestly: both
assume Poisson subsampling, but the client draws its batches uniformly *with
replacement* (the shared batch stream keeps every scheme on the same images, t and
noise), so q = B/n is an approximation of the actual sampling (each record's inclusion
probability is 1 - (1 - 1/n)^B <= B/n; inclusions are not independent). The guarantee is
record-level for one client's data, for everything its updates reveal (its ControlNet
weights at the end of each round), by post-processing.

Parameters: ``clip`` (C), ``noise-multiplier`` (sigma/C), ``delta`` (for the reported
epsilon), ``sample-rate`` (q for the accountant; 0 = B/n, taken from the client's batch
and data size at its first step; until then q = 1, i.e. no amplification).

Hook: fl-client (``private_step``; strategies/fedavg.py calls it for each local step).
Schemes: fedavg (the scheme that offers the hook).
Threat model: honest-but-curious server (and anyone who sees the updates, e.g. gradient
inversion on FL updates); (epsilon, delta)-DP per client record under the assumptions above.
"""
from __future__ import annotations

import math

import torch

from . import accounting
from .base import Defense, register

ORDERS = tuple(range(2, 257))


def _log_comb(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def rdp_sampled_gaussian(q: float, sigma: float, order: int) -> float:
    """RDP at integer ``order`` of the Poisson-subsampled Gaussian mechanism (rate q, multiplier sigma)."""
    if q <= 0:
        return 0.0
    if q >= 1:
        return order / (2 * sigma ** 2)
    terms = [_log_comb(order, k) + (order - k) * math.log1p(-q) + k * math.log(q) + (k * k - k) / (2 * sigma ** 2)
             for k in range(order + 1)]
    m = max(terms)
    return (m + math.log(sum(math.exp(t - m) for t in terms))) / (order - 1)


def rdp_epsilon(q: float, sigma: float, steps: int, delta: float) -> tuple[float, int]:
    """(epsilon, best order) after ``steps`` sampled Gaussian steps (RDP, Balle et al. 2020 conversion)."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if sigma <= 0:
        return math.inf, 0
    if steps <= 0 or q <= 0:
        return 0.0, 0
    best = (math.inf, 0)
    for a in ORDERS:
        rdp = steps * rdp_sampled_gaussian(q, sigma, a)
        eps = rdp + math.log1p(-1 / a) - (math.log(delta) + math.log(a)) / (a - 1)
        best = min(best, (max(eps, 0.0), a))
    return best


def gdp_clt_epsilon(q: float, sigma: float, steps: int, delta: float) -> float:
    """The GDP central-limit estimate: mu = q sqrt(T (e^{1/sigma^2} - 1)), as (epsilon, delta)."""
    if sigma <= 0:
        return math.inf
    if q >= 1:
        return accounting.composed_epsilon(sigma, steps, delta)
    mu = q * math.sqrt(steps * math.expm1(1 / sigma ** 2))
    return 0.0 if mu == 0 else accounting.epsilon_for(1 / mu, delta)


def clipped_gradient_sum(losses: torch.Tensor, params: list[torch.Tensor], records: torch.Tensor,
                         clip: float) -> tuple[list[torch.Tensor], list[float]]:
    """(sum over records of each record's gradient clipped to L2 norm ``clip``, the records' norms
    before clipping). ``losses``: one per sample of the batch; ``records``: each sample's record id."""
    total = [torch.zeros_like(p) for p in params]
    uniq = torch.unique(records)
    norms = []
    for k, r in enumerate(uniq.tolist()):
        grads = torch.autograd.grad(losses[records == r].sum(), params, retain_graph=k < len(uniq) - 1,
                                    allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
        norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))
        norms.append(norm)
        scale = min(1.0, clip / norm) if norm > 0 else 0.0
        for t, g in zip(total, grads):
            t.add_(g, alpha=scale)
    return total, norms


@register
class DPSGD(Defense):
    """DP-SGD in FedAvg's local training: per-record clipping to C and Gaussian noise (multiplier x C), RDP-accounted."""

    name = "dp-sgd"
    hooks = ("fl-client",)
    why_not = ("it privatises FedAvg's whole-model local training; split clients leak through the features "
               "they send every step, which DP-SGD does not cover (use local-dp or latent-dp)")
    params = {"clip": 1.0, "noise-multiplier": 1.0, "delta": 1e-5, "sample-rate": 0.0}
    at_inference = False
    accounted = True
    releases_per = "client-step"
    threat_model = ("honest-but-curious server and anyone who sees the updates; record-level (epsilon, delta) "
                    "per client, Poisson sampling assumed (batches are drawn with replacement)")

    def validate(self) -> None:
        p = self.p
        if not p["clip"] > 0:
            raise ValueError(f"defense 'dp-sgd': clip must be > 0, got {p['clip']}")
        if not p["noise-multiplier"] >= 0:
            raise ValueError(f"defense 'dp-sgd': noise-multiplier must be >= 0, got {p['noise-multiplier']}")
        if not 0 < p["delta"] < 1:
            raise ValueError(f"defense 'dp-sgd': delta must be in (0, 1), got {p['delta']}")
        if not 0 <= p["sample-rate"] <= 1:
            raise ValueError(f"defense 'dp-sgd': sample-rate must be in [0, 1] (0: batch / client data), "
                             f"got {p['sample-rate']}")
        self.sample_rate = p["sample-rate"] or None  # learnt from the client's batch and data size otherwise
        self.steps = 0
        self.last_norms: list[float] = []

    def private_step(self, model, per_sample_loss, opt, gen, records=None, dataset_size=None) -> float:
        params = [p for g in opt.param_groups for p in g["params"] if p.requires_grad]
        losses = per_sample_loss()
        b = losses.shape[0]
        records = torch.arange(b) if records is None else records.to(losses.device)
        c, s = self.p["clip"], self.p["noise-multiplier"]
        total, self.last_norms = clipped_gradient_sum(losses, params, records, c)
        for p, t in zip(params, total):
            if s > 0:
                t.add_(torch.randn(p.shape, generator=gen, device=gen.device).to(t), alpha=s * c)
            p.grad = t.div_(b)
        opt.step()
        self.steps += 1
        if dataset_size and not self.p["sample-rate"]:
            self.sample_rate = min(1.0, b / dataset_size)
        return float(losses.detach().mean())

    def accounting(self, scheduler=None, releases: float = 1.0) -> dict:
        """``releases``: the local DP-SGD steps one client takes over the run."""
        q = self.sample_rate if self.sample_rate is not None else 1.0
        s, delta, steps = self.p["noise-multiplier"], self.p["delta"], int(math.ceil(releases))
        eps, order = rdp_epsilon(q, s, steps, delta)
        return {"mechanism": "DP-SGD: per-record clipping + Gaussian noise on the summed gradient; RDP accountant "
                             "of the Poisson-subsampled Gaussian (integer orders 2..256)",
                "epsilon": eps, "epsilon_per_run": eps, "delta": delta, "rdp_order": order,
                "covers": "each record of a FedAvg client (its image, hint and prompt), over the client's local steps", "steps": steps, "sample_rate": q,
                "noise_multiplier": s, "clip": self.p["clip"], "sensitivity": self.p["clip"],
                "epsilon_gdp_clt": gdp_clt_epsilon(q, s, steps, delta),
                "assumes": "Poisson sampling at rate q (the client samples with replacement: an approximation)"
                           + ("" if self.sample_rate is not None else
                              "; q = 1 (no amplification): the client's data size is not known yet")}

"""Privacy accounting for Gaussian mechanisms (shared by the accounted defenses).

We use the *analytic* Gaussian mechanism (Balle & Wang, ICML 2018), exact for any
epsilon (the textbook bound sigma >= sqrt(2 ln(1.25/delta)) Delta / epsilon holds only for
epsilon < 1). A mechanism M(x) = f(x) + N(0, sigma^2 I) with L2 sensitivity Delta is
(epsilon, delta)-DP iff

    delta >= Phi(Delta/(2 sigma) - epsilon sigma/Delta) - e^epsilon Phi(-Delta/(2 sigma) - epsilon sigma/Delta).

Only the ratio ``s = sigma / Delta`` (the noise multiplier) matters. It is mu-GDP with
mu = 1/s (Dong, Roth & Su 2019), and k releases of the same record compose to
mu sqrt(k): :func:`composed_epsilon`.

The diffusion forward process as a mechanism
---------------------------------------------
x_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps releases z0 with sensitivity
sqrt(abar_t) Delta(z0) and noise sqrt(1 - abar_t) -- but *only while eps stays secret*.
A server that receives the noise target eps subtracts it and sees z0 exactly
(:func:`diffusion_noise_multiplier` is then meaningless; see defenses/latent_dp.py).
"""
from __future__ import annotations

import math

from scipy.stats import norm


def delta_for(epsilon: float, s: float) -> float:
    """The smallest delta at which noise multiplier ``s`` = sigma/Delta gives ``epsilon``."""
    if s <= 0:
        return 1.0
    a, b = 1.0 / (2 * s), epsilon * s
    return max(0.0, float(norm.cdf(a - b) - math.exp(epsilon + norm.logcdf(-a - b))))  # log space: no overflow


def epsilon_for(s: float, delta: float) -> float:
    """The epsilon of one Gaussian release with noise multiplier ``s`` at ``delta`` (inf if s = 0)."""
    _check_delta(delta)
    if s <= 0:
        return math.inf
    if delta_for(0.0, s) <= delta:
        return 0.0
    lo, hi = 0.0, 1.0
    while delta_for(hi, s) > delta:
        hi *= 2
        if hi > 1e6:
            return math.inf
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if delta_for(mid, s) > delta else (lo, mid)
    return hi


def multiplier_for(epsilon: float, delta: float) -> float:
    """The smallest noise multiplier sigma/Delta that makes one release (epsilon, delta)-DP."""
    _check_delta(delta)
    if epsilon <= 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    lo, hi = 1e-6, 1.0
    while delta_for(epsilon, hi) > delta:
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if delta_for(epsilon, mid) > delta else (lo, mid)
    return hi


def composed_epsilon(s: float, releases: float, delta: float) -> float:
    """Epsilon after ``releases`` Gaussian releases of one record, each with multiplier ``s``
    (exact GDP composition: multiplier s / sqrt(releases))."""
    if releases <= 0:
        return 0.0
    return epsilon_for(s / math.sqrt(releases), delta)


def diffusion_noise_multiplier(abar: float) -> float:
    """sigma/Delta of x_t as a mechanism on z0 per unit sensitivity of z0: sqrt(1-abar)/sqrt(abar)
    (valid only while eps is secret)."""
    return math.inf if abar <= 0 else math.sqrt(1 - abar) / math.sqrt(abar)


def _check_delta(delta: float) -> None:
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta} (the reference code's delta = 1 promises nothing)")


def replace_one_sensitivity(dim: int, value_range: float = 2.0) -> float:
    """L2 sensitivity of a ``dim``-vector with entries in an interval of width ``value_range``
    under replacing one record by any other (worst case: every entry flips end to end)."""
    return value_range * math.sqrt(dim)

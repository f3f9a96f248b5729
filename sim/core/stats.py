"""Statistics of per-condition scores: standard errors and paired comparisons.

Every scheme (and the base model without control) is sampled on the same evaluation
conditions with the same initial noise, so two of them are compared condition by
condition: the paired difference ``a_i - b_i`` removes the spread between conditions
(some circles are easy for everyone) that an unpaired comparison of two means carries.
"""
from __future__ import annotations

import numpy as np
from scipy import stats

#: A paired difference counts as resolved when its two-sided p-value is below this.
RESOLVED_P = 0.05


def standard_error(values) -> float:
    """Standard error of the mean of per-image scores (sample std / sqrt(n)); 0 for one image.

    The eval set is a sample of conditions, so a mean score is an estimate: the outline IoU
    of a trained ControlNet (per image ~0 or ~1, std ~0.4) has a standard error of ~0.07 on
    32 conditions and ~0.035 on 128; differences below ~2 SE are noise."""
    v = np.asarray(values, dtype=np.float64)
    return float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0


def paired_comparison(a, b) -> dict:
    """Paired t-test of per-condition scores ``a`` against ``b`` (same conditions, same order).

    Returns ``diff`` (mean of a - b), its standard error ``diff_se``, the two-sided ``p``
    and ``resolved`` (p < :data:`RESOLVED_P`). Identical scores give diff 0, p 1.
    With binary scores (colour right or wrong) the paired t-test is the usual large-sample
    approximation of McNemar's test."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) < 2:
        raise ValueError(f"paired scores need two 1-D arrays of the same length >= 2, got {a.shape} and {b.shape}")
    d = a - b
    se = standard_error(d)
    if se == 0.0:
        p = 1.0 if d.mean() == 0 else 0.0
    else:
        p = float(stats.ttest_rel(a, b).pvalue)
    return {"diff": float(d.mean()), "diff_se": se, "p": p, "n": len(d), "resolved": p < RESOLVED_P}

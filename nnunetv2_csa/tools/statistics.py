"""The statistics of a comparison table: bootstrap confidence intervals of a mean paired
difference and Holm's correction for many tests. Plain NumPy/SciPy.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import stats

BOOTSTRAP_RESAMPLES = 9999
#: fixed, so that a report is reproducible from its per-patient numbers
BOOTSTRAP_SEED = 0


def bootstrap_mean_ci(differences: Sequence[float], confidence: float = 0.95,
                      n_resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean of ``differences`` (one per patient), with
    ``scipy.stats.bootstrap``. NaN for fewer than two values; a constant sample gives the
    degenerate interval (its value, its value)."""
    values = np.asarray([d for d in differences if np.isfinite(d)], dtype=float)
    if len(values) < 2:
        return (np.nan, np.nan)
    if np.all(values == values[0]):
        return (float(values[0]), float(values[0]))
    result = stats.bootstrap((values,), np.mean, confidence_level=confidence, n_resamples=n_resamples,
                             method="percentile", rng=np.random.default_rng(seed))
    return (float(result.confidence_interval.low), float(result.confidence_interval.high))


def holm_adjust(p_values: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjustment (family-wise error rate) of the finite ``p_values``; NaN
    stays NaN and does not count as a test. The k-th smallest of m p-values becomes
    max over j <= k of min(1, (m - j + 1) p_(j))."""
    p = np.asarray(p_values, dtype=float)
    adjusted = np.full(p.shape, np.nan)
    finite = np.flatnonzero(np.isfinite(p))
    m = len(finite)
    if m == 0:
        return adjusted
    order = finite[np.argsort(p[finite], kind="stable")]
    scaled = np.minimum(1.0, (m - np.arange(m)) * p[order])
    adjusted[order] = np.maximum.accumulate(scaled)
    return adjusted

"""Holm's adjustment against a hand-computed case and its defining properties; the
bootstrap interval of a mean paired difference."""
import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from nnunetv2_csa.tools.statistics import bootstrap_mean_ci, holm_adjust


def test_holm_hand_computed():
    # sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04 -> running max 0.06
    adjusted = holm_adjust([0.01, 0.04, 0.03, 0.005])
    np.testing.assert_allclose(adjusted, [0.03, 0.06, 0.06, 0.02])


def test_holm_leaves_nan_out_of_the_family():
    adjusted = holm_adjust([0.02, math.nan, 0.5])
    assert math.isnan(adjusted[1])
    np.testing.assert_allclose(adjusted[[0, 2]], [0.04, 0.5])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0, 1), min_size=1, max_size=30))
def test_holm_is_at_least_p_at_most_one_and_keeps_the_order(p):
    adjusted = holm_adjust(p)
    p = np.asarray(p)
    assert np.all(adjusted >= p - 1e-15) and np.all(adjusted <= 1.0)
    order = np.argsort(p, kind="stable")
    assert np.all(np.diff(adjusted[order]) >= -1e-15)
    assert adjusted[order[0]] == pytest.approx(min(1.0, len(p) * p[order[0]]))


def test_bootstrap_interval_contains_the_mean_and_is_reproducible():
    differences = [0.02, -0.01, 0.05, 0.03, 0.00, 0.04, 0.01, -0.02]
    low, high = bootstrap_mean_ci(differences)
    assert low < np.mean(differences) < high
    assert (low, high) == bootstrap_mean_ci(differences)
    # a wider confidence gives a wider interval
    low90, high90 = bootstrap_mean_ci(differences, confidence=0.90)
    assert low <= low90 and high90 <= high


def test_bootstrap_degenerate_samples():
    assert bootstrap_mean_ci([0.1, 0.1, 0.1]) == (0.1, 0.1)
    assert all(math.isnan(v) for v in bootstrap_mean_ci([0.3]))
    assert all(math.isnan(v) for v in bootstrap_mean_ci([]))

"""
Kernel Inception Distance (evaluations/kid.py) against a direct O(n^2) float64 loop, its subset
scheme, and the unbiasedness of the estimator.
"""

import numpy as np
import pytest
import torch

from evaluations.kid import kernel_inception_distance, mmd2_unbiased


def _mmd2_loops(x, y):
    """Unbiased MMD^2 with k(a, b) = (a . b / d + 1)^3, term by term in float64."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    m, d = x.shape
    k = lambda a, b: (float(np.dot(a, b)) / d + 1.0) ** 3
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j)
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m))
    return xx / (m * (m - 1)) + yy / (m * (m - 1)) - 2 * xy / (m * m)


def test_mmd2_matches_the_direct_sums():
    rng = np.random.default_rng(0)
    x = np.abs(rng.normal(0, 0.5, size=(25, 12)))
    y = np.abs(rng.normal(0.3, 0.5, size=(25, 12)))
    expected = _mmd2_loops(x, y)
    assert mmd2_unbiased(torch.from_numpy(x), torch.from_numpy(y)) == pytest.approx(expected, rel=1e-12)
    # float32 features (what the evaluator has): the matmul in float32, the rest in float64.
    got32 = mmd2_unbiased(torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y.astype(np.float32)))
    assert got32 == pytest.approx(_mmd2_loops(x.astype(np.float32), y.astype(np.float32)), rel=1e-5)
    assert expected > 0.01


def test_kid_is_the_mean_and_std_over_seeded_subsets():
    rng = np.random.default_rng(1)
    ref = rng.normal(size=(40, 8)).astype(np.float32)
    sample = (rng.normal(size=(30, 8)) * 1.3 + 0.2).astype(np.float32)
    mean, std = kernel_inception_distance(ref, sample, num_subsets=7, subset_size=12, seed=5)
    # The subsets: per subset, ref indices then sample indices, without replacement.
    draw = np.random.RandomState(5)
    values = []
    for _ in range(7):
        i = draw.choice(40, 12, replace=False)
        j = draw.choice(30, 12, replace=False)
        values.append(_mmd2_loops(ref[i], sample[j]))
    assert mean == pytest.approx(np.mean(values), rel=1e-5)
    assert std == pytest.approx(np.std(values), rel=1e-4)
    assert std > 0

    # The subset size is capped by the smaller set: 30 here, so every subset holds all samples.
    mean, std = kernel_inception_distance(ref, sample, num_subsets=3)
    draw = np.random.RandomState(2020)
    values = []
    for _ in range(3):
        i = draw.choice(40, 30, replace=False)
        j = draw.choice(30, 30, replace=False)
        values.append(_mmd2_loops(ref[i], sample[j]))
    assert mean == pytest.approx(np.mean(values), rel=1e-5)


def test_kid_is_unbiased_for_one_distribution():
    # Pairs of independent small sets from one distribution: the unbiased estimate averages to
    # 0 (within 4 standard errors), while the estimate that keeps the diagonal terms is biased
    # upwards far beyond that.
    rng = np.random.default_rng(2)
    unbiased, biased = [], []
    m, d = 20, 6
    for _ in range(300):
        x = rng.normal(size=(m, d))
        y = rng.normal(size=(m, d))
        unbiased.append(mmd2_unbiased(torch.from_numpy(x), torch.from_numpy(y)))
        k = lambda a, b: (a @ b.T / d + 1) ** 3
        biased.append(k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean())
    unbiased, biased = np.array(unbiased), np.array(biased)
    stderr = unbiased.std() / np.sqrt(len(unbiased))
    assert abs(unbiased.mean()) < 4 * stderr
    assert biased.mean() > 10 * stderr

    # And on one larger pair through the subset average: near 0 against a shifted set's KID.
    ref, same = rng.normal(size=(400, d)), rng.normal(size=(400, d))
    shifted = rng.normal(0.5, 1, size=(400, d))
    same_mean, _ = kernel_inception_distance(ref, same, num_subsets=20, subset_size=100)
    shifted_mean, _ = kernel_inception_distance(ref, shifted, num_subsets=20, subset_size=100)
    assert abs(same_mean) < 0.05 * shifted_mean


def test_kid_rejects_mismatched_features():
    with pytest.raises(ValueError, match="features of one dimension, got 3 and 4"):
        kernel_inception_distance(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="at least 2"):
        kernel_inception_distance(np.zeros((1, 3)), np.zeros((5, 3)))

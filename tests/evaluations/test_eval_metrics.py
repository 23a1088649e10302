"""
Metric functions of evaluations/ on feature arrays: Fréchet distance, Inception Score,
precision/recall, checked against closed forms and brute-force float64 computations.
"""

import numpy as np
import pytest
import torch

from evaluations import frechet
from evaluations.frechet import compute_statistics, frechet_distance
from evaluations.inception_score import inception_score, inception_score_from_probs
from evaluations.precision_recall import (
    ManifoldEstimator,
    _squared_distances_fp16,
    compute_prec_recall,
    pairwise_distances,
)


def _random_spd(rng, dim):
    a = rng.normal(size=(dim, dim))
    return a @ a.T + 0.5 * np.eye(dim)


def _frechet_closed_form(mu1, s1, mu2, s2):
    # Tr sqrt(S1 S2) = Tr sqrt(S1^1/2 S2 S1^1/2), whose eigenvalues come from a symmetric
    # eigendecomposition: an independent route from scipy's sqrtm of the non-symmetric product.
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(w)) @ v.T
    inner = np.linalg.eigvalsh(root1 @ s2 @ root1)
    tr_covmean = np.sqrt(np.clip(inner, 0, None)).sum()
    diff = mu1 - mu2
    return diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean


def test_frechet_distance_matches_closed_form_for_gaussians():
    rng = np.random.default_rng(0)
    for dim in (1, 3, 8):
        mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
        s1, s2 = _random_spd(rng, dim), _random_spd(rng, dim)
        expected = _frechet_closed_form(mu1, s1, mu2, s2)
        assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_frechet_distance_of_commuting_and_scalar_gaussians():
    # Diagonal covariances: ||mu1 - mu2||^2 + sum (sqrt(a) - sqrt(b))^2.
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 16.0])
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([3.0, 1.0, 0.0])
    expected = 9 + 0 + 4 + (1 - 2) ** 2 + (2 - 1) ** 2 + (3 - 4) ** 2
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected)
    # 1-d: (m1 - m2)^2 + (sd1 - sd2)^2, scalars accepted as ADM's atleast_1d/2d allow.
    assert frechet_distance(1.0, 4.0, -1.0, 9.0) == pytest.approx(4 + 1)


def test_identical_feature_sets_give_zero_fid():
    feats = np.random.default_rng(1).normal(size=(300, 16)).astype(np.float32)
    stats = compute_statistics(feats)
    assert stats.frechet_distance(compute_statistics(feats.copy())) == pytest.approx(0, abs=1e-8)


def test_statistics_are_numpy_mean_and_covariance():
    feats = np.random.default_rng(2).normal(size=(50, 5)).astype(np.float32)
    stats = compute_statistics(feats)
    np.testing.assert_array_equal(stats.mu, np.mean(feats, axis=0))
    np.testing.assert_array_equal(stats.sigma, np.cov(feats, rowvar=False))
    assert stats.mu.dtype == np.float32 and stats.sigma.dtype == np.float64
    with pytest.raises(ValueError, match="need at least 2 feature vectors for a covariance, got 1"):
        compute_statistics(feats[:1])


def test_singular_product_retries_with_eps_on_the_diagonals(monkeypatch):
    calls = []

    def fake_sqrtm(matrix):
        calls.append(matrix)
        return np.full_like(matrix, np.nan) if len(calls) == 1 else np.eye(len(matrix))

    monkeypatch.setattr(frechet, "_sqrtm", fake_sqrtm)
    s1, s2 = np.diag([1.0, 0.0]), np.diag([0.0, 2.0])
    with pytest.warns(UserWarning, match="adding 1e-06 to diagonal of cov estimates"):
        value = frechet_distance(np.zeros(2), s1, np.zeros(2), s2)
    offset = np.eye(2) * 1e-6
    np.testing.assert_array_equal(calls[1], (s1 + offset) @ (s2 + offset))
    assert value == pytest.approx(1 + 2 - 2 * 2)


def test_significant_imaginary_component_is_an_error(monkeypatch):
    monkeypatch.setattr(frechet, "_sqrtm", lambda m: np.eye(2) * (1 + 0.01j))
    with pytest.raises(ValueError, match="Imaginary component 0.01"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.eye(2))
    monkeypatch.setattr(frechet, "_sqrtm", lambda m: np.eye(2) * (0.5 + 1e-5j))
    assert frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.eye(2)) == pytest.approx(2)


def test_frechet_distance_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="mean vectors have different lengths"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(2))
    with pytest.raises(ValueError, match="covariances have different dimensions"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.eye(3))


def test_inception_score_of_uniform_predictions_is_one():
    assert inception_score_from_probs(np.full((100, 10), 0.1, np.float32)) == pytest.approx(1)
    assert inception_score(np.zeros((64, 1008), np.float32)) == pytest.approx(1, abs=1e-6)


def test_inception_score_of_evenly_spread_one_hot_predictions_is_the_class_count():
    classes = np.arange(1000) % 10
    one_hot = np.eye(10, dtype=np.float32)[classes]
    assert inception_score_from_probs(one_hot) == pytest.approx(10)
    # Logits with huge margins give softmax outputs that are one-hot in float32.
    assert inception_score(one_hot * 200.0) == pytest.approx(10, rel=1e-6)


def test_inception_score_is_averaged_over_splits_of_5000():
    first = np.eye(4, dtype=np.float32)[np.zeros(5000, dtype=int)]  # one class: score 1
    second = np.eye(4, dtype=np.float32)[np.arange(5000) % 4]  # four classes: score 4
    assert inception_score_from_probs(np.concatenate([first, second])) == pytest.approx(2.5)
    assert inception_score_from_probs(np.concatenate([first, second]), split_size=10000) > 1.5


def test_inception_score_matches_float64_formula():
    logits = np.random.default_rng(3).normal(size=(300, 20)).astype(np.float32) * 3
    z = logits.astype(np.float64)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    expected = np.mean(
        [
            np.exp(np.mean(np.sum(q * (np.log(q) - np.log(q.mean(0, keepdims=True))), 1)))
            for q in (p[:100], p[100:200], p[200:])
        ]
    )
    assert inception_score(logits, split_size=100) == pytest.approx(expected, rel=1e-5)


def _brute_force_sq_dists(u, v):
    u, v = np.asarray(u, np.float64), np.asarray(v, np.float64)
    return ((u[:, None, :] - v[None, :, :]) ** 2).sum(-1)


def test_pairwise_distances_exact_when_float16_is_exact():
    rng = np.random.default_rng(4)
    u = rng.integers(0, 4, size=(9, 8)).astype(np.float32)
    v = rng.integers(0, 4, size=(7, 8)).astype(np.float32)
    got = pairwise_distances(torch.from_numpy(u), torch.from_numpy(v))
    assert got.dtype == torch.float32
    np.testing.assert_array_equal(got.numpy(), _brute_force_sq_dists(u, v))


def test_pairwise_distances_use_float16_when_finite():
    rng = np.random.default_rng(5)
    u = torch.from_numpy(rng.normal(size=(20, 64)).astype(np.float32))
    v = torch.from_numpy(rng.normal(size=(30, 64)).astype(np.float32))
    got = pairwise_distances(u, v)
    assert torch.equal(got, got.half().float()), "values should be float16 numbers"
    np.testing.assert_allclose(got.numpy(), _brute_force_sq_dists(u, v), rtol=5e-3, atol=0.1)


def test_pairwise_distances_fall_back_to_float32_on_overflow():
    rng = np.random.default_rng(6)
    u = torch.from_numpy((300 + rng.normal(size=(6, 8))).astype(np.float32))
    v = torch.from_numpy((rng.normal(size=(5, 8)) - 300).astype(np.float32))
    assert not torch.isfinite(_squared_distances_fp16(u, v)).all()  # ~5.8e6 > float16 max
    got = pairwise_distances(u, v)
    assert torch.isfinite(got).all()
    assert not torch.equal(got, got.half().float())
    np.testing.assert_allclose(got.numpy(), _brute_force_sq_dists(u, v), rtol=1e-5)


def _brute_force_prec_recall(ref, sample, k=3):
    d_ref = _brute_force_sq_dists(ref, ref)
    d_sample = _brute_force_sq_dists(sample, sample)
    r_ref = np.sort(d_ref, axis=1)[:, k]  # the vector itself is column 0
    r_sample = np.sort(d_sample, axis=1)[:, k]
    d = _brute_force_sq_dists(ref, sample)
    precision = np.mean((d <= r_ref[:, None]).any(axis=0))
    recall = np.mean((d <= r_sample[None, :]).any(axis=1))
    return precision, recall


@pytest.mark.parametrize("rows,cols", [(10000, 10000), (10, 7), (1, 50)])
def test_precision_recall_match_brute_force(rows, cols):
    # Small integer features keep every float16 quantity exact, so results must agree exactly.
    rng = np.random.default_rng(7)
    ref = rng.integers(0, 4, size=(37, 8)).astype(np.float32)
    sample = (rng.integers(0, 4, size=(29, 8)) + rng.integers(0, 2, size=(29, 1))).astype(np.float32)
    expected = _brute_force_prec_recall(ref, sample)
    got = compute_prec_recall(ref, sample, row_batch_size=rows, col_batch_size=cols, progress=False)
    assert got == pytest.approx(expected, abs=0)
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1


def test_manifold_radii_are_the_third_neighbour():
    feats = np.array([[0.0], [1.0], [3.0], [6.0], [10.0]], np.float32)
    radii = ManifoldEstimator(progress=False).manifold_radii(feats)
    # Squared distance to the 3rd nearest other point, e.g. for 3: {9, 4, 9, 49} -> 9.
    np.testing.assert_array_equal(radii, [36, 25, 9, 25, 81])


def test_identical_sets_give_precision_and_recall_one():
    feats = np.random.default_rng(8).normal(size=(60, 32)).astype(np.float32)
    assert compute_prec_recall(feats, feats.copy(), progress=False) == (1.0, 1.0)


def test_disjoint_sets_give_precision_and_recall_zero():
    rng = np.random.default_rng(9)
    ref = rng.normal(size=(20, 4)).astype(np.float32)
    sample = ref + 50
    assert compute_prec_recall(ref, sample, progress=False) == (0.0, 0.0)


def test_precision_recall_need_k_plus_one_vectors():
    feats = np.zeros((3, 4), np.float32)
    with pytest.raises(ValueError, match="need at least 4 feature vectors for k=3"):
        compute_prec_recall(feats, np.zeros((10, 4), np.float32), progress=False)
    with pytest.raises(ValueError, match="feature dimensions differ"):
        compute_prec_recall(np.zeros((5, 4)), np.zeros((5, 3)), progress=False)

"""
Kernel Inception Distance (Binkowski et al., "Demystifying MMD GANs", 2018).

KID is the squared maximum mean discrepancy between the pool features of two sets under the
cubic polynomial kernel k(x, y) = (x . y / d + 1)^3, d the feature dimension. Its unbiased
estimator on sets X, Y of m features each is

    MMD^2 = sum_{i != j} k(x_i, x_j) / (m (m - 1)) + sum_{i != j} k(y_i, y_j) / (m (m - 1))
            - 2 sum_{i, j} k(x_i, y_j) / m^2,

which is 0 in expectation when both sets come from the same distribution (so it can be slightly
negative). It is averaged over random subsets, with the defaults of Binkowski et al.'s code and
torch-fidelity: 100 subsets of 1000 features from each set (drawn without replacement, seed
2020), the subset size capped by the smaller set here. Reported as mean and standard deviation
over the subsets, unscaled (KID_UNIT).
"""

import numpy as np
import torch

KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
KID_SEED = 2020
# The one unit KID is printed and stored in, everywhere: the MMD^2 estimate itself. Papers often print it x1e3; we
# never do, so every figure compares with every other. Written beside each printed figure and as "kid_unit" in JSON.
KID_UNIT = "unscaled MMD^2, not x1e3"


def polynomial_kernel(x, y, degree=3, coef0=1.0):
    """k(x, y) = (x . y / d + coef0)^degree for all rows of x and y, as a float64 tensor."""
    # The matmul runs in the features' dtype (float32: fast, and its rounding averages out
    # over the m^2 terms); the power and the sums that cancel in MMD are done in float64.
    gram = (x @ y.T).double()
    return (gram / x.shape[1] + coef0) ** degree


def mmd2_unbiased(x, y, degree=3, coef0=1.0):
    """The unbiased MMD^2 estimate between feature sets x and y ([m x d] tensors, same m)."""
    m = x.shape[0]
    k_xx = polynomial_kernel(x, x, degree, coef0)
    k_yy = polynomial_kernel(y, y, degree, coef0)
    k_xy = polynomial_kernel(x, y, degree, coef0)
    # Within-set sums leave out the diagonal (k(x_i, x_i)), which is what removes the bias.
    within = (k_xx.sum() - k_xx.diagonal().sum()) + (k_yy.sum() - k_yy.diagonal().sum())
    return float(within / (m * (m - 1)) - 2 * k_xy.sum() / (m * m))


def kernel_inception_distance(
    ref_features,
    sample_features,
    num_subsets=KID_SUBSETS,
    subset_size=KID_SUBSET_SIZE,
    seed=KID_SEED,
    device="cpu",
):
    """
    KID between two feature arrays ([N x d] and [M x d]): (mean, std) of the unbiased MMD^2
    over num_subsets random subsets of min(subset_size, N, M) features from each.
    """
    ref_features = np.asarray(ref_features)
    sample_features = np.asarray(sample_features)
    if ref_features.ndim != 2 or sample_features.ndim != 2:
        raise ValueError("KID needs two [N x d] feature arrays")
    if ref_features.shape[1] != sample_features.shape[1]:
        raise ValueError(
            f"KID needs features of one dimension, got {ref_features.shape[1]} and "
            f"{sample_features.shape[1]}"
        )
    size = min(subset_size, len(ref_features), len(sample_features))
    if size < 2:
        raise ValueError("KID needs at least 2 features in each set")
    ref = torch.from_numpy(np.ascontiguousarray(ref_features)).to(device)
    sample = torch.from_numpy(np.ascontiguousarray(sample_features)).to(device)
    rng = np.random.RandomState(seed)
    values = []
    for _ in range(num_subsets):
        ref_idx = torch.from_numpy(rng.choice(len(ref), size, replace=False)).to(device)
        sample_idx = torch.from_numpy(rng.choice(len(sample), size, replace=False)).to(device)
        values.append(mmd2_unbiased(ref[ref_idx], sample[sample_idx]))
    values = np.array(values)
    return float(values.mean()), float(values.std())

"""
Fréchet distance between Gaussian fits of two feature sets (FID on pool features, sFID on
spatial features), computed the way ADM's evaluator computes it.
"""

import warnings

import numpy as np
import scipy
from scipy import linalg


class FIDStatistics:
    def __init__(self, mu, sigma):
        self.mu = mu
        self.sigma = sigma

    def frechet_distance(self, other, eps=1e-6):
        return frechet_distance(self.mu, self.sigma, other.mu, other.sigma, eps=eps)


def compute_statistics(features):
    """
    Mean and covariance of an [N x D] feature array. ADM takes np.mean of the float32 features
    (so mu stays float32) and np.cov with rowvar=False (float64); both are kept as they are.
    """
    features = np.asarray(features)
    if features.ndim != 2:
        raise ValueError(f"expected an [N x D] feature array, got shape {features.shape}")
    if len(features) < 2:
        raise ValueError(
            f"need at least 2 feature vectors for a covariance, got {len(features)}"
        )
    mu = np.mean(features, axis=0)
    sigma = np.cov(features, rowvar=False)
    return FIDStatistics(mu, sigma)


def singular_covariance_warning(num, dim, what):
    """
    A one-line warning when `num` feature vectors of `dim` dimensions give a singular covariance (its rank is at
    most num - 1), else None. Such a Fréchet distance is mostly the estimator's bias: it falls steeply with more
    images and is not comparable with figures from larger batches (ADM's use 50,000 samples, 10,000 references).
    """
    if num > dim:
        return None
    return (
        f"warning: {what}: {num} images for {dim}-d features, so the covariance is singular (rank at most "
        f"{num - 1} < {dim}) and the Fréchet distance is dominated by the estimate; use more images than "
        "feature dimensions before comparing it with other figures"
    )


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """
    ||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 sqrt(sigma1 sigma2)).

    As in ADM: when sqrtm of the product is not finite, eps is added to both diagonals and the
    square root is taken again; a complex result is accepted only when the imaginary parts of
    its diagonal are within 1e-3 of zero.
    """
    mu1 = np.atleast_1d(mu1)
    mu2 = np.atleast_1d(mu2)
    sigma1 = np.atleast_2d(sigma1)
    sigma2 = np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape:
        raise ValueError(f"mean vectors have different lengths: {mu1.shape}, {mu2.shape}")
    if sigma1.shape != sigma2.shape:
        raise ValueError(
            f"covariances have different dimensions: {sigma1.shape}, {sigma2.shape}"
        )

    diff = mu1 - mu2
    # product might be almost singular; like ADM's disp=False, this first attempt is quiet
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = _sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        warnings.warn(
            f"fid calculation produces singular product; adding {eps} to diagonal of cov estimates"
        )
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = _sqrtm((sigma1 + offset).dot(sigma2 + offset))

    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real

    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def _scipy_version():
    parts = []
    for piece in scipy.__version__.split(".")[:2]:
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def _sqrtm(matrix):
    # ADM passes disp=False so scipy returns (sqrtm, error) without printing. SciPy 1.16
    # deprecated `disp` (removed in 1.18); there the plain call returns the same matrix.
    if _scipy_version() < (1, 16):
        return linalg.sqrtm(matrix, disp=False)[0]
    return linalg.sqrtm(matrix)

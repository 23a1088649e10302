"""
Tests for guided_diffusion.losses against scipy and closed forms.
"""

import numpy as np
import pytest
import scipy.stats
import torch as th

from guided_diffusion.losses import (
    approx_standard_normal_cdf,
    discretized_gaussian_log_likelihood,
    normal_kl,
)


def test_normal_kl_matches_torch_distributions():
    g = th.Generator().manual_seed(0)
    m1, m2 = th.randn(50, generator=g), th.randn(50, generator=g)
    lv1, lv2 = th.randn(50, generator=g), th.randn(50, generator=g)
    ours = normal_kl(m1, lv1, m2, lv2)
    p = th.distributions.Normal(m1.double(), th.exp(0.5 * lv1.double()))
    q = th.distributions.Normal(m2.double(), th.exp(0.5 * lv2.double()))
    expected = th.distributions.kl_divergence(p, q)
    np.testing.assert_allclose(ours.numpy(), expected.numpy(), rtol=1e-5, atol=1e-6)


def test_normal_kl_numerical_integration():
    # KL(N(0.3, 0.5^2) || N(-0.2, 1.2^2)) by quadrature.
    m1, s1, m2, s2 = 0.3, 0.5, -0.2, 1.2
    x = np.linspace(-10, 10, 200001)
    p = scipy.stats.norm.pdf(x, m1, s1)
    integrand = p * (scipy.stats.norm.logpdf(x, m1, s1) - scipy.stats.norm.logpdf(x, m2, s2))
    trapezoid = getattr(np, "trapezoid", None) or np.trapz  # renamed in numpy 2.0
    expected = trapezoid(integrand, x)
    ours = normal_kl(th.tensor(m1, dtype=th.float64), 2 * np.log(s1), m2, 2 * np.log(s2))
    assert ours.item() == pytest.approx(expected, rel=1e-6)


def test_normal_kl_scalars_and_broadcasting():
    mean = th.zeros(2, 3)
    out = normal_kl(mean, 0.0, 0.0, 0.0)
    assert out.shape == (2, 3)
    assert (out == 0).all()
    # Scalar log-variances take the tensor's dtype.
    out = normal_kl(th.ones(4, dtype=th.float64), 0.0, 0.0, np.log(4.0))
    assert out.dtype == th.float64
    expected = 0.5 * (-1 + np.log(4.0) + 0.25 + 0.25)
    np.testing.assert_allclose(out.numpy(), expected)
    with pytest.raises(AssertionError, match="at least one argument must be a Tensor"):
        normal_kl(0.0, 0.0, 1.0, 0.0)


def test_approx_standard_normal_cdf():
    x = th.linspace(-6, 6, 2001, dtype=th.float64)
    ours = approx_standard_normal_cdf(x).numpy()
    xn = x.numpy()
    # The closed form of the tanh approximation ...
    expected = 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (xn + 0.044715 * xn**3)))
    np.testing.assert_allclose(ours, expected, rtol=1e-12, atol=1e-15)
    # ... which is within 2e-4 of the true CDF.
    assert np.abs(ours - scipy.stats.norm.cdf(xn)).max() < 2e-4
    assert approx_standard_normal_cdf(th.tensor(0.0)).item() == 0.5


def test_discretized_log_likelihood_bins():
    # The 256 bins of an image partition the real line, so their
    # probabilities sum to one for any Gaussian.
    values = th.arange(256, dtype=th.float64) / 127.5 - 1
    for mean, log_scale in [(0.0, np.log(0.3)), (0.7, np.log(0.05)), (-0.95, np.log(1.5))]:
        means = th.full_like(values, mean)
        log_scales = th.full_like(values, log_scale)
        logp = discretized_gaussian_log_likelihood(values, means=means, log_scales=log_scales)
        assert logp.shape == values.shape
        assert th.exp(logp).sum().item() == pytest.approx(1.0, abs=1e-9)


def test_discretized_log_likelihood_against_closed_form():
    values = th.tensor([-1.0, -1.0 + 2 / 255, 0.0 + 1 / 255, 0.5 + 1 / 255, 1.0], dtype=th.float64)
    means = th.tensor([-0.9, -0.8, 0.1, 0.4, 0.95], dtype=th.float64)
    log_scales = th.log(th.tensor([0.2, 0.1, 0.3, 0.05, 0.1], dtype=th.float64))
    ours = discretized_gaussian_log_likelihood(values, means=means, log_scales=log_scales).numpy()

    x, m, s = values.numpy(), means.numpy(), np.exp(log_scales.numpy())
    cdf = scipy.stats.norm.cdf
    exact = np.log(cdf((x + 1 / 255 - m) / s) - cdf((x - 1 / 255 - m) / s))
    exact[0] = np.log(cdf((x[0] + 1 / 255 - m[0]) / s[0]))  # lowest bin takes the left tail
    exact[-1] = np.log(1 - cdf((x[-1] - 1 / 255 - m[-1]) / s[-1]))  # highest takes the right tail
    # The tanh CDF approximation makes this close to, not equal to, the exact value.
    np.testing.assert_allclose(ours, exact, rtol=5e-3)

    # Tiny probabilities are clamped at 1e-12 rather than giving -inf.
    far = discretized_gaussian_log_likelihood(
        th.tensor([0.0]), means=th.tensor([0.9]), log_scales=th.tensor([np.log(1e-3)], dtype=th.float32)
    )
    assert far.item() == pytest.approx(np.log(1e-12), rel=1e-5)

    with pytest.raises(AssertionError):
        discretized_gaussian_log_likelihood(values, means=means[:2], log_scales=log_scales)

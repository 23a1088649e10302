"""
Likelihood helpers for the variational bound of Gaussian diffusion models.

The formulas follow Ho et al. (2020) and Nichol & Dhariwal (2021); the
discretised decoder assumes images were uint8 values rescaled to [-1, 1].
"""

import numpy as np
import torch as th


def normal_kl(mean1, logvar1, mean2, logvar2):
    """
    KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise.

    Any argument may be a Python scalar instead of a Tensor (for example a
    standard normal prior), as long as at least one of them is a Tensor; the
    usual broadcasting rules apply.
    """
    reference = None
    for value in (mean1, logvar1, mean2, logvar2):
        if isinstance(value, th.Tensor):
            reference = value
            break
    assert reference is not None, "at least one argument must be a Tensor"

    # th.exp() refuses Python floats, so lift scalar log-variances onto the
    # reference tensor's dtype and device.
    if not isinstance(logvar1, th.Tensor):
        logvar1 = th.tensor(logvar1).to(reference)
    if not isinstance(logvar2, th.Tensor):
        logvar2 = th.tensor(logvar2).to(reference)

    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + th.exp(logvar1 - logvar2)
        + ((mean1 - mean2) ** 2) * th.exp(-logvar2)
    )


def approx_standard_normal_cdf(x):
    """
    The tanh approximation of the standard normal CDF (as used in GELU).
    """
    return 0.5 * (1.0 + th.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * th.pow(x, 3))))


def discretized_gaussian_log_likelihood(x, *, means, log_scales):
    """
    Log-likelihood of images under a Gaussian discretised into 256 bins.

    :param x: target images, uint8 values rescaled to [-1, 1].
    :param means: the Gaussian means, same shape as x.
    :param log_scales: the Gaussian log standard deviations, same shape as x.
    :return: log probabilities in nats, same shape as x.
    """
    assert x.shape == means.shape == log_scales.shape
    centered = x - means
    inv_std = th.exp(-log_scales)
    # Each bin is 2/255 wide, centred on the pixel value.
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    # The outermost bins absorb the tails of the distribution.
    log_cdf_plus = th.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = th.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = th.log((cdf_plus - cdf_min).clamp(min=1e-12))
    log_probs = th.where(
        x < -0.999,
        log_cdf_plus,
        th.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta),
    )
    assert log_probs.shape == x.shape
    return log_probs

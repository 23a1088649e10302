"""
Tests for guided_diffusion.gaussian_diffusion with tiny toy models.

Reference values come from closed forms evaluated independently in float64
numpy, so they check the formulas rather than re-run the implementation.
"""

import math

import numpy as np
import pytest
import torch as th
import torch.nn as nn

from guided_diffusion import gaussian_diffusion as gd
from guided_diffusion.gaussian_diffusion import (
    GaussianDiffusion,
    LossType,
    ModelMeanType,
    ModelVarType,
    _extract_into_tensor,
    betas_for_alpha_bar,
    get_named_beta_schedule,
    mean_flat,
)

SHAPE = (2, 3, 4, 4)


def make_diffusion(
    steps=20,
    schedule="cosine",
    mean_type=ModelMeanType.EPSILON,
    var_type=ModelVarType.FIXED_LARGE,
    loss_type=LossType.MSE,
    rescale_timesteps=False,
):
    return GaussianDiffusion(
        betas=get_named_beta_schedule(schedule, steps),
        model_mean_type=mean_type,
        model_var_type=var_type,
        loss_type=loss_type,
        rescale_timesteps=rescale_timesteps,
    )


def toy_eps(x, t, **kwargs):
    """A deterministic stand-in for a model: smooth in x, varies with t."""
    return 0.3 * x + 0.05 * th.sin(t.float() / 7.0).view(-1, *([1] * (x.dim() - 1)))


def toy_eps_learned(x, t, **kwargs):
    # Variance channels in [-1, 1], as LEARNED_RANGE expects.
    return th.cat([toy_eps(x, t), th.tanh(x)], dim=1)


class ToyNet(nn.Module):
    """A one-layer conv net with a crude timestep input."""

    def __init__(self, channels=3, learn_sigma=False):
        super().__init__()
        out_channels = channels * 2 if learn_sigma else channels
        self.conv = nn.Conv2d(channels, out_channels, 3, padding=1)

    def forward(self, x, t, y=None):
        h = self.conv(x) + (t.float() / 1000.0).view(-1, 1, 1, 1)
        if y is not None:
            h = h + 0.01 * y.float().view(-1, 1, 1, 1)
        return h


# ---------------------------------------------------------------------------
# Schedules


@pytest.mark.parametrize("steps", [1000, 250, 50])
def test_linear_schedule_endpoints(steps):
    betas = get_named_beta_schedule("linear", steps)
    assert betas.dtype == np.float64
    assert betas.shape == (steps,)
    scale = 1000 / steps
    assert betas[0] == pytest.approx(scale * 1e-4, rel=1e-12)
    assert betas[-1] == pytest.approx(scale * 0.02, rel=1e-12)
    # Evenly spaced.
    np.testing.assert_allclose(np.diff(betas), (betas[-1] - betas[0]) / (steps - 1), rtol=1e-9)


def test_cosine_schedule_matches_alpha_bar():
    steps = 1000
    betas = get_named_beta_schedule("cosine", steps)
    assert betas.dtype == np.float64
    f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    # Without clipping, prod(1 - beta) telescopes to alpha_bar(t) / alpha_bar(0).
    alphas_cumprod = np.cumprod(1 - betas)
    expected = np.array([f((i + 1) / steps) / f(0) for i in range(steps)])
    unclipped = betas < 0.999
    assert unclipped[:-1].all()
    np.testing.assert_allclose(alphas_cumprod[:-1], expected[:-1], rtol=1e-10)
    # alpha_bar(1) is ~0, so the last beta hits the cap.
    assert betas[-1] == 0.999
    np.testing.assert_allclose(betas[:5], [1 - f((i + 1) / steps) / f(i / steps) for i in range(5)])


def test_betas_for_alpha_bar_max_beta():
    betas = betas_for_alpha_bar(10, lambda t: 1 - t, max_beta=0.5)
    expected = [min(1 - (1 - (i + 1) / 10) / (1 - i / 10), 0.5) for i in range(10)]
    np.testing.assert_allclose(betas, expected, rtol=0, atol=0)
    assert betas[-1] == 0.5


def test_unknown_schedule():
    with pytest.raises(NotImplementedError, match="unknown beta schedule: quadratic"):
        get_named_beta_schedule("quadratic", 10)


def test_loss_type_is_vb():
    assert LossType.KL.is_vb() and LossType.RESCALED_KL.is_vb()
    assert not LossType.MSE.is_vb() and not LossType.RESCALED_MSE.is_vb()


def test_derived_arrays():
    diffusion = make_diffusion(steps=30, schedule="cosine")
    betas = get_named_beta_schedule("cosine", 30)
    alphas_cumprod = np.cumprod(1 - betas)
    assert diffusion.num_timesteps == 30
    for name in [
        "betas",
        "alphas_cumprod",
        "alphas_cumprod_prev",
        "alphas_cumprod_next",
        "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod",
        "log_one_minus_alphas_cumprod",
        "sqrt_recip_alphas_cumprod",
        "sqrt_recipm1_alphas_cumprod",
        "posterior_variance",
        "posterior_log_variance_clipped",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
    ]:
        arr = getattr(diffusion, name)
        assert arr.dtype == np.float64, name
        assert arr.shape == (30,), name
    np.testing.assert_allclose(diffusion.alphas_cumprod, alphas_cumprod, rtol=1e-14)
    assert diffusion.alphas_cumprod_prev[0] == 1.0
    assert diffusion.alphas_cumprod_next[-1] == 0.0
    np.testing.assert_allclose(diffusion.alphas_cumprod_prev[1:], alphas_cumprod[:-1])
    assert diffusion.posterior_variance[0] == 0.0
    assert diffusion.posterior_log_variance_clipped[0] == np.log(diffusion.posterior_variance[1])
    np.testing.assert_allclose(
        diffusion.sqrt_recipm1_alphas_cumprod, np.sqrt((1 - alphas_cumprod) / alphas_cumprod)
    )


def test_bad_betas_rejected():
    with pytest.raises(AssertionError):
        GaussianDiffusion(
            betas=np.array([0.1, 0.0]),
            model_mean_type=ModelMeanType.EPSILON,
            model_var_type=ModelVarType.FIXED_SMALL,
            loss_type=LossType.MSE,
        )
    with pytest.raises(TypeError):
        # Keyword-only, as in ADM.
        GaussianDiffusion(np.array([0.1]), ModelMeanType.EPSILON, ModelVarType.FIXED_SMALL, LossType.MSE)


def test_extract_into_tensor():
    arr = np.array([0.1, 1.0 / 3.0, 2.0 / 3.0], dtype=np.float64)
    t = th.tensor([2, 0])
    out = _extract_into_tensor(arr, t, (2, 3, 4))
    assert out.shape == (2, 3, 4)
    assert out.dtype == th.float32
    assert th.equal(out[0], th.full((3, 4), np.float32(arr[2])))
    assert th.equal(out[1], th.full((3, 4), np.float32(arr[0])))


def test_mean_flat():
    x = th.arange(24, dtype=th.float32).view(2, 3, 4)
    assert th.equal(mean_flat(x), th.tensor([5.5, 17.5]))


# ---------------------------------------------------------------------------
# Forward process and posterior


def test_q_sample_and_q_mean_variance():
    diffusion = make_diffusion(steps=20)
    th.manual_seed(0)
    x0 = th.randn(*SHAPE)
    noise = th.randn(*SHAPE)
    t = th.tensor([0, 19])
    ab = np.cumprod(1 - get_named_beta_schedule("cosine", 20))[[0, 19]]
    expected = (
        np.sqrt(ab)[:, None, None, None] * x0.double().numpy()
        + np.sqrt(1 - ab)[:, None, None, None] * noise.double().numpy()
    )
    np.testing.assert_allclose(diffusion.q_sample(x0, t, noise=noise).numpy(), expected, atol=1e-6)

    mean, var, log_var = diffusion.q_mean_variance(x0, t)
    np.testing.assert_allclose(mean.numpy(), np.sqrt(ab)[:, None, None, None] * x0.numpy(), rtol=1e-6)
    np.testing.assert_allclose(var[:, 0, 0, 0].numpy(), 1 - ab, rtol=1e-6)
    np.testing.assert_allclose(log_var[:, 0, 0, 0].numpy(), np.log(1 - ab), rtol=1e-6)

    # Without noise, q_sample draws exactly one randn_like.
    th.manual_seed(5)
    drawn = diffusion.q_sample(x0, t)
    th.manual_seed(5)
    assert th.equal(drawn, diffusion.q_sample(x0, t, noise=th.randn_like(x0)))


def test_q_posterior_matches_bayes_rule():
    steps = 20
    diffusion = make_diffusion(steps=steps, schedule="cosine")
    betas = get_named_beta_schedule("cosine", steps)
    ab = np.cumprod(1 - betas)
    th.manual_seed(1)
    x0 = th.randn(3, 2, 3, 3)
    xt = th.randn(3, 2, 3, 3)
    t = th.tensor([1, 7, 19])
    mean, var, log_var = diffusion.q_posterior_mean_variance(x0, xt, t)

    # Gaussian product of q(x_{t-1} | x_0) and q(x_t | x_{t-1}).
    tn = t.numpy()
    ab_prev = ab[tn - 1]
    alpha = 1 - betas[tn]
    precision = 1 / (1 - ab_prev) + alpha / betas[tn]
    post_var = 1 / precision
    b = lambda a: a[:, None, None, None]  # noqa: E731
    post_mean = b(post_var) * (
        b(np.sqrt(ab_prev) / (1 - ab_prev)) * x0.double().numpy()
        + b(np.sqrt(alpha) / betas[tn]) * xt.double().numpy()
    )
    np.testing.assert_allclose(mean.numpy(), post_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(var[:, 0, 0, 0].numpy(), post_var, rtol=1e-5)
    np.testing.assert_allclose(log_var[:, 0, 0, 0].numpy(), np.log(post_var), rtol=1e-5)

    # At t = 0 the posterior is a point mass at x_0; its log-variance is clipped.
    t0 = th.zeros(3, dtype=th.long)
    mean0, var0, log_var0 = diffusion.q_posterior_mean_variance(x0, xt, t0)
    np.testing.assert_allclose(mean0.numpy(), x0.numpy(), atol=1e-6)
    assert (var0 == 0).all()
    assert th.allclose(log_var0, th.tensor(np.log(diffusion.posterior_variance[1]), dtype=th.float32))


# ---------------------------------------------------------------------------
# p_mean_variance


def test_p_mean_variance_epsilon_fixed_variances():
    steps = 20
    betas = get_named_beta_schedule("cosine", steps)
    ab = np.cumprod(1 - betas)
    ab_prev = np.append(1.0, ab[:-1])
    th.manual_seed(2)
    x = th.randn(*SHAPE)
    t = th.tensor([0, 13])
    tn = t.numpy()
    b = lambda a: a[:, None, None, None]  # noqa: E731

    eps = toy_eps(x, t).double().numpy()
    xd = x.double().numpy()
    x0 = (xd - b(np.sqrt(1 - ab[tn])) * eps) / b(np.sqrt(ab[tn]))
    x0_clipped = np.clip(x0, -1, 1)
    coef1 = betas * np.sqrt(ab_prev) / (1 - ab)
    coef2 = (1 - ab_prev) * np.sqrt(1 - betas) / (1 - ab)

    post_var = betas * (1 - ab_prev) / (1 - ab)
    for var_type, expected_var in [
        (ModelVarType.FIXED_SMALL, post_var[tn]),
        (ModelVarType.FIXED_LARGE, np.append(post_var[1], betas[1:])[tn]),
    ]:
        for clip, x0_expected in [(False, x0), (True, x0_clipped)]:
            diffusion = make_diffusion(steps=steps, var_type=var_type)
            out = diffusion.p_mean_variance(toy_eps, x, t, clip_denoised=clip)
            assert set(out) == {"mean", "variance", "log_variance", "pred_xstart"}
            np.testing.assert_allclose(out["pred_xstart"].numpy(), x0_expected, rtol=1e-5, atol=1e-5)
            expected_mean = b(coef1[tn]) * x0_expected + b(coef2[tn]) * xd
            np.testing.assert_allclose(out["mean"].numpy(), expected_mean, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(out["variance"][:, 0, 0, 0].numpy(), expected_var, rtol=1e-5)
            if var_type == ModelVarType.FIXED_LARGE:
                np.testing.assert_allclose(
                    out["log_variance"][:, 0, 0, 0].numpy(), np.log(expected_var), rtol=1e-5
                )


def test_p_mean_variance_learned_range_and_learned():
    steps = 20
    diffusion = make_diffusion(steps=steps, var_type=ModelVarType.LEARNED_RANGE)
    th.manual_seed(3)
    x = th.randn(*SHAPE)
    t = th.tensor([0, 11])
    out = diffusion.p_mean_variance(toy_eps_learned, x, t)
    frac = (th.tanh(x).double().numpy() + 1) / 2
    tn = t.numpy()
    max_log = np.log(diffusion.betas[tn])[:, None, None, None]
    min_log = diffusion.posterior_log_variance_clipped[tn][:, None, None, None]
    expected = frac * max_log + (1 - frac) * min_log
    np.testing.assert_allclose(out["log_variance"].numpy(), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["variance"].numpy(), np.exp(expected), rtol=1e-5)
    # The mean half of the output behaves exactly like an eps model.
    fixed = make_diffusion(steps=steps).p_mean_variance(toy_eps, x, t)
    assert th.equal(out["mean"], fixed["mean"])
    assert th.equal(out["pred_xstart"], fixed["pred_xstart"])

    learned = make_diffusion(steps=steps, var_type=ModelVarType.LEARNED)
    out = learned.p_mean_variance(toy_eps_learned, x, t)
    assert th.equal(out["log_variance"], th.tanh(x))
    assert th.equal(out["variance"], th.exp(th.tanh(x)))

    with pytest.raises(AssertionError):
        # A learned-variance diffusion needs 2C output channels.
        learned.p_mean_variance(toy_eps, x, t)


def test_p_mean_variance_start_x_and_previous_x():
    steps = 20
    th.manual_seed(4)
    x0 = th.rand(*SHAPE) * 1.6 - 0.8
    t = th.tensor([5, 17])
    xt = make_diffusion(steps=steps).q_sample(x0, t)

    start = make_diffusion(steps=steps, mean_type=ModelMeanType.START_X)
    out = start.p_mean_variance(lambda x, t: x0, xt, t)
    assert th.equal(out["pred_xstart"], x0)
    expected_mean = start.q_posterior_mean_variance(x0, xt, t)[0]
    assert th.equal(out["mean"], expected_mean)

    # A PREVIOUS_X model that outputs the true posterior mean implies x_0.
    prev = make_diffusion(steps=steps, mean_type=ModelMeanType.PREVIOUS_X)
    out = prev.p_mean_variance(lambda x, t: expected_mean, xt, t, clip_denoised=False)
    assert th.equal(out["mean"], expected_mean)
    np.testing.assert_allclose(out["pred_xstart"].numpy(), x0.numpy(), atol=1e-4)


def test_p_mean_variance_denoised_fn_model_kwargs_and_rescale():
    diffusion = make_diffusion(steps=20, mean_type=ModelMeanType.START_X, rescale_timesteps=True)
    seen = {}

    def model(x, t, y=None):
        seen["t"], seen["y"] = t, y
        return x * 3.0

    x = th.full(SHAPE, 0.5)
    t = th.tensor([0, 10])
    out = diffusion.p_mean_variance(
        model, x, t, denoised_fn=lambda z: z - 2.0, model_kwargs={"y": th.tensor([4, 5])}
    )
    # rescale_timesteps maps [0, T) onto [0, 1000).
    assert seen["t"].dtype == th.float32
    assert th.equal(seen["t"], th.tensor([0.0, 500.0]))
    assert th.equal(seen["y"], th.tensor([4, 5]))
    # denoised_fn runs before clipping: 1.5 - 2 = -0.5 is inside [-1, 1].
    assert th.equal(out["pred_xstart"], th.full(SHAPE, -0.5))
    out = diffusion.p_mean_variance(model, x, t, denoised_fn=lambda z: z + 2.0)
    assert th.equal(out["pred_xstart"], th.ones(SHAPE))


def test_predict_helpers_invert_each_other():
    diffusion = make_diffusion(steps=20, schedule="cosine")
    th.manual_seed(6)
    x0 = th.randn(*SHAPE)
    eps = th.randn(*SHAPE)
    t = th.tensor([3, 18])
    xt = diffusion.q_sample(x0, t, noise=eps)
    np.testing.assert_allclose(
        diffusion._predict_xstart_from_eps(xt, t, eps).numpy(), x0.numpy(), atol=1e-4
    )
    np.testing.assert_allclose(
        diffusion._predict_eps_from_xstart(xt, t, x0).numpy(), eps.numpy(), atol=1e-4
    )
    xprev = diffusion.q_posterior_mean_variance(x0, xt, t)[0]
    np.testing.assert_allclose(
        diffusion._predict_xstart_from_xprev(xt, t, xprev).numpy(), x0.numpy(), atol=1e-4
    )


# ---------------------------------------------------------------------------
# Sampling


def test_p_sample_loop_draw_order_matches_hand_written_loop():
    diffusion = make_diffusion(steps=10, var_type=ModelVarType.LEARNED_RANGE)
    th.manual_seed(123)
    sample = diffusion.p_sample_loop(toy_eps_learned, SHAPE)

    th.manual_seed(123)
    img = th.randn(*SHAPE)
    for i in reversed(range(10)):
        t = th.tensor([i] * SHAPE[0])
        out = diffusion.p_mean_variance(toy_eps_learned, img, t)
        noise = th.randn_like(img)
        std = th.exp(0.5 * out["log_variance"]) if i > 0 else th.zeros_like(img)
        img = out["mean"] + std * noise
    assert th.equal(sample, img)


def test_p_sample_loop_with_given_noise_and_progressive():
    diffusion = make_diffusion(steps=8)
    th.manual_seed(7)
    noise = th.randn(*SHAPE)
    th.manual_seed(8)
    steps = list(diffusion.p_sample_loop_progressive(toy_eps, SHAPE, noise=noise))
    assert len(steps) == 8
    assert all(set(s) == {"sample", "pred_xstart"} for s in steps)
    # The first step starts from the given noise, so no randn is drawn for it.
    th.manual_seed(8)
    first = diffusion.p_sample(toy_eps, noise, th.tensor([7, 7]))
    assert th.equal(steps[0]["sample"], first["sample"])
    th.manual_seed(8)
    assert th.equal(diffusion.p_sample_loop(toy_eps, SHAPE, noise=noise), steps[-1]["sample"])
    # The last step adds no noise: its sample is the mean.
    last_in = steps[-2]["sample"]
    mean = diffusion.p_mean_variance(toy_eps, last_in, th.tensor([0, 0]))["mean"]
    assert th.equal(steps[-1]["sample"], mean)


def test_sampling_accepts_modules_plain_callables_and_progress(capsys):
    diffusion = make_diffusion(steps=5)
    net = ToyNet()
    th.manual_seed(0)
    a = diffusion.p_sample_loop(net, SHAPE, model_kwargs={"y": th.tensor([1, 2])})
    th.manual_seed(0)
    b = diffusion.p_sample_loop(
        lambda x, t, **kw: net(x, t, **kw), SHAPE, model_kwargs={"y": th.tensor([1, 2])}
    )
    assert th.equal(a, b)
    assert not a.requires_grad
    th.manual_seed(0)
    c = diffusion.ddim_sample_loop(toy_eps, SHAPE, progress=True)
    assert c.shape == SHAPE
    assert "5/5" in capsys.readouterr().err


def test_ddim_eta_zero_is_deterministic_after_start_noise():
    diffusion = make_diffusion(steps=10, schedule="cosine")
    noise = th.randn(*SHAPE, generator=th.Generator().manual_seed(0))
    th.manual_seed(1)
    a = diffusion.ddim_sample_loop(toy_eps, SHAPE, noise=noise, eta=0.0)
    th.manual_seed(2)
    b = diffusion.ddim_sample_loop(toy_eps, SHAPE, noise=noise, eta=0.0)
    assert th.equal(a, b)
    # With eta > 0 the seed matters.
    th.manual_seed(1)
    c = diffusion.ddim_sample_loop(toy_eps, SHAPE, noise=noise, eta=1.0)
    th.manual_seed(2)
    d = diffusion.ddim_sample_loop(toy_eps, SHAPE, noise=noise, eta=1.0)
    assert not th.allclose(c, d)


def test_ddim_draw_order_matches_hand_written_loop():
    diffusion = make_diffusion(steps=6)
    th.manual_seed(9)
    sample = diffusion.ddim_sample_loop(toy_eps, SHAPE, eta=0.5)
    th.manual_seed(9)
    img = th.randn(*SHAPE)
    for i in reversed(range(6)):
        img = diffusion.ddim_sample(toy_eps, img, th.tensor([i, i]), eta=0.5)["sample"]
    assert th.equal(sample, img)
    # Each step draws one randn_like even when eta == 0.
    th.manual_seed(9)
    diffusion.ddim_sample_loop(toy_eps, SHAPE, eta=0.0)
    after_loop = th.randn(1)
    th.manual_seed(9)
    th.randn(*SHAPE)
    for _ in range(6):
        th.randn(*SHAPE)
    assert th.equal(after_loop, th.randn(1))


def test_ddim_eta_one_equals_ancestral_fixed_small():
    # With eta = 1, DDIM is the ancestral sampler with the posterior variance.
    diffusion = make_diffusion(steps=10, schedule="cosine", var_type=ModelVarType.FIXED_SMALL)
    th.manual_seed(10)
    x = th.randn(*SHAPE)
    t = th.tensor([6, 2])
    th.manual_seed(11)
    ddim = diffusion.ddim_sample(toy_eps, x, t, eta=1.0)
    th.manual_seed(11)
    ancestral = diffusion.p_sample(toy_eps, x, t)
    np.testing.assert_allclose(ddim["sample"].numpy(), ancestral["sample"].numpy(), atol=2e-5)
    assert th.equal(ddim["pred_xstart"], ancestral["pred_xstart"])


def test_ddim_reverse_sample_inverts_ddim_sample():
    diffusion = make_diffusion(steps=10, schedule="cosine")
    c = th.randn(*SHAPE, generator=th.Generator().manual_seed(3))

    def constant_eps(x, t):
        return c

    x = th.randn(*SHAPE, generator=th.Generator().manual_seed(4))
    t = th.tensor([4, 4])
    up = diffusion.ddim_reverse_sample(constant_eps, x, t, clip_denoised=False)
    down = diffusion.ddim_sample(constant_eps, up["sample"], t + 1, clip_denoised=False)
    np.testing.assert_allclose(down["sample"].numpy(), x.numpy(), atol=1e-5)
    with pytest.raises(AssertionError, match="Reverse ODE only for deterministic path"):
        diffusion.ddim_reverse_sample(constant_eps, x, t, eta=0.5)


# ---------------------------------------------------------------------------
# Guidance


def test_condition_mean_shift():
    diffusion = make_diffusion(steps=20, var_type=ModelVarType.LEARNED_RANGE, rescale_timesteps=True)
    x = th.randn(*SHAPE, generator=th.Generator().manual_seed(5))
    t = th.tensor([3, 15])
    seen = {}

    def cond_fn(x, t, y=None):
        seen["t"], seen["y"] = t, y
        return th.full_like(x, 0.7) * y.float().view(-1, 1, 1, 1)

    kwargs = {"y": th.tensor([1, 2])}
    out = diffusion.p_mean_variance(toy_eps_learned, x, t, model_kwargs=kwargs)
    new_mean = diffusion.condition_mean(cond_fn, out, x, t, model_kwargs=kwargs)
    assert th.equal(seen["t"], t.float() * 50.0)
    assert th.equal(seen["y"], kwargs["y"])
    expected = out["mean"] + out["variance"] * 0.7 * th.tensor([1.0, 2.0]).view(-1, 1, 1, 1)
    assert th.allclose(new_mean, expected, atol=1e-7)


def test_condition_score_shift():
    diffusion = make_diffusion(steps=20, schedule="cosine")
    x = th.randn(*SHAPE, generator=th.Generator().manual_seed(6))
    t = th.tensor([3, 15])
    g = 0.25

    def cond_fn(x, t, **kwargs):
        return th.full_like(x, g)

    out = diffusion.p_mean_variance(toy_eps, x, t, clip_denoised=False)
    before = {k: v.clone() for k, v in out.items()}
    new = diffusion.condition_score(cond_fn, out, x, t)
    # The input dict is not modified.
    assert all(th.equal(out[k], before[k]) for k in out)
    ab = diffusion.alphas_cumprod[t.numpy()][:, None, None, None]
    # eps -> eps - sqrt(1 - ab) g shifts x_0 by (1 - ab) / sqrt(ab) * g.
    shift = (1 - ab) / np.sqrt(ab) * g
    np.testing.assert_allclose(
        (new["pred_xstart"] - out["pred_xstart"]).numpy(), np.broadcast_to(shift, SHAPE), rtol=1e-4
    )
    coef1 = diffusion.posterior_mean_coef1[t.numpy()][:, None, None, None]
    np.testing.assert_allclose(
        (new["mean"] - out["mean"]).numpy(), np.broadcast_to(coef1 * shift, SHAPE), rtol=1e-3, atol=1e-6
    )
    assert th.equal(new["variance"], out["variance"])


def test_p_sample_draws_noise_before_cond_fn():
    diffusion = make_diffusion(steps=10)
    x = th.randn(*SHAPE, generator=th.Generator().manual_seed(7))
    t = th.tensor([5, 0])

    def noisy_cond_fn(x, t, **kwargs):
        th.randn(100)  # consumes random numbers; must not change the step's noise
        return th.ones_like(x)

    th.manual_seed(12)
    plain = diffusion.p_sample(toy_eps, x, t)
    th.manual_seed(12)
    guided = diffusion.p_sample(toy_eps, x, t, cond_fn=noisy_cond_fn, model_kwargs={})
    var = diffusion.p_mean_variance(toy_eps, x, t)["variance"]
    assert th.allclose(guided["sample"] - plain["sample"], var, atol=1e-6)


def test_ddim_with_cond_fn_uses_condition_score():
    diffusion = make_diffusion(steps=10)
    x = th.randn(*SHAPE, generator=th.Generator().manual_seed(8))
    t = th.tensor([5, 5])

    def cond_fn(x, t, **kwargs):
        return 0.1 * x

    out = diffusion.ddim_sample(toy_eps, x, t, cond_fn=cond_fn, model_kwargs={})
    base = diffusion.p_mean_variance(toy_eps, x, t)
    expected = diffusion.condition_score(cond_fn, base, x, t)
    assert th.equal(out["pred_xstart"], expected["pred_xstart"])


# ---------------------------------------------------------------------------
# Training losses and likelihood

ALL_MEAN_TYPES = list(ModelMeanType)
ALL_VAR_TYPES = list(ModelVarType)
ALL_LOSS_TYPES = list(LossType)


@pytest.mark.parametrize("loss_type", ALL_LOSS_TYPES)
@pytest.mark.parametrize("mean_type", ALL_MEAN_TYPES)
@pytest.mark.parametrize("var_type", ALL_VAR_TYPES)
def test_training_losses_finite(loss_type, mean_type, var_type):
    diffusion = make_diffusion(steps=10, mean_type=mean_type, var_type=var_type, loss_type=loss_type)
    learn_sigma = var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE)
    th.manual_seed(0)
    net = ToyNet(learn_sigma=learn_sigma)
    x0 = th.rand(*SHAPE) * 2 - 1
    t = th.tensor([0, 9])
    terms = diffusion.training_losses(net, x0, t, model_kwargs={"y": th.tensor([0, 1])})
    assert terms["loss"].shape == (SHAPE[0],)
    assert th.isfinite(terms["loss"]).all()
    if loss_type.is_vb():
        assert set(terms) == {"loss"}
    else:
        expected = {"loss", "mse", "vb"} if learn_sigma else {"loss", "mse"}
        assert set(terms) == expected
    terms["loss"].mean().backward()
    assert th.isfinite(net.conv.weight.grad).all()


def test_training_losses_mse_values_and_draw_order():
    diffusion = make_diffusion(steps=10)
    x0 = th.rand(*SHAPE) * 2 - 1
    t = th.tensor([2, 8])
    th.manual_seed(13)
    terms = diffusion.training_losses(toy_eps, x0, t)
    th.manual_seed(13)
    noise = th.randn_like(x0)
    xt = diffusion.q_sample(x0, t, noise=noise)
    assert th.equal(terms["loss"], mean_flat((noise - toy_eps(xt, t)) ** 2))

    start = make_diffusion(steps=10, mean_type=ModelMeanType.START_X)
    terms = start.training_losses(toy_eps, x0, t, noise=noise)
    assert th.equal(terms["mse"], mean_flat((x0 - toy_eps(xt, t)) ** 2))
    prev = make_diffusion(steps=10, mean_type=ModelMeanType.PREVIOUS_X)
    terms = prev.training_losses(toy_eps, x0, t, noise=noise)
    target = prev.q_posterior_mean_variance(x0, xt, t)[0]
    assert th.equal(terms["mse"], mean_flat((target - toy_eps(xt, t)) ** 2))


def test_training_losses_rescaling():
    steps = 40
    x0 = th.rand(*SHAPE) * 2 - 1
    noise = th.randn(*SHAPE, generator=th.Generator().manual_seed(1))
    t = th.tensor([0, 30])

    def losses(loss_type):
        diffusion = make_diffusion(steps=steps, var_type=ModelVarType.LEARNED_RANGE, loss_type=loss_type)
        return diffusion.training_losses(toy_eps_learned, x0, t, noise=noise)

    mse, rescaled_mse = losses(LossType.MSE), losses(LossType.RESCALED_MSE)
    assert th.equal(mse["mse"], rescaled_mse["mse"])
    assert th.allclose(rescaled_mse["vb"], mse["vb"] * steps / 1000.0, rtol=1e-6)
    assert th.allclose(mse["loss"], mse["mse"] + mse["vb"])
    kl, rescaled_kl = losses(LossType.KL), losses(LossType.RESCALED_KL)
    assert th.allclose(rescaled_kl["loss"], kl["loss"] * steps, rtol=1e-6)
    # The vb term of the MSE loss is the (unscaled) KL loss.
    assert th.allclose(mse["vb"], kl["loss"], rtol=1e-6)


def test_training_losses_vb_term_freezes_the_mean():
    diffusion = make_diffusion(steps=10, var_type=ModelVarType.LEARNED_RANGE)
    x0 = th.rand(*SHAPE) * 2 - 1
    output = (th.randn(SHAPE[0], SHAPE[1] * 2, *SHAPE[2:]) * 0.5).requires_grad_()
    t = th.tensor([1, 6])
    terms = diffusion.training_losses(lambda x, t: output, x0, t)
    (grad,) = th.autograd.grad(terms["vb"].sum(), output)
    assert (grad[:, : SHAPE[1]] == 0).all()
    assert (grad[:, SHAPE[1] :] != 0).any()
    (grad,) = th.autograd.grad(terms["mse"].sum(), output)
    assert (grad[:, : SHAPE[1]] != 0).any()
    assert (grad[:, SHAPE[1] :] == 0).all()


def test_vb_terms_use_decoder_nll_at_t0():
    diffusion = make_diffusion(steps=10, var_type=ModelVarType.FIXED_SMALL)
    x0 = th.randint(0, 256, SHAPE).float() / 127.5 - 1
    xt = diffusion.q_sample(x0, th.tensor([0, 0]))
    out = diffusion._vb_terms_bpd(toy_eps, x0, xt, th.tensor([0, 4]))
    p = diffusion.p_mean_variance(toy_eps, xt, th.tensor([0, 4]))
    from guided_diffusion.losses import discretized_gaussian_log_likelihood, normal_kl

    nll = -discretized_gaussian_log_likelihood(x0, means=p["mean"], log_scales=0.5 * p["log_variance"])
    assert th.allclose(out["output"][0], mean_flat(nll)[0] / math.log(2.0))
    true_mean, _, true_logvar = diffusion.q_posterior_mean_variance(x0, xt, th.tensor([0, 4]))
    kl = normal_kl(true_mean, true_logvar, p["mean"], p["log_variance"])
    assert th.allclose(out["output"][1], mean_flat(kl)[1] / math.log(2.0))


def test_calc_bpd_loop():
    steps = 6
    diffusion = make_diffusion(steps=steps, var_type=ModelVarType.LEARNED_RANGE)
    x0 = th.randint(0, 256, SHAPE).float() / 127.5 - 1
    th.manual_seed(14)
    out = diffusion.calc_bpd_loop(toy_eps_learned, x0, clip_denoised=True)
    assert out["total_bpd"].shape == (SHAPE[0],)
    assert out["prior_bpd"].shape == (SHAPE[0],)
    for key in ("vb", "xstart_mse", "mse"):
        assert out[key].shape == (SHAPE[0], steps), key
        assert th.isfinite(out[key]).all()
    assert th.allclose(out["total_bpd"], out["vb"].sum(dim=1) + out["prior_bpd"])

    # The prior term is KL(N(sqrt(ab_T) x0, 1 - ab_T) || N(0, 1)) in bits.
    ab = diffusion.alphas_cumprod[-1]
    x = x0.double().numpy()
    kl = 0.5 * (-1 - np.log(1 - ab) + (1 - ab) + ab * x**2)
    expected = kl.reshape(SHAPE[0], -1).mean(axis=1) / np.log(2)
    np.testing.assert_allclose(out["prior_bpd"].numpy(), expected, rtol=1e-4, atol=1e-7)

    # One randn_like per step, from T - 1 down to 0: column 0 is t = T - 1.
    th.manual_seed(14)
    noise = th.randn_like(x0)
    t = th.tensor([steps - 1] * SHAPE[0])
    xt = diffusion.q_sample(x0, t, noise=noise)
    first = diffusion._vb_terms_bpd(toy_eps_learned, x0, xt, t)
    assert th.equal(out["vb"][:, 0], first["output"])


def test_gaussian_diffusion_module_exports():
    for name in [
        "get_named_beta_schedule",
        "betas_for_alpha_bar",
        "ModelMeanType",
        "ModelVarType",
        "LossType",
        "GaussianDiffusion",
        "_extract_into_tensor",
        "mean_flat",
    ]:
        assert hasattr(gd, name), name
    assert [m.name for m in ModelMeanType] == ["PREVIOUS_X", "START_X", "EPSILON"]
    assert [m.name for m in ModelVarType] == ["LEARNED", "FIXED_SMALL", "FIXED_LARGE", "LEARNED_RANGE"]
    assert [m.name for m in LossType] == ["MSE", "RESCALED_MSE", "KL", "RESCALED_KL"]

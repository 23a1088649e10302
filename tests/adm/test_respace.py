"""
Tests for guided_diffusion.respace: timestep spacing and SpacedDiffusion.
"""

import numpy as np
import pytest
import torch as th

from guided_diffusion.gaussian_diffusion import (
    GaussianDiffusion,
    LossType,
    ModelMeanType,
    ModelVarType,
    get_named_beta_schedule,
)
from guided_diffusion.respace import SpacedDiffusion, _WrappedModel, space_timesteps

SHAPE = (2, 3, 4, 4)


def diffusion_kwargs(steps=50, schedule="linear", var_type=ModelVarType.LEARNED_RANGE, rescale=False):
    return dict(
        betas=get_named_beta_schedule(schedule, steps),
        model_mean_type=ModelMeanType.EPSILON,
        model_var_type=var_type,
        loss_type=LossType.MSE,
        rescale_timesteps=rescale,
    )


def toy_model(x, t, **kwargs):
    # Depends on t, so a wrong timestep mapping changes the samples.
    scale = th.cos(t.float() / 300.0).view(-1, 1, 1, 1)
    return th.cat([0.2 * x * scale, th.tanh(x + scale)], dim=1)


# ---------------------------------------------------------------------------
# space_timesteps


@pytest.mark.parametrize(
    "spec, stride",
    [("ddim25", 40), ("ddim50", 20), ("ddim100", 10), ("ddim250", 4), ("ddim1000", 1), ("ddim3", 334)],
)
def test_space_timesteps_ddim(spec, stride):
    assert space_timesteps(1000, spec) == set(range(0, 1000, stride))


def test_space_timesteps_ddim_takes_smallest_stride():
    # Strides 143..166 all give 7 steps on 1000; the smallest wins.
    assert space_timesteps(1000, "ddim7") == set(range(0, 1000, 143))


@pytest.mark.parametrize(
    "num_timesteps, spec, message",
    [
        (1000, "ddim999", "cannot create exactly 999 steps with an integer stride"),
        (1000, "ddim1", "cannot create exactly 1 steps with an integer stride"),
        (100, "ddim2000", "cannot create exactly 2000 steps with an integer stride"),
        (10, [11], "cannot divide section of 10 steps into 11"),
        (10, "3,7", "cannot divide section of 5 steps into 7"),
        (11, "6,6", "cannot divide section of 5 steps into 6"),
    ],
)
def test_space_timesteps_errors(num_timesteps, spec, message):
    with pytest.raises(ValueError) as info:
        space_timesteps(num_timesteps, spec)
    assert str(info.value) == message


def test_space_timesteps_sections():
    steps = space_timesteps(300, "10,15,20")
    assert steps == space_timesteps(300, [10, 15, 20])
    assert len(steps) == 45
    # Values that ADM's float accumulation produces (note 149: 7 * 99/14
    # accumulates to just under 49.5).
    assert sorted(steps) == [
        0, 11, 22, 33, 44, 55, 66, 77, 88, 99,
        100, 107, 114, 121, 128, 135, 142, 149, 157, 164, 171, 178, 185, 192, 199,
        200, 205, 210, 216, 221, 226, 231, 236, 242, 247, 252, 257, 263, 268, 273,
        278, 283, 289, 294, 299,
    ]  # fmt: skip


def test_space_timesteps_uneven_sections():
    # 10 steps in two sections of 5; 11 steps as 6 + 5 (the first is longer).
    assert space_timesteps(10, [2, 3]) == {0, 4, 5, 7, 9}
    assert space_timesteps(11, [1, 2]) == {0, 6, 10}
    assert space_timesteps(1000, "1000") == set(range(1000))
    assert space_timesteps(1000, [250]) == space_timesteps(1000, "250")
    assert len(space_timesteps(1000, "250")) == 250


# ---------------------------------------------------------------------------
# SpacedDiffusion


@pytest.mark.parametrize("rescale", [False, True])
def test_full_spacing_equals_base_diffusion(rescale):
    kwargs = diffusion_kwargs(steps=50, rescale=rescale)
    base = GaussianDiffusion(**kwargs)
    spaced = SpacedDiffusion(space_timesteps(50, "50"), **kwargs)
    assert spaced.num_timesteps == 50
    assert spaced.timestep_map == list(range(50))
    np.testing.assert_allclose(spaced.betas, base.betas, rtol=1e-10)
    np.testing.assert_allclose(spaced.alphas_cumprod, base.alphas_cumprod, rtol=1e-12)

    th.manual_seed(0)
    a = base.p_sample_loop(toy_model, SHAPE)
    th.manual_seed(0)
    b = spaced.p_sample_loop(toy_model, SHAPE)
    np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5)
    th.manual_seed(0)
    a = base.ddim_sample_loop(toy_model, SHAPE, eta=0.3)
    th.manual_seed(0)
    b = spaced.ddim_sample_loop(toy_model, SHAPE, eta=0.3)
    np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5)


def test_spaced_alphas_cumprod_and_timestep_map():
    kwargs = diffusion_kwargs(steps=100, schedule="cosine")
    base = GaussianDiffusion(**kwargs)
    use = space_timesteps(100, "ddim10")
    spaced = SpacedDiffusion(use, **kwargs)
    assert spaced.original_num_steps == 100
    assert spaced.use_timesteps == set(range(0, 100, 10))
    assert spaced.timestep_map == list(range(0, 100, 10))
    assert spaced.num_timesteps == 10
    # The kept steps see the same noise levels as in the base process.
    np.testing.assert_allclose(spaced.alphas_cumprod, base.alphas_cumprod[::10], rtol=1e-12)
    # kwargs are not modified in place.
    assert len(kwargs["betas"]) == 100


@pytest.mark.parametrize("rescale", [False, True])
def test_model_and_cond_fn_see_original_timesteps(rescale):
    spaced = SpacedDiffusion(space_timesteps(100, "ddim5"), **diffusion_kwargs(steps=100, rescale=rescale))
    model_ts, cond_ts = [], []

    def model(x, t, y=None):
        assert y is not None
        model_ts.append(t.tolist())
        return toy_model(x, t)

    def cond_fn(x, t, y=None):
        cond_ts.append(t.tolist())
        return th.zeros_like(x)

    th.manual_seed(0)
    spaced.p_sample_loop(model, SHAPE, cond_fn=cond_fn, model_kwargs={"y": th.tensor([1, 2])})
    expected = [[t, t] for t in (80, 60, 40, 20, 0)]
    if rescale:
        # Rescaled relative to the original 100 steps, not the 5 kept ones.
        expected = [[t * 10.0, t * 10.0] for t, _ in expected]
    assert model_ts == expected
    assert cond_ts == expected

    model_ts.clear()
    cond_ts.clear()
    spaced.ddim_sample_loop(model, SHAPE, cond_fn=cond_fn, model_kwargs={"y": th.tensor([1, 2])})
    assert model_ts == expected
    assert cond_ts == expected

    model_ts.clear()
    spaced.training_losses(model, th.zeros(SHAPE), th.tensor([4, 1]), model_kwargs={"y": th.tensor([1, 2])})
    assert model_ts == [[expected[0][0], expected[3][0]]]


def test_spaced_sampling_equals_manual_base_steps():
    # One spaced p_mean_variance call equals the base process with the
    # spaced betas and the model fed the original timestep.
    kwargs = diffusion_kwargs(steps=100, schedule="cosine")
    spaced = SpacedDiffusion(space_timesteps(100, "ddim4"), **kwargs)
    manual = GaussianDiffusion(**{**kwargs, "betas": spaced.betas})
    x = th.randn(*SHAPE, generator=th.Generator().manual_seed(1))
    t = th.tensor([2, 1])
    out = spaced.p_mean_variance(toy_model, x, t)
    ref = manual.p_mean_variance(lambda x, t_: toy_model(x, th.tensor([50, 25])), x, t)
    for key in out:
        assert th.equal(out[key], ref[key]), key


def test_wrapped_model_is_not_wrapped_twice():
    spaced = SpacedDiffusion(space_timesteps(100, "ddim4"), **diffusion_kwargs(steps=100))
    wrapped = spaced._wrap_model(toy_model)
    assert isinstance(wrapped, _WrappedModel)
    assert spaced._wrap_model(wrapped) is wrapped
    assert th.equal(spaced._scale_timesteps(th.tensor([3])), th.tensor([3]))


def test_spaced_condition_score_and_mean():
    spaced = SpacedDiffusion(space_timesteps(100, "ddim4"), **diffusion_kwargs(steps=100))
    seen = []

    def cond_fn(x, t, **kwargs):
        seen.append(t.tolist())
        return th.ones_like(x)

    x = th.randn(*SHAPE, generator=th.Generator().manual_seed(2))
    t = th.tensor([3, 1])
    out = spaced.p_mean_variance(toy_model, x, t)
    new_mean = spaced.condition_mean(cond_fn, out, x, t, model_kwargs={})
    assert th.allclose(new_mean, out["mean"] + out["variance"])
    spaced.condition_score(cond_fn, out, x, t, model_kwargs={})
    assert seen == [[75, 25], [75, 25]]

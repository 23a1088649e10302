"""
The scale schedules of guided_diffusion/methods/schedules.py, shared by PAG, SAG and autoguidance: every shape at its end
points, the sigma interval on the original timesteps under respacing, and the constant schedule computing what the
guided models computed before schedules existed.
"""

import math

import numpy as np
import pytest
import torch as th

from conftest import TINY_ADM_FLAGS, flag_args, randomize

from guided_diffusion.common.errors import UsageError
from guided_diffusion.run.guidance import guide_model
from guided_diffusion.methods.pag import PAGGuidedModel, perturb_attention
from guided_diffusion.methods.guided_model import check_t_range
from guided_diffusion.methods.schedules import ScaleSchedule, check_sigma_interval, model_timesteps, step_sigmas
from guided_diffusion.script_util import create_gaussian_diffusion, create_model, model_and_diffusion_defaults

pytestmark = pytest.mark.usefixtures("one_thread")


def _diffusion(respacing="", steps=1000, schedule="linear", rescale=False):
    return create_gaussian_diffusion(
        steps=steps, noise_schedule=schedule, timestep_respacing=respacing, learn_sigma=True,
        rescale_timesteps=rescale,
    )


@pytest.mark.parametrize("respacing", ["", "ddim10", "25"])
def test_every_shape_at_its_end_points(respacing):
    diffusion = _diffusion(respacing)
    n = diffusion.num_timesteps
    s = 3.0
    linear = ScaleSchedule("linear", diffusion).step_scales(s)
    cosine = ScaleSchedule("cosine", diffusion).step_scales(s)
    # Index 0 is the last step sampled, N - 1 the first (the noisiest).
    assert linear[-1] == s and linear[0] == 0.0
    assert cosine[-1] == s and cosine[0] == 0.0
    i = np.arange(n)
    np.testing.assert_allclose(linear, s * i / (n - 1), rtol=1e-15)
    np.testing.assert_allclose(cosine, s * np.cos(np.pi / 2 * (n - 1 - i) / (n - 1)), rtol=0, atol=1e-15)
    assert np.all(np.diff(linear) > 0) and np.all(np.diff(cosine) > 0)
    # The official code's disabled schedules, np.linspace(g, 0, N)[::-1] and (cos(np.linspace(0, pi/2, N)) * g)[::-1],
    # applied to s: the same numbers.
    np.testing.assert_allclose(linear, np.linspace(s, 0, n)[::-1], rtol=0, atol=1e-15)
    np.testing.assert_allclose(cosine, (np.cos(np.linspace(0, np.pi / 2, n)) * s)[::-1], rtol=0, atol=1e-15)


def test_adaptive_at_its_end_points():
    s, a = 3.0, 0.004
    full = ScaleSchedule("adaptive", _diffusion(), adaptive_a=a).step_scales(s)
    # t = 999 (the first step): s - a; the scale reaches 0 at t = 1000 - s / a = 250 and stays there.
    assert full[999] == pytest.approx(s - a * 1) and full[0] == 0.0
    assert full[251] > 0 and np.all(full[:251] == 0)
    np.testing.assert_allclose(full, np.maximum(0, s - a * (1000 - np.arange(1000))), rtol=1e-12, atol=1e-12)
    # 100 diffusion steps: the timestep on a 0..1000 scale, t * 10.
    short = ScaleSchedule("adaptive", _diffusion(steps=100), adaptive_a=a).step_scales(s)
    assert short[99] == pytest.approx(s - a * 10) and short[0] == 0.0
    # a = 0 is the constant scale.
    assert np.all(ScaleSchedule("adaptive", _diffusion("ddim10"), adaptive_a=0.0).step_scales(s) == s)


def test_sigma_interval_uses_the_original_timesteps_under_respacing():
    base = _diffusion(schedule="cosine")
    spaced = _diffusion("ddim10", schedule="cosine")
    assert spaced.timestep_map == list(range(0, 1000, 100))
    abar = np.cumprod(1.0 - base.betas)
    sigma = np.sqrt((1 - abar) / abar)
    # sigma_t at each sampled step is the original process's at the step's original timestep, not the value at
    # the respaced index (sigma[i] for i = 0..9 would be tiny).
    np.testing.assert_array_equal(step_sigmas(spaced), sigma[spaced.timestep_map])
    # An interval (sigma_100, sigma_500]: steps 200..500 are guided, 100 (its open end) is not.
    lo, hi = sigma[100], sigma[500]
    scales = ScaleSchedule("constant", spaced, sigma_interval=(lo, hi)).step_scales(2.0)
    guided = [t for t, value in zip(spaced.timestep_map, scales) if value]
    assert guided == [200, 300, 400, 500]
    assert set(scales) == {0.0, 2.0}
    # With rescaled timesteps the model sees t * 1000 / T, and the lookup follows it.
    rescaled = _diffusion("ddim10", steps=500, schedule="cosine", rescale=True)
    schedule = ScaleSchedule("linear", rescaled)
    t = model_timesteps(rescaled)
    assert t.tolist() == [float(v) * 2 for v in range(0, 500, 50)]
    np.testing.assert_allclose(schedule.scales(2.0, t, 10).numpy(), 2.0 * np.arange(10) / 9, rtol=1e-15)


def test_sigma_interval_combines_with_a_shape():
    diffusion = _diffusion("ddim10")
    sigma = step_sigmas(diffusion)
    both = ScaleSchedule("linear", diffusion, sigma_interval=(0.0, sigma[5])).step_scales(3.0)
    np.testing.assert_allclose(both, [3.0 * i / 9 if i <= 5 else 0.0 for i in range(10)], rtol=1e-15)


@pytest.mark.parametrize("kwargs, message", [
    (dict(kind="steep"), "schedule kind 'steep' is unknown"),
    (dict(kind="adaptive"), "adaptive_a is required by the adaptive schedule and by no other"),
    (dict(kind="linear", adaptive_a=0.1), "adaptive_a is required by the adaptive schedule and by no other"),
    (dict(kind="adaptive", adaptive_a=-1.0), "adaptive_a must be a finite number >= 0"),
    (dict(kind="constant", sigma_interval=(3, 1)), "sigma_interval must satisfy 0 <= lo < hi"),
    (dict(kind="linear", diffusion=None), "the linear schedule needs the diffusion"),
])
def test_bad_schedules(kwargs, message):
    kwargs.setdefault("diffusion", _diffusion())
    with pytest.raises(ValueError, match=message):
        ScaleSchedule(**kwargs)


@pytest.fixture(scope="module")
def tiny():
    th.manual_seed(0)
    model = randomize(create_model(**TINY_ADM_FLAGS), std=0.05)
    gen = th.Generator().manual_seed(1)
    x = th.randn(3, 3, 32, 32, generator=gen)
    return model, x, th.tensor([900, 500, 0]), th.tensor([1, 2, 3])


def test_the_constant_schedule_computes_what_pag_computed(tiny):
    model, x, t, y = tiny
    with th.no_grad():
        default = PAGGuidedModel(model, 2.5, "middle", batched=False)
        explicit = PAGGuidedModel(model, 2.5, "middle", batched=False, schedule=ScaleSchedule("constant"))
        for guided in (default, explicit):
            # The row scale is the wrapper's own float: the arithmetic is the pre-schedule eps + s (eps - eps').
            rows, scale = guided.row_scales(t, 3)
            assert rows is True and scale is guided.scale
        plain = model(x, t, y=y)
        with perturb_attention(model, "middle"):
            perturbed = model(x, t, y=y)
        statement = plain[:, :3] + 2.5 * (plain[:, :3] - perturbed[:, :3])
        assert th.equal(default(x, t, y=y)[:, :3], statement)
        assert th.equal(explicit(x, t, y=y), default(x, t, y=y))


def test_schedules_reach_every_method_through_the_flags(tiny):
    model, x, t, y = tiny
    diffusion = _diffusion()
    args = dict(model_and_diffusion_defaults(), **TINY_ADM_FLAGS)
    pag = guide_model(model, diffusion, flag_args(**args, pag_scale=2.0, pag_schedule="cosine"))
    assert pag.schedule.kind == "cosine" and "schedule cosine" in pag.describe()
    sag = guide_model(model, diffusion, flag_args(**args, sag_scale=1.0, sag_layer="middle", sag_schedule="adaptive",
                                                  sag_adaptive_a=0.001))
    assert sag.schedule.kind == "adaptive" and sag.schedule.adaptive_a == 0.001
    # At t = 0 the cosine schedule's scale is 0: that row is not guided (no perturbed pass for it).
    rows, scales = pag.row_scales(t, 3)
    assert rows.tolist() == [0, 1]
    np.testing.assert_allclose(scales.numpy(), [2.0 * math.sin(math.pi / 2 * 900 / 999), 2.0 * math.sin(math.pi / 2 * 500 / 999)])
    spaced = _diffusion("ddim10")
    for values, message in [
        (dict(pag_scale=2.0, pag_sigma_interval="0,0.001"), "gives scale 0 at every one of the 10 sampled steps"),
        (dict(pag_scale=2.0, pag_schedule="adaptive", pag_adaptive_a=1.0), "--pag_adaptive_a 1 gives scale 0"),
        (dict(pag_scale=2.0, pag_schedule="linear", pag_interval="0,50"), "--pag_interval '0,50' gives scale 0"),
        (dict(pag_scale=-1.0, pag_schedule="adaptive", pag_adaptive_a=0.1), "needs a positive --pag_scale"),
        (dict(pag_scale=2.0, pag_adaptive_a=0.1), "--pag_adaptive_a applies to --pag_schedule adaptive only"),
        (dict(sag_scale=2.0, sag_sigma_interval="1"), "--sag_sigma_interval '1' is malformed"),
    ]:
        with pytest.raises(UsageError) as info:
            guide_model(model, spaced, flag_args(**args, **values))
        assert message in str(info.value)
    # The flags of an unconstant schedule while the method is off are reported as having no effect.
    from guided_diffusion.run.guidance import ignored_flags_warnings

    lines = ignored_flags_warnings(flag_args(**args, ag_schedule="linear"))
    assert lines and "--ag_schedule linear" in lines[0]


@pytest.mark.parametrize("value", ["ab", (1,), (1, "x"), 5])
def test_a_range_that_is_not_two_numbers_is_named(value):
    with pytest.raises(ValueError, match=r"t_range must be a pair \(lo, hi\) of numbers"):
        check_t_range(value)
    with pytest.raises(ValueError, match=r"sigma_interval must be a pair \(lo, hi\) of numbers"):
        check_sigma_interval(value)

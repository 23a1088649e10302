"""
Autoguidance (guided_diffusion/methods/autoguidance.py, guidance.AGFlags): the rule against a hand-written statement of it,
the guide equal to the main model giving the plain model at any weight, the variance from the main model, the cost
accounting, and the flags' one-line errors.
"""

import copy
import math

import numpy as np
import pytest
import torch as th

from conftest import TINY_ADM_FLAGS, flag_args, randomize

from guided_diffusion.methods.autoguidance import AutoguidedModel, forward_flops, guide_cost_ratio
from guided_diffusion.common.errors import UsageError
from guided_diffusion.run.guidance import AGFlags, check_guidance_args, parse_guide_flags
from guided_diffusion.methods.schedules import ScaleSchedule
from guided_diffusion.script_util import create_gaussian_diffusion, create_model, model_and_diffusion_defaults

pytestmark = pytest.mark.usefixtures("one_thread")

# A guide with one width at every level: smaller than TINY_ADM_FLAGS's 1,2,2.
GUIDE_FLAGS = dict(TINY_ADM_FLAGS, channel_mult="1,1,1")


def _model(seed, **overrides):
    th.manual_seed(seed)
    return randomize(create_model(**{**TINY_ADM_FLAGS, **overrides}), seed=seed, std=0.05)


@pytest.fixture(scope="module")
def models():
    main = _model(0)
    guide = _model(1, channel_mult="1,1,1")
    gen = th.Generator().manual_seed(5)
    x = th.randn(3, 3, 32, 32, generator=gen)
    t = th.tensor([900, 500, 20])
    y = th.tensor([1, 7, 3])
    return main, guide, x, t, y


@pytest.mark.parametrize("scale", [-1.0, -0.4, 0.7, 2.0, 5.5])
def test_the_guide_equal_to_the_main_model_is_the_plain_model_at_any_weight(models, scale):
    main, _, x, t, y = models
    with th.no_grad():
        plain = main(x, t, y=y)
        for guide in (main, copy.deepcopy(main)):
            guided = AutoguidedModel(main, guide, scale)
            # eps + s (eps - eps) = eps exactly: both calls compute the same numbers on the same inputs.
            assert th.equal(guided(x, t, y=y), plain)
            _, both = guided.plain_and_guided(x, t, y=y)
            assert th.equal(both, plain)


def test_the_rule_against_its_statement(models):
    main, guide, x, t, y = models
    s = 1.5
    with th.no_grad():
        out = AutoguidedModel(main, guide, s)(x, t, y=y)
        m, g = main(x, t, y=y), guide(x, t, y=y)
    eps_m, eps_g = m[:, :3], g[:, :3]
    np.testing.assert_array_equal(out[:, :3].numpy(), (eps_m + s * (eps_m - eps_g)).numpy())
    # The variance channels are the main model's, untouched.
    assert th.equal(out[:, 3:], m[:, 3:])
    # EDM2's form, D_guide.lerp(D_main, w) with w = 1 + s, is the same rule: equal within float32 rounding. Each
    # form rounds three times (a difference, a product, a sum), every intermediate at most
    # M = (1 + s) |eps_m| + s |eps_g| in size, so each is within 3 u M of the exact value and they within 6 u M.
    lerp = eps_g.lerp(eps_m, 1 + s)
    bound = 6 * 2.0**-24 * ((1 + s) * eps_m.abs() + s * eps_g.abs())
    assert bool(((out[:, :3] - lerp).abs() <= bound).all())
    # The guide really differs, so the test above is not vacuous.
    assert (eps_m - eps_g).abs().max() > 1e-2


def test_a_guide_without_learned_variance_and_the_main_models_variance(models):
    main, _, x, t, y = models
    guide = _model(2, channel_mult="1,1,1", learn_sigma=False)
    with th.no_grad():
        out = AutoguidedModel(main, guide, 2.0)(x, t, y=y)
        m, g = main(x, t, y=y), guide(x, t, y=y)
    assert g.shape[1] == 3
    np.testing.assert_array_equal(out[:, :3].numpy(), (m[:, :3] + 2.0 * (m[:, :3] - g)).numpy())
    assert th.equal(out[:, 3:], m[:, 3:])


def test_scale_zero_never_calls_the_guide(models):
    main, _, x, t, y = models

    def guide(*args, **kwargs):
        raise AssertionError("the guide was called")

    with th.no_grad():
        assert th.equal(AutoguidedModel(main, guide, 0.0)(x, t, y=y), main(x, t, y=y))


def test_interval_and_schedule_rows(models):
    main, guide, x, t, y = models
    diffusion = create_gaussian_diffusion(steps=1000, noise_schedule="linear", learn_sigma=True)
    with th.no_grad():
        plain = main(x, t, y=y)
        late = AutoguidedModel(main, guide, 2.0, t_range=(0, 499))(x, t, y=y)
        weak_last = guide(x[2:], t[2:], y=y[2:])
        linear = AutoguidedModel(main, guide, 2.0, schedule=ScaleSchedule("linear", diffusion))(x, t, y=y)
        weak = guide(x, t, y=y)
    # Outside the interval the plain output; inside it the rule, the guide run on the guided rows only.
    assert th.equal(late[:2], plain[:2])
    eps = plain[2:, :3]
    assert th.equal(late[2:, :3], eps + 2.0 * (eps - weak_last[:, :3]))
    # The linear schedule on 1000 unspaced steps: s t / 999 at each row's own t.
    s = (2.0 * (t.double() / 999)).float().view(-1, 1, 1, 1)
    assert th.equal(linear[:, :3], plain[:, :3] + s * (plain[:, :3] - weak[:, :3]))
    assert th.equal(linear[:, 3:], plain[:, 3:])


def test_call_cost_counts_the_guide_by_its_flops(models):
    main, guide, _, t, _ = models
    ratio = guide_cost_ratio(main, guide)
    assert 0 < ratio < 1
    assert ratio == pytest.approx(forward_flops(guide) / forward_flops(main))
    guided = AutoguidedModel(main, guide, 1.0, t_range=(0, 499))
    np.testing.assert_allclose(guided.call_cost(t).numpy(), [1.0, 1.0, 1.0 + ratio])
    assert AutoguidedModel(main, main, 1.0).call_cost(t).tolist() == [2.0, 2.0, 2.0]
    assert AutoguidedModel(main, guide, 0.0).call_cost(t).tolist() == [1.0, 1.0, 1.0]
    assert AutoguidedModel(main, guide, 1.0, cost_ratio=0.25).call_cost(th.tensor(3)).item() == 1.25  # one row


def test_a_guide_with_other_output_channels_is_refused(models):
    main, _, x, t, y = models
    with pytest.raises(ValueError, match="the autoguidance guide's output has 4 channels"):
        AutoguidedModel(main, lambda x, t, **kw: th.zeros(x.shape[0], 4, 32, 32), 1.0)(x, t, y=y)


# --- the flags ------------------------------------------------------------------------------------------------------


def _args(**values):
    base = dict(model_and_diffusion_defaults(), **TINY_ADM_FLAGS)
    return flag_args(**{**base, **values})


def test_guide_flags_default_to_the_main_models_and_are_overridden():
    args = _args()
    main = parse_guide_flags("", args, super_res=False)
    assert main["channel_mult"] == "1,2,2" and main["num_channels"] == 32
    guide = parse_guide_flags("--channel_mult 1,1,1 --learn_sigma False", args, super_res=False)
    assert guide["channel_mult"] == "1,1,1" and guide["learn_sigma"] is False and guide["num_heads"] == 4
    from_file = parse_guide_flags("@digits16_weak_model", _args(image_size=16, class_cond=False, noise_schedule="cosine"), False)
    assert from_file["channel_mult"] == "1,1,1" and from_file["num_channels"] == 32


@pytest.mark.parametrize("values, message", [
    (dict(ag_model_flags="--num_samples 4"), "--ag_model_flags: --num_samples 4 are not the model's architecture flags"),
    (dict(ag_model_flags="--num_channels many"), "--ag_model_flags: argument --num_channels: invalid int value: 'many'"),
    (dict(ag_model_flags="--image_size 64"), "--ag_model_flags gives --image_size 64, the main model has 32"),
    (dict(ag_model_flags="--noise_schedule cosine"), "--ag_model_flags gives --noise_schedule cosine, the main model has linear"),
    (dict(ag_model_flags="@no_such_config"), "--ag_model_flags '@no_such_config': unknown config 'no_such_config'"),
    (dict(ag_model_flags="'--channel_mult 1,1"), "--ag_model_flags"),
    (dict(ag_scale=1.0, ag_schedule="adaptive"), "--ag_schedule adaptive needs --ag_adaptive_a A"),
    (dict(ag_scale=1.0, ag_schedule="steep"), "--ag_schedule 'steep' is unknown"),
    (dict(ag_scale=1.0, ag_sigma_interval="2,1"), "--ag_sigma_interval '2,1' is out of range"),
    (dict(ag_scale=1.0, ag_interval="0"), "--ag_interval '0' is malformed"),
    (dict(ag_scale=1.0, pag_scale=3.0), "--ag_scale cannot be combined with --pag_scale"),
    (dict(ag_scale=1.0, sag_scale=0.5), "--ag_scale cannot be combined with --sag_scale"),
])
def test_bad_autoguidance_flags_are_usage_errors(values, message):
    with pytest.raises(UsageError) as info:
        check_guidance_args(_args(**values))
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_a_flag_file_given_to_ag_model_flags_is_its_value_not_spliced_in():
    from guided_diffusion.run.flag_files import expand_flag_files

    tokens, _ = expand_flag_files(["--ag_model_flags", "@digits16_weak_model", "@digits16_model"])
    assert tokens[:2] == ["--ag_model_flags", "@digits16_weak_model"] and "--image_size" in tokens[2:]


def test_describe_names_both_conventions():
    spec = AGFlags().spec(_args(ag_scale=1.5, ag_model_path="weak.pt", ag_model_flags="--channel_mult 1,1,1"))
    text = AGFlags().describe(spec)
    assert text.startswith("autoguidance: scale 1.5 (w = 2.5), guide 'weak.pt', guide flags '--channel_mult 1,1,1'")
    assert AGFlags().checkpoints(spec) == {"ag_model_path": "autoguidance guide model"}
    off = AGFlags().spec(_args(ag_model_path="weak.pt"))
    assert AGFlags().checkpoints(off) == {} and AGFlags().ignored(off) == ["--ag_model_path weak.pt"]
    assert math.isclose(spec.scale + 1, 2.5)

"""
Self-Attention Guidance (sag.py) against a rewrite of the official SAG sampler (SusungHong/Self-Attention-Guidance:
the attention map from a forward hook on the selected block, attention_masking, the guided p_sample with
classifier guidance after it), on a tiny model; per-row intervals, s = 0, clean-up and bad input.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from guided_diffusion.gaussian_diffusion import ModelMeanType
from guided_diffusion.methods.sag import SAGGuidedModel, sag_layer_name
from guided_diffusion.script_util import create_gaussian_diffusion
from guided_diffusion.unet import AttentionBlock

from conftest import flag_args, load_script, randomize_zero_params, tiny_flags
from test_perturbations import batch, blocks_clean, reference_blur, tiny_unet

LAYER = "output_blocks.2.1"  # the official default name (--sel_attn_block output --sel_attn_depth 2): 8x8 here


pytestmark = pytest.mark.usefixtures("one_thread")


def respaced(steps="4", **kwargs):
    return create_gaussian_diffusion(steps=1000, learn_sigma=True, timestep_respacing=steps, **kwargs)


# --- the official sampler, rewritten -------------------------------------------------------------------------


class OfficialModel:
    """
    The official UNetModel.forward of SAG: (output, attention map), the map recomputed from the qkv a forward hook
    saved on the selected block's attention module (as float32), split into `num_heads` heads the legacy way.
    """

    def __init__(self, model, layer, num_heads):
        self.model = model
        self.attention = dict(model.named_modules())[layer].attention
        self.num_heads = num_heads

    def __call__(self, x, t, **kwargs):
        saved = {}
        handle = self.attention.register_forward_hook(lambda m, inp, out: saved.update(qkv=inp[0].detach().float()))
        try:
            with torch.no_grad():
                out = self.model(x, t, **kwargs)
        finally:
            handle.remove()
        qkv = saved["qkv"]
        bs, width, length = qkv.shape
        ch = width // (3 * self.num_heads)
        q, k, v = qkv.reshape(bs * self.num_heads, ch * 3, length).split(ch, dim=1)
        scale = 1 / math.sqrt(math.sqrt(ch))
        weight = torch.softmax(torch.einsum("bct,bcs->bts", q * scale, k * scale).float(), dim=-1)
        return out, weight


def official_step(diffusion, official, x, i, y, guide_scale, blur_sigma, cond_fn=None, noise=None):
    """
    One step of the official guided p_sample (x_{t-1} from x_t at spaced index i), written out; with noise=None
    returns (mean, log_variance) instead of the sample.
    """
    n, c, h, w = x.shape
    t_model = torch.full((n,), diffusion.timestep_map[i], dtype=torch.long)
    ac = float(diffusion.alphas_cumprod[i])
    out, attn = official(x, t_model, y=y)
    eps, var_values = out[:, :c], out[:, c:]
    x0 = (math.sqrt(1 / ac) * x - math.sqrt(1 / ac - 1) * eps).clamp(-1, 1)
    # attention_masking
    heads = official.num_heads
    res = int(math.isqrt(attn.shape[-1]))
    mask = attn.reshape(n, heads, res * res, res * res).mean(1).sum(1) > 1.0
    mask = mask.reshape(n, res, res).unsqueeze(1).repeat(1, 3, 1, 1).int().float()
    mask = F.interpolate(mask, (h, w))
    blurred = reference_blur(x0.reshape(n * c, h, w), 31, blur_sigma).reshape(n, c, h, w)
    x_bar = blurred * mask + x0 * (1 - mask)
    x_t_bar = math.sqrt(ac) * x_bar + math.sqrt(1 - ac) * eps
    eps_bar = official(x_t_bar, t_model, y=y)[0][:, :c]
    guided = eps_bar + guide_scale * (eps - eps_bar)
    pred_xstart = (math.sqrt(1 / ac) * x - math.sqrt(1 / ac - 1) * guided).clamp(-1, 1)
    mean = float(diffusion.posterior_mean_coef1[i]) * pred_xstart + float(diffusion.posterior_mean_coef2[i]) * x
    frac = (var_values + 1) / 2
    min_log = float(diffusion.posterior_log_variance_clipped[i])
    max_log = math.log(float(diffusion.betas[i]))
    log_variance = frac * max_log + (1 - frac) * min_log
    if cond_fn is not None:
        mean = mean + torch.exp(log_variance) * cond_fn(x, t_model, y=y)
    if noise is None:
        return mean, log_variance, mask, x0, blurred
    return mean + (i != 0) * torch.exp(0.5 * log_variance) * noise


# --- one step ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("map_heads", [None, 4])
def test_guided_mean_equals_the_official_p_sample(map_heads):
    model = tiny_unet()
    diffusion = respaced("10")
    x, _, kwargs = batch()
    x = x.clamp(-2, 2)
    i = 5
    t = torch.full((3,), i, dtype=torch.long)
    guided = SAGGuidedModel(model, diffusion, scale=0.5, layer=LAYER, blur_sigma=3.0, map_heads=map_heads)
    assert guided.map_heads == (2 if map_heads is None else 4)
    with torch.no_grad():
        ours = diffusion.p_mean_variance(guided, x, t, clip_denoised=True, model_kwargs=kwargs)
        plain = diffusion.p_mean_variance(model, x, t, clip_denoised=True, model_kwargs=kwargs)
    official = OfficialModel(model, LAYER, num_heads=guided.map_heads)
    mean, log_variance, mask, x0, blurred = official_step(diffusion, official, x, i, kwargs["y"], 1.5, 3.0)
    torch.testing.assert_close(ours["mean"], mean, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours["log_variance"], log_variance, rtol=0, atol=1e-6)
    # The variance is the plain pass's; the mean is not the plain one; the mask and the blur are not trivial.
    assert torch.equal(ours["variance"], plain["variance"])
    assert (ours["mean"] - plain["mean"]).abs().max() > 1e-3
    assert 0.05 < mask.mean() < 0.95
    assert (blurred - x0).abs().max() > 0.1
    assert blocks_clean(model)


def test_map_heads_of_the_official_quirk_differ_from_the_real_map():
    model = tiny_unet()
    diffusion = respaced("10")
    x, _, kwargs = batch()
    t = torch.full((3,), 5, dtype=torch.long)
    with torch.no_grad():
        real = SAGGuidedModel(model, diffusion, 0.5, LAYER, 3.0)(x, diffusion.timestep_map[5] + 0 * t, **kwargs)
        quirk = SAGGuidedModel(model, diffusion, 0.5, LAYER, 3.0, map_heads=4)(x, diffusion.timestep_map[5] + 0 * t, **kwargs)
    assert (real - quirk).abs().max() > 1e-4


# --- sampling ---------------------------------------------------------------------------------------------------


def _classifier_cond_fn(scale):
    from guided_diffusion.unet import EncoderUNetModel

    classifier = EncoderUNetModel(
        image_size=16, in_channels=3, model_channels=32, out_channels=10, num_res_blocks=1,
        attention_resolutions=(2,), channel_mult=(1, 2), num_heads=4, use_scale_shift_norm=True, pool="adaptive",
    )
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in classifier.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    classifier.eval()

    def cond_fn(x, t, y=None):
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            log_probs = torch.log_softmax(classifier(x_in, t), dim=-1)
            return torch.autograd.grad(log_probs[range(len(y)), y].sum(), x_in)[0] * scale

    return cond_fn


@pytest.mark.parametrize("with_classifier", [False, True])
def test_sampling_equals_the_official_loop(with_classifier):
    model = tiny_unet()
    diffusion = respaced("4")
    y = torch.tensor([4, 9])
    start = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    cond_fn = _classifier_cond_fn(2.0) if with_classifier else None
    guided = SAGGuidedModel(model, diffusion, scale=0.8, layer=LAYER, blur_sigma=2.0)
    torch.manual_seed(0)
    sample = diffusion.p_sample_loop(guided, start.shape, noise=start, cond_fn=cond_fn, model_kwargs={"y": y})
    official = OfficialModel(model, LAYER, num_heads=2)
    torch.manual_seed(0)
    x = start
    for i in reversed(range(diffusion.num_timesteps)):
        x = official_step(diffusion, official, x, i, y, 1.8, 2.0, cond_fn=cond_fn, noise=torch.randn_like(x))
    torch.testing.assert_close(sample, x, rtol=0, atol=1e-4)
    torch.manual_seed(0)
    plain = diffusion.p_sample_loop(model, start.shape, noise=start, cond_fn=cond_fn, model_kwargs={"y": y})
    assert (sample - plain).abs().max() > 1e-3
    assert blocks_clean(model)


def test_ddim_uses_the_guided_eps():
    # The official SAG code guides only its ancestral sampler; here DDIM gets the same guided eps.
    model = tiny_unet()
    diffusion = create_gaussian_diffusion(steps=1000, learn_sigma=True, timestep_respacing="ddim4")
    y = torch.tensor([4, 9])
    start = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    guided = SAGGuidedModel(model, diffusion, scale=0.8, layer=LAYER, blur_sigma=2.0)
    sample = diffusion.ddim_sample_loop(guided, start.shape, noise=start, model_kwargs={"y": y})
    x = start
    for i in reversed(range(diffusion.num_timesteps)):
        with torch.no_grad():
            eps = guided(x, torch.full((2,), diffusion.timestep_map[i]), y=y)[:, :3]
        ac, ac_prev = float(diffusion.alphas_cumprod[i]), float(diffusion.alphas_cumprod_prev[i])
        x0 = (math.sqrt(1 / ac) * x - math.sqrt(1 / ac - 1) * eps).clamp(-1, 1)
        eps = (math.sqrt(1 / ac) * x - x0) / math.sqrt(1 / ac - 1)
        x = x0 * math.sqrt(ac_prev) + math.sqrt(1 - ac_prev) * eps
    torch.testing.assert_close(sample, x, rtol=0, atol=1e-5)


@pytest.mark.parametrize("rescale", [False, True])
def test_t_range_guides_only_rows_inside(rescale):
    model = tiny_unet()
    # 500 base steps, so that rescale_timesteps really changes what the model sees (t * 2).
    diffusion = create_gaussian_diffusion(steps=500, learn_sigma=True, timestep_respacing="10", rescale_timesteps=rescale)
    x, _, kwargs = batch(3)
    index = torch.tensor([2, 5, 8])
    t_model = torch.tensor([float(diffusion.timestep_map[i]) for i in index])
    if rescale:
        t_model = t_model * 2.0
    # SAG finds the diffusion's steps from what the model sees.
    assert SAGGuidedModel(model, diffusion, 0.5, LAYER).diffusion_index(t_model).tolist() == index.tolist()
    with torch.no_grad():
        plain = model(x, t_model, **kwargs)
        lo = float(t_model[1])
        out = SAGGuidedModel(model, diffusion, 0.5, LAYER, 3.0, t_range=(lo, 1e9))(x, t_model, **kwargs)
        alone = SAGGuidedModel(model, diffusion, 0.5, LAYER, 3.0)(x[1:], t_model[1:], y=kwargs["y"][1:])
    assert torch.equal(out[0], plain[0])
    torch.testing.assert_close(out[1:], alone, rtol=0, atol=1e-6)
    assert (out[1:] - plain[1:]).abs().max() > 1e-3


def test_scale_zero_is_plain_sampling_bit_for_bit():
    model = tiny_unet()
    diffusion = respaced("3")
    y = torch.tensor([2, 5])
    start = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    calls = []
    model.register_forward_hook(lambda m, inp, out: calls.append(inp[0].shape[0]))
    torch.manual_seed(0)
    plain = diffusion.p_sample_loop(model, start.shape, noise=start, model_kwargs={"y": y})
    torch.manual_seed(0)
    guided = diffusion.p_sample_loop(SAGGuidedModel(model, diffusion, 0.0, LAYER), start.shape, noise=start, model_kwargs={"y": y})
    assert torch.equal(guided, plain)
    assert calls == [2] * 6


def test_no_capture_is_left_behind_on_exceptions():
    model = tiny_unet()
    diffusion = respaced("10")
    x, _, _ = batch()
    guided = SAGGuidedModel(model, diffusion, 0.5, LAYER)
    with pytest.raises(AssertionError, match="must specify y"):
        guided(x, torch.full((3,), diffusion.timestep_map[3]))
    assert blocks_clean(model)
    # A timestep that is not a step of the diffusion: a clear error, and nothing left behind either.
    with pytest.raises(ValueError, match=r"^SAG: the model was called with timestep 5, which is not a step of the diffusion SAG was given"):
        with torch.no_grad():
            guided(x, torch.full((3,), 5), y=torch.tensor([1, 2, 3]))
    assert blocks_clean(model)


# --- flags and bad input ----------------------------------------------------------------------------------------


def test_official_layer_names():
    assert sag_layer_name("output", 2) == "output_blocks.2.1"
    assert sag_layer_name("output", 8) == "output_blocks.8.1"
    assert sag_layer_name("middle") == "middle_block.1"
    with pytest.raises(ValueError, match="sel_attn_block must be 'middle' or 'output'"):
        sag_layer_name("input", 0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(layer="output_blocks.4.1"), r"^SAG layer: unknown attention block 'output_blocks.4.1'; this model's attention blocks are: input_blocks.3.1, "),
        (dict(layer="output_blocks.2.0"), r"^SAG layer: unknown attention block 'output_blocks.2.0'"),
        (dict(layer="output"), r"^SAG reads the attention map of one block; layer 'output' selects 4: output_blocks.0.1, "),
        (dict(scale=math.nan), r"^SAG scale must be finite, got nan$"),
        (dict(scale="1"), r"^SAG scale must be a real number"),
        (dict(blur_sigma=0), r"^SAG blur_sigma must be a number > 0, got 0$"),
        (dict(blur_sigma=math.inf), r"^SAG blur_sigma must be finite, got inf$"),
        (dict(map_heads=3), r"^SAG map_heads 3 does not divide the 64 channels of output_blocks.2.1$"),
        (dict(map_heads=0), r"^SAG map_heads must be None or a positive integer, got 0$"),
        (dict(t_range=(5, 1)), r"t_range must satisfy lo <= hi"),
    ],
)
def test_bad_input(kwargs, message):
    model = tiny_unet()
    args = {"scale": 0.5, "layer": LAYER, **kwargs}
    with pytest.raises(ValueError, match=message):
        SAGGuidedModel(model, respaced("10"), **args)


def test_x0_models_are_rejected():
    model = tiny_unet()
    diffusion = respaced("10", predict_xstart=True)
    assert diffusion.model_mean_type == ModelMeanType.START_X
    with pytest.raises(ValueError, match="SAG needs a model that predicts eps"):
        SAGGuidedModel(model, diffusion, 0.5, LAYER)


def test_images_smaller_than_the_blur_kernel_are_reported():
    model = tiny_unet()
    diffusion = respaced("10")
    x = torch.randn(1, 3, 8, 8)
    guided = SAGGuidedModel(model, diffusion, 0.5, "middle")
    with pytest.raises(ValueError, match=r"kernel size 31 \(reflect padding 15\) needs inputs larger than 15x15, got 8x8"):
        with torch.no_grad():
            guided(x, torch.full((1,), diffusion.timestep_map[3]), y=torch.tensor([1]))
    assert all(m.hook is None for m in model.modules() if isinstance(m, AttentionBlock))


# --- the command-line flags and the scripts ---------------------------------------------------------------------


def test_sag_flag_checks():
    from guided_diffusion.common.errors import UsageError
    from guided_diffusion.run.guidance import GUIDANCE_METHODS, SAGFlags, check_guidance_args, guide_model

    assert [m.name for m in GUIDANCE_METHODS] == ["PAG", "SAG"]
    args = flag_args()
    assert (args.sag_scale, args.sag_layer, args.sag_blur_sigma, args.sag_heads) == (0.0, LAYER, 9.0, "num_heads")
    model = tiny_unet()
    diffusion = respaced("10")
    # Off with the defaults: the plain model, whatever the default layer.
    assert guide_model(model, diffusion, args) is model
    for values, message in [
        (dict(sag_scale=math.nan), "--sag_scale must be a finite number (0 turns SAG off), got nan"),
        (dict(sag_blur_sigma=0.0), "--sag_blur_sigma must be a finite number > 0, got 0.0"),
        (dict(sag_interval="5"), "--sag_interval '5' is malformed"),
        (dict(sag_heads="some"), "--sag_heads 'some': use 'num_heads'"),
        (dict(sag_heads="0"), "--sag_heads '0': use 'num_heads'"),
        (dict(sag_scale=0.5, pag_scale=1.0), "--sag_scale and --pag_scale cannot both be set"),
    ]:
        with pytest.raises(UsageError) as info:
            check_guidance_args(flag_args(**values))
        assert message in str(info.value)
    for values, message in [
        (dict(sag_layer="output_blocks.4.1"), "--sag_layer 'output_blocks.4.1': unknown attention block 'output_blocks.4.1'; this model's attention blocks are: input_blocks.3.1"),
        (dict(sag_scale=0.5, sag_layer="output_blocks.4.1"), "--sag_layer 'output_blocks.4.1': unknown attention block"),
        (dict(sag_scale=0.5, sag_layer="all"), "SAG reads the attention map of one block; layer 'all' selects 7"),
        (dict(sag_layer="all"), "--sag_layer 'all' selects 7 attention blocks; give one"),
        (dict(sag_scale=0.5, sag_heads="3"), "SAG map_heads 3 does not divide the 64 channels of output_blocks.2.1"),
        (dict(sag_scale=0.5, sag_interval="1,50"), "--sag_interval '1,50' contains none of the 10 timesteps"),
    ]:
        with pytest.raises(UsageError) as info:
            guide_model(model, diffusion, flag_args(**values))
        assert message in str(info.value)
    guided = guide_model(model, diffusion, flag_args(sag_scale=0.5, sag_interval="100,999"))
    assert isinstance(guided, SAGGuidedModel) and guided.t_range == (100.0, 999.0)
    assert guided.map_heads == 4  # the official choice: the --num_heads flag
    assert guide_model(model, diffusion, flag_args(sag_scale=0.5, sag_heads="block")).map_heads == 2
    described = SAGFlags().describe(SAGFlags().spec(flag_args(sag_scale=0.5)))
    assert "SAG: scale 0.5, layer 'output_blocks.2.1', blur sigma 9" in described


def _scripts():
    return load_script("image_sample"), load_script("classifier_sample")


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory):
    from test_sampling_scripts import TINY_CLASSIFIER, _save_model
    from guided_diffusion.script_util import classifier_defaults, create_classifier

    folder = tmp_path_factory.mktemp("sag_ckpt")
    cond = _save_model(folder / "cond.pt", 2, class_cond=True)
    uncond64 = _save_model(folder / "uncond64.pt", 3, image_size=64)
    torch.manual_seed(4)
    classifier_args = classifier_defaults()
    classifier_args.update(image_size=64, **TINY_CLASSIFIER)
    classifier = create_classifier(**classifier_args)
    randomize_zero_params(classifier, 4)
    torch.save(classifier.state_dict(), folder / "classifier.pt")
    return cond, uncond64, str(folder / "classifier.pt"), TINY_CLASSIFIER


def test_scripts_sample_with_sag_and_perturbations(tiny_checkpoints, tmp_path):
    from test_sampling_scripts import run_main

    image_sample, classifier_sample = _scripts()
    cond, uncond64, classifier, classifier_flags = tiny_checkpoints
    common = dict(model_path=cond, class_cond=True, num_samples=2, batch_size=2, seed=3)
    plain = run_main(image_sample, tiny_flags(out_dir=tmp_path / "plain", **common))
    sag = run_main(image_sample, tiny_flags(out_dir=tmp_path / "sag", sag_scale=2.0, sag_blur_sigma=3.0, **common))
    assert np.abs(sag["arr_0"].astype(int) - plain["arr_0"]).mean() > 0.5
    np.testing.assert_array_equal(sag["arr_1"], plain["arr_1"])
    # A random perturbation: seeded, so a rerun gives the same samples; not the identity's samples.
    noise = dict(pag_scale=3.0, pag_layers="all", pag_perturbation="noise", pag_noise_scale=0.5)
    first = run_main(image_sample, tiny_flags(out_dir=tmp_path / "n1", **noise, **common))
    again = run_main(image_sample, tiny_flags(out_dir=tmp_path / "n2", **noise, **common))
    identity = run_main(image_sample, tiny_flags(out_dir=tmp_path / "id", pag_scale=3.0, pag_layers="all", **common))
    np.testing.assert_array_equal(first["arr_0"], again["arr_0"])
    assert np.abs(first["arr_0"].astype(int) - identity["arr_0"]).mean() > 0.5
    # SAG with and without classifier guidance (64x64, the tiny classifier's size).
    cg = dict(
        image_size=64, model_path=uncond64, num_samples=2, batch_size=2, seed=3, classifier_path=classifier,
        sag_scale=2.0, sag_blur_sigma=3.0, sag_layer="output_blocks.1.1", **classifier_flags,
    )
    both = run_main(classifier_sample, tiny_flags(out_dir=tmp_path / "cg", classifier_scale=10.0, **cg))
    sag_only = run_main(classifier_sample, tiny_flags(out_dir=tmp_path / "nocg", classifier_scale=0.0, **cg))
    assert np.abs(both["arr_0"].astype(int) - sag_only["arr_0"]).mean() > 0.5


# --- the shipped SAG rows ----------------------------------------------------------------------------------------


def test_sag_rows_carry_the_readme_settings():
    from guided_diffusion.run.guidance import SAGFlags, check_guidance_args
    from guided_diffusion.methods.pag import resolve_layers
    from guided_diffusion.script_util import args_to_dict, create_model_and_diffusion, model_and_diffusion_defaults

    from test_perturbations import parse_row, row_names

    expected = {
        # name: (sag_scale, layer, blur sigma, classifier scale or None, published FID)
        "adm256_uncond_ddpm250_sag": (0.5, "output_blocks.2.1", 9.0, None, 20.31),
        "adm256_uncond_ddpm250_sag_s0p8": (0.8, "output_blocks.2.1", 9.0, None, 20.08),
        "adm256_cond_ddpm250_sag": (0.2, "output_blocks.2.1", 9.0, None, 9.41),
        "adm128_cond_ddpm250_sag": (0.1, "output_blocks.8.1", 3.0, None, 5.11),
        "adm128_cond_ddpm250_sag_cg": (0.1, "output_blocks.8.1", 3.0, 0.5, 2.58),
        "adm128_cond_ddpm250_cg": (0.0, "output_blocks.2.1", 9.0, 0.5, 2.97),
        "adm128_cond_ddpm250_baseline": (0.0, "output_blocks.2.1", 9.0, None, 5.91),
        "digits16_sag": (1.0, "output_blocks.2.1", 3.0, None, None),
    }
    assert sorted(row_names("adm128_*")) == sorted(n for n in expected if n.startswith("adm128"))
    assert row_names("digits16_sag*") == ["digits16_sag"]
    assert sorted(n for n in row_names("adm256_*_sag*")) == sorted(n for n in expected if n.startswith("adm256"))
    for name, (scale, layer, sigma, classifier_scale, fid) in expected.items():
        row, args = parse_row(name)
        check_guidance_args(args)
        assert (args.sag_scale, args.sag_layer, args.sag_blur_sigma, args.sag_heads) == (scale, layer, sigma, "num_heads")
        assert args.pag_scale == 0.0 and args.sag_interval == ""
        assert row.script == ("classifier_sample.py" if classifier_scale is not None else "image_sample.py")
        if classifier_scale is not None:
            assert args.classifier_scale == classifier_scale
            assert args.classifier_path == "models/128x128_classifier.pt"
        assert row.published.get("fid") == fid
        if name.startswith("adm"):
            assert args.timestep_respacing == "250" and not args.use_ddim and args.num_samples == 50000
        if scale:
            # The block exists in the architecture, at the resolution the official code assumes for it
            # (sel_attn_depth 2 -> 8x8 on ImageNet 256, 8 -> 32x32 on ImageNet 128).
            with torch.device("meta"):
                model, diffusion = create_model_and_diffusion(**args_to_dict(args, model_and_diffusion_defaults().keys()))
            assert resolve_layers(model, layer) == [layer]
            if name.startswith("adm"):
                guided = SAGFlags().wrap(model, diffusion, SAGFlags().spec(args))
                assert guided.map_heads == args.num_heads == 4
                # ImageNet 256 blocks have 64-channel heads, so the official 4-head split is not their real map.
                assert guided.block.attention.n_heads == (4 if "adm128" in name else 16)

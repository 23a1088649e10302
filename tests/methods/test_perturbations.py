"""
The attention perturbations of PAG's ablation (perturbations.py): each kind against an independent rewrite of the
official code's QKVAttentionLegacy{Mask,Drop,Blur,AvgPool2D,Noise} modules under the same seed, invariants, the
composition with PAGGuidedModel's naive / batched / shared-prefix paths and per-row intervals, s = 0, and the
error messages.
"""

import math
import os

import numpy as np
import pytest
import torch

from guided_diffusion.methods.pag import PAGGuidedModel, perturb_attention, resolve_layers
from guided_diffusion.methods.perturbations import KINDS, gaussian_blur2d, make_perturbation
from guided_diffusion.script_util import create_gaussian_diffusion
from guided_diffusion.unet import AttentionBlock, UNetModel

from conftest import GUIDED_PATHS, flag_args

LAYOUTS = {"legacy": dict(num_heads=2), "new_order": dict(num_heads=2, use_new_attention_order=True)}

# Every kind with the parameters the tests use (large enough to change the output clearly).
KIND_PARAMS = {
    "identity": {},
    "mask": dict(drop_rate=0.5),
    "mask_diag": dict(drop_rate=0.7, retain_diag=True),
    "drop": dict(drop_rate=0.3),
    "blur": dict(blur_sigma=1.5),
    "avgpool2d": {},
    "noise": dict(noise_scale=0.5),
}


def kind_of(name):
    return "mask" if name == "mask_diag" else name


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_unet(seed=0, **overrides):
    """
    16x16 inputs, attention at 8x8 (64 tokens) and 4x4 (16 tokens), random weights (ADM zero-initializes
    proj_out and the output conv, which would hide the attention).
    """
    kwargs = dict(
        image_size=16,
        in_channels=3,
        model_channels=32,
        out_channels=6,
        num_res_blocks=1,
        attention_resolutions=(2, 4),
        channel_mult=(1, 2, 2),
        num_classes=10,
        use_scale_shift_norm=True,
        resblock_updown=True,
    )
    kwargs.update(LAYOUTS["legacy"])
    kwargs.update(overrides)
    model = UNetModel(**kwargs)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            # Larger q and k weights give peaked attention maps, on which every perturbation shows.
            scale = 0.6 if ".qkv." in name else 0.1
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return model.eval()


def batch(n=3, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 16, 16, generator=gen)
    t = torch.tensor([0, 417, 999, 250, 600][:n])
    y = torch.tensor([1, 7, 9, 3, 5][:n])
    return x, t, {"y": y}


# --- an independent rewrite of the official modules ----------------------------------------------------------


def reference_blur(weight, kernel_size, sigma):
    """
    torchvision's gaussian_blur of each [T x T] map, written out in float64 with numpy: reflect padding, then the
    sum over kernel offsets of the padded map times the outer product of the normalized 1-D Gaussian.
    """
    half = (kernel_size - 1) / 2
    xs = np.linspace(-half, half, kernel_size)
    k1 = np.exp(-0.5 * (xs / sigma) ** 2)
    k1 = k1 / k1.sum()
    maps = weight.detach().double().numpy()
    pad = kernel_size // 2
    padded = np.pad(maps, ((0, 0), (pad, pad), (pad, pad)), mode="reflect")
    out = np.zeros_like(maps)
    size = maps.shape[-1]
    for i in range(kernel_size):
        for j in range(kernel_size):
            out += k1[i] * k1[j] * padded[:, i : i + size, j : j + size]
    return torch.from_numpy(out).to(weight.dtype)


def reference_avgpool(weight):
    """
    A 3x3 mean with zero padding, the padding counted (avg_pool2d's count_include_pad), written as shifted sums.
    """
    padded = torch.nn.functional.pad(weight, (1, 1, 1, 1))
    size = weight.shape[-1]
    total = sum(padded[:, i : i + size, j : j + size] for i in range(3) for j in range(3))
    return total / 9


class OfficialPerturbedAttention(torch.nn.Module):
    """
    The official QKVAttentionLegacy{Mask,Drop,Blur,AvgPool2D,Noise}.forward, in either qkv layout: the map
    softmax(q k / sqrt(C)) with the kind's change, the random draws from the global generator in the map's shape.
    """

    def __init__(self, n_heads, legacy, kind, params):
        super().__init__()
        self.n_heads, self.legacy, self.kind, self.params = n_heads, legacy, kind, params

    def forward(self, qkv):
        bs, width, length = qkv.shape
        ch = width // (3 * self.n_heads)
        if self.legacy:
            q, k, v = qkv.reshape(bs * self.n_heads, 3 * ch, length).split(ch, dim=1)
        else:
            q, k, v = (p.reshape(bs * self.n_heads, ch, length) for p in qkv.chunk(3, dim=1))
        scale = 1 / math.sqrt(math.sqrt(ch))
        weight = torch.einsum("bct,bcs->bts", q * scale, k * scale)
        if self.kind == "mask":
            drop = torch.rand(weight.shape) < self.params["drop_rate"]
            if self.params.get("retain_diag", False):
                for i in range(length):
                    drop[:, i, i] = False
            weight = weight.clone()
            weight[drop] = -float("inf")
        weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
        if self.kind == "drop":
            weight = weight * (torch.rand(weight.shape) > self.params["drop_rate"])
        elif self.kind == "blur":
            weight = reference_blur(weight, 5, self.params["blur_sigma"])
        elif self.kind == "avgpool2d":
            weight = reference_avgpool(weight)
        elif self.kind == "noise":
            weight = weight + torch.randn_like(weight) * self.params["noise_scale"]
        elif self.kind == "identity":
            weight = torch.eye(length).expand_as(weight)
        return torch.einsum("bts,bcs->bct", weight, v).reshape(bs, -1, length)


def official_forward(model, names, kind, params, x, t, kwargs, seed):
    """
    The model's output with the named blocks' attention replaced by the official module (as the official
    replace_attn_layers does), after torch.manual_seed(seed).
    """
    modules = dict(model.named_modules())
    saved = {}
    try:
        for name in names:
            block = modules[name]
            saved[name] = block.attention
            legacy = type(block.attention).__name__ == "QKVAttentionLegacy"
            block.attention = OfficialPerturbedAttention(block.attention.n_heads, legacy, kind, params)
        torch.manual_seed(seed)
        with torch.no_grad():
            return model(x, t, **kwargs)
    finally:
        for name, attention in saved.items():
            modules[name].attention = attention


def ours(model, layers, kind, params, x, t, kwargs, seed):
    torch.manual_seed(seed)
    with torch.no_grad(), perturb_attention(model, layers, kind, **params):
        return model(x, t, **kwargs)


def blocks_clean(model):
    return all(
        m.hook is None
        for m in model.modules()
        if isinstance(m, AttentionBlock)
    )


# --- each kind against the official module --------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", KIND_PARAMS)
def test_each_kind_equals_the_official_module(name, layout):
    model = tiny_unet(**LAYOUTS[layout])
    x, t, kwargs = batch()
    # Two blocks at different resolutions: the random draws must come in the official order and shapes.
    layers = "input_blocks.3.1,output_blocks.1.1"
    names = resolve_layers(model, layers)
    kind, params = kind_of(name), KIND_PARAMS[name]
    got = ours(model, layers, kind, params, x, t, kwargs, seed=5)
    expected = official_forward(model, names, kind, params, x, t, kwargs, seed=5)
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-6)
    with torch.no_grad():
        plain = model(x, t, **kwargs)
    assert (got - plain).abs().max() > 1e-3
    assert blocks_clean(model)
    if kind in ("mask", "drop", "noise"):
        # A different seed gives a different perturbation: the draws are really used.
        other = ours(model, layers, kind, params, x, t, kwargs, seed=6)
        assert (other - got).abs().max() > 1e-4


def test_blur_helper_equals_the_reference_on_odd_sizes():
    maps = torch.rand(3, 7, 7)
    for kernel, sigma in [(5, 0.8), (3, 2.0), (1, 1.0), (13, 9.0)]:
        if kernel // 2 >= 7:
            continue
        torch.testing.assert_close(gaussian_blur2d(maps, kernel, sigma), reference_blur(maps, kernel, sigma), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=r"kernel size 31 \(reflect padding 15\) needs inputs larger than 15x15, got 7x7"):
        gaussian_blur2d(maps, 31, 9.0)


def test_degenerate_parameters_give_known_maps():
    model = tiny_unet()
    x, t, kwargs = batch()
    with torch.no_grad():
        plain = model(x, t, **kwargs)
        with perturb_attention(model, "all"):
            identity = model(x, t, **kwargs)
    # Masking every off-diagonal logit leaves the identity map; dropping nothing or adding no noise leaves the map.
    torch.testing.assert_close(ours(model, "all", "mask", dict(drop_rate=1.0, retain_diag=True), x, t, kwargs, 0), identity, rtol=0, atol=2e-6)
    torch.testing.assert_close(ours(model, "all", "drop", dict(drop_rate=0.0), x, t, kwargs, 0), plain, rtol=0, atol=2e-6)
    torch.testing.assert_close(ours(model, "all", "noise", dict(noise_scale=0.0), x, t, kwargs, 0), plain, rtol=0, atol=2e-6)
    torch.testing.assert_close(ours(model, "all", "mask", dict(drop_rate=0.0), x, t, kwargs, 0), plain, rtol=0, atol=2e-6)
    # Dropping every weight removes the attention output: the block returns its input (proj_out has a bias only).
    dropped = ours(model, "all", "drop", dict(drop_rate=1.0), x, t, kwargs, 0)
    assert (dropped - plain).abs().max() > 1e-3


def test_partial_rows_equal_perturbing_them_alone():
    model = tiny_unet()
    x, t, kwargs = batch()
    rows = torch.tensor([False, True, True])
    torch.manual_seed(3)
    with torch.no_grad(), perturb_attention(model, "all", "noise", rows=rows, noise_scale=0.5):
        mixed = model(x, t, **kwargs)
    alone = ours(model, "all", "noise", dict(noise_scale=0.5), x[1:], t[1:], {"y": kwargs["y"][1:]}, seed=3)
    with torch.no_grad():
        plain = model(x[:1], t[:1], y=kwargs["y"][:1])
    torch.testing.assert_close(mixed[1:], alone, rtol=0, atol=2e-6)
    torch.testing.assert_close(mixed[:1], plain, rtol=0, atol=2e-6)


def test_context_restores_the_perturbation_on_exception():
    model = tiny_unet()
    with pytest.raises(RuntimeError, match="boom"):
        with perturb_attention(model, "middle", "blur", blur_sigma=2.0) as blocks:
            assert blocks[0].hook.perturbation.kind == "blur" and blocks[0].hook.rows is None  # every row
            raise RuntimeError("boom")
    assert blocks_clean(model)
    # A bad kind fails before any block is touched.
    with pytest.raises(ValueError, match="unknown attention perturbation 'swap'"):
        with perturb_attention(model, "middle", "swap"):
            pass
    assert blocks_clean(model)


def test_gradients_of_a_perturbed_pass_after_the_context_exits():
    # Attention blocks recompute their forward in the backward pass; the recomputation must use the perturbation
    # bound at forward time (deterministic kinds; random ones would redraw).
    model = tiny_unet()
    x, t, kwargs = batch(2)
    x = x.requires_grad_()
    with perturb_attention(model, "all", "blur", blur_sigma=1.0):
        model(x, t[:2], y=kwargs["y"][:2]).square().sum().backward()
    inside = x.grad.clone()
    x.grad = None
    with perturb_attention(model, "all", "blur", blur_sigma=1.0):
        out = model(x, t[:2], y=kwargs["y"][:2])
    out.square().sum().backward()
    torch.testing.assert_close(x.grad, inside, rtol=0, atol=0)


# --- with PAGGuidedModel ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", KIND_PARAMS)
def test_guided_paths_agree_for_every_kind(name):
    model = tiny_unet()
    x, t, kwargs = batch(5)  # t = 0, 417, 999, 250, 600
    kind, params = kind_of(name), KIND_PARAMS[name]
    layers = "output_blocks.0.1,output_blocks.3.1"
    outs = {}
    for t_range in [None, (250, 600)]:
        for mode, flags in GUIDED_PATHS.items():
            guided = PAGGuidedModel(model, 2.0, layers, t_range=t_range, kind=kind, **flags, **params)
            torch.manual_seed(11)
            with torch.no_grad():
                outs[mode, t_range] = guided(x, t, **kwargs)
            assert blocks_clean(model)
    for t_range in [None, (250, 600)]:
        for mode in ("batched", "shared_prefix"):
            torch.testing.assert_close(outs[mode, t_range], outs["naive", t_range], rtol=0, atol=1e-5)
    # The formula, with the perturbed branch from the official module on the guided rows only.
    inside = [1, 3, 4]
    with torch.no_grad():
        plain = model(x, t, **kwargs)
    sub = {"y": kwargs["y"][inside]}
    perturbed = official_forward(model, resolve_layers(model, layers), kind, params, x[inside], t[inside], sub, seed=11)
    eps, eps_p = plain[inside, :3], perturbed[:, :3]
    expected = plain.clone()
    expected[inside, :3] = eps + 2.0 * (eps - eps_p)
    torch.testing.assert_close(outs["naive", (250, 600)], expected, rtol=0, atol=1e-5)
    assert torch.equal(outs["naive", (250, 600)][[0, 2]], plain[[0, 2]])


@pytest.mark.parametrize("name", ["mask", "noise", "blur"])
def test_scale_zero_is_plain_sampling_bit_for_bit(name):
    model = tiny_unet()
    diffusion = create_gaussian_diffusion(steps=1000, learn_sigma=True, timestep_respacing="3")
    guided = PAGGuidedModel(model, 0.0, "all", kind=kind_of(name), **KIND_PARAMS[name])
    y = torch.tensor([2, 5])
    noise = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))

    def run(m):
        torch.manual_seed(0)
        with torch.no_grad():
            out = diffusion.p_sample_loop(m, (2, 3, 16, 16), noise=noise, model_kwargs={"y": y})
        return out, torch.get_rng_state()

    plain, plain_state = run(model)
    out, state = run(guided)
    assert torch.equal(out, plain)
    # No random draw was spent either.
    assert torch.equal(state, plain_state)


# --- bad input -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind, params, message",
    [
        ("swap", {}, r"^unknown attention perturbation 'swap'; use one of identity, mask, drop, blur, avgpool2d, noise$"),
        ("attention_mask", {}, r"^unknown attention perturbation 'attention_mask'"),
        (None, {}, r"^unknown attention perturbation None"),
        ("mask", {}, r"^perturbation 'mask' needs drop_rate; it takes drop_rate, retain_diag \(optional, default False\)$"),
        ("drop", dict(drop_rate=None), r"^perturbation 'drop' needs drop_rate"),
        ("blur", {}, r"^perturbation 'blur' needs blur_sigma"),
        ("noise", {}, r"^perturbation 'noise' needs noise_scale; it takes noise_scale$"),
        ("identity", dict(drop_rate=0.5), r"^perturbation 'identity' does not take drop_rate; it takes no parameters$"),
        ("avgpool2d", dict(blur_sigma=1.0), r"^perturbation 'avgpool2d' does not take blur_sigma"),
        ("noise", dict(noise_scale=1.0, retain_diag=True), r"^perturbation 'noise' does not take retain_diag"),
        ("mask", dict(drop_rate=1.5), r"^perturbation 'mask': drop_rate must be in \[0, 1\], got 1.5$"),
        ("drop", dict(drop_rate=-0.1), r"^perturbation 'drop': drop_rate must be in \[0, 1\], got -0.1$"),
        ("drop", dict(drop_rate="0.3"), r"^perturbation 'drop': drop_rate must be a real number, got '0.3'$"),
        ("noise", dict(noise_scale=float("nan")), r"^perturbation 'noise': noise_scale must be finite, got nan$"),
        ("noise", dict(noise_scale=-1.0), r"^perturbation 'noise': noise_scale must be >= 0, got -1$"),
        ("blur", dict(blur_sigma=0.0), r"^perturbation 'blur': blur_sigma must be > 0, got 0$"),
        ("blur", dict(blur_sigma=1.0, blur_kernel_size=4), r"blur_kernel_size must be an odd positive integer, got 4$"),
        ("mask", dict(drop_rate=0.5, retain_diag=1), r"^perturbation 'mask': retain_diag must be True or False, got 1$"),
        ("mask", dict(drop_rate=1.0), r"masks every logit, and the softmax of a row of -inf is NaN"),
    ],
)
def test_bad_kinds_and_parameters(kind, params, message):
    with pytest.raises(ValueError, match=message):
        make_perturbation(kind, **params)
    model = tiny_unet()
    with pytest.raises(ValueError, match=message):
        PAGGuidedModel(model, 1.0, "middle", kind=kind, **params)
    assert blocks_clean(model)


def test_kinds_table_and_descriptions():
    assert list(KINDS) == ["identity", "mask", "drop", "blur", "avgpool2d", "noise"]
    assert make_perturbation().describe() == "identity"
    assert make_perturbation("mask", drop_rate=0.25).describe() == "mask (drop_rate=0.25, retain_diag=False)"
    assert make_perturbation("blur", blur_sigma=3).describe() == "blur (blur_sigma=3, blur_kernel_size=5)"
    guided = PAGGuidedModel(tiny_unet(), 1.0, "middle", kind="noise", noise_scale=0.1)
    assert "perturbation='noise (noise_scale=0.1)'" in repr(guided)


# --- the command-line flags ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "values, kind, params",
    [
        ({}, "identity", {}),
        (dict(pag_perturbation="mask", pag_drop_rate="0.3"), "mask", dict(drop_rate=0.3)),
        (dict(pag_perturbation="mask", pag_drop_rate="1", pag_retain_diag=True), "mask", dict(drop_rate=1.0, retain_diag=True)),
        (dict(pag_perturbation="drop", pag_drop_rate=" 0.5 "), "drop", dict(drop_rate=0.5)),
        (dict(pag_perturbation="blur", pag_blur_sigma="9"), "blur", dict(blur_sigma=9.0)),
        (dict(pag_perturbation="avgpool2d"), "avgpool2d", {}),
        (dict(pag_perturbation="noise", pag_noise_scale="1.0"), "noise", dict(noise_scale=1.0)),
    ],
)
def test_pag_perturbation_flags(values, kind, params):
    from guided_diffusion.run.guidance import PAGFlags, check_guidance_args

    args = flag_args(pag_scale=-0.5, **values)  # any finite scale, negative too
    check_guidance_args(args)
    spec = PAGFlags().spec(args)
    assert (spec.kind, spec.params) == (kind, params)
    guided = PAGFlags().wrap(tiny_unet(), None, spec)
    assert guided.scale == -0.5 and guided.perturbation.kind == kind
    assert guided.perturbation.params == make_perturbation(kind, **params).params


def test_a_pag_spec_is_built_once_and_used_as_it_is():
    import dataclasses

    from guided_diffusion.run.guidance import PAGFlags

    args = flag_args(pag_scale=1.0, pag_perturbation="mask", pag_drop_rate="0.5", pag_interval="0,499")
    spec = PAGFlags().spec(args)
    assert (spec.interval.interval, spec.t_range) == ((0, 499), (0.0, 499.0))
    guided = PAGFlags().wrap(tiny_unet(), None, spec)
    assert guided.perturbation is spec.perturbation and guided.t_range == spec.t_range
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.scale = 2.0


@pytest.mark.parametrize(
    "values, message",
    [
        (dict(pag_perturbation="attention_mask"), "--pag_perturbation 'attention_mask' is unknown; use one of identity, mask, drop, blur, avgpool2d, noise"),
        (dict(pag_perturbation="mask"), "--pag_perturbation mask needs --pag_drop_rate (the probability of masking (mask) or zeroing (drop) each attention weight)"),
        (dict(pag_perturbation="blur"), "--pag_perturbation blur needs --pag_blur_sigma"),
        (dict(pag_perturbation="noise"), "--pag_perturbation noise needs --pag_noise_scale"),
        (dict(pag_drop_rate="0.5"), "--pag_drop_rate applies to --pag_perturbation mask or drop only, not 'identity'"),
        (dict(pag_perturbation="mask", pag_drop_rate="0.5", pag_noise_scale="1"), "--pag_noise_scale applies to --pag_perturbation noise only, not 'mask'"),
        (dict(pag_perturbation="drop", pag_drop_rate="0.5", pag_retain_diag=True), "--pag_retain_diag applies to --pag_perturbation mask only, not 'drop'"),
        (dict(pag_perturbation="blur", pag_blur_sigma="wide"), "--pag_blur_sigma 'wide' is not a number"),
        (dict(pag_perturbation="drop", pag_drop_rate="2"), "--pag_perturbation drop: perturbation 'drop': drop_rate must be in [0, 1], got 2"),
        (dict(pag_perturbation="mask", pag_drop_rate="1"), "--pag_perturbation mask: perturbation 'mask' with drop_rate 1 and retain_diag False"),
        (dict(pag_scale=math.inf), "--pag_scale must be a finite number (0 turns PAG off), got inf"),
    ],
)
def test_pag_perturbation_flag_errors(values, message):
    from guided_diffusion.common.errors import UsageError
    from guided_diffusion.run.guidance import check_guidance_args

    with pytest.raises(UsageError) as info:
        check_guidance_args(flag_args(**values))
    assert message in str(info.value)


# --- the shipped ablation rows -----------------------------------------------------------------------------------


def parse_row(name):
    """
    (row, args) of a shipped row config, parsed with its script's parser.
    """
    from guided_diffusion.run.flag_files import expand_flag_files, resolve_config
    from guided_diffusion.tables.table_rows import select_configs

    from conftest import load_script

    (row,) = select_configs([name])
    module = load_script(os.path.join("scripts", row.script))
    tokens, _ = expand_flag_files(["@" + resolve_config(name)])
    args, unknown = module.create_argparser().parse_known_args(tokens)
    assert unknown == [], f"{name}: {unknown}"
    return row, args


def row_names(pattern):
    """
    The row configs a reproduce.py glob selects (shared bases are not rows).
    """
    from guided_diffusion.tables.table_rows import select_configs

    return sorted(row.name for row in select_configs([pattern]))


def adm256_uncond_blocks():
    from guided_diffusion.script_util import args_to_dict, create_model_and_diffusion, model_and_diffusion_defaults

    _, args = parse_row("adm256_layer_middle")
    with torch.device("meta"):
        model, _ = create_model_and_diffusion(**args_to_dict(args, model_and_diffusion_defaults().keys()))
    return model


def test_adm256_perturbation_rows():
    from guided_diffusion.run.guidance import PAGFlags, check_guidance_args

    expected = {
        "adm256_kind_identity": ("identity", {}, 32.34),
        "adm256_kind_mask": ("mask", dict(drop_rate=0.5), 40.20),
        "adm256_kind_mask_offdiag": ("mask", dict(drop_rate=0.5, retain_diag=True), 39.49),
        "adm256_kind_noise": ("noise", dict(noise_scale=1.0), 62.83),
        "adm256_kind_drop": ("drop", dict(drop_rate=0.5), None),
        "adm256_kind_blur": ("blur", dict(blur_sigma=9.0), None),
        "adm256_kind_avgpool2d": ("avgpool2d", {}, None),
    }
    assert row_names("adm256_kind_*") == sorted(expected)
    for name, (kind, params, fid) in expected.items():
        row, args = parse_row(name)
        check_guidance_args(args)
        spec = PAGFlags().spec(args)
        assert (spec.kind, spec.params) == (kind, params)
        assert (args.pag_scale, args.pag_layers, args.num_samples) == (1.0, "input_blocks.13.1", 5000)
        assert (args.class_cond, args.timestep_respacing, args.use_ddim) == (False, "ddim25", True)
        assert row.published == ({"fid": fid} if fid else {})
    model = adm256_uncond_blocks()
    assert resolve_layers(model, "input_blocks.13.1") == ["input_blocks.13.1"]


def test_adm256_layer_and_scale_rows():
    from guided_diffusion.methods.pag import OFFICIAL_IMAGENET256_LAYERS, attention_block_names

    model = adm256_uncond_blocks()
    layers = []
    for name in row_names("adm256_layer_*"):
        _, args = parse_row(name)
        assert (args.pag_scale, args.num_samples, args.timestep_respacing, args.pag_perturbation) == (1.0, 5000, "ddim25", "identity")
        layers.append(args.pag_layers)
    # One row per attention block of the model, each perturbing that block alone.
    assert sorted(layers) == sorted(attention_block_names(model)) and len(layers) == 16
    scales = []
    for name in row_names("adm256_scale_*"):
        _, args = parse_row(name)
        assert args.pag_layers == OFFICIAL_IMAGENET256_LAYERS and args.num_samples == 5000
        scales.append(args.pag_scale)
    assert sorted(scales) == [0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0]


def test_digits_kind_and_layer_rows():
    from guided_diffusion.run.guidance import PAGFlags

    kinds = set()
    for name in row_names("digits16_kind_*"):
        _, args = parse_row(name)
        assert (args.pag_scale, args.pag_layers, args.image_size) == (3.0, "middle", 16)
        spec = PAGFlags().spec(args)
        kind, params = spec.kind, spec.params
        kinds.add(kind + ("_offdiag" if params.get("retain_diag") else ""))
    assert kinds == set(KINDS) | {"mask_offdiag"}
    from guided_diffusion.methods.pag import attention_block_names
    from guided_diffusion.script_util import args_to_dict, create_model_and_diffusion, model_and_diffusion_defaults

    _, args = parse_row("digits16_layer_middle")
    with torch.device("meta"):
        model, _ = create_model_and_diffusion(**args_to_dict(args, model_and_diffusion_defaults().keys()))
    layers = [parse_row(name)[1].pag_layers for name in row_names("digits16_layer_*")]
    assert sorted(layers) == sorted(attention_block_names(model))


def test_digits_interval_and_ddim_rows():
    from guided_diffusion.run.guidance import parse_interval

    early = parse_row("digits16_interval_early")[1]
    late = parse_row("digits16_interval_late")[1]
    # The two rows split the 1000 timesteps into disjoint halves, same scale and layer otherwise.
    lo_e, hi_e = parse_interval(early.pag_interval, early.diffusion_steps, "--pag_interval")
    lo_l, hi_l = parse_interval(late.pag_interval, late.diffusion_steps, "--pag_interval")
    assert (lo_l, hi_l, lo_e, hi_e) == (0, 499, 500, 999)
    for args in (early, late):
        assert (args.pag_scale, args.pag_layers, args.timestep_respacing) == (2.0, "middle", "100")
    base = parse_row("digits16_ddim25_baseline")[1]
    pag = parse_row("digits16_ddim25_pag1")[1]
    for args in (base, pag):
        assert (args.timestep_respacing, args.use_ddim) == ("ddim25", True)
    assert (base.pag_scale, pag.pag_scale, pag.pag_layers) == (0.0, 1.0, "middle")

"""
Perturbed-Attention Guidance: the identity-attention perturbation, layer selection, the package's plain two-pass
statement (two_pass.py) against a hand-written one, PAGGuidedModel's batched / shared-prefix fast paths against
that statement, t_range, and sampling with it.
"""

import json
import math

import pytest
import torch

from guided_diffusion.methods.attention_hooks import AttentionHook, perturbation_rows
from guided_diffusion.methods.perturbations import make_perturbation
from guided_diffusion.methods.pag import (
    OFFICIAL_IMAGENET256_LAYERS,
    PAGGuidedModel,
    attention_block_names,
    perturb_attention,
    resolve_layers,
    scale_from_guide_scale,
)
from guided_diffusion.methods.two_pass import pag_two_pass
from guided_diffusion.unet import AttentionBlock, SuperResModel, UNetModel

from conftest import GUIDED_PATHS, randomize, reference_file

TINY_BLOCKS = [
    "input_blocks.3.1",
    "input_blocks.5.1",
    "middle_block.1",
    "output_blocks.0.1",
    "output_blocks.1.1",
    "output_blocks.2.1",
    "output_blocks.3.1",
]

# Attention layouts: ADM's legacy order with num_heads, the new order, and a fixed width per head.
VARIANTS = {
    "legacy": dict(num_heads=4),
    "new_order": dict(num_heads=4, use_new_attention_order=True),
    "head_channels": dict(num_head_channels=8, use_new_attention_order=True),
}


def tiny_unet(seed=0, cls=UNetModel, learn_sigma=True, class_cond=True, attention_ds=(2, 4), **overrides):
    """
    The architecture of tiny_unet_a (image_size 32, channel_mult 1,2,2, 32 channels, one res block,
    attention at 16 and 8, scale-shift norm, resblock_updown), with random weights.
    """
    kwargs = dict(
        image_size=32,
        in_channels=3,
        model_channels=32,
        out_channels=6 if learn_sigma else 3,
        num_res_blocks=1,
        attention_resolutions=attention_ds,
        channel_mult=(1, 2, 2),
        num_classes=1000 if class_cond else None,
        num_heads=4,
        use_scale_shift_norm=True,
        resblock_updown=True,
    )
    kwargs.update(overrides)
    return randomize(cls(**kwargs), seed)


pytestmark = pytest.mark.usefixtures("one_thread")


def batch(n=3, seed=1):
    # 16x16 inputs (the model is built for 32x32; a smaller input keeps the tests fast and still passes both
    # attention resolutions).
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 16, 16, generator=gen)
    t = torch.tensor([0, 417, 999, 250, 600][:n])
    y = torch.tensor([1, 7, 999, 3, 500][:n])
    return x, t, {"y": y}


class IdentityAttention(torch.nn.Module):
    """
    Attention with the identity as attention map, written out from the qkv layouts: each head's output is its V.
    """

    def __init__(self, n_heads, legacy):
        super().__init__()
        self.n_heads = n_heads
        self.legacy = legacy

    def forward(self, qkv):
        n, width, length = qkv.shape
        ch = width // (3 * self.n_heads)
        if self.legacy:
            # [q_h, k_h, v_h] per head, heads one after another.
            per_head = qkv.reshape(n, self.n_heads, 3, ch, length)
            return per_head[:, :, 2].reshape(n, self.n_heads * ch, length)
        # All q, then all k, then all v.
        return qkv[:, 2 * self.n_heads * ch :]


def hand_perturbed(model, names, x, t, kwargs):
    """
    The model's output with the named blocks' attention swapped for IdentityAttention.
    """
    modules = dict(model.named_modules())
    saved = {}
    try:
        for name in names:
            block = modules[name]
            saved[name] = block.attention
            legacy = type(block.attention).__name__ == "QKVAttentionLegacy"
            block.attention = IdentityAttention(block.attention.n_heads, legacy)
        with torch.no_grad():
            return model(x, t, **kwargs)
    finally:
        for name, attention in saved.items():
            modules[name].attention = attention


def hand_pag(model, names, scale, x, t, kwargs):
    """
    PAG from two plain passes: eps + s * (eps - eps_perturbed) on the eps channels, variance unperturbed.
    """
    with torch.no_grad():
        plain = model(x, t, **kwargs)
    perturbed = hand_perturbed(model, names, x, t, kwargs)
    c = x.shape[1]
    eps, eps_p = plain[:, :c], perturbed[:, :c]
    return torch.cat([eps + scale * (eps - eps_p), plain[:, c:]], dim=1)


def all_perturb_off(model):
    return all(m.hook is None for m in model.modules() if isinstance(m, AttentionBlock))


# --- layer names --------------------------------------------------------------------------------------------


def test_attention_block_names_in_module_order():
    model = tiny_unet()
    assert attention_block_names(model) == TINY_BLOCKS


def test_attention_block_names_match_the_reference_model():
    ref = torch.load(reference_file("tiny_unet_a.pt"))
    model = tiny_unet()
    model.load_state_dict(ref["state_dict"], strict=True)
    assert attention_block_names(model) == ref["attention_blocks"]


def test_official_layers_exist_in_the_adm256_architecture():
    with open(reference_file("state_dict_specs.json")) as f:
        spec = json.load(f)["256x256_diffusion"]
    # Build the real architecture without allocating its weights.
    import inspect

    from guided_diffusion.script_util import create_model, model_and_diffusion_defaults

    architecture = set(inspect.signature(create_model).parameters)
    flags = {k: v for k, v in {**model_and_diffusion_defaults(), **spec["flags"]}.items() if k in architecture}
    with torch.device("meta"):
        model = create_model(**flags)
    assert attention_block_names(model) == spec["attention_blocks"]
    assert resolve_layers(model, OFFICIAL_IMAGENET256_LAYERS) == [
        "input_blocks.14.1",
        "input_blocks.16.1",
        "input_blocks.17.1",
        "middle_block.1",
    ]


def test_layer_aliases():
    model = tiny_unet()
    assert resolve_layers(model, "all") == TINY_BLOCKS
    assert resolve_layers(model, "middle") == ["middle_block.1"]
    assert resolve_layers(model, "input") == resolve_layers(model, "encoder") == TINY_BLOCKS[:2]
    assert resolve_layers(model, "output") == resolve_layers(model, "decoder") == TINY_BLOCKS[3:]
    # Sorted by module order, duplicates dropped, whitespace and aliases mixed with names.
    assert resolve_layers(model, " middle_block.1, input_blocks.5.1 ,middle") == [
        "input_blocks.5.1",
        "middle_block.1",
    ]
    assert resolve_layers(model, ["output_blocks.3.1", "MIDDLE"]) == ["middle_block.1", "output_blocks.3.1"]
    assert resolve_layers(model, ("input_blocks.3.1",)) == ["input_blocks.3.1"]


def test_unknown_layer_lists_valid_names_and_aliases():
    model = tiny_unet()
    expected = (
        "unknown attention block 'input_blocks.14.1'; this model's attention blocks are: "
        + ", ".join(TINY_BLOCKS)
        + "; aliases: all, middle, input (or encoder), output (or decoder)"
    )
    with pytest.raises(ValueError) as info:
        resolve_layers(model, "middle_block.1,input_blocks.14.1")
    assert str(info.value) == expected
    # A module that exists but is not an attention block is unknown too.
    with pytest.raises(ValueError, match=r"unknown attention block 'input_blocks.3.0'"):
        resolve_layers(model, "input_blocks.3.0")
    with pytest.raises(ValueError, match="unknown attention block 'input_blocks.14.1'"):
        PAGGuidedModel(model, 1.0, "input_blocks.14.1")


def test_empty_selection_raises():
    model = tiny_unet()
    for layers in ["", " , ", []]:
        with pytest.raises(ValueError, match=r"^no attention block selected"):
            resolve_layers(model, layers)
    with pytest.raises(ValueError, match="comma-separated string or a list"):
        resolve_layers(model, None)
    # A model with attention only in the middle block has nothing for "input".
    middle_only = tiny_unet(attention_ds=())
    assert attention_block_names(middle_only) == ["middle_block.1"]
    with pytest.raises(ValueError, match=r"^layer alias 'input' selects no attention block of this model$"):
        resolve_layers(middle_only, "input")


# --- the perturbation ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("layers", ["all", "input_blocks.3.1,output_blocks.2.1"])
def test_perturbed_forward_is_identity_attention(variant, layers):
    model = tiny_unet(**VARIANTS[variant])
    x, t, kwargs = batch()
    names = resolve_layers(model, layers)
    with torch.no_grad():
        plain = model(x, t, **kwargs)
        with perturb_attention(model, layers):
            perturbed = model(x, t, **kwargs)
    expected = hand_perturbed(model, names, x, t, kwargs)
    torch.testing.assert_close(perturbed, expected, rtol=0, atol=1e-6)
    # The perturbation matters (so the comparison above is not vacuous) and is off again.
    assert (perturbed - plain).abs().max() > 1e-3
    assert all_perturb_off(model)


@pytest.mark.parametrize("rows", [torch.tensor([0, 2]), torch.tensor([True, False, True]), slice(0, 3, 2)])
def test_perturbing_rows_equals_perturbing_them_alone(rows):
    model = tiny_unet()
    x, t, kwargs = batch()
    with torch.no_grad():
        with perturb_attention(model, "all", rows=rows, batch_size=3):
            mixed = model(x, t, **kwargs)
        with perturb_attention(model, "all"):
            alone = model(x[[0, 2]], t[[0, 2]], y=kwargs["y"][[0, 2]])
        plain = model(x[[1]], t[[1]], y=kwargs["y"][[1]])
    torch.testing.assert_close(mixed[[0, 2]], alone, rtol=0, atol=1e-5)
    torch.testing.assert_close(mixed[[1]], plain, rtol=0, atol=1e-5)


def test_perturbation_rows_reach_the_block_as_a_bool_mask_or_none():
    assert perturbation_rows(True) is None and perturbation_rows(None) is None
    assert perturbation_rows(torch.tensor([0, 2]), 3).tolist() == [True, False, True]
    assert perturbation_rows(slice(1, None), 3).tolist() == [False, True, True]
    with pytest.raises(ValueError, match="indices or a slice need batch_size"):
        perturbation_rows(torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="must be True, a bool mask"):
        perturbation_rows([0, 2], 3)
    model = tiny_unet()
    x, t, kwargs = batch()
    with torch.no_grad():
        with perturb_attention(model, "middle", rows=torch.tensor([True, False])) as blocks:
            assert blocks[0].hook.rows.dtype == torch.bool
            with pytest.raises(ValueError, match=r"perturbation mask has shape \(2,\), expected \(3,\)"):
                model(x, t, **kwargs)
        assert all_perturb_off(model)
        # A mask of every row takes the whole-batch path: a seeded random perturbation draws as for rows=True.
        outs = []
        for rows in (True, torch.ones(3, dtype=torch.bool)):
            torch.manual_seed(5)
            with perturb_attention(model, "all", "mask", rows=rows, drop_rate=0.3, retain_diag=True):
                outs.append(model(x, t, **kwargs))
    assert torch.equal(outs[0], outs[1])


def test_context_restores_state_on_exception():
    model = tiny_unet()
    blocks = dict(model.named_modules())
    before = AttentionHook(perturbation=make_perturbation("identity"), rows=torch.tensor([True, False, False]))
    blocks["middle_block.1"].hook = before
    with pytest.raises(RuntimeError, match="boom"):
        with perturb_attention(model, "middle,output_blocks.0.1") as perturbed:
            assert [b.hook.rows for b in perturbed] == [None, None]  # every row
            raise RuntimeError("boom")
    assert blocks["middle_block.1"].hook is before
    assert blocks["output_blocks.0.1"].hook is None
    blocks["middle_block.1"].hook = None
    # A failing guided call (class-conditional model without labels) leaves every block unperturbed.
    x, t, _ = batch()
    for batched, share in [(True, True), (True, False), (False, False)]:
        guided = PAGGuidedModel(model, 2.0, "all", batched=batched, share_prefix=share)
        with pytest.raises(AssertionError, match="must specify y"):
            guided(x, t)
        assert all_perturb_off(model)


def test_gradients_through_a_perturbed_pass_after_the_context_exits():
    # Attention blocks recompute their forward in the backward pass (checkpointing); the recomputation must use
    # the perturbation of the forward pass even when backward runs after the context has switched it off.
    model = tiny_unet()
    x, t, kwargs = batch(2)
    x = x.requires_grad_()
    with perturb_attention(model, "all"):
        model(x, t[:2], y=kwargs["y"][:2]).square().sum().backward()
    inside = x.grad.clone()
    x.grad = None
    with perturb_attention(model, "all"):
        out = model(x, t[:2], y=kwargs["y"][:2])
    out.square().sum().backward()
    torch.testing.assert_close(x.grad, inside, rtol=0, atol=0)


# --- PAGGuidedModel -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_two_pass_statement_is_the_hand_written_pag(variant):
    # The package's statement perturbs through the blocks' hook; the hand-written one swaps the attention modules.
    model = tiny_unet(**VARIANTS[variant])
    x, t, kwargs = batch()
    layers = "input_blocks.5.1,middle_block.1,output_blocks.1.1"
    with torch.no_grad():
        out = pag_two_pass(model, x, t, 3.0, layers, **kwargs)
    expected = hand_pag(model, resolve_layers(model, layers), 3.0, x, t, kwargs)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mode", GUIDED_PATHS)
def test_guided_output_matches_the_two_pass_statement(variant, mode):
    model = tiny_unet(**VARIANTS[variant])
    x, t, kwargs = batch()
    layers = "input_blocks.5.1,middle_block.1,output_blocks.1.1"
    guided = PAGGuidedModel(model, 3.0, layers, **GUIDED_PATHS[mode])
    with torch.no_grad():
        out = guided(x, t, **kwargs)
        expected = pag_two_pass(model, x, t, 3.0, layers, **kwargs)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    # The variance channels are the unperturbed pass's.
    with torch.no_grad():
        plain = model(x, t, **kwargs)
    torch.testing.assert_close(out[:, 3:], plain[:, 3:], rtol=0, atol=1e-5)
    assert (out[:, :3] - plain[:, :3]).abs().max() > 1e-3


@pytest.mark.parametrize(
    "layers",
    TINY_BLOCKS + ["all", "input", "middle", "output", "input_blocks.5.1,output_blocks.3.1"],
)
def test_shared_prefix_equals_the_two_pass_statement_for_every_layer_choice(layers):
    model = tiny_unet()
    x, t, kwargs = batch()
    with torch.no_grad():
        statement = pag_two_pass(model, x, t, 2.5, layers, **kwargs)
        fast = PAGGuidedModel(model, 2.5, layers)(x, t, **kwargs)
    torch.testing.assert_close(fast, statement, rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode", GUIDED_PATHS)
@pytest.mark.parametrize("kind, params", [("blur", dict(blur_sigma=1.0)), ("avgpool2d", {})])
def test_fast_paths_equal_the_two_pass_statement_for_other_perturbations(mode, kind, params):
    model = tiny_unet()
    x, t, kwargs = batch()
    with torch.no_grad():
        statement = pag_two_pass(model, x, t, 2.0, "middle,output", make_perturbation(kind, **params), **kwargs)
        out = PAGGuidedModel(model, 2.0, "middle,output", kind=kind, **params, **GUIDED_PATHS[mode])(x, t, **kwargs)
    torch.testing.assert_close(out, statement, rtol=0, atol=1e-5)


def _count_batches(module):
    sizes = []
    module.register_forward_hook(lambda _m, inputs, _out: sizes.append(inputs[0].shape[0]))
    return sizes


@pytest.mark.parametrize(
    "layers, first_stage",
    [("input_blocks.5.1,middle", "input_blocks.5"), ("output", "output_blocks.0"), ("output_blocks.3.1", "output_blocks.3")],
)
def test_shared_prefix_runs_the_prefix_once(layers, first_stage):
    model = tiny_unet()
    modules = dict(model.named_modules())
    stem = _count_batches(model.input_blocks[0])
    middle = _count_batches(model.middle_block)
    first = _count_batches(modules[first_stage])
    head = _count_batches(model.out)
    x, t, kwargs = batch()
    with torch.no_grad():
        PAGGuidedModel(model, 1.0, layers)(x, t, **kwargs)
    assert stem == [3]
    assert first == [6]
    assert head == [6]
    # The middle block is in the shared prefix exactly when the first perturbed block is in the decoder.
    assert middle == ([3] if first_stage.startswith("output") else [6])


def test_batched_without_sharing_and_naive_pass_counts():
    model = tiny_unet()
    stem = _count_batches(model.input_blocks[0])
    x, t, kwargs = batch()
    with torch.no_grad():
        PAGGuidedModel(model, 1.0, "middle", share_prefix=False)(x, t, **kwargs)
        assert stem == [6]
        stem.clear()
        PAGGuidedModel(model, 1.0, "middle", batched=False)(x, t, **kwargs)
        assert stem == [3, 3]


@pytest.mark.parametrize("t_range", [None, (1000, 5000), (-10, -1)])
def test_no_guidance_is_the_plain_model_bit_for_bit(t_range):
    model = tiny_unet()
    x, t, kwargs = batch()
    calls = _count_batches(model)
    stem = _count_batches(model.input_blocks[0])
    with torch.no_grad():
        plain = model(x, t, **kwargs)
        scale = 0.0 if t_range is None else 3.0
        out = PAGGuidedModel(model, scale, "all", t_range=t_range)(x, t, **kwargs)
    assert torch.equal(out, plain)
    # One call for `plain`, one for the guided model, each a single pass over 3 rows.
    assert calls == [3, 3]
    assert stem == [3, 3]


@pytest.mark.parametrize("mode", GUIDED_PATHS)
def test_t_range_guides_only_rows_inside(mode):
    model = tiny_unet()
    x, t, kwargs = batch(5)  # t = 0, 417, 999, 250, 600
    with torch.no_grad():
        plain = model(x, t, **kwargs)
        out = PAGGuidedModel(model, 2.0, "all", t_range=(250, 600), **GUIDED_PATHS[mode])(x, t, **kwargs)
    inside = [1, 3, 4]  # the bounds are inclusive
    expected = pag_two_pass(model, x[inside], t[inside], 2.0, "all", y=kwargs["y"][inside])
    torch.testing.assert_close(out[inside], expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(out[[0, 2]], plain[[0, 2]], rtol=0, atol=1e-5)
    if mode == "naive":
        # Unguided rows come straight from the plain pass over the whole batch.
        assert torch.equal(out[[0, 2]], plain[[0, 2]])
    # Only the guided rows go through the perturbed branch.
    stem = _count_batches(model.out)
    with torch.no_grad():
        PAGGuidedModel(model, 2.0, "all", t_range=(417, 417), **GUIDED_PATHS[mode])(x, t, **kwargs)
    assert stem == ([5, 1] if mode == "naive" else [6])


def test_official_guide_scale_convention():
    model = tiny_unet()
    x, t, kwargs = batch()
    g = 4.0
    assert scale_from_guide_scale(g) == 3.0
    with torch.no_grad():
        out = PAGGuidedModel(model, scale_from_guide_scale(g), "middle,output")(x, t, **kwargs)
        plain = model(x, t, **kwargs)
        with perturb_attention(model, "middle,output"):
            perturbed = model(x, t, **kwargs)
    official = perturbed[:, :3] + g * (plain[:, :3] - perturbed[:, :3])
    torch.testing.assert_close(out[:, :3], official, rtol=0, atol=1e-5)


def test_negative_scale_minus_one_gives_the_perturbed_prediction():
    model = tiny_unet()
    x, t, kwargs = batch()
    with torch.no_grad():
        out = PAGGuidedModel(model, -1.0, "all")(x, t, **kwargs)
        with perturb_attention(model, "all"):
            perturbed = model(x, t, **kwargs)
    torch.testing.assert_close(out[:, :3], perturbed[:, :3], rtol=0, atol=1e-5)


def test_model_without_learned_sigma_and_unconditional():
    model = tiny_unet(learn_sigma=False, class_cond=False)
    x, t, _ = batch()
    with torch.no_grad():
        out = PAGGuidedModel(model, 1.5, "input_blocks.5.1,output_blocks.2.1")(x, t)
    assert out.shape == (3, 3, 16, 16)
    expected = hand_pag(model, ["input_blocks.5.1", "output_blocks.2.1"], 1.5, x, t, {})
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode", GUIDED_PATHS)
def test_super_resolution_model(mode):
    model = tiny_unet(cls=SuperResModel, class_cond=False)
    x, t, _ = batch()
    low_res = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = PAGGuidedModel(model, 2.0, "middle,output_blocks.1.1", **GUIDED_PATHS[mode])(x, t, low_res=low_res)
    expected = hand_pag(model, ["middle_block.1", "output_blocks.1.1"], 2.0, x, t, {"low_res": low_res})
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


def test_other_forwards_fall_back_to_the_plain_batched_pass():
    class Shifted(UNetModel):
        def forward(self, x, timesteps, y=None):
            return super().forward(x + 1.0, timesteps, y)

    model = tiny_unet(cls=Shifted)
    x, t, kwargs = batch()
    with torch.no_grad():
        out = PAGGuidedModel(model, 2.0, "middle")(x, t, **kwargs)
    torch.testing.assert_close(out, hand_pag(model, ["middle_block.1"], 2.0, x, t, kwargs), rtol=0, atol=1e-5)


def test_attributes():
    model = tiny_unet()
    guided = PAGGuidedModel(model, 3, "middle, input_blocks.3.1", t_range=(0, 500))
    assert guided.model is model
    assert guided.scale == 3.0 and isinstance(guided.scale, float)
    assert guided.layers == ["input_blocks.3.1", "middle_block.1"]
    assert guided.t_range == (0.0, 500.0)
    assert PAGGuidedModel(model, torch.tensor(2.5), "all").scale == 2.5


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(scale=math.nan), "PAG scale must be finite, got nan"),
        (dict(scale=math.inf), "PAG scale must be finite, got inf"),
        (dict(scale="3"), "PAG scale must be a real number, got '3'"),
        (dict(scale=True), "PAG scale must be a real number, got True"),
        (dict(scale=torch.ones(2)), r"PAG scale must be a single number, got a tensor of shape \(2,\)"),
        (dict(t_range=(600, 100)), r"t_range must satisfy lo <= hi, got \(600, 100\)"),
        (dict(t_range=(0, math.nan)), r"t_range must not contain NaN"),
        (dict(t_range=500), r"t_range must be a pair \(lo, hi\) of numbers, got 500"),
        (dict(t_range=(1, 2, 3)), r"t_range must be a pair \(lo, hi\) of numbers"),
        (dict(layers=""), "no attention block selected"),
    ],
)
def test_validation_messages(kwargs, message):
    model = tiny_unet()
    args = {"scale": 1.0, "layers": "all", **kwargs}
    with pytest.raises(ValueError, match=message):
        PAGGuidedModel(model, **args)


def test_wrong_output_channels_are_reported():
    model = tiny_unet(out_channels=5)
    x, t, kwargs = batch()
    with pytest.raises(ValueError, match=r"model output has 5 channels; PAG expects 3 \(eps\) or 6"):
        with torch.no_grad():
            PAGGuidedModel(model, 1.0, "all")(x, t, **kwargs)



# --- sampling -----------------------------------------------------------------------------------------------


def _respaced_diffusion(steps="4"):
    from guided_diffusion.script_util import create_gaussian_diffusion

    return create_gaussian_diffusion(steps=1000, learn_sigma=True, noise_schedule="linear", timestep_respacing=steps)


def _tiny_classifier():
    from guided_diffusion.unet import EncoderUNetModel

    classifier = EncoderUNetModel(
        image_size=16,
        in_channels=3,
        model_channels=32,
        out_channels=10,
        num_res_blocks=1,
        attention_resolutions=(2,),
        channel_mult=(1, 2),
        num_heads=4,
        use_scale_shift_norm=True,
        pool="adaptive",
    )
    return randomize(classifier, seed=7)


def _classifier_cond_fn(classifier, scale, seen_timesteps):
    def cond_fn(x, t, y=None):
        seen_timesteps.append(t.tolist())
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            log_probs = torch.log_softmax(classifier(x_in, t), dim=-1)
            selected = log_probs[range(len(y)), y]
            return torch.autograd.grad(selected.sum(), x_in)[0] * scale

    return cond_fn


def hand_sample(diffusion, model, names, scale, t_range, noise, y, ddim=False, cond_fn=None, seed=0):
    """
    PAG sampling written out: eps_guided -> clipped pred_xstart -> posterior mean (DDPM, learned-range variance
    from the unperturbed output) or the DDIM update with eps re-derived from pred_xstart.
    """
    torch.manual_seed(seed)
    x = noise
    n = x.shape[0]
    for i in reversed(range(diffusion.num_timesteps)):
        t_model = torch.full((n,), diffusion.timestep_map[i], dtype=torch.long)
        with torch.no_grad():
            plain = model(x, t_model, y=y)
        eps, var_values = plain[:, :3], plain[:, 3:]
        if t_range[0] <= diffusion.timestep_map[i] <= t_range[1]:
            perturbed = hand_perturbed(model, names, x, t_model, {"y": y})
            eps = eps + scale * (eps - perturbed[:, :3])
        ac = float(diffusion.alphas_cumprod[i])
        ac_prev = float(diffusion.alphas_cumprod_prev[i])
        pred_xstart = (math.sqrt(1 / ac) * x - math.sqrt(1 / ac - 1) * eps).clamp(-1, 1)
        noise_i = torch.randn_like(x)
        if ddim:
            eps = (math.sqrt(1 / ac) * x - pred_xstart) / math.sqrt(1 / ac - 1)
            x = pred_xstart * math.sqrt(ac_prev) + math.sqrt(1 - ac_prev) * eps
            continue
        mean = float(diffusion.posterior_mean_coef1[i]) * pred_xstart + float(diffusion.posterior_mean_coef2[i]) * x
        frac = (var_values + 1) / 2
        min_log = float(diffusion.posterior_log_variance_clipped[i])
        max_log = math.log(float(diffusion.betas[i]))
        log_variance = frac * max_log + (1 - frac) * min_log
        if cond_fn is not None:
            mean = mean + torch.exp(log_variance) * cond_fn(x, t_model, y=y)
        x = mean + (i != 0) * torch.exp(0.5 * log_variance) * noise_i
    return x


def _sampling_setup():
    model = tiny_unet()
    diffusion = _respaced_diffusion()
    noise = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    y = torch.tensor([4, 9])
    return model, diffusion, noise, y


@pytest.mark.parametrize("ddim", [False, True])
def test_guided_sampling_matches_the_hand_written_loop(ddim):
    model, diffusion, noise, y = _sampling_setup()
    assert diffusion.timestep_map == [0, 333, 666, 999]
    layers = "middle,output_blocks.1.1"
    # Original-scale timesteps decide: 333 and 666 are guided, 0 and 999 are not.
    guided = PAGGuidedModel(model, 2.0, layers, t_range=(300, 700))
    loop = diffusion.ddim_sample_loop if ddim else diffusion.p_sample_loop
    torch.manual_seed(0)
    sample = loop(guided, noise.shape, noise=noise, model_kwargs={"y": y})
    expected = hand_sample(diffusion, model, resolve_layers(model, layers), 2.0, (300, 700), noise, y, ddim=ddim)
    torch.testing.assert_close(sample, expected, rtol=0, atol=1e-4)
    torch.manual_seed(0)
    plain = loop(model, noise.shape, noise=noise, model_kwargs={"y": y})
    assert (sample - plain).abs().max() > 1e-3


def test_guided_sampling_with_classifier_guidance():
    model, diffusion, noise, y = _sampling_setup()
    classifier = _tiny_classifier()
    seen = []
    cond_fn = _classifier_cond_fn(classifier, 3.0, seen)
    guided = PAGGuidedModel(model, 1.5, "all")
    torch.manual_seed(0)
    sample = diffusion.p_sample_loop(guided, noise.shape, noise=noise, cond_fn=cond_fn, model_kwargs={"y": y})
    # The classifier sees original-scale timesteps, like the model.
    assert seen == [[999, 999], [666, 666], [333, 333], [0, 0]]
    expected = hand_sample(diffusion, model, TINY_BLOCKS, 1.5, (0, 999), noise, y, cond_fn=cond_fn)
    torch.testing.assert_close(sample, expected, rtol=0, atol=1e-4)
    torch.manual_seed(0)
    without_classifier = diffusion.p_sample_loop(guided, noise.shape, noise=noise, model_kwargs={"y": y})
    assert (sample - without_classifier).abs().max() > 1e-4


@pytest.mark.parametrize("ddim", [False, True])
def test_scale_zero_sampling_is_plain_sampling_bit_for_bit(ddim):
    model, diffusion, noise, y = _sampling_setup()
    loop = diffusion.ddim_sample_loop if ddim else diffusion.p_sample_loop
    torch.manual_seed(0)
    plain = loop(model, noise.shape, model_kwargs={"y": y})
    torch.manual_seed(0)
    guided = loop(PAGGuidedModel(model, 0.0, "all"), noise.shape, model_kwargs={"y": y})
    assert torch.equal(guided, plain)

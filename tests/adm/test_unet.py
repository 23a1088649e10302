"""
Behaviour of the U-Net family beyond the released shapes: fp16 conversion, pools, gradient checkpointing,
super-resolution conditioning and the errors users meet.
"""

import pytest
import torch
import torch.nn as nn

from guided_diffusion import script_util as su
from guided_diffusion.unet import EncoderUNetModel, SuperResModel, UNetModel

from conftest import TINY_ADM_FLAGS

TINY = dict(TINY_ADM_FLAGS, use_scale_shift_norm=True)


def tiny_model(**overrides):
    torch.manual_seed(0)
    model, _ = su.create_model_and_diffusion(**{**su.model_and_diffusion_defaults(), **TINY, **overrides})
    # Released checkpoints have non-zero output convs; zero-initialised ones would hide most bugs.
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0 and p.ndim > 1:
                p.normal_(0, 0.05)
    return model


def test_fp16_converts_exactly_the_torso_convolutions():
    model = tiny_model()
    model.convert_to_fp16()
    torso = ("input_blocks.", "middle_block.", "output_blocks.")
    conv_params = set()
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv1d, nn.Conv2d)) and name.startswith(torso):
            conv_params |= {f"{name}.{p}" for p, _ in module.named_parameters()}
    half = {n for n, p in model.named_parameters() if p.dtype == torch.float16}
    assert half == conv_params
    # Norms, embeddings and the output head stay float32.
    assert model.time_embed[0].weight.dtype == torch.float32
    assert model.label_emb.weight.dtype == torch.float32
    assert model.out[2].weight.dtype == torch.float32
    assert model.input_blocks[1][0].in_layers[0].weight.dtype == torch.float32
    model.convert_to_fp32()
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_classifier_fp16_converts_encoder_but_not_pool():
    classifier = su.create_classifier(**{**su.classifier_defaults(), "image_size": 64, "classifier_width": 64})
    classifier.convert_to_fp16()
    assert classifier.input_blocks[0][0].weight.dtype == torch.float16
    assert classifier.middle_block[1].qkv.weight.dtype == torch.float16
    assert classifier.out[2].qkv_proj.weight.dtype == torch.float32


def test_checkpointing_gives_the_same_gradients():
    plain = tiny_model()
    ckpt = tiny_model(use_checkpoint=True)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 32, 32)
    t = torch.tensor([3, 700])
    y = torch.tensor([4, 5])
    grads = []
    for model in (plain, ckpt):
        model.zero_grad()
        model(x, t, y=y).square().mean().backward()
        grads.append(model.input_blocks[1][0].in_layers[2].weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("order", [False, True])
@pytest.mark.parametrize("heads", [dict(num_heads=4), dict(num_head_channels=16)])
def test_attention_orders_and_head_options(order, heads):
    model = tiny_model(use_new_attention_order=order, **heads)
    block = model.middle_block[1]
    assert block.num_heads == 4
    out = model(torch.randn(2, 3, 32, 32), torch.tensor([1, 2]), y=torch.tensor([0, 1]))
    assert out.shape == (2, 6, 32, 32) and torch.isfinite(out).all()


def test_attention_order_changes_the_computation():
    legacy = tiny_model(use_new_attention_order=False)
    new = tiny_model(use_new_attention_order=True)
    new.load_state_dict(legacy.state_dict())
    x, t, y = torch.randn(1, 3, 32, 32), torch.tensor([5]), torch.tensor([3])
    assert not torch.allclose(legacy(x, t, y=y), new(x, t, y=y))


def test_class_conditional_model_requires_labels():
    model = tiny_model()
    with pytest.raises(AssertionError, match="class-conditional"):
        model(torch.randn(1, 3, 32, 32), torch.tensor([1]))


@pytest.mark.parametrize("pool", ["adaptive", "attention", "spatial", "spatial_v2"])
def test_classifier_pools(pool):
    torch.manual_seed(0)
    classifier = EncoderUNetModel(
        image_size=32,
        in_channels=3,
        model_channels=32,
        out_channels=10,
        num_res_blocks=1,
        attention_resolutions=(2, 4),
        channel_mult=(1, 2, 2),
        num_head_channels=16,
        use_scale_shift_norm=True,
        resblock_updown=True,
        pool=pool,
    )
    out = classifier(torch.randn(3, 3, 32, 32), torch.tensor([0, 10, 999]))
    assert out.shape == (3, 10)


def test_unknown_pool_is_rejected():
    with pytest.raises(NotImplementedError, match="adaptive, attention, spatial or spatial_v2"):
        EncoderUNetModel(32, 3, 32, 10, 1, (2,), channel_mult=(1, 2), pool="max")


def test_super_res_model_concatenates_upsampled_low_res():
    torch.manual_seed(0)
    model = SuperResModel(
        image_size=32,
        in_channels=3,
        model_channels=32,
        out_channels=6,
        num_res_blocks=1,
        attention_resolutions=(4,),
        channel_mult=(1, 2, 2),
    )
    assert model.input_blocks[0][0].weight.shape[1] == 6
    x = torch.randn(2, 3, 32, 32)
    low = torch.randn(2, 3, 8, 8)
    out = model(x, torch.tensor([1, 2]), low_res=low)
    assert out.shape == (2, 6, 32, 32)
    # Equivalent to the plain U-Net on the concatenation.
    plain = UNetModel.forward(model, model.concat_low_res(x, low), torch.tensor([1, 2]))
    torch.testing.assert_close(out, plain)


def test_unsupported_image_size_explains_channel_mult():
    with pytest.raises(ValueError) as err:
        su.create_model(100, 32, 1)
    msg = str(err.value)
    assert "unsupported image size: 100" in msg
    assert "64, 128, 256, 512" in msg and "--channel_mult" in msg
    # With channel_mult any size works.
    su.create_model(48, 32, 1, channel_mult="1,2", attention_resolutions="24")


def test_attention_resolution_must_divide_image_size():
    with pytest.raises(ValueError, match="attention resolution 7 does not divide image size 32"):
        su.create_model(32, 32, 1, channel_mult="1,2", attention_resolutions="7")


@pytest.mark.parametrize(
    "flag, value, hint",
    [
        ("learn_sigma", False, "--learn_sigma True"),
        ("class_cond", False, "--class_cond True"),
        ("num_channels", 64, "--num_channels 32"),
        ("use_scale_shift_norm", False, "--use_scale_shift_norm True"),
        ("resblock_updown", False, "--resblock_updown True"),
        ("attention_resolutions", "16", "--attention_resolutions"),
        ("num_res_blocks", 2, "--num_res_blocks"),
    ],
)
def test_mismatched_checkpoint_names_the_flag(flag, value, hint):
    ckpt = tiny_model().state_dict()
    model = tiny_model(**{flag: value})
    with pytest.raises(RuntimeError) as err:
        model.load_state_dict(ckpt)
    msg = str(err.value)
    assert msg.startswith("The checkpoint does not match the model built from these flags.")
    assert f"Most likely wrong flag: {hint}" in msg


def test_classifier_checkpoint_given_to_unet():
    classifier = su.create_classifier(**{**su.classifier_defaults(), "image_size": 64, "classifier_width": 64})
    model = tiny_model()
    with pytest.raises(RuntimeError, match="this is a classifier checkpoint"):
        model.load_state_dict(classifier.state_dict())


def test_num_channels_mismatch_names_no_other_flag():
    # Doubling --num_channels doubles every width, which can look like a scale-shift-norm mismatch (whose
    # emb_layers are twice as wide).
    ckpt = tiny_model().state_dict()
    with pytest.raises(RuntimeError) as err:
        tiny_model(num_channels=64).load_state_dict(ckpt)
    msg = str(err.value)
    assert "Most likely wrong flag: --num_channels 32" in msg
    assert "scale_shift" not in msg


def test_wrapped_training_checkpoint_is_not_called_a_classifier():
    wrapped = {"model": tiny_model().state_dict(), "step": 7}
    with pytest.raises(RuntimeError) as err:
        tiny_model().load_state_dict(wrapped)
    msg = str(err.value)
    assert "classifier checkpoint" not in msg
    assert "not an ADM model or classifier state dict" in msg and "model, step" in msg


def test_non_strict_load_still_possible():
    model = tiny_model()
    sd = model.state_dict()
    del sd["label_emb.weight"]
    result = model.load_state_dict(sd, strict=False)
    assert result.missing_keys == ["label_emb.weight"]


def test_str2bool_and_argparser():
    import argparse

    parser = argparse.ArgumentParser()
    su.add_dict_to_argparser(parser, dict(a=False, b=1, c="x", d=None, e=0.5))
    args = parser.parse_args(["--a", "yes", "--b", "3", "--d", "hi", "--e", "2"])
    assert su.args_to_dict(args, ["a", "b", "c", "d", "e"]) == dict(a=True, b=3, c="x", d="hi", e=2.0)
    with pytest.raises(SystemExit):
        parser.parse_args(["--a", "maybe"])

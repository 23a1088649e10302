"""
Half-precision sampling (ADM's --use_fp16): the torso really runs in float16, the parts ADM keeps in float32 stay
there, and the model, both attention backends and the PAG wrapper agree with the float32 model up to float16
rounding. On the CPU these run where torch has float16 kernels; the CUDA versions skip without a GPU.
"""

import pytest
import torch as th

from guided_diffusion import script_util as su
from guided_diffusion.common import attention_backends
from guided_diffusion import unet
from guided_diffusion.methods.pag import PAGGuidedModel

from error_bounds import (
    FLOAT16_U,
    attention_error_bound,
    float16_roundings,
    pag_amplification,
    probabilistic_bound,
)
from test_attention_backends import ORDERS, model_inputs, random_model, reference_attention

needs_cuda = pytest.mark.skipif(not th.cuda.is_available(), reason="CUDA is not available")


def _cpu_half_kernels():
    try:
        x = th.randn(1, 4, 8, 8, dtype=th.float16)
        th.nn.Conv2d(4, 4, 3).half()(x)
        q = th.randn(1, 2, 8, 4, dtype=th.float16)
        if attention_backends.SDPA_AVAILABLE:
            th.nn.functional.scaled_dot_product_attention(q, q, q, scale=0.5)
        th.einsum("bct,bcs->bts", q[0], q[0])
    except (RuntimeError, NotImplementedError) as exc:
        return str(exc)
    return None


_NO_HALF = _cpu_half_kernels()
needs_cpu_half = pytest.mark.skipif(
    _NO_HALF is not None, reason=f"this torch has no CPU float16 kernels for the U-Net: {_NO_HALF}"
)


def half_pair(use_new_attention_order, device="cpu", **overrides):
    """
    The same random tiny U-Net twice: in float32, and converted as ADM's --use_fp16 does.
    """
    full = random_model(use_new_attention_order, **overrides).to(device)
    half = random_model(use_new_attention_order, **overrides).to(device)
    half.convert_to_fp16()
    return full, half


def attention_dtypes(model):
    seen = []
    hooks = [
        module.register_forward_hook(lambda module, inputs, output: seen.append((inputs[0].dtype, output.dtype)))
        for module in model.modules()
        if isinstance(module, (unet.QKVAttention, unet.QKVAttentionLegacy))
    ]
    return seen, hooks


def relative_error(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def forward_bound(half, out, *args, **kwargs):
    """
    The relative error bound of the float16 model's output (tests/error_bounds.py: lambda sqrt(n) u for its n
    float16 roundings, all outputs together failing with probability below 1e-6).
    """
    return probabilistic_bound(float16_roundings(half, *args, **kwargs), FLOAT16_U, out.numel())


def test_convert_to_fp16_converts_the_torso_and_keeps_dtype_in_step():
    # Built without use_fp16: ADM's flag only sets the torso's input dtype, which converting must set too.
    model = random_model(False)
    assert model.dtype == th.float32
    model.convert_to_fp16()
    assert model.dtype == th.float16
    for name, module in model.named_modules():
        if isinstance(module, (th.nn.Conv1d, th.nn.Conv2d)) and name.split(".")[0] in (
            "input_blocks", "middle_block", "output_blocks"
        ):
            assert module.weight.dtype == th.float16, name
    assert model.time_embed[0].weight.dtype == th.float32
    assert model.label_emb.weight.dtype == th.float32
    assert model.out[2].weight.dtype == th.float32
    assert all(m.weight.dtype == th.float32 for m in model.modules() if isinstance(m, th.nn.GroupNorm))
    model.convert_to_fp32()
    assert model.dtype == th.float32
    assert all(p.dtype == th.float32 for p in model.parameters())


def test_classifier_convert_to_fp16_keeps_dtype_in_step():
    from guided_diffusion.script_util import classifier_defaults, create_classifier

    classifier = create_classifier(**{**classifier_defaults(), "image_size": 32, "classifier_width": 32,
                                      "classifier_depth": 1, "classifier_attention_resolutions": "8",
                                      "classifier_channel_mult": "1,2,2"})
    classifier.convert_to_fp16()
    assert classifier.dtype == th.float16
    assert classifier.input_blocks[0][0].weight.dtype == th.float16
    classifier.convert_to_fp32()
    assert classifier.dtype == th.float32


@needs_cpu_half
@pytest.mark.parametrize("use_new_attention_order", [False, True])
@pytest.mark.parametrize("backend", ["einsum", "sdpa"])
def test_cpu_half_forward_runs_in_half_and_matches_float32(use_new_attention_order, backend):
    if backend == "sdpa" and not attention_backends.SDPA_AVAILABLE:
        pytest.skip("this torch has no sdpa with a scale argument")
    full, half = half_pair(use_new_attention_order)
    # 16x16 inputs (the model is built for 32): CPU float16 convolutions are slow.
    x, t, y = model_inputs(batch_size=2, size=16)
    seen, hooks = attention_dtypes(half)
    with th.no_grad(), attention_backends.attention_backend(backend):
        expected = full(x, t, y=y)
        out = half(x, t, y=y)
    for hook in hooks:
        hook.remove()
    assert len(seen) == 7 and all(pair == (th.float16, th.float16) for pair in seen)
    assert out.dtype == th.float32
    assert th.isfinite(out).all()
    assert relative_error(out, expected) < forward_bound(half, out, x, t, y=y)


@needs_cpu_half
@pytest.mark.parametrize("order", ["legacy", "new"])
@pytest.mark.parametrize("backend", ["einsum", "sdpa"])
def test_cpu_half_attention_within_its_rounding_bound(order, backend):
    if backend == "sdpa" and not attention_backends.SDPA_AVAILABLE:
        pytest.skip("this torch has no sdpa with a scale argument")
    # The check of test_attention_backends.test_cuda_backends_match, on this CPU's float16 kernels.
    qkv = th.randn(2, 3 * 4 * 64, 256, generator=th.Generator().manual_seed(11))
    with attention_backends.attention_backend(backend):
        out = ORDERS[order](4)(qkv.half())
    error = (out.double() - reference_attention(qkv, 4, order)).abs()
    bound = attention_error_bound(qkv, 4, order, FLOAT16_U)
    assert (error <= bound).all(), f"{(error / bound).max().item():.3g} times the bound"


@needs_cpu_half
def test_einsum_softmax_runs_in_float32_for_half_input(monkeypatch):
    # ADM casts the attention logits to float32 for the softmax; logits that overflow a float16 softmax's exp
    # sum must still give a proper distribution.
    calls = []
    real = th.softmax

    def recording(input, *args, **kwargs):
        calls.append(input.dtype)
        return real(input, *args, **kwargs)

    monkeypatch.setattr(unet.th, "softmax", recording)
    qkv = th.randn(2, 3 * 2 * 8, 16).half()
    with attention_backends.attention_backend("einsum"):
        out = unet.QKVAttentionLegacy(2)(qkv)
        unet.QKVAttention(2)(qkv)
    assert calls == [th.float32, th.float32]
    assert out.dtype == th.float16


def pag_bound(full, half, scale, layers, out, x, t, **kwargs):
    """
    The absolute error bound of a float16 PAG output: each branch's forward bound, grown by PAG's combination
    (error_bounds.pag_amplification), relative to the larger float32 branch.
    """
    plain = full(x, t, **kwargs)
    perturbed = PAGGuidedModel(full, -1.0, layers, batched=False)(x, t, **kwargs)
    size = max(plain.abs().max().item(), perturbed.abs().max().item())
    return pag_amplification(scale) * forward_bound(half, out, x, t, **kwargs) * size


@needs_cpu_half
def test_cpu_half_pag_wrapper_all_modes_agree():
    full, half = half_pair(False)
    x, t, y = model_inputs(batch_size=3, size=8)
    layers = "input_blocks.5.1,middle_block.1,output_blocks.3.1"
    with th.no_grad():
        with attention_backends.attention_backend("einsum"):
            expected = PAGGuidedModel(full, 3.0, layers, batched=False)(x, t, y=y)
            bound = pag_bound(full, half, 3.0, layers, expected, x, t, y=y)
        outputs = {}
        for name, kwargs in [("two-pass", dict(batched=False)), ("batched", dict(share_prefix=False)),
                             ("shared", dict())]:
            outputs[name] = PAGGuidedModel(half, 3.0, layers, **kwargs)(x, t, y=y)
    # The three ways run the same float16 operations on batches of different shapes, which the CPU's float16
    # kernels may block and round differently (AVX-512 FP16 does): each agrees with float32 within the bound, and
    # so with the others within twice it. Their agreement at float32 precision is tested in test_pag.py.
    for name, out in outputs.items():
        assert out.dtype == th.float32, name
        assert (out - expected).abs().max().item() < bound, name


@needs_cpu_half
def test_cpu_half_ddim_pag_sampling_runs():
    full, half = half_pair(False)
    diffusion = su.create_gaussian_diffusion(learn_sigma=True, timestep_respacing="ddim2")
    noise = th.randn(2, 3, 8, 8, generator=th.Generator().manual_seed(4))
    kwargs = dict(model_kwargs={"y": th.tensor([3, 4])}, noise=noise, clip_denoised=True)
    with th.no_grad():
        sample = diffusion.ddim_sample_loop(PAGGuidedModel(half, 3.0, "middle"), (2, 3, 8, 8), **kwargs)
    # The loop runs with a float16 model and returns float32. No closeness to the float32 run is asserted: DDIM's
    # first step multiplies eps's error by sqrt((1 - abar) / abar) (about 160 at t = 999) before clipping, so the
    # worst-case bound on the final sample is larger than its range [-1, 1]; closeness is bounded per forward pass
    # above.
    assert sample.dtype == th.float32
    assert th.isfinite(sample).all()
    assert sample.abs().max().item() <= 1.0


@needs_cuda
@pytest.mark.parametrize("use_new_attention_order", [False, True])
@pytest.mark.parametrize("backend", ["einsum", "sdpa"])
def test_cuda_half_forward_and_pag_match_float32(use_new_attention_order, backend):
    full, half = half_pair(use_new_attention_order, device="cuda", num_head_channels=16)
    x, t, y = (value.cuda() for value in model_inputs(batch_size=4))
    seen, hooks = attention_dtypes(half)
    # The float32 reference without TF32 (which rounds products to float16's 11 bits, PyTorch's cuDNN default).
    previous = (th.backends.cuda.matmul.allow_tf32, th.backends.cudnn.allow_tf32)
    th.backends.cuda.matmul.allow_tf32 = th.backends.cudnn.allow_tf32 = False
    try:
        with th.no_grad(), attention_backends.attention_backend(backend):
            expected = full(x, t, y=y)
            out = half(x, t, y=y)
            guided_full = PAGGuidedModel(full, 3.0, "all", batched=False)(x, t, y=y)
            guided_half = PAGGuidedModel(half, 3.0, "all")(x, t, y=y)
            bound = pag_bound(full, half, 3.0, "all", guided_full, x, t, y=y)
    finally:
        th.backends.cuda.matmul.allow_tf32, th.backends.cudnn.allow_tf32 = previous
    for hook in hooks:
        hook.remove()
    assert seen and all(pair == (th.float16, th.float16) for pair in seen)
    assert relative_error(out, expected) < forward_bound(half, out, x, t, y=y)
    assert (guided_half - guided_full).abs().max().item() < bound

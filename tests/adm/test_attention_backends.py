"""
The attention backends (ADM's einsum formulation and torch's scaled_dot_product_attention) compute the same
attention, for both attention orders, in isolation and inside full U-Nets; perturbed rows take the cheap path.
"""

import os
import subprocess
import sys

import pytest
import torch as th

from guided_diffusion import script_util as su
from guided_diffusion.common import attention_backends
from guided_diffusion import unet
from guided_diffusion.methods.pag import PAGGuidedModel

from conftest import REPO_ROOT, TINY_ADM_FLAGS, randomize, reference_file
from error_bounds import FLOAT16_U, FLOAT32_U, attention_error_bound, split_heads_float64

needs_sdpa = pytest.mark.skipif(not attention_backends.SDPA_AVAILABLE, reason="this torch has no sdpa with a scale argument")
needs_cuda = pytest.mark.skipif(not th.cuda.is_available(), reason="CUDA is not available")

ORDERS = {"legacy": unet.QKVAttentionLegacy, "new": unet.QKVAttention}


def reference_attention(qkv, n_heads, order, identity=False):
    """
    Multi-head attention written out per head in float64, from the channel layout of each order.
    """
    q, k, v = split_heads_float64(qkv, n_heads, order)
    bs, _, ch, length = q.shape
    out = th.zeros(bs, n_heads, ch, length, dtype=th.float64)
    for n in range(bs):
        for h in range(n_heads):
            if identity:
                weights = th.eye(length, dtype=th.float64)
            else:
                logits = q[n, h].T @ k[n, h] / ch ** 0.5
                weights = th.softmax(logits, dim=-1)
            out[n, h] = v[n, h] @ weights.T
    return out.reshape(bs, n_heads * ch, length)


def random_model(use_new_attention_order, seed=0, **overrides):
    """
    A tiny class-conditional U-Net with every parameter random (the zero-initialised output convolutions too,
    so the attention blocks change the output).
    """
    flags = dict(TINY_ADM_FLAGS, use_new_attention_order=use_new_attention_order)
    flags.update(overrides)
    model, _ = su.create_model_and_diffusion(**{**su.model_and_diffusion_defaults(), **flags})
    return randomize(model, seed)


def model_inputs(batch_size=3, seed=1, size=32):
    gen = th.Generator().manual_seed(seed)
    x = th.randn(batch_size, 3, size, size, generator=gen)
    t = th.tensor([0, 417, 999, 250, 600, 10][:batch_size])
    y = th.tensor([1, 7, 999, 3, 500, 0][:batch_size])
    return x, t, y


@pytest.fixture(autouse=True)
def restore_backend():
    previous = attention_backends.set_attention_backend(None)
    attention_backends.set_attention_backend(previous)
    yield
    attention_backends.set_attention_backend(previous)


@needs_sdpa
@pytest.mark.parametrize("order", ["legacy", "new"])
@pytest.mark.parametrize("n_heads,ch,length", [(1, 8, 16), (4, 16, 64), (2, 64, 256), (3, 32, 5)])
def test_backends_match_reference_on_random_qkv(order, n_heads, ch, length):
    gen = th.Generator().manual_seed(n_heads * 1000 + ch + length)
    qkv = th.randn(2, 3 * n_heads * ch, length, generator=gen)
    attention = ORDERS[order](n_heads)
    expected = reference_attention(qkv, n_heads, order)
    with th.no_grad():
        with attention_backends.attention_backend("einsum"):
            einsum = attention(qkv)
        with attention_backends.attention_backend("sdpa"):
            sdpa = attention(qkv)
    assert einsum.shape == sdpa.shape == (2, n_heads * ch, length)
    assert einsum.dtype == sdpa.dtype == th.float32
    assert (einsum.double() - expected).abs().max().item() < 2e-5
    assert (sdpa.double() - expected).abs().max().item() < 2e-5
    assert (sdpa - einsum).abs().max().item() < 2e-5


@needs_sdpa
@pytest.mark.parametrize("order", ["legacy", "new"])
def test_orders_read_different_layouts(order):
    # Guards the reference itself: the two orders split the same tensor differently, so they must disagree.
    gen = th.Generator().manual_seed(3)
    qkv = th.randn(2, 3 * 4 * 8, 16, generator=gen)
    other = "new" if order == "legacy" else "legacy"
    with attention_backends.attention_backend("sdpa"):
        out = ORDERS[order](4)(qkv)
    assert (out.double() - reference_attention(qkv, 4, order)).abs().max().item() < 2e-5
    assert (out.double() - reference_attention(qkv, 4, other)).abs().max().item() > 1e-2


@needs_sdpa
@pytest.mark.parametrize("order", ["legacy", "new"])
def test_sdpa_path_calls_sdpa_and_einsum_path_does_not(order, monkeypatch):
    calls = []
    real = unet.F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(kwargs.get("scale"))
        return real(*args, **kwargs)

    monkeypatch.setattr(unet.F, "scaled_dot_product_attention", counting)
    qkv = th.randn(1, 3 * 2 * 16, 8)
    attention = ORDERS[order](2)
    with attention_backends.attention_backend("einsum"):
        attention(qkv)
    assert calls == []
    with attention_backends.attention_backend("sdpa"):
        attention(qkv)
    with attention_backends.attention_backend("auto"):
        attention(qkv)
    # auto takes the fused kernel only where CUDA is: CPU runs keep ADM's numbers bit for bit.
    expected = 2 if th.cuda.is_available() else 1
    assert calls == pytest.approx([16 ** -0.5] * expected)


@pytest.mark.parametrize("order", ["legacy", "new"])
@pytest.mark.parametrize("backend", ["einsum", "sdpa", "auto"])
def test_values_is_attention_with_identity_map_and_computes_no_scores(order, backend, monkeypatch):
    if backend == "sdpa" and not attention_backends.SDPA_AVAILABLE:
        pytest.skip("this torch has no sdpa with a scale argument")
    gen = th.Generator().manual_seed(5)
    qkv = th.randn(3, 3 * 4 * 8, 16, generator=gen)
    expected = reference_attention(qkv, 4, order, identity=True)

    def forbidden(*args, **kwargs):
        raise AssertionError("values() must not compute attention scores")

    monkeypatch.setattr(unet.F, "scaled_dot_product_attention", forbidden)
    monkeypatch.setattr(unet.th, "einsum", forbidden)
    with attention_backends.attention_backend(backend):
        values = ORDERS[order](4).values(qkv)
    assert values.shape == (3, 32, 16)
    assert th.equal(values.double(), expected)


@needs_sdpa
@pytest.mark.parametrize("use_new_attention_order", [False, True])
@pytest.mark.parametrize("head_flags", [dict(num_heads=4), dict(num_head_channels=16)])
def test_full_unet_same_output_with_either_backend(use_new_attention_order, head_flags):
    model = random_model(use_new_attention_order, **head_flags)
    x, t, y = model_inputs()
    with th.no_grad():
        with attention_backends.attention_backend("einsum"):
            einsum = model(x, t, y=y)
        with attention_backends.attention_backend("sdpa"):
            sdpa = model(x, t, y=y)
    assert einsum.abs().max().item() > 0.1
    assert (sdpa - einsum).abs().max().item() < 2e-5


@needs_sdpa
@pytest.mark.parametrize("use_new_attention_order", [False, True])
def test_perturbed_rows_same_with_either_backend(use_new_attention_order):
    # Mixed batches: the unperturbed rows go through the selected kernel, the perturbed ones through values().
    model = random_model(use_new_attention_order)
    x, t, y = model_inputs(batch_size=4)
    outputs = {}
    for backend in ("einsum", "sdpa"):
        with th.no_grad(), attention_backends.attention_backend(backend):
            outputs[backend] = PAGGuidedModel(model, 2.0, "all")(x, t, y=y)
            two_pass = PAGGuidedModel(model, 2.0, "all", batched=False)(x, t, y=y)
        assert (two_pass - outputs[backend]).abs().max().item() < 2e-5
    assert (outputs["sdpa"] - outputs["einsum"]).abs().max().item() < 2e-5


@pytest.mark.parametrize("backend", ["einsum", "sdpa"])
def test_reference_unet_golden_with_each_backend(backend):
    if backend == "sdpa" and not attention_backends.SDPA_AVAILABLE:
        pytest.skip("this torch has no sdpa with a scale argument")
    ref = th.load(reference_file("tiny_unet_a.pt"))
    model, _ = su.create_model_and_diffusion(**{**su.model_and_diffusion_defaults(), **ref["flags"]})
    model.load_state_dict(ref["state_dict"], strict=True)
    model.eval()
    with th.no_grad(), attention_backends.attention_backend(backend):
        out = model(ref["x"], ref["t"], **ref["model_kwargs"])
    assert (out - ref["out"]).abs().max().item() < 1e-5


@pytest.mark.parametrize("backend", ["einsum", "sdpa"])
def test_reference_classifier_golden_with_each_backend(backend):
    # The classifier's attention pool uses QKVAttention on a token count that is not a power of two.
    if backend == "sdpa" and not attention_backends.SDPA_AVAILABLE:
        pytest.skip("this torch has no sdpa with a scale argument")
    ref = th.load(reference_file("tiny_classifier.pt"))
    args = {**su.classifier_defaults(), **ref["flags"]}
    classifier = su.create_classifier(**{k: args[k] for k in su.classifier_defaults()})
    classifier.load_state_dict(ref["state_dict"], strict=True)
    classifier.eval()
    with th.no_grad(), attention_backends.attention_backend(backend):
        out = classifier(ref["x"], ref["t"])
    assert (out - ref["out"]).abs().max().item() < 1e-5


def test_switch_returns_previous_and_context_restores_on_error():
    attention_backends.set_attention_backend("einsum")
    assert attention_backends.set_attention_backend("auto") == "einsum"
    assert attention_backends.get_attention_backend() == "auto"
    assert attention_backends.resolved_attention_backend() == (
        "sdpa" if attention_backends.SDPA_AVAILABLE and th.cuda.is_available() else "einsum"
    )
    with pytest.raises(RuntimeError, match="boom"):
        with attention_backends.attention_backend("einsum"):
            assert attention_backends.resolved_attention_backend() == "einsum"
            raise RuntimeError("boom")
    assert attention_backends.get_attention_backend() == "auto"


def test_unknown_backend_is_rejected_with_the_choices():
    with pytest.raises(ValueError, match="unknown attention backend 'flash'; use one of auto, einsum, sdpa"):
        attention_backends.set_attention_backend("flash")
    with pytest.raises(ValueError, match="unknown attention backend"):
        with attention_backends.attention_backend("flash"):
            pass
    assert attention_backends.get_attention_backend() in attention_backends.ATTENTION_BACKENDS


def _run_with_env(value, code):
    env = dict(os.environ, PYTHONPATH=REPO_ROOT, PAG_ADM_ATTENTION=value)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_environment_variable_selects_the_backend():
    code = (
        "import torch as th\n"
        "from guided_diffusion.common import attention_backends\n"
        "print(attention_backends.get_attention_backend(), attention_backends.resolved_attention_backend())\n"
        "attention_backends.set_attention_backend('auto')\n"
        "print(attention_backends.set_attention_backend(None))\n"
        "print(attention_backends.get_attention_backend())\n"
    )
    result = _run_with_env("einsum", code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:3] == ["einsum einsum", "auto", "einsum"]


def test_bad_environment_variable_fails_on_first_attention_with_its_name():
    code = (
        "import torch as th\n"
        "from guided_diffusion import unet\n"
        "unet.QKVAttention(1)(th.zeros(1, 3, 4))\n"
    )
    result = _run_with_env("fast", code)
    assert result.returncode != 0
    assert "ValueError: unknown attention backend PAG_ADM_ATTENTION='fast'; use one of auto, einsum, sdpa" in (
        result.stderr
    )


@needs_cuda
@pytest.mark.parametrize("order", ["legacy", "new"])
@pytest.mark.parametrize("dtype", [th.float32, th.float16])
def test_cuda_backends_match(order, dtype):
    # ADM-256 head width (64) at a 32x32 token grid; float32 on CUDA may use TF32 in matmuls, so it is disabled.
    gen = th.Generator().manual_seed(11)
    qkv = th.randn(4, 3 * 4 * 64, 1024, generator=gen)
    expected = reference_attention(qkv, 4, order)
    attention = ORDERS[order](4)
    u = FLOAT16_U if dtype == th.float16 else FLOAT32_U
    bound = attention_error_bound(qkv, 4, order, u, input_u=u if dtype == th.float16 else 0.0)
    qkv = qkv.to("cuda", dtype)
    previous = th.backends.cuda.matmul.allow_tf32
    th.backends.cuda.matmul.allow_tf32 = False
    try:
        with attention_backends.attention_backend("einsum"):
            einsum = attention(qkv)
        with attention_backends.attention_backend("sdpa"):
            sdpa = attention(qkv)
    finally:
        th.backends.cuda.matmul.allow_tf32 = previous
    assert einsum.dtype == sdpa.dtype == dtype
    # Every element within the first-order rounding bound of its own data (error_bounds.attention_error_bound):
    # float16 rounds qkv and each stage (u = 2^-11); float32 rounds the stages only (u = 2^-24).
    for name, out in (("einsum", einsum), ("sdpa", sdpa)):
        error = (out.double().cpu() - expected).abs()
        assert (error <= bound).all(), f"{name}: {(error / bound).max().item():.3g} times the bound"


@needs_cuda
@pytest.mark.parametrize("use_new_attention_order", [False, True])
def test_cuda_full_unet_same_output_with_either_backend(use_new_attention_order):
    model = random_model(use_new_attention_order, num_head_channels=16)
    x, t, y = model_inputs()
    with th.no_grad(), attention_backends.attention_backend("einsum"):
        cpu = model(x, t, y=y)
    model = model.cuda()
    previous = (th.backends.cuda.matmul.allow_tf32, th.backends.cudnn.allow_tf32)
    th.backends.cuda.matmul.allow_tf32 = th.backends.cudnn.allow_tf32 = False
    try:
        with th.no_grad():
            for backend in ("einsum", "sdpa"):
                with attention_backends.attention_backend(backend):
                    out = model(x.cuda(), t.cuda(), y=y.cuda())
                assert (out.cpu() - cpu).abs().max().item() < 1e-4, backend
    finally:
        th.backends.cuda.matmul.allow_tf32, th.backends.cudnn.allow_tf32 = previous

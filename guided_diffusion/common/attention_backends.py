"""
Which kernel computes the attention of ADM's attention layers (unet.QKVAttention and QKVAttentionLegacy): ADM's
einsum formulation or torch's fused scaled_dot_product_attention, chosen per process. Kept out of unet.py, which
asks resolved_attention_backend() on each forward and calls sdpa() when it says so.
"""

import contextlib
import os

import torch as th
import torch.nn.functional as F

# The kernel behind QKVAttention and QKVAttentionLegacy:
#   "einsum"  ADM's own formulation (two einsums, softmax in float32), for exact comparisons with the original code;
#   "sdpa"    torch's fused scaled_dot_product_attention (flash or memory-efficient kernels on CUDA, a blocked kernel
#             on the CPU), which never materialises the full attention map; equal to einsum up to float32 rounding;
#   "auto"    sdpa on a machine with CUDA where this torch has it (2.1 or later, for its `scale` argument), else
#             einsum: CPU runs keep ADM's numbers bit for bit (and the project's earlier results); pass "sdpa" to
#             use the fused kernel on the CPU too.
# Chosen per process by set_attention_backend() / the attention_backend() context, or before start-up by the
# environment variable PAG_ADM_ATTENTION.
ATTENTION_BACKENDS = ("auto", "einsum", "sdpa")
ATTENTION_BACKEND_ENV = "PAG_ADM_ATTENTION"


def _torch_has_sdpa_scale():
    try:
        major, minor = (int(part) for part in th.__version__.split(".")[:2])
    except ValueError:
        return hasattr(F, "scaled_dot_product_attention")
    return (major, minor) >= (2, 1)


SDPA_AVAILABLE = _torch_has_sdpa_scale()

_attention_backend = os.environ.get(ATTENTION_BACKEND_ENV) or "auto"
_attention_backend_source = ATTENTION_BACKEND_ENV if os.environ.get(ATTENTION_BACKEND_ENV) else "default"


def _check_backend_name(name, source):
    if name not in ATTENTION_BACKENDS:
        where = f"{source}={name!r}" if source == ATTENTION_BACKEND_ENV else repr(name)
        raise ValueError(f"unknown attention backend {where}; use one of {', '.join(ATTENTION_BACKENDS)}")
    if name == "sdpa" and not SDPA_AVAILABLE:
        raise ValueError(
            f"attention backend 'sdpa' needs torch 2.1 or later (this is torch {th.__version__}); "
            "use 'einsum' or 'auto'"
        )


def set_attention_backend(name):
    """
    Select the attention kernel of every attention layer in this process: "auto", "einsum" or "sdpa" (see
    ATTENTION_BACKENDS); None goes back to the environment variable PAG_ADM_ATTENTION, or "auto" without it.

    :return: the previous setting, for restoring it.
    """
    global _attention_backend, _attention_backend_source
    previous = _attention_backend
    if name is None:
        name = os.environ.get(ATTENTION_BACKEND_ENV) or "auto"
        source = ATTENTION_BACKEND_ENV if os.environ.get(ATTENTION_BACKEND_ENV) else "default"
    else:
        source = "argument"
    _check_backend_name(name, source)
    _attention_backend, _attention_backend_source = name, source
    return previous


def get_attention_backend():
    """
    The selected attention backend ("auto", "einsum" or "sdpa").
    """
    _check_backend_name(_attention_backend, _attention_backend_source)
    return _attention_backend


def resolved_attention_backend():
    """
    The kernel attention layers use now: "einsum" or "sdpa" ("auto" resolved).
    """
    name = get_attention_backend()
    if name == "auto":
        return "sdpa" if SDPA_AVAILABLE and th.cuda.is_available() else "einsum"
    return name


@contextlib.contextmanager
def attention_backend(name):
    """
    Within the context, attention layers use the given backend; the previous setting is restored on exit.
    """
    global _attention_backend, _attention_backend_source
    previous = (_attention_backend, _attention_backend_source)
    set_attention_backend(name)
    try:
        yield
    finally:
        _attention_backend, _attention_backend_source = previous


def sdpa(qkv_heads):
    """
    Attention through scaled_dot_product_attention.

    :param qkv_heads: a [3 x N x H x C x T] view of the Qs, Ks and Vs (either attention order).
    :return: an [N x (H * C) x T] tensor after attention.
    """
    _, bs, heads, ch, length = qkv_heads.shape
    # Tokens-major and contiguous in C, the layout the fused kernels take without copying again.
    q, k, v = qkv_heads.transpose(-1, -2).contiguous().unbind(0)
    # ADM scales q and k by ch**-1/4 each; sdpa's scale multiplies their product, so ch**-1/2 is the same map.
    a = F.scaled_dot_product_attention(q, k, v, scale=ch ** -0.5)
    return a.transpose(-1, -2).reshape(bs, heads * ch, length)

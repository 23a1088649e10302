"""
Tolerances from rounding-error bounds, for the tests that compare a low-precision computation with a reference.

A tolerance here is a stated bound, a function of the precision's unit roundoff u and of the computation's depth,
never one machine's observed difference: kernels differ between CPUs (AVX2, AVX-512, AVX-512 FP16, no
vectorisation: ATEN_CPU_CAPABILITY), thread counts and GPUs, and each rounds differently within the bound.

- float16's unit roundoff is u = 2^-11 (half the spacing of float16 numbers at 1; float32's is 2^-24).
- A computation of n successive roundings, each a relative perturbation (1 + d_k) with |d_k| <= u, has a relative
  error of at most n*u (to first order) in the worst case. Treating the d_k as independent and of mean zero (the
  model of Higham and Mary, "A new approach to probabilistic rounding error analysis", SIAM J. Sci. Comput. 41,
  2019), it is at most lambda*sqrt(n)*u (to first order in u) with probability at least 1 - 2 exp(-lambda^2 / 2)
  per output. probabilistic_bound() takes lambda from a failure probability for all the m outputs compared
  together (a union bound: 1 - 2 m exp(-lambda^2 / 2) >= 1 - failure).
- For a network, n is its depth in roundings, counted by float16_roundings(), and each layer is taken as
  unit-conditioned (normalised activations, as the U-Net's GroupNorms keep them).
- PAG's guided output eps + s (eps - eps_perturbed) adds the errors of both branches: (1 + |s|) + |s| times one
  branch's bound, relative to the larger branch (pag_amplification()).
"""

import math

import torch as th

FLOAT16_U = 2.0 ** -11
FLOAT32_U = 2.0 ** -24

# The roundings inside one attention call besides its output: q and k scaled, the logits, the float32 softmax
# cast back to the map's dtype (unet._attention_map and _attend_heads).
ATTENTION_INNER_ROUNDINGS = 4


def probabilistic_bound(n, u, outputs, failure=1e-6):
    """
    The relative error bound lambda * sqrt(n) * u of n roundings of unit roundoff u, holding for all `outputs`
    compared values together except with probability `failure` (see the module docstring).
    """
    lam = math.sqrt(2.0 * math.log(2.0 * outputs / failure))
    return lam * math.sqrt(n) * u


def float16_roundings(model, *args, **kwargs):
    """
    The depth in float16 roundings of one forward pass of `model`: every leaf module whose output is float16
    (convolutions, norms cast back, activations, resampling) plus the attention calls' inner roundings.
    """
    count = [0]

    def hook(module, inputs, output):
        if th.is_tensor(output) and output.dtype == th.float16:
            count[0] += 1
            if "QKVAttention" in type(module).__name__:
                count[0] += ATTENTION_INNER_ROUNDINGS

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        with th.no_grad():
            model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return count[0]


def pag_amplification(scale):
    """
    How much PAG's combination can grow one branch's error: (1 + |s|) from eps plus |s| from eps_perturbed.
    """
    return 1.0 + 2.0 * abs(scale)


def split_heads_float64(qkv, n_heads, order):
    """
    q, k, v in float64, each [batch, heads, channels, tokens], from the channel layout of each attention order
    ("legacy": heads split before q, k, v; "new": q, k, v split before heads).
    """
    bs, width, length = qkv.shape
    ch = width // (3 * n_heads)
    if order == "legacy":
        parts = qkv.double().reshape(bs, n_heads, 3, ch, length)
        return parts[:, :, 0], parts[:, :, 1], parts[:, :, 2]
    parts = qkv.double().reshape(bs, 3, n_heads, ch, length)
    return parts[:, 0], parts[:, 1], parts[:, 2]


def attention_error_bound(qkv, n_heads, order, u, input_u=None, accumulation_u=FLOAT32_U):
    """
    The first-order worst-case bound, per output element, of attention computed in a precision of unit roundoff
    u from qkv rounded to it, in ADM's einsum formulation (q and k scaled by ch^-1/4 each, logits rounded, softmax
    in float32 and rounded, the weighted sum of v rounded), against the exact attention of the unrounded qkv;
    computed in float64 from the data. input_u is the rounding of qkv itself (u by default; 0 when qkv already
    has the precision); dot products accumulate in accumulation_u (float32: CPU kernels and cuBLAS/flash
    accumulate half products in float32). The fused kernels (flash, memory-efficient) round no more: they keep the
    logits and the softmax in float32 and round P to the value dtype once.

    For output a = sum_s w_s v_s with w = softmax(l), l_s = q.k_s / sqrt(ch), and g_n = n u_acc:
      |dl_s| <= (2 input_u + 2 u + g_ch) sum_c |q_c k_sc| / sqrt(ch) + u |l_s|
      |dw_s| <= w_s (|dl_s| + sum_r w_r |dl_r|) + u w_s                (softmax's sensitivity; the cast)
      |da|   <= sum_s |dw_s| |v_s| + (input_u + g_T) sum_s w_s |v_s| + u |a|
    """
    input_u = u if input_u is None else input_u
    q, k, v = split_heads_float64(qkv, n_heads, order)
    bs, _, ch, length = q.shape
    logits = th.einsum("nhct,nhcs->nhts", q, k) / math.sqrt(ch)
    w = th.softmax(logits, dim=-1)
    products = th.einsum("nhct,nhcs->nhts", q.abs(), k.abs()) / math.sqrt(ch)
    dl = (2 * input_u + 2 * u + ch * accumulation_u) * products + u * logits.abs()
    dw = w * (dl + (w * dl).sum(-1, keepdim=True)) + u * w
    a = th.einsum("nhts,nhcs->nhct", w, v)
    da = th.einsum("nhts,nhcs->nhct", dw + (input_u + length * accumulation_u) * w, v.abs()) + u * a.abs()
    return da.reshape(bs, n_heads * ch, length)

"""
The attention perturbations of PAG's ablation (Ahn et al., ECCV 2024, appendix; the official code's
--guidance_strategies), for AttentionBlock's perturbed rows.

A perturbation changes the attention map softmax(QK^T / sqrt(d)) of a perturbed block. PAG's own perturbation is
`identity` (the map becomes the identity matrix, so the output is V); the others are the official code's
QKVAttentionLegacy{Mask,Drop,Blur,AvgPool2D,Noise} modules, named as its strategies without the `attention_`
prefix:

    identity    the identity map (no map is computed at all)
    mask        before the softmax, each logit is set to -inf with probability drop_rate; with retain_diag the
                diagonal is never masked (the official `attention_mask` is retain_diag=False,
                `attention_mask_identity` is retain_diag=True)
    drop        after the softmax, each weight is set to 0 with probability drop_rate (rows no longer sum to 1)
    blur        after the softmax, the [T x T] map (queries x keys, one map per row and head) is blurred with a
                Gaussian of std blur_sigma, kernel blur_kernel_size (5 in the official code), reflect padding
    avgpool2d   after the softmax, the [T x T] map gets a 3x3 mean filter (stride 1, zero padding counted)
    noise       after the softmax, noise_scale * N(0, 1) is added to each weight

`blur` and `avgpool2d` filter the map as a T x T image, as the official modules do; they do not reshape it to the
spatial grid. The random kinds (mask, drop, noise) draw in one of two ways, with the same distribution:

  - from torch's global generator of the map's device, with the map's shape [rows * heads, T, T] and in the
    official order (one draw per perturbed block and forward pass), so a seeded forward equals the official
    module's; this is what a perturbation does by itself;
  - with_generators(g) gives a copy whose row r of the batch draws its [heads, T, T] part from generator g[r]
    (on g[r]'s device; random_streams.py), so a sample's perturbation depends on its own stream only; the scripts
    sample this way.
"""

import math
import numbers

import torch as th
import torch.nn.functional as F

# kind -> (required parameters, optional parameters with their defaults)
KINDS = {
    "identity": ((), {}),
    "mask": (("drop_rate",), {"retain_diag": False}),
    "drop": (("drop_rate",), {}),
    "blur": (("blur_sigma",), {"blur_kernel_size": 5}),
    "avgpool2d": ((), {}),
    "noise": (("noise_scale",), {}),
}


def gaussian_kernel1d(kernel_size, sigma, dtype=th.float32, device=None):
    """
    The normalized 1-D Gaussian torchvision's gaussian_blur uses: exp(-x^2 / (2 sigma^2)) at x = -(k-1)/2 .. (k-1)/2,
    computed in float32 and then cast, as there.
    """
    half = (kernel_size - 1) * 0.5
    x = th.linspace(-half, half, steps=kernel_size)
    pdf = th.exp(-0.5 * (x / sigma).pow(2))
    return (pdf / pdf.sum()).to(device=device, dtype=dtype)


def gaussian_blur2d(images, kernel_size, sigma):
    """
    Blur the last two dimensions of `images` [..., H, W] with a Gaussian, each leading slice on its own, with
    reflect padding: torchvision.transforms.functional.gaussian_blur for a square kernel and one sigma.
    """
    *lead, height, width = images.shape
    pad = kernel_size // 2
    if pad >= height or pad >= width:
        raise ValueError(
            f"a Gaussian blur with kernel size {kernel_size} (reflect padding {pad}) needs inputs larger than "
            f"{pad}x{pad}, got {height}x{width}"
        )
    dtype = images.dtype if images.is_floating_point() else th.float32
    k1 = gaussian_kernel1d(kernel_size, sigma, dtype=dtype, device=images.device)
    kernel = th.outer(k1, k1)[None, None]
    flat = images.reshape(-1, 1, height, width).to(dtype)
    flat = F.pad(flat, [pad, pad, pad, pad], mode="reflect")
    return F.conv2d(flat, kernel).reshape(*lead, height, width)


class AttentionPerturbation:
    """
    One perturbation of the attention map. `logits(w)` acts on the scaled logits before the softmax and
    `weights(w)` on the map after it, both on [rows * heads, T, T] tensors; either may return `w` unchanged.
    """

    kind = ""
    # Whether the perturbation draws random numbers.
    random = False

    def __init__(self, **params):
        self.params = params
        self.generators = None

    def with_generators(self, generators):
        """
        A copy whose random draws come from one CPU generator per batch row (None: the global generator).
        """
        copy = type(self)(**self.params)
        copy.generators = None if generators is None else list(generators)
        return copy

    def _draw(self, weight, normal=False):
        """
        Uniform [0, 1) (or standard normal) numbers shaped like the map `weight` [rows * heads, T, T]: a float32
        draw from the global generator on the map's device (normal: randn_like, the map's dtype), as the official
        modules draw, or, with generators, row r's [heads, T, T] from generators[r].
        """
        if self.generators is None:
            if normal:
                return th.randn_like(weight)
            return th.rand(weight.shape, device=weight.device)
        rows = len(self.generators)
        if rows == 0 or weight.shape[0] % rows:
            raise ValueError(
                f"perturbation {self.kind!r}: an attention map of {weight.shape[0]} rows * heads cannot be split "
                f"among {rows} per-sample generators"
            )
        shape = (weight.shape[0] // rows,) + tuple(weight.shape[1:])
        draw = th.randn if normal else th.rand
        parts = th.cat([draw(shape, generator=g, device=g.device) for g in self.generators])
        return parts.to(device=weight.device, dtype=weight.dtype if normal else th.float32)

    def logits(self, weight):
        return weight

    def weights(self, weight):
        return weight

    def __repr__(self):
        items = "".join(f", {k}={v!r}" for k, v in self.params.items())
        return f"{type(self).__name__}(kind={self.kind!r}{items})"

    def describe(self):
        """
        'kind' or 'kind (name=value, ...)', for logs.
        """
        if not self.params:
            return self.kind
        items = [f"{k}={v}" if isinstance(v, bool) else f"{k}={v:g}" for k, v in self.params.items()]
        return f"{self.kind} ({', '.join(items)})"


class IdentityPerturbation(AttentionPerturbation):
    """
    PAG's identity map. AttentionBlock takes a fast path for it (the output is V; no map is computed), so the
    hooks below only serve callers that build the map anyway.
    """

    kind = "identity"

    def weights(self, weight):
        eye = th.eye(weight.shape[-1], dtype=weight.dtype, device=weight.device)
        return eye.expand_as(weight)


class MaskPerturbation(AttentionPerturbation):
    kind = "mask"
    random = True

    def logits(self, weight):
        masked = self._draw(weight) < self.params["drop_rate"]
        if self.params["retain_diag"]:
            masked.diagonal(dim1=-2, dim2=-1).fill_(False)
        return weight.masked_fill(masked, -float("inf"))


class DropPerturbation(AttentionPerturbation):
    kind = "drop"
    random = True

    def weights(self, weight):
        keep = self._draw(weight) > self.params["drop_rate"]
        return weight * keep


class BlurPerturbation(AttentionPerturbation):
    kind = "blur"

    def weights(self, weight):
        return gaussian_blur2d(weight, self.params["blur_kernel_size"], self.params["blur_sigma"])


class AvgPool2dPerturbation(AttentionPerturbation):
    kind = "avgpool2d"

    def weights(self, weight):
        # The rows * heads maps are the channels of one image, as in the official module.
        return F.avg_pool2d(weight.unsqueeze(0), 3, stride=1, padding=1).squeeze(0)


class NoisePerturbation(AttentionPerturbation):
    kind = "noise"
    random = True

    def weights(self, weight):
        # The noise has the map's dtype (float16 under --use_fp16), as the official module's randn_like.
        return weight + self._draw(weight, normal=True) * self.params["noise_scale"]


_CLASSES = {
    cls.kind: cls
    for cls in (
        IdentityPerturbation,
        MaskPerturbation,
        DropPerturbation,
        BlurPerturbation,
        AvgPool2dPerturbation,
        NoisePerturbation,
    )
}


def real_number(value, what):
    """
    A float from a real number or a one-element tensor, finite, or a ValueError that starts with `what`.
    """
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, th.Tensor)):
        raise ValueError(f"{what} must be a real number, got {value!r}")
    if th.is_tensor(value):
        if value.numel() != 1:
            raise ValueError(f"{what} must be a single number, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{what} must be finite, got {value}")
    return value


def _real(kind, name, value):
    return real_number(value, f"perturbation {kind!r}: {name}")


def _check_param(kind, name, value):
    if name == "drop_rate":
        value = _real(kind, name, value)
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"perturbation {kind!r}: drop_rate must be in [0, 1], got {value:g}")
    elif name == "noise_scale":
        value = _real(kind, name, value)
        if value < 0:
            raise ValueError(f"perturbation {kind!r}: noise_scale must be >= 0, got {value:g}")
    elif name == "blur_sigma":
        value = _real(kind, name, value)
        if value <= 0:
            raise ValueError(f"perturbation {kind!r}: blur_sigma must be > 0, got {value:g}")
    elif name == "blur_kernel_size":
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1 or value % 2 == 0:
            raise ValueError(f"perturbation {kind!r}: blur_kernel_size must be an odd positive integer, got {value!r}")
        value = int(value)
    elif name == "retain_diag":
        if not isinstance(value, bool):
            raise ValueError(f"perturbation {kind!r}: retain_diag must be True or False, got {value!r}")
    return value


def _params_text(kind):
    required, optional = KINDS[kind]
    names = list(required) + [f"{k} (optional, default {v!r})" for k, v in optional.items()]
    return ", ".join(names) if names else "no parameters"


def make_perturbation(kind="identity", **params):
    """
    The perturbation `kind` (see the module docstring and KINDS) with its parameters checked.

    :raises ValueError: for an unknown kind, a missing or unknown parameter, or a value out of range.
    """
    if isinstance(kind, AttentionPerturbation):
        if params:
            raise ValueError(f"parameters {sorted(params)} given with a ready perturbation {kind!r}")
        return kind
    if not isinstance(kind, str) or kind not in KINDS:
        raise ValueError(f"unknown attention perturbation {kind!r}; use one of {', '.join(KINDS)}")
    required, optional = KINDS[kind]
    unknown = sorted(set(params) - set(required) - set(optional))
    if unknown:
        raise ValueError(
            f"perturbation {kind!r} does not take {', '.join(unknown)}; it takes {_params_text(kind)}"
        )
    missing = [name for name in required if params.get(name) is None]
    if missing:
        raise ValueError(f"perturbation {kind!r} needs {', '.join(missing)}; it takes {_params_text(kind)}")
    values = {}
    for name in required:
        values[name] = _check_param(kind, name, params[name])
    for name, default in optional.items():
        values[name] = _check_param(kind, name, params.get(name, default))
    if kind == "mask" and values["drop_rate"] == 1.0 and not values["retain_diag"]:
        raise ValueError(
            "perturbation 'mask' with drop_rate 1 and retain_diag False masks every logit, and the softmax of a "
            "row of -inf is NaN; use drop_rate < 1, or retain_diag=True"
        )
    return _CLASSES[kind](**values)


def is_identity(perturbation):
    return perturbation is None or isinstance(perturbation, IdentityPerturbation)

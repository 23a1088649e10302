"""
The attention perturbations of PAG's perturbed branch: PAG's own, the ones of its ablation, and its successors that
change an attention block in another place. Each is one AttentionPerturbation subclass registered with @register;
the PAG flags (--pag_perturbation and a --pag_<param> flag per parameter), --help, describe(), the non-finite hint
and the docs' table read the class.

A perturbation may act in three places of AttentionBlock's forward pass, on the perturbed rows only:

    queries(q, spatial)      the queries after the head split, [rows * heads, C, T] (spatial: the token grid)
    logits(w) / weights(w)   the attention map [rows * heads, T, T], before / after the softmax
    output(x, h)             the block's output from its input x and its attention branch h = proj_out(...),
                             both [rows, C, T]; ADM's block returns x + h

The paper's kinds (Ahn et al., ECCV 2024, appendix; the official code's --guidance_strategies, named without the
`attention_` prefix; KINDS) act on the map:

    identity    the identity map (no map is computed at all: the output is V)
    mask        before the softmax, each logit is set to -inf with probability drop_rate; with retain_diag the
                diagonal is never masked (the official `attention_mask` is retain_diag=False,
                `attention_mask_identity` is retain_diag=True)
    drop        after the softmax, each weight is set to 0 with probability drop_rate (rows no longer sum to 1)
    blur        after the softmax, the [T x T] map (queries x keys, one map per row and head) is blurred with a
                Gaussian of std blur_sigma, kernel blur_kernel_size (5 in the official code), reflect padding
    avgpool2d   after the softmax, the [T x T] map gets a 3x3 mean filter (stride 1, zero padding counted)
    noise       after the softmax, noise_scale * N(0, 1) is added to each weight

Its successors (docs/pag.md gives each one's reference and deviations):

    seg         Smoothed Energy Guidance: each query channel blurred over the token grid (queries)
    soft        SoftPAG: the map becomes (1 - soft_alpha) A + soft_alpha I on the chosen heads (weights)
    tpg         Token Perturbation Guidance: the block's branch sees its tokens shuffled, x + P h(x) (output)

`blur` and `avgpool2d` filter the map as a T x T image, as the official modules do; they do not reshape it to the
spatial grid. The random kinds (mask, drop, noise, tpg) draw in one of two ways, with the same distribution:

  - from torch's global generator of the tensor's device (for the map kinds with the map's shape
    [rows * heads, T, T] and in the official order, one draw per perturbed block and forward pass, so a seeded
    forward equals the official module's); this is what a perturbation does by itself;
  - with_generators(g) gives a copy whose row r of the batch draws its part from generator g[r] (on g[r]'s
    device; random_streams.py), so a sample's perturbation depends on its own stream only; the scripts sample
    this way.
"""

import dataclasses
import math
import numbers
from typing import Callable, Tuple

import torch as th
import torch.nn.functional as F


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


def real_number(value, what):
    """
    A float from a real number or a one-element tensor, finite, or a ValueError that starts with `what`.
    """
    value = _any_real(value, what)
    if not math.isfinite(value):
        raise ValueError(f"{what} must be finite, got {value}")
    return value


def _any_real(value, what):
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, th.Tensor)):
        raise ValueError(f"{what} must be a real number, got {value!r}")
    if th.is_tensor(value):
        if value.numel() != 1:
            raise ValueError(f"{what} must be a single number, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"{what} must be finite, got {value}")
    return value


# Parameter checks: check(value, what) returns the checked value or raises a ValueError that starts with `what`
# ("perturbation 'kind': name").


def probability(value, what):
    value = real_number(value, what)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{what} must be in [0, 1], got {value:g}")
    return value


def non_negative(value, what):
    value = real_number(value, what)
    if value < 0:
        raise ValueError(f"{what} must be >= 0, got {value:g}")
    return value


def positive(value, what):
    value = real_number(value, what)
    if value <= 0:
        raise ValueError(f"{what} must be > 0, got {value:g}")
    return value


def positive_or_inf(value, what):
    value = _any_real(value, what)
    if value <= 0:
        raise ValueError(f"{what} must be > 0 (or inf), got {value:g}")
    return value


def odd_size(value, what):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1 or value % 2 == 0:
        raise ValueError(f"{what} must be an odd positive integer, got {value!r}")
    return int(value)


def boolean(value, what):
    if not isinstance(value, bool):
        raise ValueError(f"{what} must be True or False, got {value!r}")
    return value


def head_indices(value, what):
    """
    None (every head) from None, "" or "all"; else a sorted tuple of distinct head indices >= 0 from a
    comma-separated string or a sequence of integers.
    """
    if value is None or (isinstance(value, str) and value.strip() in ("", "all")):
        return None
    items = value.split(",") if isinstance(value, str) else value
    try:
        heads = [int(str(item).strip()) if isinstance(item, str) else item for item in items]
    except (TypeError, ValueError):
        heads = None
    if not heads or any(isinstance(h, bool) or not isinstance(h, numbers.Integral) or h < 0 for h in heads):
        raise ValueError(f"{what} must be 'all' or head indices >= 0 (e.g. '0,2'), got {value!r}")
    return tuple(sorted(set(int(h) for h in heads)))


REQUIRED = object()


@dataclasses.dataclass(frozen=True)
class Param:
    """
    One parameter of a perturbation. With `flag`, the samplers take it as --pag_<name> (a float unless the default
    is a bool or `flag_type` says otherwise; None: not given); `help` is that flag's help text.
    """

    name: str
    check: Callable
    help: str
    default: object = REQUIRED
    flag: bool = True
    flag_type: type = float

    @property
    def required(self):
        return self.default is REQUIRED


DROP_RATE = Param("drop_rate", probability, "the probability of masking (mask) or zeroing (drop) each attention weight")


class AttentionPerturbation:
    """
    One perturbation of an attention block (see the module docstring). A subclass sets `kind`, `summary` (a few
    words for --help) and `params_declared`, and overrides the hooks it acts in: the block writes the attention map
    out only for a class that changes the queries or the map, and calls output() only where a class overrides it,
    so the hooks a class leaves alone cost nothing. attend() may be overridden to take the whole attention branch.
    """

    kind = ""
    summary = ""
    params_declared: Tuple[Param, ...] = ()
    # Whether the perturbation draws random numbers.
    random = False
    # One of the paper's ablation kinds (KINDS).
    paper_kind = False

    def __init__(self, **params):
        self.params = params
        self.generators = None

    @classmethod
    def acts_on(cls, hook):
        """
        Whether the class overrides the hook ("queries", "logits", "weights" or "output").
        """
        return getattr(cls, hook) is not getattr(AttentionPerturbation, hook)

    @classmethod
    def changes_map(cls):
        """
        Whether the attention must be computed with its map written out (the queries or the map change).
        """
        return cls.acts_on("queries") or cls.acts_on("logits") or cls.acts_on("weights")

    def check_block(self, name, block):
        """
        Raise ValueError when the perturbation cannot act on the attention block `block` (named `name`), so that a
        setting the model does not fit fails before any sampling, not in the middle of it.
        """

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

    # The hooks; each returns its input unchanged here.

    def queries(self, q, spatial):
        return q

    def logits(self, weight):
        return weight

    def weights(self, weight):
        return weight

    def output(self, x, h):
        return x + h

    def attend(self, attention, qkv, spatial):
        """
        The attention branch of the perturbed rows, [rows, H * C, T], from their qkv and the block's
        QKVAttention(Legacy) module.
        """
        if not self.changes_map():
            return attention(qkv)
        queries = None
        if self.acts_on("queries"):
            def queries(q):
                return self.queries(q, spatial)
        return attention.attend_with_map(qkv, self.logits, self.weights, queries_fn=queries)

    def nonfinite_hint(self):
        """
        What to change when a sample with this perturbation turns non-finite ("" if nothing specific).
        """
        return ""

    def __repr__(self):
        items = "".join(f", {k}={v!r}" for k, v in self.params.items())
        return f"{type(self).__name__}(kind={self.kind!r}{items})"

    def describe(self):
        """
        'kind' or 'kind (name=value, ...)', for logs.
        """
        if not self.params:
            return self.kind
        items = [f"{k}={_value_text(v)}" for k, v in self.params.items()]
        return f"{self.kind} ({', '.join(items)})"


def _value_text(value):
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, numbers.Real):
        return f"{value:g}"
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return str(value)


# kind -> class, in registration order: the paper's kinds, then their successors.
PERTURBATIONS = {}


def register(cls):
    """
    Class decorator: make the perturbation available under cls.kind (the PAG flags, --help and docs read it).
    """
    if not cls.kind or cls.kind in PERTURBATIONS:
        raise ValueError(f"perturbation kind {cls.kind!r} is empty or taken")
    PERTURBATIONS[cls.kind] = cls
    return cls


@register
class IdentityPerturbation(AttentionPerturbation):
    """
    PAG's identity map: the attention output is V, and no map is computed.
    """

    kind = "identity"
    summary = "the paper's PAG: the map becomes the identity"
    paper_kind = True

    def weights(self, weight):
        # For callers that build the map anyway; attend() never does.
        eye = th.eye(weight.shape[-1], dtype=weight.dtype, device=weight.device)
        return eye.expand_as(weight)

    def attend(self, attention, qkv, spatial):
        return attention.values(qkv)


@register
class MaskPerturbation(AttentionPerturbation):
    kind = "mask"
    summary = "random -inf logits"
    params_declared = (
        DROP_RATE,
        Param(
            "retain_diag", boolean, "never mask the diagonal of the attention map (the official "
            "attention_mask_identity)", default=False,
        ),
    )
    random = True
    paper_kind = True

    def logits(self, weight):
        masked = self._draw(weight) < self.params["drop_rate"]
        if self.params["retain_diag"]:
            masked.diagonal(dim1=-2, dim2=-1).fill_(False)
        return weight.masked_fill(masked, -float("inf"))

    def nonfinite_hint(self):
        if self.params["retain_diag"]:
            return ""
        return (
            "the random mask (as in the official attention_mask) can mask every logit of an attention row, "
            "whose softmax is NaN; --pag_retain_diag (the official attention_mask_identity) never masks the "
            "diagonal, or lower --pag_drop_rate"
        )


@register
class DropPerturbation(AttentionPerturbation):
    kind = "drop"
    summary = "random zero weights"
    params_declared = (DROP_RATE,)
    random = True
    paper_kind = True

    def weights(self, weight):
        keep = self._draw(weight) > self.params["drop_rate"]
        return weight * keep


@register
class BlurPerturbation(AttentionPerturbation):
    kind = "blur"
    summary = "the map blurred"
    params_declared = (
        Param("blur_sigma", positive, "the std of the Gaussian blur of the attention map"),
        Param("blur_kernel_size", odd_size, "", default=5, flag=False),
    )
    paper_kind = True

    def weights(self, weight):
        return gaussian_blur2d(weight, self.params["blur_kernel_size"], self.params["blur_sigma"])


@register
class AvgPool2dPerturbation(AttentionPerturbation):
    kind = "avgpool2d"
    summary = "the map mean-filtered"
    paper_kind = True

    def weights(self, weight):
        # The rows * heads maps are the channels of one image, as in the official module.
        return F.avg_pool2d(weight.unsqueeze(0), 3, stride=1, padding=1).squeeze(0)


@register
class NoisePerturbation(AttentionPerturbation):
    kind = "noise"
    summary = "Gaussian noise on the map"
    params_declared = (Param("noise_scale", non_negative, "the std of the noise added to the attention map"),)
    random = True
    paper_kind = True

    def weights(self, weight):
        # The noise has the map's dtype (float16 under --use_fp16), as the official module's randn_like.
        return weight + self._draw(weight, normal=True) * self.params["noise_scale"]


# --- PAG's successors ---

# SEG: a sigma above this blurs infinitely (each query channel becomes its mean), as in the official code.
SEG_INFINITE_SIGMA = 9999.0


def seg_kernel_size(sigma, width):
    """
    SEG's kernel size for a grid `width` tokens wide: ceil(6 sigma) + 1 - (ceil(6 sigma) mod 2), the odd size that
    covers +-3 sigma, at most width for an odd width and width + 1 for an even one.
    """
    six = math.ceil(6 * sigma)
    return min(six + 1 - six % 2, width if width % 2 else width + 1)


def seg_blur(q, spatial, sigma):
    """
    SEG's query blur: q [N, C, T] with T = h * w tokens, each channel blurred over the h x w grid by a normalized
    Gaussian of std sigma (kernel seg_kernel_size, reflect padding kernel // 2), or, for sigma > 9999 (inf),
    replaced by its mean over the tokens.
    """
    if len(spatial) != 2:
        raise ValueError(f"perturbation 'seg' blurs a 2-D token grid, got a grid of shape {tuple(spatial)}")
    if sigma > SEG_INFINITE_SIGMA:
        return q.mean(dim=-1, keepdim=True).expand_as(q)
    n, c, _ = q.shape
    height, width = spatial
    size = seg_kernel_size(sigma, width)
    grid = q.reshape(n * c, 1, height, width)
    k1 = gaussian_kernel1d(size, sigma, dtype=q.dtype, device=q.device)
    pad = size // 2
    grid = F.pad(grid, [pad, pad, pad, pad], mode="reflect")
    return F.conv2d(grid, th.outer(k1, k1)[None, None]).reshape(n, c, -1)


@register
class SEGPerturbation(AttentionPerturbation):
    """
    Smoothed Energy Guidance (Hong, NeurIPS 2024): the queries, after the head split, blurred over the token grid
    channel by channel (seg_blur); keys and values untouched.
    """

    kind = "seg"
    summary = "SEG: the queries blurred over the token grid"
    params_declared = (
        Param(
            "seg_sigma", positive_or_inf,
            "std of SEG's Gaussian blur of the queries, in tokens; above 9999 or inf: each query channel becomes "
            "its mean (the official default)",
        ),
    )

    def queries(self, q, spatial):
        return seg_blur(q, spatial, self.params["seg_sigma"])


@register
class SoftPerturbation(AttentionPerturbation):
    """
    SoftPAG (Ahn et al., NeurIPS 2025, "HeadHunter"): on the chosen heads the map becomes (1 - u) A + u I with
    u = soft_alpha; the other heads keep A. u = 1 on every head is PAG's identity, u = 0 the plain model.
    """

    kind = "soft"
    summary = "SoftPAG: the map moved toward the identity by soft_alpha on the chosen heads"
    params_declared = (
        Param("soft_alpha", probability, "SoftPAG's interpolation u: the map becomes (1 - u) A + u I"),
        Param(
            "soft_heads", head_indices, "the heads SoftPAG perturbs: comma-separated head indices, or all",
            default=None, flag_type=str,
        ),
    )

    def check_block(self, name, block):
        self._check_heads(block.attention.n_heads, f" ({name})")

    def _check_heads(self, n_heads, where=""):
        heads = self.params["soft_heads"]
        if heads is not None and heads[-1] >= n_heads:
            raise ValueError(
                f"perturbation 'soft': soft_heads {','.join(map(str, heads))} names a head the block{where} lacks (it "
                f"has {n_heads}: 0..{n_heads - 1})"
            )

    def attend(self, attention, qkv, spatial):
        self._check_heads(attention.n_heads)

        def soften(weight):
            return self._soften(weight, attention.n_heads)

        return attention.attend_with_map(qkv, weights_fn=soften)

    def _soften(self, weight, n_heads):
        """
        The map [rows * n_heads, T, T] with the chosen heads moved toward the identity.
        """
        u = self.params["soft_alpha"]
        eye = th.eye(weight.shape[-1], dtype=weight.dtype, device=weight.device)
        soft = (1 - u) * weight + u * eye
        heads = self.params["soft_heads"]
        if heads is None:
            return soft
        # Row r of the map is head r mod n_heads of its sample, in either qkv layout.
        chosen = th.zeros(n_heads, dtype=th.bool, device=weight.device)
        chosen[list(heads)] = True
        chosen = chosen.repeat(weight.shape[0] // n_heads)[:, None, None]
        return th.where(chosen, soft, weight)


@register
class TPGPerturbation(AttentionPerturbation):
    """
    Token Perturbation Guidance (Rajabi et al., 2025): the tokens entering the block's branch are shuffled by a
    uniform random permutation P. ADM's branch (GroupNorm, 1x1 convolutions, attention without positions) is
    permutation-equivariant, so the block gives x + P h(x): the branch's output permuted, the skip not. A fresh
    permutation per block call, one per row with per-sample generators, one for the batch without.
    """

    kind = "tpg"
    summary = "TPG: the tokens entering the block shuffled (x + P h(x))"
    random = True

    def permutations(self, rows, tokens, device):
        """
        [rows, tokens] permutation indices: row r's from generators[r], or one from the global generator for all.
        """
        if self.generators is None:
            return th.randperm(tokens, device=device).expand(rows, tokens)
        if len(self.generators) != rows:
            raise ValueError(
                f"perturbation 'tpg': {rows} rows cannot take {len(self.generators)} per-sample generators"
            )
        return th.stack([th.randperm(tokens, generator=g, device=g.device) for g in self.generators]).to(device)

    def output(self, x, h):
        perm = self.permutations(h.shape[0], h.shape[-1], h.device)
        return x + th.gather(h, -1, perm[:, None, :].expand_as(h))


# The paper's ablation kinds (its table; the official code's strategies): kind -> (required parameters, optional
# parameters with their defaults).
KINDS = {
    kind: (
        tuple(p.name for p in cls.params_declared if p.required),
        {p.name: p.default for p in cls.params_declared if not p.required},
    )
    for kind, cls in PERTURBATIONS.items()
    if cls.paper_kind
}


def _params_text(cls):
    names = [p.name if p.required else f"{p.name} (optional, default {p.default!r})" for p in cls.params_declared]
    return ", ".join(names) if names else "no parameters"


def make_perturbation(kind="identity", **params):
    """
    The perturbation `kind` (see the module docstring and PERTURBATIONS) with its parameters checked.

    :raises ValueError: for an unknown kind, a missing or unknown parameter, or a value out of range.
    """
    if isinstance(kind, AttentionPerturbation):
        if params:
            raise ValueError(f"parameters {sorted(params)} given with a ready perturbation {kind!r}")
        return kind
    if not isinstance(kind, str) or kind not in PERTURBATIONS:
        raise ValueError(f"unknown attention perturbation {kind!r}; use one of {', '.join(PERTURBATIONS)}")
    cls = PERTURBATIONS[kind]
    declared = {p.name: p for p in cls.params_declared}
    unknown = sorted(set(params) - set(declared))
    if unknown:
        raise ValueError(f"perturbation {kind!r} does not take {', '.join(unknown)}; it takes {_params_text(cls)}")
    missing = [p.name for p in cls.params_declared if p.required and params.get(p.name) is None]
    if missing:
        raise ValueError(f"perturbation {kind!r} needs {', '.join(missing)}; it takes {_params_text(cls)}")
    values = {}
    for p in cls.params_declared:
        value = params[p.name] if p.name in params else p.default
        values[p.name] = p.check(value, f"perturbation {kind!r}: {p.name}")
    if kind == "mask" and values["drop_rate"] == 1.0 and not values["retain_diag"]:
        raise ValueError(
            "perturbation 'mask' with drop_rate 1 and retain_diag False masks every logit, and the softmax of a "
            "row of -inf is NaN; use drop_rate < 1, or retain_diag=True"
        )
    return cls(**values)


def is_identity(perturbation):
    return perturbation is None or isinstance(perturbation, IdentityPerturbation)

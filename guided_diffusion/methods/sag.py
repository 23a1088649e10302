"""
Self-Attention Guidance (SAG, Hong et al., ICCV 2023) for ADM's U-Net, the baseline of PAG's Table 1.

At each sampling step SAG degrades the parts of the image the model attends to and pushes the prediction away
from the degraded one:

  1. the plain pass gives eps and, from the selected attention block, the attention map A (rows: queries,
     columns: keys, averaged over heads);
  2. x0 = pred_xstart(x_t, eps), clipped to [-1, 1] like ADM's p_mean_variance with clip_denoised;
  3. the mask M marks the key tokens that receive more than the average attention (column sums of A > 1),
     upsampled to the image by nearest neighbour;
  4. x0_bar = M * blur(x0) + (1 - M) * x0, with a Gaussian blur (kernel 31, std blur_sigma, reflect padding);
  5. x_t_bar = q_sample(x0_bar, t, noise=eps): the degraded image re-noised with the same eps;
  6. eps_guided = eps_bar + (1 + s) * (eps - eps_bar), eps_bar being the model's eps for x_t_bar.

`s` is the paper's scale (SAG's README calls it the guidance scale); the official code's --guide_scale is 1 + s.
The learned-variance channels of learn_sigma models come from the plain pass, as in the official p_sample, and
the guidance acts on the model's output, so pred_xstart, the posterior mean, DDIM and classifier guidance (which
the diffusion applies to the guided mean, with the plain pass's variance) follow without changes.

As in the official code, the map is recomputed from the block's qkv in float32 with `map_heads` heads, the legacy
qkv split of ADM's checkpoints: the official code uses the model's --num_heads flag there, which differs from
the block's own heads when --num_head_channels is set (ImageNet 256: 4 "heads" of 256 channels instead of 16 of
64). map_heads=None uses the block's own heads, i.e. its real attention map.
"""

import contextlib
import math
import numbers

import torch as th
import torch.nn.functional as F

from ..gaussian_diffusion import ModelMeanType
from ..respace import SpacedDiffusion
from ..unet import QKVAttention, QKVAttentionLegacy
from .attention_hooks import hooked
from .attention_layers import resolve_layers
from .guided_model import GuidedModel, take_rows
from .perturbations import gaussian_blur2d

# The official attention_masking's torchvision GaussianBlur(kernel_size=31, sigma=blur_sigma).
SAG_BLUR_KERNEL = 31

# The official defaults: --sel_attn_block output --sel_attn_depth 2, --blur_sigma 9.
OFFICIAL_SAG_LAYER = "output_blocks.2.1"
OFFICIAL_SAG_BLUR_SIGMA = 9.0


def sag_layer_name(sel_attn_block, sel_attn_depth=None):
    """
    The block the official --sel_attn_block / --sel_attn_depth select: middle_block.1 or output_blocks.DEPTH.1.
    """
    if sel_attn_block == "middle":
        return "middle_block.1"
    if sel_attn_block == "output":
        return f"output_blocks.{int(sel_attn_depth)}.1"
    raise ValueError(f"sel_attn_block must be 'middle' or 'output', got {sel_attn_block!r}")


@contextlib.contextmanager
def capture_qkv(block):
    """
    Within the context, every forward of the attention block appends (qkv as float32, spatial shape) to the
    yielded list. The block's previous capture is back on exit, also when the body raises.
    """
    seen = []

    def capture(qkv, spatial):
        seen.append((qkv.detach().float(), spatial))

    with hooked([block], capture=capture):
        yield seen


def attention_map(qkv, num_heads, legacy=True):
    """
    softmax(q^T k / sqrt(C)) of a block's qkv [N x 3*H*C x T] as [N x H x T x T], in qkv's dtype, computed as the
    U-Net's own attention computes it.

    :param legacy: the qkv layout: heads first, then q, k, v (QKVAttentionLegacy), or q, k, v first.
    """
    if qkv.shape[1] % (3 * num_heads) != 0:
        raise ValueError(f"qkv width {qkv.shape[1]} does not split into 3 x {num_heads} heads")
    return (QKVAttentionLegacy if legacy else QKVAttention)(num_heads).weights(qkv)


def attention_mask(weight, spatial, image_size):
    """
    SAG's mask: 1 where a key token receives more than the average attention (the column sum of the head-averaged
    map exceeds 1), as a [N x 1 x H x W] float tensor upsampled by nearest neighbour.
    """
    bs = weight.shape[0]
    attended = weight.mean(dim=1).sum(dim=1) > 1.0
    mask = attended.reshape(bs, 1, *spatial).float()
    return F.interpolate(mask, tuple(image_size), mode="nearest")


def check_blur_sigma(blur_sigma):
    if isinstance(blur_sigma, bool) or not isinstance(blur_sigma, numbers.Real) or not blur_sigma > 0:
        raise ValueError(f"SAG blur_sigma must be a number > 0, got {blur_sigma!r}")
    if not math.isfinite(blur_sigma):
        raise ValueError(f"SAG blur_sigma must be finite, got {blur_sigma!r}")


class SAGGuidedModel(GuidedModel):
    """
    A model wrapper whose output is guided by Self-Attention Guidance; call it like the model,
    `guided(x, t, **model_kwargs)`, e.g. as the model of diffusion.p_sample_loop / ddim_sample_loop.

    :param model: a UNetModel (or any module holding the attention block `layer`).
    :param diffusion: the diffusion it is sampled with (a SpacedDiffusion under respacing): SAG needs its
                      schedule to compute x0 and re-noise the degraded image.
    :param scale: the paper's scale s (any finite number; 0 turns SAG off). The official --guide_scale is 1 + s.
    :param layer: the one attention block whose map makes the mask, by name or alias (e.g. "output_blocks.2.1",
                  the official default, or "middle").
    :param blur_sigma: the std of the Gaussian blur of x0 (official --blur_sigma, default 9).
    :param map_heads: the heads the map is computed with: None (the block's own) or a count (the official code
                      uses the model's --num_heads flag; see the module docstring).
    :param t_range: (lo, hi): guide only rows with lo <= t <= hi, t as the model receives it (as for PAG).
    :param clip_denoised: clip x0 to [-1, 1] before blurring, as the sampler's clip_denoised does.
    :param validated: scale, t_range and blur_sigma come checked (guidance.SAGFlags); the layer, map_heads and
                      diffusion, which need the model, are checked here either way.
    """

    name = "SAG"

    def __init__(
        self,
        model,
        diffusion,
        scale,
        layer=OFFICIAL_SAG_LAYER,
        blur_sigma=OFFICIAL_SAG_BLUR_SIGMA,
        map_heads=None,
        t_range=None,
        clip_denoised=True,
        validated=False,
    ):
        super().__init__(model, scale, t_range, validated)
        try:
            names = resolve_layers(model, layer)
        except ValueError as exc:
            raise ValueError(f"SAG layer: {exc}") from None
        if len(names) != 1:
            raise ValueError(
                f"SAG reads the attention map of one block; layer {layer!r} selects {len(names)}: {', '.join(names)}"
            )
        block = dict(model.named_modules())[names[0]]
        if not validated:
            check_blur_sigma(blur_sigma)
        if map_heads is None:
            map_heads = block.attention.n_heads
        if isinstance(map_heads, bool) or not isinstance(map_heads, int) or map_heads < 1:
            raise ValueError(f"SAG map_heads must be None or a positive integer, got {map_heads!r}")
        if block.channels % map_heads != 0:
            raise ValueError(
                f"SAG map_heads {map_heads} does not divide the {block.channels} channels of {names[0]}"
            )
        if diffusion.model_mean_type != ModelMeanType.EPSILON:
            raise ValueError(f"SAG needs a model that predicts eps, not {diffusion.model_mean_type}")
        self.diffusion = diffusion
        self.layer = names[0]
        self.block = block
        # torchvision's GaussianBlur hands its sigma over as a float32 draw from [sigma, sigma].
        self.blur_sigma = float(th.tensor(blur_sigma, dtype=th.float32))
        self.map_heads = map_heads
        self.clip_denoised = bool(clip_denoised)
        self._model_timesteps = _model_timesteps(diffusion)

    def settings(self):
        return [
            ("scale", self.scale),
            ("layer", repr(self.layer)),
            ("blur_sigma", f"{self.blur_sigma:g}"),
            ("map_heads", self.map_heads),
            ("t_range", self.t_range),
            ("clip_denoised", self.clip_denoised),
        ]

    def describe(self):
        """
        One line for logs and messages.
        """
        return f"SAG (scale {self.scale:g}, layer {self.layer}, blur sigma {self.blur_sigma:g})"

    def diffusion_index(self, t):
        """
        The diffusion's step index of each model timestep (original, possibly rescaled, timesteps under
        respacing).
        """
        table = self._model_timesteps.to(t.device)
        gap, index = (t.double()[:, None] - table[None, :]).abs().min(dim=1)
        if bool((gap > 1e-3).any()):
            bad = t[gap > 1e-3][0].item()
            raise ValueError(
                f"SAG: the model was called with timestep {bad:g}, which is not a step of the diffusion SAG was "
                "given; pass the diffusion the model is sampled with"
            )
        return index

    def _guided_eps(self, x, t, model_kwargs, rows, autograd):
        n = x.shape[0]
        with capture_qkv(self.block) as seen:
            plain = self.model(x, t, **model_kwargs)
        if not seen:
            raise RuntimeError(f"SAG: the attention block {self.layer} did not run in the model's forward pass")
        qkv, spatial = seen[-1]
        channels = self.check_channels(x, plain)
        if th.is_tensor(t) and t.dim() == 0:
            t = t.expand(n)
        x_g, t_g = take_rows(x, rows, n), take_rows(t, rows, n)
        kwargs = {k: take_rows(v, rows, n) for k, v in model_kwargs.items()}
        eps = take_rows(plain, rows, n)[:, :channels]
        with th.set_grad_enabled(autograd and th.is_grad_enabled()):
            degraded = self.degrade(x_g, t_g, eps, take_rows(qkv, rows, n), spatial)
            eps_bar = self.model(degraded, t_g, **kwargs)[:, :channels]
        return plain, eps_bar + (1.0 + self.scale) * (eps - eps_bar)

    def degrade(self, x, t, eps, qkv, spatial):
        """
        x_t_bar: the blurred-where-attended x0 re-noised with eps (steps 2-5 of the module docstring).
        """
        index = self.diffusion_index(th.as_tensor(t, device=x.device))
        x0 = self.diffusion._predict_xstart_from_eps(x_t=x, t=index, eps=eps)
        if self.clip_denoised:
            x0 = x0.clamp(-1, 1)
        weight = attention_map(qkv, self.map_heads, legacy=not isinstance(self.block.attention, QKVAttention))
        mask = attention_mask(weight, spatial, x.shape[2:])
        blurred = gaussian_blur2d(x0, SAG_BLUR_KERNEL, self.blur_sigma)
        x0_bar = blurred * mask + x0 * (1 - mask)
        return self.diffusion.q_sample(x0_bar, index, noise=eps)


def _model_timesteps(diffusion):
    """
    The timestep the model receives at each of the diffusion's steps: the original timestep under respacing
    (SpacedDiffusion's _WrappedModel), rescaled to [0, 1000) with rescale_timesteps.
    """
    if isinstance(diffusion, SpacedDiffusion):
        steps = th.tensor(diffusion.timestep_map, dtype=th.float64)
        total = diffusion.original_num_steps
    else:
        steps = th.arange(diffusion.num_timesteps, dtype=th.float64)
        total = diffusion.num_timesteps
    if diffusion.rescale_timesteps:
        steps = steps * (1000.0 / total)
    return steps

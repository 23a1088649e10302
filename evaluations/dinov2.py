"""
DINOv2 ViT-L/14 features for FD_DINOv2, the Fréchet distance EDM2 and autoguidance report beside FID.

What is computed, and from where the facts come:
- The network is the `dinov2_vitl14` model of facebookresearch/dinov2's torch hub code (hub/backbones.py,
  models/vision_transformer.py, layers/): a pre-norm ViT with 24 blocks of width 1024, 16 heads, MLP ratio 4
  (exact GELU), LayerNorm eps 1e-6, LayerScale on both residual branches, 14x14 patches, a class token and no
  register tokens. The published weights dinov2_vitl14_pretrain.pth load into it with strict=True: the module
  names below are those of the file (cls_token, pos_embed, mask_token, patch_embed.proj, blocks.N.{norm1, attn.qkv,
  attn.proj, ls1.gamma, norm2, mlp.fc1, mlp.fc2, ls2.gamma}, norm). mask_token is only used in training.
- The positional embedding is stored for a 37x37 grid (518-pixel images). At another grid the hub model resizes it
  bicubically without antialiasing, passing scale factors (grid + 0.1) / 37 (its `interpolate_offset`) rather than
  an output size; PyTorch then maps output to input coordinates with those factors, not with 37 / grid, so the
  factors are reproduced here as given. At 224 pixels the grid is 16x16.
- The features are the class token after the final LayerNorm (1024 numbers), what the hub model's forward returns.
- The preprocessing is EDM2's calculate_metrics.py (its DINOv2Detector, 'torch' resize mode): float images resized
  to 224x224 by torch.nn.functional.interpolate(mode="bicubic", antialias=True) (always called, even at 224), divided
  by 255, normalised with ImageNet's mean and std. Nothing is clamped after the resize.

Deviation: everything runs in float32 with TF32 off (evaluations.device.strict_float32). EDM2 sets no precision
flags, so on Ampere and newer GPUs its patch convolution ran with cuDNN's default TF32.

The weights are never downloaded here: `python scripts/fetch_assets.py dinov2_vitl14_pretrain.pth` puts them in
torch hub's checkpoint folder (where torch.hub itself caches them), or pass --dinov2_path / set $PAG_ADM_DINOV2_PATH.
"""

import os
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from guided_diffusion.common.assets import fetch_hint
from guided_diffusion.common.file_digest import file_digest

from .device import strict_float32
from .feature_nets import FeatureNet, state_dict_digest, weights_candidate

WEIGHTS_FILENAME = "dinov2_vitl14_pretrain.pth"
# As facebookresearch/dinov2's hub code builds it: _DINOV2_BASE_URL + /dinov2_vitl14/dinov2_vitl14_pretrain.pth.
WEIGHTS_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/" + WEIGHTS_FILENAME
WEIGHTS_ENV = "PAG_ADM_DINOV2_PATH"

INPUT_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Added to the target grid before the scale factors of the positional-embedding resize are computed (the hub
# model's interpolate_offset; a historical guard against floor() rounding the output size down).
POS_GRID_OFFSET = 0.1


@dataclass(frozen=True)
class ViTShape:
    """The sizes that fix a DINOv2 ViT's parameters."""

    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int = 14
    pos_grid: int = 37  # the stored positional grid: 518-pixel training images / 14-pixel patches
    mlp_ratio: int = 4


VITL14 = ViTShape(embed_dim=1024, depth=24, num_heads=16)


class LayerScale(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class SelfAttention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not a multiple of {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        batch, tokens, dim = x.shape
        # qkv's output is laid out as (q | k | v), each split into heads of dim / num_heads channels.
        qkv = self.qkv(x).view(batch, tokens, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(head width)) v
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class FeedForward(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """x + ls1(attn(norm1(x))), then + ls2(mlp(norm2(.)))."""

    def __init__(self, dim, num_heads, mlp_ratio):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = SelfAttention(dim, num_heads)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = FeedForward(dim, dim * mlp_ratio)
        self.ls2 = LayerScale(dim)

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size, dim, channels=3):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        height, width = x.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"image size {height}x{width} is not a multiple of the {self.patch_size}-pixel patch")
        return self.proj(x).flatten(2).transpose(1, 2)  # N x (rows * cols) x dim, row-major


class DINOv2ViT(nn.Module):
    """
    The DINOv2 backbone: NCHW normalised images (sides multiples of the patch size) -> N x embed_dim class-token
    features after the final norm.
    """

    def __init__(self, shape=VITL14):
        super().__init__()
        self.shape = shape
        dim = shape.embed_dim
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + shape.pos_grid**2, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, dim))
        self.patch_embed = PatchEmbed(shape.patch_size, dim)
        self.blocks = nn.ModuleList(Block(dim, shape.num_heads, shape.mlp_ratio) for _ in range(shape.depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def position_embedding(self, rows, cols):
        """The class token's embedding followed by the patch grid's, resized to rows x cols patches."""
        grid = self.shape.pos_grid
        if (rows, cols) == (grid, grid):
            return self.pos_embed
        table = self.pos_embed.float()
        patches = table[:, 1:].reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
        factors = ((rows + POS_GRID_OFFSET) / grid, (cols + POS_GRID_OFFSET) / grid)
        patches = F.interpolate(patches, scale_factor=factors, mode="bicubic", antialias=False)
        if patches.shape[-2:] != (rows, cols):
            raise ValueError(f"cannot resize the {grid}x{grid} positional grid to {rows}x{cols}")
        patches = patches.permute(0, 2, 3, 1).reshape(1, rows * cols, -1)
        return torch.cat([table[:, :1], patches], dim=1).to(self.pos_embed.dtype)

    def forward(self, x):
        rows, cols = (side // self.shape.patch_size for side in x.shape[-2:])
        tokens = self.patch_embed(x)
        tokens = torch.cat([self.cls_token.expand(len(tokens), -1, -1), tokens], dim=1)
        tokens = tokens + self.position_embedding(rows, cols)
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens[:, 0])


def edm2_preprocess(images):
    """
    NHWC float images in [0, 255] -> NCHW 224x224 inputs as EDM2's DINOv2 detector makes them: an antialiased
    bicubic resize (even at 224), / 255, ImageNet mean and std.
    """
    x = images.permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bicubic", antialias=True)
    x = x / 255
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - mean) / std


class DINOv2FeatureNet(FeatureNet):
    """FD_DINOv2's feature network: EDM2's preprocessing, then the ViT's 1024 class-token features."""

    input_channels = (3,)
    # The Fréchet distance on these features is FD_DINOv2 (how the evaluator labels it), not FID.
    fd_label = "FD_DINOv2"

    def __init__(self, vit, name, weights_digest=None):
        super().__init__()
        self.vit = vit.eval().requires_grad_(False)
        self.name = name
        self._weights_digest = weights_digest

    def forward(self, images):
        """:param images: float32 [N x H x W x 3] in [0, 255], any size. Returns [N x embed_dim]."""
        with torch.inference_mode(), strict_float32():
            return self.vit(edm2_preprocess(images))

    def weights_digest(self):
        if self._weights_digest is None:
            self._weights_digest = state_dict_digest(self.vit.state_dict())
        return self._weights_digest


class DINOv2WeightsError(ValueError):
    """A file that is not (a readable copy of) dinov2_vitl14_pretrain.pth."""


def state_dict_mismatch(expected, state, examples=3):
    """
    None when `state` has exactly the keys and shapes of `expected` ({key: shape}), else one sentence counting the
    missing, unexpected and reshaped keys with a few examples.
    """
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    reshaped = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k])]
    if not (missing or unexpected or reshaped):
        return None
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("of another shape", reshaped)):
        if keys:
            shown = ", ".join(keys[:examples]) + (", ..." if len(keys) > examples else "")
            parts.append(f"{len(keys)} {label} ({shown})")
    count = len(missing) + len(unexpected) + len(reshaped)
    return f"{count} of its keys do not fit the {len(expected)} of ViT-L/14: " + "; ".join(parts)


def vitl14_state_shapes():
    """{key: shape} of the published ViT-L/14 state dict (built on the meta device: nothing is allocated)."""
    with torch.device("meta"):
        vit = DINOv2ViT(VITL14)
    return {k: tuple(v.shape) for k, v in vit.state_dict().items()}


def find_dinov2_weights(path=None):
    """The given path, else $PAG_ADM_DINOV2_PATH, else torch hub's checkpoint folder; a missing file is one line."""
    how, candidate = weights_candidate(path, "--dinov2_path", WEIGHTS_ENV, WEIGHTS_FILENAME)
    if os.path.isfile(candidate):
        return candidate
    hint = fetch_hint(candidate, WEIGHTS_FILENAME) or (
        f"; facebookresearch/dinov2 publishes them at {WEIGHTS_URL}"
    )
    raise FileNotFoundError(f"DINOv2 weights {WEIGHTS_FILENAME} not found (looked at {how}: {candidate}){hint}")


def build_dinov2_vit(weights_path):
    """ViT-L/14 with the published weights at `weights_path`, loaded with strict=True."""
    try:
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds (pickle, zip, EOF, runtime) here
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise DINOv2WeightsError(
            f"{weights_path}: not the {WEIGHTS_FILENAME} weights: torch.load cannot read it "
            f"({type(exc).__name__}: {first})"
        ) from None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise DINOv2WeightsError(
            f"{weights_path}: not the {WEIGHTS_FILENAME} weights: it holds a {type(state).__name__}, not a state dict"
        )
    vit = DINOv2ViT(VITL14)
    problem = state_dict_mismatch({k: tuple(v.shape) for k, v in vit.state_dict().items()}, state)
    if problem:
        raise DINOv2WeightsError(f"{weights_path}: not the {WEIGHTS_FILENAME} weights: {problem}")
    vit.load_state_dict(state, strict=True)
    return vit


def load_dinov2_feature_net(dinov2_path=None, device="cpu"):
    """`--feature_net dinov2`: the published ViT-L/14 behind EDM2's preprocessing, named by its file's content."""
    path = find_dinov2_weights(dinov2_path)
    digest = file_digest(path)
    net = DINOv2FeatureNet(build_dinov2_vit(path), name=f"dinov2-vitl14:{digest[:12]}", weights_digest=digest[:16])
    return net.to(device).eval()


def random_dinov2_state_dict(shape, seed=0):
    """
    Random weights in the published file's format (its keys, shapes, float32) for `shape`, the same on every machine
    and numpy version (numpy's legacy RandomState stream is frozen): keys in sorted order, each drawn from a normal
    scaled so that activations stay O(1) through the blocks, and the positional table large enough to matter.
    """
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in DINOv2ViT(shape).state_dict().items()}
    rng = np.random.RandomState(seed)
    state = {}
    for key in sorted(shapes):
        size = shapes[key]
        noise = rng.standard_normal(size)
        leaf = key.rsplit(".", 1)[-1]
        if leaf == "weight" and key.split(".")[-2].startswith("norm"):
            value = 1 + 0.1 * noise  # LayerNorm gains
        elif leaf == "bias":
            value = 0.1 * noise
        elif leaf == "gamma":
            value = 0.5 + 0.2 * noise
        elif leaf == "weight":
            value = noise / math.sqrt(int(np.prod(size[1:])))  # linear and patch weights: unit gain on average
        elif key == "pos_embed":
            value = 0.5 * noise
        else:  # cls_token, mask_token
            value = noise
        state[key] = torch.from_numpy(value.astype(np.float32))
    return state


def random_dinov2_feature_net(seed=0, shape=VITL14, device="cpu"):
    """EDM2's preprocessing and a ViT of `shape` with random_dinov2_state_dict weights, for tests and benchmarks."""
    vit = DINOv2ViT(shape)
    vit.load_state_dict(random_dinov2_state_dict(shape, seed), strict=True)
    return DINOv2FeatureNet(vit, name=f"dinov2-random-{seed}").to(device).eval()

"""
The FID Inception-v3 network (TensorFlow's inception-2015-12-05 graph) in PyTorch.

The layout follows the widely used PyTorch conversion of that graph,
pt_inception-2015-12-05-6726825d.pth (the pytorch-fid weights): torchvision's module names
(Conv2d_1a_3x3 ... Mixed_7c, each conv as `.conv` + `.bn` with BatchNorm eps 0.001) and a 1008-way
`fc`, so that file loads with strict=True. Where the 2015 graph differs from torchvision's
Inception-v3: its 3x3 average pools ignore the zero padding (count_include_pad=False), and the pool
branch of the last block (Mixed_7c) uses max pooling.

InceptionFeatureNet reproduces what ADM's evaluator reads from the graph:
- the graph resizes the NHWC float input in [0, 255] to 299x299 with TF1's bilinear resize, then
  computes (x - 128) / 128;
- `pool_3:0` is the 2048-d global average pool of Mixed_7c;
- `mixed_6/conv:0` feeds sFID. The graph names its blocks mixed (Mixed_5b), mixed_1 (5c),
  mixed_2 (5d), mixed_3 (6a), mixed_4 (6b), mixed_5 (6c), mixed_6 (6d), ..., mixed_10 (7c), and in
  each block the 1x1 branch is the scope `conv`, whose ops are `conv/Conv2D`,
  `conv/conv2d_params`, `conv/batchnorm` and finally the op named `conv` itself, the ReLU. So
  `mixed_6/conv:0` is the ReLU output of Mixed_6d.branch1x1 (192 x 17 x 17). The conversion
  scripts of pytorch-fid and torch-fidelity map `mixed_6/conv/conv2d_params` to
  `Mixed_6d.branch1x1.conv` in the same way. ADM keeps its first 7 channels in NHWC order and
  flattens them: 17 * 17 * 7 = 2023 features.
- IS uses softmax(pool_3 @ W), W the 2048x1008 weight of the graph's `softmax/logits` MatMul
  (no bias); the conversion stores W transposed as fc.weight.
"""

import hashlib
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from guided_diffusion.common.assets import fetch_hint

from .device import fast_gpu_precision, strict_float32
from .feature_nets import FeatureNet, state_dict_digest
from .inception_fast import FastFIDInceptionV3, MatmulResize

WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_ENV = "PAG_ADM_INCEPTION_PATH"
# Where the file is published (pytorch-fid's release). Shown to users; never downloaded here.
WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + WEIGHTS_FILENAME
)

INPUT_SIZE = 299
SPATIAL_CHANNELS = 7


def tf1_resize_bilinear(images, size):
    """
    Bilinear resize of NCHW images as TensorFlow 1's ResizeBilinear with align_corners=False
    and half_pixel_centers=False: output pixel i samples the input at i * (in / out), all in
    float32, interpolating along x in the two neighbouring rows first, then along y.
    """
    out_h, out_w = size
    in_h, in_w = images.shape[-2:]
    if (in_h, in_w) == (out_h, out_w):
        return images
    y0, y1, ly = _resize_taps(in_h, out_h, images.device)
    x0, x1, lx = _resize_taps(in_w, out_w, images.device)
    top_rows = images.index_select(-2, y0)
    bottom_rows = images.index_select(-2, y1)
    top_left, top_right = top_rows.index_select(-1, x0), top_rows.index_select(-1, x1)
    bottom_left, bottom_right = bottom_rows.index_select(-1, x0), bottom_rows.index_select(-1, x1)
    top = top_left + (top_right - top_left) * lx
    bottom = bottom_left + (bottom_right - bottom_left) * lx
    return top + (bottom - top) * ly[:, None]


def _resize_taps(in_size, out_size, device):
    scale = np.float32(in_size) / np.float32(out_size)
    src = np.arange(out_size, dtype=np.float32) * scale
    floor = np.floor(src)
    lower = np.maximum(floor, 0).astype(np.int64)
    upper = np.minimum(np.ceil(src), in_size - 1).astype(np.int64)
    lerp = (src - floor).astype(np.float32)
    return (
        torch.from_numpy(lower).to(device),
        torch.from_numpy(upper).to(device),
        torch.from_numpy(lerp).to(device),
    )


class ConvBN(nn.Module):
    """Convolution without bias, BatchNorm (eps 0.001), ReLU."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False
        )
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_3x3(x):
    # TensorFlow's SAME average pooling divides by the number of real (unpadded) inputs.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35x35 block: 1x1, 5x5, double 3x3 and pool branches (Mixed_5b/5c/5d)."""

    def __init__(self, in_channels, pool_features):
        super().__init__()
        self.branch1x1 = ConvBN(in_channels, 64, 1)
        self.branch5x5_1 = ConvBN(in_channels, 48, 1)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(in_channels, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(in_channels, pool_features, 1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_avg_pool_3x3(x))
        return torch.cat([b1, b5, b3, bp], 1)


class InceptionB(nn.Module):
    """Grid reduction 35x35 -> 17x17 (Mixed_6a)."""

    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3 = ConvBN(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(in_channels, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3(x)
        b3d = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, b3d, bp], 1)


class InceptionC(nn.Module):
    """17x17 block with factorized 7x7 convolutions (Mixed_6b..6e)."""

    def __init__(self, in_channels, channels_7x7):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = ConvBN(in_channels, 192, 1)
        self.branch7x7_1 = ConvBN(in_channels, c7, 1)
        self.branch7x7_2 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = ConvBN(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = ConvBN(in_channels, c7, 1)
        self.branch7x7dbl_2 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = ConvBN(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = ConvBN(in_channels, 192, 1)

    def forward(self, x, branch1x1=None):
        # branch1x1 may be passed in when the caller already computed it (sFID taps it).
        b1 = self.branch1x1(x) if branch1x1 is None else branch1x1
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7d = self.branch7x7dbl_1(x)
        b7d = self.branch7x7dbl_3(self.branch7x7dbl_2(b7d))
        b7d = self.branch7x7dbl_5(self.branch7x7dbl_4(b7d))
        bp = self.branch_pool(_avg_pool_3x3(x))
        return torch.cat([b1, b7, b7d, bp], 1)


class InceptionD(nn.Module):
    """Grid reduction 17x17 -> 8x8 (Mixed_7a)."""

    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3_1 = ConvBN(in_channels, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(in_channels, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_2(self.branch7x7x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(b7))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, b7, bp], 1)


class InceptionE(nn.Module):
    """8x8 block with expanded 3x3 branches (Mixed_7b with avg pool, Mixed_7c with max pool)."""

    def __init__(self, in_channels, pool="avg"):
        super().__init__()
        assert pool in ("avg", "max")
        self.pool = pool
        self.branch1x1 = ConvBN(in_channels, 320, 1)
        self.branch3x3_1 = ConvBN(in_channels, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBN(in_channels, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvBN(in_channels, 192, 1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        b3d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        b3d = torch.cat([self.branch3x3dbl_3a(b3d), self.branch3x3dbl_3b(b3d)], 1)
        if self.pool == "avg":
            pooled = _avg_pool_3x3(x)
        else:
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        bp = self.branch_pool(pooled)
        return torch.cat([b1, b3, b3d, bp], 1)


class FIDInceptionV3(nn.Module):
    """
    Inception-v3 of the 2015-12-05 graph, from normalized 299x299 NCHW input to pool_3 (2048-d)
    and the Mixed_6d 1x1-branch map (192 x 17 x 17).
    """

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(2048, 1008)

    def forward(self, x):
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))
        x = self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(x)))
        spatial = self.Mixed_6d.branch1x1(x)
        x = self.Mixed_6d(x, branch1x1=spatial)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(self.Mixed_6e(x))))
        pool = x.mean(dim=(2, 3))
        return pool, spatial


class InceptionFeatureNet(FeatureNet):
    """
    ADM's Inception features: pool_3 (2048), mixed_6/conv[..., :7] (2023) and IS logits.

    fast=True (the default) runs inception_fast's rearrangement of the network (BatchNorm
    folded, 1x1 convolutions stacked, channels-last, resize as matrix products), built here from
    `network`; fast=False runs `network` itself, the reference. Both give the same features up
    to float32 rounding. fast_gpu=True additionally lets CUDA use TF32 and float16
    (device.fast_gpu_precision); it changes nothing on the CPU.
    """

    input_channels = (3,)
    # ADM's reference batches hold statistics of this network's features (see feature_nets.net_is_fid_inception).
    fid_inception = True

    def __init__(self, network, name, fast=True, fast_gpu=False):
        super().__init__()
        self.network = network.eval().requires_grad_(False)
        # The fast GPU mode's features differ from float32 ones: a name of its own keeps its
        # cached activations and reference statistics apart.
        self.name = name + "+fast_gpu" if fast_gpu else name
        self._weights_digest = None
        self.fast = fast or fast_gpu
        self.fast_gpu = fast_gpu
        if self.fast:
            self.fast_network = FastFIDInceptionV3(self.network).eval().requires_grad_(False)
            self.resize = MatmulResize(INPUT_SIZE)

    def forward(self, images):
        """:param images: float32 [N x H x W x 3] in [0, 255], any size."""
        if self.fast:
            pool, spatial = self._forward_fast(images)
        else:
            with strict_float32():
                x = images.permute(0, 3, 1, 2).float()
                x = tf1_resize_bilinear(x, (INPUT_SIZE, INPUT_SIZE))
                x = (x - 128) / 128
                pool, spatial = self.network(x)
        spatial = spatial.permute(0, 2, 3, 1)[..., :SPATIAL_CHANNELS]
        return pool, spatial.reshape(len(spatial), -1)

    def _forward_fast(self, images):
        with torch.inference_mode():
            with strict_float32():
                # Kept in float32 in every mode: float16 cannot hold 0..255 finely enough.
                x = (self.resize(images.float()) - 128) / 128
            with self._precision(images.device):
                pool, spatial = self.fast_network(x)
        return pool.float(), spatial.float()

    def _precision(self, device):
        if self.fast_gpu and torch.device(device).type == "cuda":
            return fast_gpu_precision()
        return strict_float32()

    def logits(self, pool):
        with strict_float32():
            return pool.float() @ self.network.fc.weight.T

    def weights_digest(self):
        if self._weights_digest is None:
            self._weights_digest = state_dict_digest(self.network.state_dict())
        return self._weights_digest


def find_inception_weights(path=None):
    """
    Locate pt_inception-2015-12-05-6726825d.pth: the given path, else $PAG_ADM_INCEPTION_PATH,
    else the torch hub checkpoint folder (where pytorch-fid's download lands).
    """
    hub_path = os.path.join(torch.hub.get_dir(), "checkpoints", WEIGHTS_FILENAME)
    if path:
        how, candidate = "--inception_path", path
    elif os.environ.get(WEIGHTS_ENV):
        how, candidate = f"${WEIGHTS_ENV}", os.environ[WEIGHTS_ENV]
    else:
        how, candidate = "torch hub checkpoints", hub_path
    if os.path.isfile(candidate):
        return candidate
    raise FileNotFoundError(
        f"Inception weights {WEIGHTS_FILENAME} not found (looked at {how}: {candidate}). "
        f"This is the PyTorch conversion of TensorFlow's inception-2015-12-05 graph that "
        f"pytorch-fid publishes at {WEIGHTS_URL}. Download it yourself and either pass "
        f"--inception_path PATH, set {WEIGHTS_ENV}=PATH, or put it at {hub_path}"
        f"{fetch_hint(candidate, WEIGHTS_FILENAME)}."
    )


class InceptionWeightsError(ValueError):
    """A weights file that is not (a readable copy of) pt_inception-2015-12-05-6726825d.pth."""


def _not_the_weights(path, detail):
    where = f"{path}: " if path else ""
    return InceptionWeightsError(
        f"{where}not the {WEIGHTS_FILENAME} weights (the FID Inception-v3 pytorch-fid publishes "
        f"at {WEIGHTS_URL}): {detail}"
    )


def load_inception_state_dict(network, state_dict, path=None, examples=3):
    """
    Load a state dict with strict=True. The converted file has no BatchNorm
    num_batches_tracked entries (they are unused in eval mode), so missing ones are filled in.
    A file of another layout is refused with a count of the mismatched keys and a few examples,
    not torch's list of every key.
    """
    if not isinstance(state_dict, dict) or not all(torch.is_tensor(v) for v in state_dict.values()):
        raise _not_the_weights(path, f"it holds a {type(state_dict).__name__}, not a state dict")
    state_dict = dict(state_dict)
    expected = network.state_dict()
    for key, value in expected.items():
        if key.endswith("num_batches_tracked") and key not in state_dict:
            state_dict[key] = torch.zeros_like(value)
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    reshaped = [
        k for k in expected if k in state_dict and state_dict[k].shape != expected[k].shape
    ]
    if missing or unexpected or reshaped:
        wanted = sum(1 for k in expected if not k.endswith("num_batches_tracked"))
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("of another shape", reshaped)):
            if keys:
                shown = ", ".join(keys[:examples]) + (", ..." if len(keys) > examples else "")
                parts.append(f"{len(keys)} {label} ({shown})")
        raise _not_the_weights(
            path, f"{len(missing) + len(unexpected) + len(reshaped)} keys do not match the "
            f"{wanted} expected: " + "; ".join(parts)
        )
    network.load_state_dict(state_dict, strict=True)
    return network


def build_inception_network(weights_path=None):
    """The network with weights from weights_path, or random weights when it is None."""
    network = FIDInceptionV3()
    if weights_path is not None:
        try:
            state_dict = torch.load(weights_path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many kinds (pickle, zip, EOF, runtime) here
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            raise _not_the_weights(
                weights_path, f"torch.load cannot read it ({type(exc).__name__}: {first})"
            ) from None
        load_inception_state_dict(network, state_dict, path=weights_path)
    return network.eval()


def _sha256_prefix(path, chars=12):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:chars]


def load_inception_feature_net(inception_path=None, fast=True, fast_gpu=False):
    path = find_inception_weights(inception_path)
    network = build_inception_network(path)
    # Key caches on the file's content so a different file never reuses stale activations.
    return InceptionFeatureNet(
        network,
        name=f"fid-inception-2015-12-05:{_sha256_prefix(path)}",
        fast=fast,
        fast_gpu=fast_gpu,
    )


def random_inception_feature_net(seed=0, fast=True, fast_gpu=False):
    """Random weights, for tests and benchmarks: the real file is never needed there."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        network = build_inception_network(None)
        # He initialisation keeps activations O(1) through the 40-odd ReLU layers, so random
        # features are informative (PyTorch's default init shrinks them towards 1e-8).
        for module in network.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    return InceptionFeatureNet(
        network, name=f"fid-inception-random-{seed}", fast=fast, fast_gpu=fast_gpu
    )

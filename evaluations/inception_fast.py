"""
A faster arrangement of the FID Inception-v3 (inception.FIDInceptionV3), computing the same
function up to float32 rounding (features within 1e-5 relative; tests/evaluations/test_eval_inception_fast.py).

Built from a loaded FIDInceptionV3 at load time; the reference network stays the definition.
What changes, each measured to pay on the CPU (benchmarks/evaluator_throughput.py):
- BatchNorm is folded into the convolution before it (w * g / sqrt(v + eps), b - m * g /
  sqrt(v + eps)), so each ConvBN is one convolution with a bias and an in-place ReLU.
- The 1x1 convolutions of a block that read the block input are one convolution with their
  output channels stacked, then split: one large matrix product instead of three or four small
  ones. The pool branch joins them where its pool is an average pool: a 3x3 average pool that
  ignores padding and a 1x1 convolution are both linear and commute, and the average of a
  constant bias is the bias, so avg_pool(x) -> conv is conv(x) without bias -> avg_pool -> + bias,
  which also pools 32-192 channels instead of 192-2048.
- Activations are channels-last (NHWC), the layout oneDNN's convolutions run in, so no layout
  conversions happen between layers; the NHWC input images are already in that layout.
- The TF1 bilinear resize is two small matrix products (rows, then columns), each output
  pixel's two taps as a row of an interpolation matrix.
"""

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def _folded_weights(conv_bn):
    """(weight, bias) of a ConvBN's convolution with its BatchNorm folded in, in float64 math."""
    bn = conv_bn.bn
    scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    weight = conv_bn.conv.weight.double() * scale[:, None, None, None]
    bias = bn.bias.double() - bn.running_mean.double() * scale
    return weight.float(), bias.float()


def _conv_like(conv, weight, bias):
    out = nn.Conv2d(
        weight.shape[1],
        weight.shape[0],
        tuple(weight.shape[2:]),
        stride=conv.stride,
        padding=conv.padding,
        bias=bias is not None,
    )
    out.weight.data.copy_(weight)
    if bias is not None:
        out.bias.data.copy_(bias)
    return out


class Conv(nn.Module):
    """
    Convolution with bias, optionally followed by ReLU. On the CPU it runs as one oneDNN
    convolution with a ReLU post-op (torch.ops.mkldnn._convolution_pointwise, what
    torch.compile emits for this): that saves a pass over every activation, and F.conv2d would
    send some 1x1 convolutions to a slower im2col path. Elsewhere, or where that op is missing,
    F.conv2d then relu_.
    """

    def __init__(self, conv, relu=True):
        super().__init__()
        self.weight = conv.weight
        self.bias = conv.bias
        self.stride = list(conv.stride)
        self.padding = list(conv.padding)
        self.relu = relu

    def forward(self, x):
        if FUSED_CPU_CONV and x.device.type == "cpu" and x.dtype == torch.float32:
            return torch.ops.mkldnn._convolution_pointwise(
                x,
                self.weight,
                self.bias,
                self.padding,
                self.stride,
                [1, 1],
                1,
                "relu" if self.relu else "none",
                [],
                "",
            )
        x = F.conv2d(x, self.weight, self.bias, self.stride, self.padding)
        return F.relu_(x) if self.relu else x


def _has_fused_cpu_conv():
    op = getattr(torch.ops.mkldnn, "_convolution_pointwise", None) if torch.backends.mkldnn.is_available() else None
    if op is None:
        return False
    x = torch.linspace(-1, 1, 2 * 3 * 4 * 4).reshape(2, 3, 4, 4)
    weight, bias = torch.linspace(-1, 1, 2 * 3 * 9).reshape(2, 3, 3, 3), torch.tensor([0.1, -0.2])
    try:
        got = op(x, weight, bias, [1, 1], [1, 1], [1, 1], 1, "relu", [], "")
    except (RuntimeError, TypeError):
        return False
    return torch.allclose(got, F.relu(F.conv2d(x, weight, bias, 1, 1)), rtol=1e-5, atol=1e-6)


FUSED_CPU_CONV = _has_fused_cpu_conv()


def folded_conv(conv_bn):
    weight, bias = _folded_weights(conv_bn)
    return Conv(_conv_like(conv_bn.conv, weight, bias))


def stacked_1x1(conv_bns, pooled=None):
    """
    One 1x1 convolution computing all of conv_bns (and `pooled`, without its bias, which is
    returned separately to be added after the pool). Returns (conv, split sizes, pooled bias).
    """
    weights, biases = zip(*(_folded_weights(c) for c in conv_bns))
    weights, biases = list(weights), list(biases)
    pool_bias = None
    if pooled is not None:
        weight, pool_bias = _folded_weights(pooled)
        weights.append(weight)
        biases.append(torch.zeros_like(pool_bias))
    conv = _conv_like(conv_bns[0].conv, torch.cat(weights), torch.cat(biases))
    return Conv(conv, relu=False), [w.shape[0] for w in weights], pool_bias


def _relu_conv(conv, x):
    return conv(x)


def _avg_pool_3x3(x):
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FastInceptionA(nn.Module):
    def __init__(self, block):
        super().__init__()
        self.reduce, self.split, pool_bias = stacked_1x1(
            [block.branch1x1, block.branch5x5_1, block.branch3x3dbl_1], pooled=block.branch_pool
        )
        self.register_buffer("pool_bias", pool_bias[None, :, None, None])
        self.branch5x5_2 = folded_conv(block.branch5x5_2)
        self.branch3x3dbl_2 = folded_conv(block.branch3x3dbl_2)
        self.branch3x3dbl_3 = folded_conv(block.branch3x3dbl_3)

    def forward(self, x):
        b1, b5, b3, bp = self.conv_split(x)
        b5 = _relu_conv(self.branch5x5_2, b5)
        b3 = _relu_conv(self.branch3x3dbl_3, _relu_conv(self.branch3x3dbl_2, b3))
        bp = F.relu_(_avg_pool_3x3(bp) + self.pool_bias)
        return torch.cat([b1, b5, b3, bp], 1)

    def conv_split(self, x):
        y = self.reduce(x)
        parts = list(y.split(self.split, dim=1))
        for i in range(len(parts) - 1):
            parts[i] = F.relu(parts[i])
        return parts


class FastInceptionB(nn.Module):
    def __init__(self, block):
        super().__init__()
        self.branch3x3 = folded_conv(block.branch3x3)
        self.branch3x3dbl_1 = folded_conv(block.branch3x3dbl_1)
        self.branch3x3dbl_2 = folded_conv(block.branch3x3dbl_2)
        self.branch3x3dbl_3 = folded_conv(block.branch3x3dbl_3)

    def forward(self, x):
        b3 = _relu_conv(self.branch3x3, x)
        b3d = _relu_conv(self.branch3x3dbl_1, x)
        b3d = _relu_conv(self.branch3x3dbl_3, _relu_conv(self.branch3x3dbl_2, b3d))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, b3d, bp], 1)


class FastInceptionC(nn.Module):
    def __init__(self, block):
        super().__init__()
        self.reduce, self.split, pool_bias = stacked_1x1(
            [block.branch1x1, block.branch7x7_1, block.branch7x7dbl_1], pooled=block.branch_pool
        )
        self.register_buffer("pool_bias", pool_bias[None, :, None, None])
        self.branch7x7_2 = folded_conv(block.branch7x7_2)
        self.branch7x7_3 = folded_conv(block.branch7x7_3)
        self.branch7x7dbl_2 = folded_conv(block.branch7x7dbl_2)
        self.branch7x7dbl_3 = folded_conv(block.branch7x7dbl_3)
        self.branch7x7dbl_4 = folded_conv(block.branch7x7dbl_4)
        self.branch7x7dbl_5 = folded_conv(block.branch7x7dbl_5)

    def forward(self, x, tap=None):
        y = self.reduce(x)
        b1, b7, b7d, bp = y.split(self.split, dim=1)
        b1 = F.relu(b1)
        if tap is not None:
            tap.append(b1)  # mixed_6/conv for sFID, the ReLU output of the 1x1 branch
        b7 = _relu_conv(self.branch7x7_2, F.relu(b7))
        b7 = _relu_conv(self.branch7x7_3, b7)
        b7d = _relu_conv(self.branch7x7dbl_2, F.relu(b7d))
        b7d = _relu_conv(self.branch7x7dbl_3, b7d)
        b7d = _relu_conv(self.branch7x7dbl_5, _relu_conv(self.branch7x7dbl_4, b7d))
        bp = F.relu_(_avg_pool_3x3(bp) + self.pool_bias)
        return torch.cat([b1, b7, b7d, bp], 1)


class FastInceptionD(nn.Module):
    def __init__(self, block):
        super().__init__()
        self.reduce, self.split, _ = stacked_1x1([block.branch3x3_1, block.branch7x7x3_1])
        self.branch3x3_2 = folded_conv(block.branch3x3_2)
        self.branch7x7x3_2 = folded_conv(block.branch7x7x3_2)
        self.branch7x7x3_3 = folded_conv(block.branch7x7x3_3)
        self.branch7x7x3_4 = folded_conv(block.branch7x7x3_4)

    def forward(self, x):
        b3, b7 = F.relu_(self.reduce(x)).split(self.split, dim=1)
        b3 = _relu_conv(self.branch3x3_2, b3)
        b7 = _relu_conv(self.branch7x7x3_3, _relu_conv(self.branch7x7x3_2, b7))
        b7 = _relu_conv(self.branch7x7x3_4, b7)
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, b7, bp], 1)


class FastInceptionE(nn.Module):
    def __init__(self, block):
        super().__init__()
        self.avg = block.pool == "avg"
        # A max pool does not commute with the convolution: that pool branch stays separate.
        self.reduce, self.split, pool_bias = stacked_1x1(
            [block.branch1x1, block.branch3x3_1, block.branch3x3dbl_1],
            pooled=block.branch_pool if self.avg else None,
        )
        if self.avg:
            self.register_buffer("pool_bias", pool_bias[None, :, None, None])
        else:
            self.branch_pool = folded_conv(block.branch_pool)
        self.branch3x3_2a = folded_conv(block.branch3x3_2a)
        self.branch3x3_2b = folded_conv(block.branch3x3_2b)
        self.branch3x3dbl_2 = folded_conv(block.branch3x3dbl_2)
        self.branch3x3dbl_3a = folded_conv(block.branch3x3dbl_3a)
        self.branch3x3dbl_3b = folded_conv(block.branch3x3dbl_3b)

    def forward(self, x):
        parts = self.reduce(x).split(self.split, dim=1)
        b1, b3, b3d = F.relu(parts[0]), F.relu(parts[1]), F.relu(parts[2])
        b3a = _relu_conv(self.branch3x3_2a, b3)
        b3b = _relu_conv(self.branch3x3_2b, b3)
        b3d = _relu_conv(self.branch3x3dbl_2, b3d)
        b3da = _relu_conv(self.branch3x3dbl_3a, b3d)
        b3db = _relu_conv(self.branch3x3dbl_3b, b3d)
        if self.avg:
            bp = F.relu_(_avg_pool_3x3(parts[3]) + self.pool_bias)
        else:
            bp = _relu_conv(self.branch_pool, F.max_pool2d(x, kernel_size=3, stride=1, padding=1))
        return torch.cat([b1, b3a, b3b, b3da, b3db, bp], 1)


class FastFIDInceptionV3(nn.Module):
    """FIDInceptionV3's function from normalized 299x299 input, rearranged (module docstring)."""

    def __init__(self, network):
        super().__init__()
        n = network
        self.stem = nn.ModuleList(
            folded_conv(c)
            for c in (n.Conv2d_1a_3x3, n.Conv2d_2a_3x3, n.Conv2d_2b_3x3, n.Conv2d_3b_1x1, n.Conv2d_4a_3x3)
        )
        self.mixed_5 = nn.ModuleList(FastInceptionA(b) for b in (n.Mixed_5b, n.Mixed_5c, n.Mixed_5d))
        self.mixed_6a = FastInceptionB(n.Mixed_6a)
        self.mixed_6 = nn.ModuleList(
            FastInceptionC(b) for b in (n.Mixed_6b, n.Mixed_6c, n.Mixed_6d, n.Mixed_6e)
        )
        self.mixed_7a = FastInceptionD(n.Mixed_7a)
        self.mixed_7 = nn.ModuleList(FastInceptionE(b) for b in (n.Mixed_7b, n.Mixed_7c))
        self.to(memory_format=torch.channels_last)

    def forward(self, x):
        x = x.contiguous(memory_format=torch.channels_last)
        conv1a, conv2a, conv2b, conv3b, conv4a = self.stem
        x = _relu_conv(conv2b, _relu_conv(conv2a, _relu_conv(conv1a, x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = _relu_conv(conv4a, _relu_conv(conv3b, x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for block in self.mixed_5:
            x = block(x)
        x = self.mixed_6a(x)
        tap = []
        for i, block in enumerate(self.mixed_6):
            x = block(x, tap if i == 2 else None)  # Mixed_6d
        x = self.mixed_7a(x)
        for block in self.mixed_7:
            x = block(x)
        return x.mean(dim=(2, 3)), tap[0]


def resize_matrix(in_size, out_size):
    """
    [out x in] float32 matrix of TF1's bilinear resize along one axis (align_corners=False, no
    half-pixel centres): row i holds 1 - t at floor(s) and t at min(ceil(s), in - 1) for
    s = i * in / out, t = s - floor(s).
    """
    scale = np.float32(in_size) / np.float32(out_size)
    src = np.arange(out_size, dtype=np.float32) * scale
    lower = np.floor(src).astype(np.int64)
    upper = np.minimum(np.ceil(src), in_size - 1).astype(np.int64)
    lerp = (src - np.floor(src)).astype(np.float32)
    matrix = np.zeros((out_size, in_size), np.float32)
    rows = np.arange(out_size)
    np.add.at(matrix, (rows, lower), 1 - lerp)
    np.add.at(matrix, (rows, upper), lerp)
    return torch.from_numpy(matrix)


class MatmulResize(nn.Module):
    """TF1 bilinear resize of NHWC images to size x size as two matrix products (matrices cached per input size)."""

    def __init__(self, size):
        super().__init__()
        self.size = size
        self._matrices = {}

    def matrices(self, in_h, in_w, device):
        key = (in_h, in_w, str(device))
        if key not in self._matrices:
            self._matrices[key] = (
                resize_matrix(in_h, self.size).to(device),
                resize_matrix(in_w, self.size).to(device),
            )
        return self._matrices[key]

    def forward(self, images):
        """:param images: float [N x H x W x C]. :return: [N x C x size x size], channels-last."""
        n, h, w, c = images.shape
        x = images.permute(0, 3, 1, 2)
        if (h, w) != (self.size, self.size):
            rows, cols = self.matrices(h, w, images.device)
            # Per image and channel: rows [size x H] @ image [H x W] @ cols^T [W x size], as
            # two large batched products (the channel axis kept out of the contracted ones).
            x = torch.matmul(rows, torch.matmul(x, cols.T))
        return x.contiguous(memory_format=torch.channels_last)

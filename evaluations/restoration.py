"""
Metrics for image restoration (inverse problems): PSNR, SSIM and LPIPS per image against the ground truth, and
FID and KID of the set of reconstructions against the set of ground-truth images.

Conventions
-----------
PSNR and SSIM take two batches of the same shape, N x C x H x W (tensors or arrays), and the data range of their
values: 255.0 for uint8 pixels, 1.0 for [0, 1], 2.0 for [-1, 1] (the model's range). PSNR is the same in all three
scales. SSIM is the same for uint8 with 255 and [0, 1] with 1, but not for [-1, 1]: its luminance term depends on
the offset of the values, so SSIM has no default data range, and restoration_metrics computes it on the uint8
pixels (0..255), which is what papers' SSIM on saved PNGs means. Both match scikit-image's defaults:

- peak_signal_noise_ratio(true, test, data_range=R): 10 log10(R^2 / MSE) with the MSE over all of an image's
  values, in float64; inf for identical images.
- structural_similarity(true, test, data_range=R, channel_axis=...): a 7 x 7 uniform window, K1 = 0.01,
  K2 = 0.03, the sample covariance (N / (N - 1) with N = 49), the SSIM map averaged over the pixels at least 3
  from the border (skimage's crop) and over the channels. Images must be at least 7 x 7.

DPS's own script (util/compute_metric.py) reads its PNGs as floats in [0, 1] and lets skimage infer the data range
(1 for such images), so its PSNR is ours with data_range=1 on the same PNGs, i.e. ours on the uint8 pixels with
data_range=255. (DPS's PNGs are min-max normalised per image by its clear_color; ours are not.)

LPIPS (Zhang et al. 2018, v0.1) needs two files the user supplies, never downloaded here:
- the backbone's ImageNet weights as torchvision saves them (alexnet-owt-7be5be79.pth or vgg16-397923af.pth, keys
  "features.N.weight" / "features.N.bias"; the classifier keys are ignored);
- the LPIPS linear layers (alex.pth or vgg.pth from the lpips package's weights/v0.1 folder, keys
  "linK.model.1.weight").
The backbones are written here (no torchvision). DPS reports LPIPS with VGG (lpips.LPIPS(net='vgg')).
"""

import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from guided_diffusion.common.assets import fetch_hint

from .evaluator import Evaluator, _print_note
from .frechet import compute_statistics, singular_covariance_warning
from .kid import kernel_inception_distance

SSIM_WIN_SIZE = 7
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def _as_float64(images, what):
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if not torch.is_tensor(images) or images.dim() != 4:
        shape = tuple(images.shape) if hasattr(images, "shape") else type(images).__name__
        raise ValueError(f"{what} must be an N x C x H x W batch, got {shape}")
    return images.detach().to("cpu", torch.float64)


def _pair(truth, test):
    truth = _as_float64(truth, "ground truth")
    test = _as_float64(test, "reconstructions")
    if truth.shape != test.shape:
        raise ValueError(
            f"ground truth {tuple(truth.shape)} and reconstructions {tuple(test.shape)} must have the same shape"
        )
    return truth, test


def _data_range(data_range):
    if not isinstance(data_range, (int, float)) or isinstance(data_range, bool) or not data_range > 0:
        raise ValueError(f"data_range must be a positive number (2 for [-1, 1], 255 for uint8), got {data_range!r}")
    return float(data_range)


def psnr(truth, test, data_range=2.0):
    """
    PSNR in dB of each image (a float64 numpy array of N values), as skimage's peak_signal_noise_ratio.
    """
    data_range = _data_range(data_range)
    truth, test = _pair(truth, test)
    mse = ((truth - test) ** 2).flatten(1).mean(dim=1)
    with np.errstate(divide="ignore"):
        return 10 * np.log10(data_range**2 / mse.numpy())


def ssim(truth, test, data_range):
    """
    SSIM of each image (a float64 numpy array of N values), as skimage's structural_similarity with its defaults
    and channel_axis set (see the module docstring). Pass uint8-scale values with data_range=255 (or [0, 1] with
    1) for the usual figures; [-1, 1] values give a different SSIM.
    """
    data_range = _data_range(data_range)
    truth, test = _pair(truth, test)
    n, c, h, w = truth.shape
    if min(h, w) < SSIM_WIN_SIZE:
        raise ValueError(f"SSIM needs images of at least {SSIM_WIN_SIZE} x {SSIM_WIN_SIZE} pixels, got {h} x {w}")
    # The valid 7 x 7 windows are exactly the pixels skimage keeps after cropping 3 from each border.
    mean = lambda v: F.avg_pool2d(v, SSIM_WIN_SIZE, stride=1)
    x, y = truth.reshape(n * c, 1, h, w), test.reshape(n * c, 1, h, w)
    ux, uy = mean(x), mean(y)
    cov_norm = SSIM_WIN_SIZE**2 / (SSIM_WIN_SIZE**2 - 1)
    vx = cov_norm * (mean(x * x) - ux * ux)
    vy = cov_norm * (mean(y * y) - uy * uy)
    vxy = cov_norm * (mean(x * y) - ux * uy)
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
    return s.reshape(n, -1).mean(dim=1).numpy()


def uint8_nhwc_to_nchw(images):
    """
    NHWC uint8 images (an npz's arr_0) as an N x C x H x W float64 tensor of 0..255 values (data_range=255).
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"expected N x H x W x C uint8 images, got {images.dtype} of shape {images.shape}")
    return torch.from_numpy(images).permute(0, 3, 1, 2).to(torch.float64)


# --- LPIPS ------------------------------------------------------------------------------------------------------

# (torchvision "features" layout, indices of the ReLUs whose outputs LPIPS compares, their channels)
LPIPS_BACKBONES = {
    "alex": (
        [("conv", 3, 64, 11, 4, 2), ("relu",), ("pool",), ("conv", 64, 192, 5, 1, 2), ("relu",), ("pool",),
         ("conv", 192, 384, 3, 1, 1), ("relu",), ("conv", 384, 256, 3, 1, 1), ("relu",),
         ("conv", 256, 256, 3, 1, 1), ("relu",)],
        (1, 4, 7, 9, 11),
        (64, 192, 384, 256, 256),
    ),
    "vgg": (
        [("conv", 3, 64, 3, 1, 1), ("relu",), ("conv", 64, 64, 3, 1, 1), ("relu",), ("maxpool2",),
         ("conv", 64, 128, 3, 1, 1), ("relu",), ("conv", 128, 128, 3, 1, 1), ("relu",), ("maxpool2",),
         ("conv", 128, 256, 3, 1, 1), ("relu",), ("conv", 256, 256, 3, 1, 1), ("relu",),
         ("conv", 256, 256, 3, 1, 1), ("relu",), ("maxpool2",),
         ("conv", 256, 512, 3, 1, 1), ("relu",), ("conv", 512, 512, 3, 1, 1), ("relu",),
         ("conv", 512, 512, 3, 1, 1), ("relu",), ("maxpool2",),
         ("conv", 512, 512, 3, 1, 1), ("relu",), ("conv", 512, 512, 3, 1, 1), ("relu",),
         ("conv", 512, 512, 3, 1, 1), ("relu",)],
        (3, 8, 15, 22, 29),
        (64, 128, 256, 512, 512),
    ),
}

# LPIPS's input scaling: (x - shift) / scale per RGB channel, for inputs in [-1, 1].
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)


class LPIPSTrunk(nn.Module):
    """
    The convolutional part ("features") of torchvision's AlexNet or VGG16, with torchvision's module indices so
    that its state-dict keys load as they are; forward returns the five LPIPS taps.
    """

    def __init__(self, net):
        super().__init__()
        layers, self.taps, self.channels = LPIPS_BACKBONES[net]
        modules = []
        for spec in layers:
            if spec[0] == "conv":
                _, cin, cout, k, stride, pad = spec
                modules.append(nn.Conv2d(cin, cout, k, stride=stride, padding=pad))
            elif spec[0] == "relu":
                modules.append(nn.ReLU(inplace=False))
            elif spec[0] == "pool":
                modules.append(nn.MaxPool2d(3, stride=2))
            else:
                modules.append(nn.MaxPool2d(2, stride=2))
        self.features = nn.Sequential(*modules)

    def forward(self, x):
        taps = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.taps:
                taps.append(x)
                if len(taps) == len(self.taps):
                    break
        return taps


class LPIPS(nn.Module):
    """
    LPIPS v0.1: unit-normalise each tap's features over channels, weight the squared differences per channel with
    the learned linear layers, average over space and sum over taps. Inputs N x 3 x H x W in [-1, 1].
    """

    def __init__(self, net="vgg"):
        super().__init__()
        if net not in LPIPS_BACKBONES:
            raise ValueError(f"unknown LPIPS backbone {net!r}; expected one of {', '.join(LPIPS_BACKBONES)}")
        self.net = net
        self.trunk = LPIPSTrunk(net)
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in self.trunk.channels)
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1))

    def load_weights(self, backbone_path, lpips_path):
        backbone = _load_state_dict(backbone_path, f"{self.net} backbone (torchvision ImageNet weights)")
        wanted = self.trunk.state_dict().keys()
        missing = [k for k in wanted if k not in backbone]
        if missing:
            raise ValueError(
                f"{backbone_path} is not torchvision's {self.net} state dict: it lacks {', '.join(missing[:3])}"
                f"{' ...' if len(missing) > 3 else ''}"
            )
        self.trunk.load_state_dict({k: backbone[k] for k in wanted})
        lins = _load_state_dict(lpips_path, f"LPIPS linear layers ({self.net}.pth)")
        for k, lin in enumerate(self.lins):
            key = f"lin{k}.model.1.weight"
            if key not in lins or tuple(lins[key].shape) != tuple(lin.weight.shape):
                raise ValueError(
                    f"{lpips_path} is not LPIPS v0.1's {self.net}.pth: '{key}' is missing or not shaped "
                    f"{tuple(lin.weight.shape)}"
                )
            with torch.no_grad():
                lin.weight.copy_(lins[key])
        return self.eval()

    def forward(self, a, b):
        fa = self.trunk((a - self.shift) / self.scale)
        fb = self.trunk((b - self.shift) / self.scale)
        total = 0
        for lin, x, y in zip(self.lins, fa, fb):
            x = x / (torch.sqrt((x**2).sum(dim=1, keepdim=True)) + 1e-10)
            y = y / (torch.sqrt((y**2).sum(dim=1, keepdim=True)) + 1e-10)
            total = total + lin((x - y) ** 2).mean(dim=(2, 3), keepdim=True)
        return total.flatten()


def _load_state_dict(path, what):
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(
            f"LPIPS needs the {what} at {path!r}, which does not exist. Nothing is downloaded: get the file yourself "
            f"(see evaluations/restoration.py and docs/inverse.md) and pass its path{fetch_hint(path or '')}"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict ({what})")
    return state


def load_lpips(backbone_path, lpips_path, net="vgg", device="cpu"):
    """
    LPIPS with the user's weight files (see the module docstring); raises FileNotFoundError naming a missing file.
    """
    return LPIPS(net).load_weights(backbone_path, lpips_path).to(device)


@torch.no_grad()
def lpips_distance(model, truth, test, batch_size=16):
    """
    LPIPS of each image pair (a float64 numpy array), for N x 3 x H x W batches in [-1, 1].
    """
    truth, test = _pair(truth, test)
    device = next(model.parameters()).device
    out = []
    for i in range(0, truth.shape[0], batch_size):
        a = truth[i : i + batch_size].to(device, torch.float32)
        b = test[i : i + batch_size].to(device, torch.float32)
        out.append(model(a, b).double().cpu())
    return torch.cat(out).numpy()


# --- the whole set ----------------------------------------------------------------------------------------------


def distribution_metrics(truth_uint8, recon_uint8, feature_net, device="cpu", batch_size=64, note=None):
    """
    FID and KID (mean and std over subsets, evaluations/kid.py) of the reconstructions against the ground-truth
    set, with our evaluator's feature network (evaluations.feature_nets.load_feature_net). NHWC uint8 inputs.
    Warnings (a set with no more images than feature dimensions, whose covariance is singular) go to `note`
    (default: stderr) and are returned under "notes".
    """
    truth_uint8, recon_uint8 = np.asarray(truth_uint8), np.asarray(recon_uint8)
    for name, arr in (("ground truth", truth_uint8), ("reconstructions", recon_uint8)):
        if arr.ndim != 4 or arr.dtype != np.uint8 or len(arr) < 2:
            raise ValueError(f"{name}: FID needs at least 2 NHWC uint8 images, got {arr.dtype} {arr.shape}")
    evaluator = Evaluator(feature_net, device=device, batch_size=batch_size, progress=False)
    batches = lambda arr: (arr[i : i + batch_size] for i in range(0, len(arr), batch_size))
    ref = evaluator.compute_activations(batches(truth_uint8)).pool
    rec = evaluator.compute_activations(batches(recon_uint8)).pool
    kid_mean, kid_std = kernel_inception_distance(ref, rec, device=device)
    notes = []
    for what, features in (("ground truth (FID)", ref), ("reconstructions (FID)", rec)):
        warning = singular_covariance_warning(len(features), features.shape[1], what)
        if warning is not None:
            notes.append(warning)
            (note or _print_note)(warning)
    return {
        "fid": float(compute_statistics(rec).frechet_distance(compute_statistics(ref))),
        "kid_mean": kid_mean,
        "kid_std": kid_std,
        "notes": notes,
    }


def restoration_metrics(truth_uint8, recon_uint8, lpips_model=None, feature_net=None, device="cpu"):
    """
    Mean PSNR and SSIM (on the uint8 pixels, data_range 255), LPIPS (if a model is given) and FID/KID (if a
    feature network is given) of reconstructions against the ground truth, both NHWC uint8.
    """
    truth = uint8_nhwc_to_nchw(truth_uint8)
    recon = uint8_nhwc_to_nchw(recon_uint8)
    out = {
        "psnr": float(np.mean(psnr(truth, recon, 255.0))),
        "ssim": float(np.mean(ssim(truth, recon, 255.0))),
        "lpips": None,
        "num_images": int(truth.shape[0]),
    }
    if lpips_model is not None:
        out["lpips"] = float(np.mean(lpips_distance(lpips_model, truth / 127.5 - 1, recon / 127.5 - 1)))
    if feature_net is not None:
        out.update(distribution_metrics(truth_uint8, recon_uint8, feature_net, device))
    return out

"""
Noisy linear inverse problems y = A(x) + n solved with Diffusion Posterior Sampling (DPS, Chung et al., ICLR 2023),
optionally with a guidance method (PAG, SAG: guided_model.py), on our GaussianDiffusion / SpacedDiffusion.

The operators follow the DPS reference code (DPS2022/diffusion-posterior-sampling) so that its task configs
translate one to one: the same names and parameters (create_operator("gaussian_blur", kernel_size=61,
intensity=3.0), ...), the same kernels, the same reflection padding and the same resize weights, so forward(x)
equals DPS's operator on the same NCHW image in [-1, 1]. See docs/inverse.md for the mapping and the few
places where we differ (all of them documented there).

dps_sample_loop is DPS's "ps" conditioning on the ancestral (DDPM) sampler: at each step

    x0      = x0(x_t), computed and clipped to [-1, 1] as the diffusion computes it
    x_{t-1} = ancestral step from x_t  -  scale * grad_{x_t} ||y - A(x0)||

With the global RNG and one image it equals DPS's own loop draw for draw: each step draws randn_like(x_t) for the
ancestral step and then randn_like(y) for the noisy measurement DPS computes (and "ps" never uses). DPS takes one
norm over the whole batch; we take one norm per image, which is the same at batch 1 and makes a batch equal its
images run one by one.

With a guided model (guided_model.GuidedModel: PAG, SAG) the ancestral step uses the guided eps while the
measurement gradient flows through the x0 of the plain (unperturbed, undegraded) pass only, as in the authors'
PSLD+PAG code (the x0 for the measurement loss comes from the unperturbed e_t_cond). The method's second pass then
runs without autograd (GuidedModel.plain_and_guided), so guidance adds a forward pass but no backward cost.
gradient_through="guided" takes the gradient through the guided x0 instead (for ablations; it backpropagates
through both passes, and for SAG also through the degraded image built from the plain pass's x0).
"""

import inspect
import math
import numbers

import numpy as np
import scipy.ndimage
import torch as th
import torch.nn.functional as F

from ..common.nonfinite import check_finite
from ..gaussian_diffusion import _nonzero_mask, _timestep_indices
from .guided_model import GuidedModel

# DPS's measurement noise on its Gaussian-noise tasks.
DEFAULT_SIGMA = 0.05

MASK_TYPES = ("box", "random", "extreme")


def _positive_int(value, what):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        if isinstance(value, float) and value.is_integer() and value > 0:
            return int(value)
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def _image_batch(x, what="image batch"):
    if not th.is_tensor(x) or x.dim() != 4:
        shape = tuple(x.shape) if th.is_tensor(x) else type(x).__name__
        raise ValueError(f"{what} must be an N x C x H x W tensor, got {shape}")
    return x


def _rng(rng):
    """
    A numpy RandomState from a seed or a RandomState. DPS draws kernels and masks from numpy's global RNG, which
    is a RandomState: RandomState(s) gives the draws of np.random.seed(s) followed by the same np.random calls.
    """
    if isinstance(rng, np.random.RandomState):
        return rng
    if rng is None or isinstance(rng, numbers.Integral):
        return np.random.RandomState(rng)
    raise ValueError(f"expected a seed (int) or a numpy RandomState, got {type(rng).__name__}")


# --- kernels ----------------------------------------------------------------------------------------------------


def gaussian_kernel(kernel_size, intensity):
    """
    DPS's Gaussian blur kernel: scipy's gaussian_filter (sigma = intensity, truncated at 4 sigma) of a centred
    delta on a kernel_size x kernel_size grid, as float32.
    """
    kernel_size = _positive_int(kernel_size, "kernel_size")
    if not intensity > 0:
        raise ValueError(f"intensity (the Gaussian's standard deviation in pixels) must be > 0, got {intensity!r}")
    delta = np.zeros((kernel_size, kernel_size))
    delta[kernel_size // 2, kernel_size // 2] = 1
    return th.from_numpy(scipy.ndimage.gaussian_filter(delta, sigma=float(intensity)).astype(np.float32))


def _trajectory(rng, diagonal, intensity):
    """
    A random camera-shake path: the construction of the motionblur package (LeviBorodenko/motionblur) that DPS
    uses, with its draws in the same order, as complex points centred on the origin.
    """
    eps = 0.1  # the package's margin that keeps step lengths and angles from degenerating
    max_len = 0.75 * diagonal * (rng.uniform() + rng.uniform(0, intensity**2))
    steps = []
    while sum(steps) < max_len:
        step = rng.beta(1, 30) * (1 - intensity + eps) * diagonal
        if step < max_len:
            steps.append(step)
    # The larger the intensity, the larger the turns and the likelier a turn changes direction.
    max_angle = rng.uniform(0, intensity * math.pi)
    jitter = rng.beta(2, 20)
    angles = [rng.uniform(low=-max_angle, high=max_angle)]
    while len(angles) < len(steps):
        angle = rng.triangular(0, intensity * max_angle, max_angle + eps)
        if rng.uniform() < jitter:
            angle *= -np.sign(angles[-1])
        else:
            angle *= np.sign(angles[-1])
        angles.append(angle)
    path = np.cumsum(np.asarray(steps) * np.exp(1j * np.asarray(angles)))
    # The package sums with Python's sum (left to right); keep its rounding.
    path = path - sum(path) / len(steps)
    return path * np.exp(1j * rng.uniform(0, math.pi))


def motion_kernel(kernel_size, intensity, rng=None):
    """
    A random motion blur kernel (kernel_size x kernel_size, float32, sums to 1), built as the motionblur package's
    Kernel(size=(k, k), intensity).kernelMatrix: a random path drawn as a line on a 2k x 2k canvas, Gaussian
    blurred, LANCZOS-downsized to k x k, converted to gray and normalised. With rng = RandomState(s) it is the
    kernel the package makes after np.random.seed(s) (up to Pillow versions).
    """
    # Pillow only for the motion-blur kernel (as DPS's package draws it), not for the other operators.
    from PIL import Image, ImageDraw, ImageFilter

    kernel_size = _positive_int(kernel_size, "kernel_size")
    if int(2 * (2 * kernel_size) ** 2) ** 0.5 < 150:
        raise ValueError(
            f"motion blur kernel_size {kernel_size} is too small for the trajectory construction (its path is drawn "
            "int(diagonal / 150) pixels wide, 0 below 54); use kernel_size >= 54, or pass kernel= a 2-D kernel"
        )
    if isinstance(intensity, bool) or not isinstance(intensity, numbers.Real) or not 0 <= intensity <= 1:
        raise ValueError(f"motion blur intensity must be a number in [0, 1], got {intensity!r}")
    rng = _rng(rng)
    # Drawn at twice the size and downsized, for anti-aliasing.
    size2 = 2 * kernel_size
    diagonal = (2 * size2**2) ** 0.5
    path = _trajectory(rng, diagonal, float(intensity)) + (size2 + 1j * size2) / 2
    canvas = Image.new("RGB", (size2, size2))
    ImageDraw.Draw(canvas).line(xy=[(p.real, p.imag) for p in path], width=int(diagonal / 150))
    canvas = canvas.filter(ImageFilter.GaussianBlur(radius=int(diagonal * 0.01)))
    lanczos = getattr(Image, "Resampling", Image).LANCZOS
    canvas = canvas.resize((kernel_size, kernel_size), resample=lanczos).convert("L")
    kernel = np.asarray(canvas, dtype=np.float32)
    total = kernel.sum()
    return th.from_numpy(kernel / total)


# --- masks ------------------------------------------------------------------------------------------------------


def box_mask(image_size, mask_len_range=(128, 129), margin=(16, 16), rng=None):
    """
    DPS's "box" mask (1 = observed, 0 = missing): a box of height and width drawn from
    randint(*mask_len_range), its top-left corner from randint(margin, image_size - margin - side). Shape
    1 x 1 x image_size x image_size. DPS's FFHQ setting is mask_len_range (128, 129): always a 128 x 128 box.
    """
    image_size = _positive_int(image_size, "image_size")
    rng = _rng(rng)
    lo, hi = (int(v) for v in mask_len_range)
    margin_h, margin_w = (int(v) for v in margin)
    if not 0 < lo < hi or image_size - max(margin_h, margin_w) - (hi - 1) <= max(margin_h, margin_w):
        raise ValueError(
            f"box mask: mask_len_range {tuple(mask_len_range)} with margin {tuple(margin)} does not fit an image of "
            f"{image_size} pixels (need 0 < lo < hi and hi - 1 + 2 * margin < image_size)"
        )
    h = rng.randint(lo, hi)
    w = rng.randint(lo, hi)
    top = rng.randint(margin_h, image_size - margin_h - h)
    left = rng.randint(margin_w, image_size - margin_w - w)
    mask = th.ones(1, 1, image_size, image_size)
    mask[..., top : top + h, left : left + w] = 0
    return mask


def random_mask(image_size, mask_prob_range=(0.3, 0.7), rng=None):
    """
    DPS's "random" mask: a fraction p ~ U(mask_prob_range) of the pixels (all channels of each) is missing,
    int(p * image_size^2) pixels chosen without replacement. Shape 1 x 1 x image_size x image_size.
    """
    image_size = _positive_int(image_size, "image_size")
    rng = _rng(rng)
    lo, hi = (float(v) for v in mask_prob_range)
    if not 0 <= lo <= hi <= 1:
        raise ValueError(f"mask_prob_range must satisfy 0 <= lo <= hi <= 1, got {tuple(mask_prob_range)}")
    total = image_size * image_size
    prob = rng.uniform(lo, hi)
    missing = rng.choice(total, int(total * prob), replace=False)
    mask = th.ones(total)
    mask[th.from_numpy(np.asarray(missing, dtype=np.int64))] = 0
    return mask.view(1, 1, image_size, image_size)


def make_mask(mask_type, image_size, mask_len_range=(128, 129), mask_prob_range=(0.3, 0.7), margin=(16, 16), rng=None):
    """
    One mask of DPS's mask_generator options: "box", "random", or "extreme" (only the box is observed).
    """
    if mask_type == "box":
        return box_mask(image_size, mask_len_range, margin, rng)
    if mask_type == "random":
        return random_mask(image_size, mask_prob_range, rng)
    if mask_type == "extreme":
        return 1 - box_mask(image_size, mask_len_range, margin, rng)
    raise ValueError(f"unknown mask_type {mask_type!r}; expected one of {', '.join(MASK_TYPES)}")


# --- operators --------------------------------------------------------------------------------------------------


class Operator:
    """
    A linear measurement operator on N x C x H x W images in [-1, 1]. forward(x) is A x; transpose(y) is what
    DPS's operator calls transpose (for the blurs and inpainting DPS returns y unchanged; we keep that).
    """

    name = ""

    def forward(self, x):
        raise NotImplementedError

    def transpose(self, y):
        raise NotImplementedError

    def __call__(self, x):
        return self.forward(x)

    def to(self, device):
        for key, value in vars(self).items():
            if th.is_tensor(value):
                setattr(self, key, value.to(device))
        return self

    def measurement_shape(self, image_shape):
        with th.device("meta"):
            return tuple(self.forward(th.empty(image_shape)).shape)


class BlurOperator(Operator):
    """
    Depthwise convolution (cross-correlation, as torch's conv2d and DPS's Blurkernel) of every channel with one
    kernel after reflection padding by kernel_size // 2, so the output has the input's size.
    """

    def __init__(self, kernel):
        if not th.is_tensor(kernel):
            kernel = th.as_tensor(np.asarray(kernel, dtype=np.float32))
        if kernel.dim() != 2 or kernel.shape[0] != kernel.shape[1] or kernel.shape[0] % 2 == 0:
            raise ValueError(f"blur kernel must be a square 2-D tensor of odd size, got shape {tuple(kernel.shape)}")
        self.kernel = kernel.float()
        self.kernel_size = kernel.shape[0]

    def get_kernel(self):
        return self.kernel.view(1, 1, self.kernel_size, self.kernel_size)

    def forward(self, x):
        _image_batch(x)
        pad = self.kernel_size // 2
        if pad >= min(x.shape[-2:]):
            raise ValueError(
                f"{self.name}: kernel_size {self.kernel_size} needs images larger than {pad} pixels on each side "
                f"(reflection padding), got {tuple(x.shape[-2:])}"
            )
        channels = x.shape[1]
        weight = self.kernel.to(device=x.device, dtype=x.dtype).expand(channels, 1, -1, -1)
        return F.conv2d(F.pad(x, (pad, pad, pad, pad), mode="reflect"), weight, groups=channels)

    def transpose(self, y):
        return y


class GaussianBlurOperator(BlurOperator):
    name = "gaussian_blur"

    def __init__(self, kernel_size, intensity):
        super().__init__(gaussian_kernel(kernel_size, intensity))
        self.intensity = float(intensity)


class MotionBlurOperator(BlurOperator):
    """
    Motion blur with the given 2-D `kernel`, or with a random trajectory kernel (motion_kernel) drawn from
    RandomState(seed). DPS's operator draws two kernels from numpy's global RNG (its Blurkernel draws one that
    the operator then overwrites with a second), so the kernel used is the second draw; we do the same, which
    makes seed s give DPS's kernel after np.random.seed(s).
    """

    name = "motion_blur"

    def __init__(self, kernel_size, intensity, kernel=None, seed=0):
        kernel_size = _positive_int(kernel_size, "kernel_size")
        if kernel is None:
            rng = _rng(seed)
            motion_kernel(kernel_size, intensity, rng)
            kernel = motion_kernel(kernel_size, intensity, rng)
        elif not th.is_tensor(kernel):
            kernel = th.as_tensor(np.asarray(kernel, dtype=np.float32))
        if tuple(kernel.shape) != (kernel_size, kernel_size):
            raise ValueError(f"motion_blur: kernel has shape {tuple(kernel.shape)}, expected ({kernel_size}, {kernel_size})")
        super().__init__(kernel)
        self.intensity = float(intensity)


def _cubic(x):
    # Keys' cubic with a = -0.5, MATLAB's imresize kernel.
    ax = np.abs(x)
    return (1.5 * ax**3 - 2.5 * ax**2 + 1) * (ax <= 1) + (-0.5 * ax**3 + 2.5 * ax**2 - 4 * ax + 2) * (
        (1 < ax) & (ax <= 2)
    )


def resize_matrix(in_length, out_length):
    """
    The out_length x in_length matrix of the antialiased bicubic resize DPS uses (the Resizer of
    assafshocher/ResizeRight's predecessor, MATLAB imresize style): pixel centres aligned as in imresize, the
    cubic kernel stretched by 1 / scale when downscaling, weights normalised per output pixel and symmetric
    (edge-repeating) reflection at the borders. Weights in float64, returned as float32 like DPS's.
    """
    scale = out_length / in_length
    antialias = scale < 1
    width = 4.0 / scale if antialias else 4.0
    kernel = (lambda d: scale * _cubic(scale * d)) if antialias else _cubic
    out_pos = np.arange(1, out_length + 1) - (out_length - in_length * scale) / 2
    centre = out_pos / scale + 0.5 * (1 - 1 / scale)
    taps = int(np.ceil(width) + 2)
    first = np.floor(centre - width / 2)[:, None]
    source = (first + np.arange(taps) - 1).astype(np.int64)
    weights = kernel(centre[:, None] - source - 1)
    sums = weights.sum(axis=1, keepdims=True)
    sums[sums == 0] = 1.0
    weights = weights / sums
    period = 2 * in_length
    source = np.mod(source, period)
    source = np.where(source < in_length, source, period - 1 - source)
    matrix = np.zeros((out_length, in_length))
    np.add.at(matrix, (np.repeat(np.arange(out_length), taps), source.ravel()), weights.astype(np.float32).ravel())
    return th.from_numpy(matrix.astype(np.float32))


class SuperResolutionOperator(Operator):
    """
    Downsampling by an integer scale_factor with DPS's antialiased bicubic Resizer; transpose is nearest-neighbour
    upsampling (DPS's F.interpolate). in_shape is DPS's (N, C, H, W), or (H, W), or the image size.
    """

    name = "super_resolution"

    def __init__(self, in_shape, scale_factor):
        if isinstance(in_shape, numbers.Integral):
            in_shape = (in_shape, in_shape)
        in_shape = tuple(int(v) for v in in_shape)
        if len(in_shape) not in (2, 3, 4):
            raise ValueError(f"super_resolution: in_shape must be (N, C, H, W), (H, W) or an int, got {in_shape}")
        self.height, self.width = in_shape[-2:]
        self.scale_factor = _positive_int(scale_factor, "super_resolution scale_factor")
        if self.height % self.scale_factor or self.width % self.scale_factor:
            raise ValueError(
                f"super_resolution: scale_factor {self.scale_factor} does not divide the image size "
                f"{self.height} x {self.width}; use a factor that divides both sides"
            )
        self.rows = resize_matrix(self.height, self.height // self.scale_factor)
        self.cols = resize_matrix(self.width, self.width // self.scale_factor)

    def forward(self, x):
        _image_batch(x)
        if tuple(x.shape[-2:]) != (self.height, self.width):
            raise ValueError(
                f"super_resolution: images are {tuple(x.shape[-2:])}, the operator was made for "
                f"in_shape {self.height} x {self.width}"
            )
        rows = self.rows.to(device=x.device, dtype=x.dtype)
        cols = self.cols.to(device=x.device, dtype=x.dtype)
        # Rows first, then columns, in DPS's order (it resizes dimension 2 before dimension 3).
        return th.einsum("ph,nchw->ncpw", rows, x).matmul(cols.t())

    def transpose(self, y):
        return F.interpolate(y, scale_factor=self.scale_factor)


class InpaintingOperator(Operator):
    """
    Multiplication by a 0/1 mask (1 = observed). The mask is given (`mask=`, H x W, 1 x H x W or
    N x 1-or-C x H x W, N = 1 or the batch size) or made per image by make_mask from DPS's mask options
    (mask_type "box" / "random" / "extreme", mask_len_range, mask_prob_range, image_size, margin): see
    new_mask and set_mask.
    """

    name = "inpainting"

    def __init__(self, mask=None, mask_type=None, mask_len_range=(128, 129), mask_prob_range=(0.3, 0.7),
                 image_size=256, margin=(16, 16)):
        if mask_type is not None and mask_type not in MASK_TYPES:
            raise ValueError(f"unknown mask_type {mask_type!r}; expected one of {', '.join(MASK_TYPES)}")
        if mask is None and mask_type is None:
            raise ValueError("inpainting needs mask= (a 0/1 tensor) or mask_type= (one of box, random, extreme)")
        self.mask_type = mask_type
        self.mask_len_range = tuple(mask_len_range)
        self.mask_prob_range = tuple(mask_prob_range)
        self.image_size = image_size
        self.margin = tuple(margin)
        self.mask = None
        if mask is not None:
            self.set_mask(mask)

    def new_mask(self, rng=None):
        """
        One mask from the operator's mask options (1 x 1 x image_size x image_size), drawn from rng.
        """
        if self.mask_type is None:
            raise ValueError("this inpainting operator has a fixed mask and no mask_type to draw new ones from")
        return make_mask(self.mask_type, self.image_size, self.mask_len_range, self.mask_prob_range, self.margin, rng)

    def set_mask(self, mask):
        mask = th.as_tensor(mask).float()
        if mask.dim() == 2:
            mask = mask[None, None]
        elif mask.dim() == 3:
            mask = mask[None]
        if mask.dim() != 4:
            raise ValueError(f"inpainting mask must be H x W, 1 x H x W or N x C x H x W, got {tuple(mask.shape)}")
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("inpainting mask must hold only 0 (missing) and 1 (observed)")
        self.mask = mask
        return self

    def forward(self, x):
        _image_batch(x)
        if self.mask is None:
            raise ValueError("inpainting operator has no mask yet: call set_mask(mask) or set_mask(new_mask(rng))")
        n, c, h, w = x.shape
        mn, mc, mh, mw = self.mask.shape
        if (mh, mw) != (h, w) or mc not in (1, c) or mn not in (1, n):
            raise ValueError(
                f"inpainting mask of shape {tuple(self.mask.shape)} does not fit images of shape {tuple(x.shape)}: "
                f"it must be {h} x {w} with 1 or {c} channels and 1 or {n} rows"
            )
        return x * self.mask.to(device=x.device, dtype=x.dtype)

    def transpose(self, y):
        return y


OPERATORS = {
    "gaussian_blur": GaussianBlurOperator,
    "motion_blur": MotionBlurOperator,
    "super_resolution": SuperResolutionOperator,
    "inpainting": InpaintingOperator,
}


def create_operator(name, device=None, **params):
    """
    An operator by DPS's name and parameters, e.g. create_operator("gaussian_blur", kernel_size=61,
    intensity=3.0), create_operator("super_resolution", in_shape=(1, 3, 256, 256), scale_factor=4),
    create_operator("inpainting", mask_type="box", mask_len_range=(128, 129), image_size=256).
    """
    if name not in OPERATORS:
        raise ValueError(f"unknown inverse-problem task {name!r}; expected one of {', '.join(OPERATORS)}")
    cls = OPERATORS[name]
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(f"{name}: unknown parameter(s) {', '.join(unknown)}; it takes {', '.join(accepted)}")
    try:
        operator = cls(**params)
    except TypeError as exc:
        raise ValueError(f"{name}: {exc}; it takes {', '.join(accepted)}") from None
    return operator.to(device) if device is not None else operator


# --- measurements -----------------------------------------------------------------------------------------------


def add_measurement_noise(y, sigma=DEFAULT_SIGMA, generators=None):
    """
    y + sigma * n with n standard normal: from the global RNG (th.randn_like, as DPS) or, with one CPU
    torch.Generator per row, row i from generators[i] (so an image's measurement depends on its own stream only).
    """
    if not sigma >= 0:
        raise ValueError(f"measurement noise sigma must be >= 0, got {sigma!r}")
    if generators is None:
        noise = th.randn_like(y)
    else:
        if len(generators) != y.shape[0]:
            raise ValueError(f"{len(generators)} generators for a batch of {y.shape[0]} measurements")
        noise = th.stack([th.randn(tuple(y.shape[1:]), generator=g) for g in generators]).to(y)
    return y + noise * sigma


# --- DPS sampling -----------------------------------------------------------------------------------------------

GRADIENT_THROUGH = ("plain", "guided")


def _image_norms(residual):
    # One norm per image, each computed as DPS computes its single (batch-1) norm.
    return th.stack([th.linalg.norm(r[None]) for r in residual])


def dps_sample(diffusion, model, x, t, measurement, operator, scale, model_kwargs=None, noise_fn=None,
               clip_denoised=True, gradient_through="plain"):
    """
    One DPS step from x_t (a batch at timestep indices t). Returns a dict with "sample" (x_{t-1}), "pred_xstart"
    (the x0 the measurement loss used) and "distance" (||y - A(x0)|| per image).
    """
    if model_kwargs is None:
        model_kwargs = {}
    draw = th.randn_like if noise_fn is None else noise_fn
    x = x.detach().requires_grad_(True)
    with th.enable_grad():
        if isinstance(model, GuidedModel) and gradient_through == "plain":
            plain, guided = diffusion.call_model(model.plain_and_guided, x, t, model_kwargs)
        else:
            plain = guided = diffusion.call_model(model, x, t, model_kwargs)
        out = diffusion.p_mean_variance_of(guided, x, t, clip_denoised=clip_denoised)
        # The measurement's x0, through the same eps -> x0 and clipping as the guided one.
        x0 = out["pred_xstart"] if plain is guided else diffusion.pred_xstart(plain, x, t, clip_denoised=clip_denoised)
        noise = draw(x)
        sample = out["mean"] + _nonzero_mask(t, x) * th.exp(0.5 * out["log_variance"]) * noise
        # DPS computes q_sample(y, t) here for its projection-based methods; "ps" ignores it but it draws.
        draw(measurement)
        distance = _image_norms(measurement - operator.forward(x0))
        grad = th.autograd.grad(distance.sum(), x)[0]
    return {
        "sample": (sample - scale * grad).detach(),
        "pred_xstart": x0.detach(),
        "distance": distance.detach(),
    }


def _check_dps_args(diffusion, model, noise, measurement, operator, scale, gradient_through):
    _image_batch(noise, "noise (x_T)")
    if not th.is_tensor(measurement) or measurement.shape[0] != noise.shape[0]:
        got = tuple(measurement.shape) if th.is_tensor(measurement) else type(measurement).__name__
        raise ValueError(f"measurement must be a tensor with one row per image ({noise.shape[0]}), got {got}")
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise ValueError(f"DPS scale must be a finite number, got {scale!r}")
    if gradient_through not in GRADIENT_THROUGH:
        raise ValueError(f"gradient_through must be one of {', '.join(GRADIENT_THROUGH)}, got {gradient_through!r}")
    if not isinstance(operator, Operator):
        raise ValueError(f"operator must come from create_operator, got {type(operator).__name__}")
    expected = operator.measurement_shape(tuple(noise.shape))
    if tuple(measurement.shape) != expected:
        raise ValueError(
            f"measurement has shape {tuple(measurement.shape)}, but {operator.name} maps images of shape "
            f"{tuple(noise.shape)} to {expected}"
        )


def dps_sample_loop_progressive(diffusion, model, noise, measurement, operator, scale, model_kwargs=None,
                                progress=False, noise_fn=None, clip_denoised=True, gradient_through="plain"):
    """
    Like dps_sample_loop, but yield dps_sample's dict at every timestep, from T - 1 down to 0; a step that gives
    NaN or Inf raises nonfinite.NonFiniteSampleError.
    """
    _check_dps_args(diffusion, model, noise, measurement, operator, scale, gradient_through)
    indices = _timestep_indices(diffusion.num_timesteps, progress)
    img = noise
    for i in indices:
        t = th.tensor([i] * noise.shape[0], device=noise.device)
        out = dps_sample(diffusion, model, img, t, measurement, operator, scale, model_kwargs, noise_fn,
                         clip_denoised, gradient_through)
        check_finite(out["sample"], diffusion, i, model, sampler="DPS sampling")
        if progress:
            indices.set_postfix(distance=float(out["distance"].mean()), refresh=False)
        yield out
        img = out["sample"]


def dps_sample_loop(diffusion, model, noise, measurement, operator, scale, model_kwargs=None, progress=False,
                    noise_fn=None, clip_denoised=True, gradient_through="plain"):
    """
    Diffusion Posterior Sampling ("ps") from x_T = noise given the measurement y = operator(x) + n.

    :param diffusion: a GaussianDiffusion or SpacedDiffusion (DPS samples with DDPM over its steps).
    :param model: the model, or a guided model such as PAGGuidedModel or SAGGuidedModel (see the module docstring
                  for how guidance enters).
    :param scale: DPS's step size (its config's conditioning.params.scale).
    :param progress: a bar over the steps, as for GaussianDiffusion.p_sample_loop (True, or tqdm options).
    :param noise_fn: replaces th.randn_like for both draws of each step (e.g. random_streams.PerSampleNoise).
    :param gradient_through: with a guided model, "plain" (the x0 of the plain pass, default) or "guided".
    :return: the reconstructions x_0 (not differentiable).
    """
    final = None
    for out in dps_sample_loop_progressive(diffusion, model, noise, measurement, operator, scale, model_kwargs,
                                           progress, noise_fn, clip_denoised, gradient_through):
        final = out
    return final["sample"]

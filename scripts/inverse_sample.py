"""
Solve noisy inverse problems y = A(x) + n on a set of images with Diffusion Posterior Sampling (DPS, Chung et al.
2023), optionally with Perturbed-Attention Guidance or any other guidance flag of guided_diffusion/run/guidance.py.
The tasks, their parameters and the sampler follow the DPS reference code (see docs/inverse.md and
guided_diffusion/methods/inverse.py): --task gaussian_blur, motion_blur, super_resolution or inpainting, Gaussian
measurement noise --sigma, DPS's step size --dps_scale, DDPM over the diffusion's (respaced) steps.

The images come from --data_dir: a folder of image files (sorted by path) or an .npz whose arr_0 holds uint8 NHWC
images; they must already have the model's size. Image i's mask (inpainting with --mask_type), its measurement
noise and its sampling noise come from its own random stream, seeded by --seed and i only, so a run gives the
same reconstructions with any number of MPI ranks at the same --batch_size and thread count, and within a
kernel's rounding with another --batch_size (docs/determinism.md). Output (resumable, like image_sample.py): one
.npz with arr_0 the reconstructions, arr_1 the measurements (uint8, clipped to [-1, 1]; at the low resolution for
super_resolution) and arr_2 the ground truth, all NHWC uint8; and a PNG grid (--grid) whose rows are
measurement | reconstruction | ground truth for the first images.
"""

import copy
import os

import numpy as np
import torch as th

from guided_diffusion.run import sampling_cli as cli
from guided_diffusion.common.errors import UsageError, not_found
from guided_diffusion.image_datasets import IMAGE_EXTENSIONS, list_image_files
from guided_diffusion.run.image_output import save_grid, to_uint8_images
from guided_diffusion.methods.inverse import (
    GRADIENT_THROUGH,
    MASK_TYPES,
    OPERATORS,
    BlurOperator,
    InpaintingOperator,
    add_measurement_noise,
    create_operator,
    dps_sample_loop,
)
from guided_diffusion.common.random_streams import PerSampleNoise
from guided_diffusion.run.sampler_flags import inverse_sample_argparser
from guided_diffusion.script_util import create_model_and_diffusion, model_and_diffusion_defaults

# DPS's intensity for each blur when --intensity is not given (its configs: gaussian 3.0, motion 0.5).
DEFAULT_INTENSITY = {"gaussian_blur": 3.0, "motion_blur": 0.5}
GRID_ROWS = 8


def main(argv=None):
    return cli.run_main(create_argparser(), sample, argv)


def _numbers(text, flag, count, kind):
    try:
        values = [kind(v) for v in str(text).split(",")]
    except ValueError:
        values = []
    if len(values) != count:
        raise UsageError(f"{flag} {text!r} is malformed: expected {count} comma-separated numbers")
    return tuple(values)


def load_images(args):
    """
    The ground-truth images of --data_dir, uint8 NHWC, checked against --image_size.
    """
    path = args.data_dir
    if not path:
        raise UsageError("--data_dir is required: a folder of images or an .npz whose arr_0 holds uint8 NHWC images")
    if os.path.isfile(path):
        if not path.endswith(".npz"):
            raise UsageError(f"--data_dir {path!r} is a file but not an .npz; pass a folder of images or an .npz")
        with np.load(path) as data:
            if "arr_0" not in data.files:
                raise UsageError(f"--data_dir {path!r} has no arr_0 (the images)")
            images = data["arr_0"]
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise UsageError(f"--data_dir {path!r}: arr_0 must hold uint8 images shaped (N, H, W, 3), got {images.dtype} {images.shape}")
        names = [f"{path}[{i}]" for i in range(len(images))]
    elif os.path.isdir(path):
        from PIL import Image  # Pillow only for a folder of images (an npz needs none)

        images, names = [], []
        for f in list_image_files(path):
            with Image.open(f) as im:
                images.append(np.asarray(im.convert("RGB")))
            names.append(f)
        if not images:
            raise UsageError(f"--data_dir {path!r} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
        sizes = {im.shape for im in images}
        if len(sizes) == 1:
            images = np.stack(images)
    else:
        raise UsageError(f"--data_dir {path!r}: {not_found(path)}")
    if len(images) == 0:
        raise UsageError(f"--data_dir {path!r} holds no images")
    want = (args.image_size, args.image_size, 3)
    for name, image in zip(names, images):
        if image.shape != want:
            raise UsageError(
                f"{name} is {image.shape[1]}x{image.shape[0]} pixels but the model (--image_size {args.image_size}) "
                f"needs {args.image_size}x{args.image_size}: resize or crop the images first"
            )
    return np.asarray(images)


def load_array_file(path, flag):
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path!r} is a folder, not a file")
    if not os.path.isfile(path):
        raise UsageError(f"{flag} {path!r}: {not_found(path)}")
    if path.endswith(".npy"):
        return np.load(path)
    from PIL import Image  # Pillow only for an image file (a .npy needs none)

    with Image.open(path) as im:
        return np.asarray(im.convert("L"), dtype=np.float64) / 255.0


def build_operator(args):
    """
    The task's operator from the flags (DPS's names and parameters), checked on the images' shape before anything
    is loaded.
    """
    operator = _operator_from_flags(args)
    try:
        probe = operator
        if isinstance(operator, InpaintingOperator) and operator.mask is None:
            probe = copy.copy(operator).set_mask(operator.new_mask(0))
        probe.measurement_shape((1, 3, args.image_size, args.image_size))
    except ValueError as exc:
        raise UsageError(f"--task {args.task}: {exc}") from None
    return operator


def _operator_from_flags(args):
    if not args.task:
        raise UsageError(f"--task is required: the inverse problem to solve, one of {', '.join(OPERATORS)}")
    if args.task not in OPERATORS:
        raise UsageError(f"--task {args.task!r} is unknown; choose one of {', '.join(OPERATORS)}")
    intensity = args.intensity
    try:
        if args.task in ("gaussian_blur", "motion_blur"):
            intensity = DEFAULT_INTENSITY[args.task] if intensity is None else float(intensity)
            if args.task == "gaussian_blur":
                return create_operator("gaussian_blur", kernel_size=args.kernel_size, intensity=intensity)
            kernel = None
            if args.kernel_path:
                kernel = load_array_file(args.kernel_path, "--kernel_path").astype(np.float32)
            return create_operator(
                "motion_blur", kernel_size=args.kernel_size, intensity=intensity, kernel=kernel, seed=args.kernel_seed
            )
        if args.task == "super_resolution":
            return create_operator("super_resolution", in_shape=args.image_size, scale_factor=args.scale_factor)
        if args.mask_path:
            mask = load_array_file(args.mask_path, "--mask_path")
            if mask.shape != (args.image_size, args.image_size):
                raise UsageError(
                    f"--mask_path {args.mask_path!r} is {mask.shape[1] if mask.ndim > 1 else mask.shape}x"
                    f"{mask.shape[0]} but the images are {args.image_size}x{args.image_size}"
                )
            return create_operator("inpainting", mask=th.from_numpy(np.round(mask)).float())
        if args.mask_type not in MASK_TYPES:
            raise UsageError(f"--mask_type {args.mask_type!r} is unknown; choose one of {', '.join(MASK_TYPES)}")
        op = create_operator(
            "inpainting",
            mask_type=args.mask_type,
            mask_len_range=_numbers(args.mask_len_range, "--mask_len_range", 2, int),
            mask_prob_range=_numbers(args.mask_prob_range, "--mask_prob_range", 2, float),
            image_size=args.image_size,
            margin=_numbers(args.mask_margin, "--mask_margin", 2, int),
        )
        return op
    except ValueError as exc:
        if isinstance(exc, UsageError):
            raise
        raise UsageError(f"--task {args.task}: {exc}") from None


def check_args(args):
    if args.use_ddim:
        raise UsageError("--use_ddim True is not supported: DPS takes its measurement step on the ancestral (DDPM) sampler")
    if args.class_cond:
        raise UsageError("inverse_sample.py runs unconditional models (--class_cond False), as DPS does")
    if args.gradient_through not in GRADIENT_THROUGH:
        raise UsageError(f"--gradient_through must be one of {', '.join(GRADIENT_THROUGH)}, got {args.gradient_through!r}")
    if not args.sigma >= 0:
        raise UsageError(f"--sigma (the measurement noise) must be >= 0, got {args.sigma}")
    if not np.isfinite(args.dps_scale):
        raise UsageError(f"--dps_scale must be a finite number, got {args.dps_scale}")
    return build_operator(args)


def reflection_pad_backward(args, operator):
    """
    What in DPS's backward pass goes through reflection padding (a blur operator, a blurring guidance), or None.
    """
    parts = []
    if isinstance(operator, BlurOperator):
        parts.append(f"the {args.task} operator")
    if getattr(args, "sag_scale", 0) or (getattr(args, "pag_scale", 0) and args.pag_perturbation == "blur"):
        parts.append("the guidance's Gaussian blur")
    return " and ".join(parts) or None


def sample(args):
    images = load_images(args)
    if args.num_samples <= 0:
        args.num_samples = len(images)
    elif args.num_samples > len(images):
        raise UsageError(f"--num_samples {args.num_samples} is more than the {len(images)} images in --data_dir")
    run = cli.start_run(
        args, checkpoints={"model_path": "diffusion model"}, check=check_args,
        output=("inverse_sample", args.image_size), input_flags=("data_dir",), write_grid=write_triplet_grid,
    )
    operator = run.checked.to(run.device)
    _, guided, diffusion = cli.build_guided_model(args, run, create_model_and_diffusion, model_and_diffusion_defaults)
    cli.say(run, f"DPS: {describe_task(args, operator)}, step size {args.dps_scale}, noise sigma {args.sigma}")
    cli.say_if_not_deterministic(run, args, reflection_pad_backward(args, operator))

    def sample_batch(start, end, generators):
        truth = th.from_numpy(images[start:end]).float().permute(0, 3, 1, 2).to(run.device) / 127.5 - 1
        op = operator
        if isinstance(operator, InpaintingOperator) and operator.mask_type is not None:
            # The image's first draw seeds its mask (numpy draws, as DPS's mask generator makes them).
            seeds = [int(th.randint(2**31 - 1, (), generator=g)) for g in generators]
            op = copy.copy(operator).set_mask(th.cat([operator.new_mask(s) for s in seeds]).to(run.device))
        measurement = add_measurement_noise(op.forward(truth), args.sigma, generators)
        noise = PerSampleNoise(generators)
        x_T = noise.draw(tuple(truth.shape), run.device)
        recon = dps_sample_loop(
            diffusion, guided, x_T, measurement, op, args.dps_scale, progress=run.progress, noise_fn=noise,
            clip_denoised=args.clip_denoised, gradient_through=args.gradient_through,
        )
        return [to_uint8_images(recon), to_uint8_images(measurement.clamp(-1, 1)), images[start:end]]

    return cli.finish_run(
        "inverse_sample", args, run, args.image_size, sample_batch, input_flags=("data_dir",),
        write_grid=write_triplet_grid,
    )


def describe_task(args, operator):
    if args.task in ("gaussian_blur", "motion_blur"):
        return f"{args.task} (kernel {operator.kernel_size}x{operator.kernel_size}, intensity {operator.intensity})"
    if args.task == "super_resolution":
        return f"super_resolution x{operator.scale_factor}"
    if operator.mask_type is None:
        return f"inpainting with the mask of {args.mask_path}"
    return f"inpainting, {operator.mask_type} masks"


def write_triplet_grid(path, arrays):
    """
    One row per image of the first GRID_ROWS: the measurement (nearest-upsampled to the image size), the
    reconstruction, the truth; images under 64 pixels are enlarged so they can be looked at.
    """
    recons, measurements, truths = (a[:GRID_ROWS] for a in arrays)
    size = recons.shape[1]
    if measurements.shape[1] != size:
        factor = size // measurements.shape[1]
        measurements = measurements.repeat(factor, axis=1).repeat(factor, axis=2)
    rows = np.stack([measurements, recons, truths], axis=1).reshape(-1, *recons.shape[1:])
    save_grid(path, rows, ncol=3, min_size=64)
    return "(measurement | reconstruction | ground truth) rows"


def create_argparser():
    return inverse_sample_argparser(__doc__)


if __name__ == "__main__":
    main()

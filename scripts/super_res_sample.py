"""
Upsample low-resolution samples (an .npz from image_sample.py, given with --base_samples) with a super-resolution
model and save the results as a large numpy array, as ADM's super_res_sample.py does; plus the guidance flags of
guided_diffusion/run/guidance.py (e.g. Perturbed-Attention Guidance, --pag_scale), per-sample seeding (--seed),
resumable runs and a PNG grid (--grid).

Output sample i upsamples base image i modulo the number of base images (the order ADM's script uses on one
process), conditioned on its label when the model is class-conditional.
"""

import os

import numpy as np
import torch as th

from guided_diffusion.run import sampling_cli as cli
from guided_diffusion.common.errors import UsageError, not_found
from guided_diffusion.script_util import sr_create_model_and_diffusion, sr_model_and_diffusion_defaults


def main(argv=None):
    return cli.run_main(create_argparser(), sample, argv)


def load_base_samples(args):
    """
    The low-resolution images (uint8 NHWC) and, for a class-conditional model, their labels.
    """
    if not args.base_samples:
        raise UsageError(
            "--base_samples is required: pass the .npz of low-resolution samples to upsample "
            f"(e.g. the samples_Nx{args.small_size}x{args.small_size}x3.npz written by image_sample.py)"
        )
    if os.path.isdir(args.base_samples):
        raise UsageError(f"--base_samples {args.base_samples!r} is a folder, not a file; pass the .npz of samples")
    if not os.path.isfile(args.base_samples):
        raise UsageError(f"--base_samples {args.base_samples!r}: {not_found(args.base_samples)}")
    with np.load(args.base_samples) as data:
        if "arr_0" not in data.files:
            raise UsageError(f"--base_samples {args.base_samples!r} has no arr_0 (the images)")
        images = data["arr_0"]
        labels = data["arr_1"] if "arr_1" in data.files else None
    expected = (args.small_size, args.small_size, 3)
    if images.ndim != 4 or images.shape[1:] != expected or images.dtype != np.uint8 or len(images) == 0:
        raise UsageError(
            f"--base_samples {args.base_samples!r}: arr_0 must hold uint8 images shaped (N, {args.small_size}, "
            f"{args.small_size}, 3) to match --small_size {args.small_size}, got {images.dtype} {images.shape}"
        )
    if args.class_cond:
        if labels is None:
            raise UsageError(
                f"--base_samples {args.base_samples!r} has no labels (arr_1), which the class-conditional model "
                "(--class_cond True) needs"
            )
        if labels.shape != (len(images),):
            raise UsageError(
                f"--base_samples {args.base_samples!r}: arr_1 must hold one label per image, got shape "
                f"{labels.shape} for {len(images)} images"
            )
    return images, labels


def sample(args):
    run = cli.start_run(
        args, checkpoints={"model_path": "super-resolution model"}, kind="upsampler", check=load_base_samples,
        output=("super_res_sample", args.large_size), input_flags=("base_samples",),
    )
    base_images, base_labels = run.checked
    _, guided, diffusion = cli.build_guided_model(
        args, run, sr_create_model_and_diffusion, sr_model_and_diffusion_defaults, what="super-resolution model"
    )

    def sample_batch(start, end, generators):
        which = np.arange(start, end) % len(base_images)
        low_res = th.from_numpy(base_images[which]).float() / 127.5 - 1
        model_kwargs = {"low_res": low_res.permute(0, 3, 1, 2).contiguous().to(run.device)}
        if args.class_cond:
            model_kwargs["y"] = th.from_numpy(base_labels[which]).long().to(run.device)
        images = cli.sample_images(
            diffusion, guided, args, generators, args.large_size, model_kwargs, device=run.device, progress=run.progress
        )
        return [images]

    return cli.finish_run("super_res_sample", args, run, args.large_size, sample_batch, input_flags=("base_samples",))


def create_argparser():
    defaults = dict(base_samples="", model_path="")
    defaults.update(sr_model_and_diffusion_defaults())
    return cli.create_sampling_argparser(__doc__, defaults)


if __name__ == "__main__":
    main()

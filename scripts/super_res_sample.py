"""
Upsample low-resolution samples (an .npz from image_sample.py, given with --base_samples) with a super-resolution
model and save the results as a large numpy array, as ADM's super_res_sample.py does; plus Perturbed-Attention
Guidance (--pag_scale), per-sample seeding (--seed), resumable runs and a PNG grid (--grid).

Output sample i upsamples base image i modulo the number of base images (the order ADM's script uses on one
process), conditioned on its label when the model is class-conditional.
"""

import os

import numpy as np
import torch as th

from guided_diffusion import dist_util, logger
from guided_diffusion.flag_files import FlagFileArgumentParser
from guided_diffusion.sample_util import (
    UsageError,
    check_diffusion_args,
    check_pag_args,
    check_pag_scale,
    check_sampling_args,
    configure_logger,
    exit_with_usage_error,
    load_for_sampling,
    mpi_comm,
    pag_defaults,
    pag_model,
    parse_pag_interval,
    resolve_checkpoint,
    run_record,
    run_sampling,
    sample_images,
    sampling_defaults,
)
from guided_diffusion.script_util import (
    add_dict_to_argparser,
    args_to_dict,
    sr_create_model_and_diffusion,
    sr_model_and_diffusion_defaults,
)


def main(argv=None):
    parser = create_argparser()
    args = parser.parse_args(argv)
    try:
        return sample(args)
    except UsageError as exc:
        exit_with_usage_error(parser, exc)


def load_base_samples(args):
    """
    The low-resolution images (uint8 NHWC) and, for a class-conditional model, their labels.
    """
    if not args.base_samples:
        raise UsageError(
            "--base_samples is required: pass the .npz of low-resolution samples to upsample "
            f"(e.g. the samples_Nx{args.small_size}x{args.small_size}x3.npz written by image_sample.py)"
        )
    if not os.path.isfile(args.base_samples):
        raise UsageError(f"--base_samples {args.base_samples!r}: no such file")
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
    # Check everything cheap before loading anything.
    check_sampling_args(args)
    check_pag_scale(args.pag_scale)
    parse_pag_interval(args.pag_interval, args.diffusion_steps)
    check_diffusion_args(args)
    model_path = resolve_checkpoint(args.model_path, "--model_path", "super-resolution model", "upsampler")
    base_images, base_labels = load_base_samples(args)

    # No torch.distributed group is needed: ranks share work through files and MPI alone.
    comm = mpi_comm()
    out_dir = configure_logger(args.out_dir, comm)
    device = dist_util.dev()

    logger.log("creating model...")
    try:
        model, diffusion = sr_create_model_and_diffusion(
            **args_to_dict(args, sr_model_and_diffusion_defaults().keys())
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    t_range = check_pag_args(args, model)
    load_for_sampling(model, model_path, "--model_path", "super-resolution model", args.use_fp16, device)
    guided = pag_model(model, args, t_range)
    if args.pag_scale > 0:
        logger.log(f"PAG: scale {args.pag_scale}, layers {args.pag_layers!r}, interval {args.pag_interval or 'all'}")

    def sample_batch(start, end, generators):
        which = np.arange(start, end) % len(base_images)
        low_res = th.from_numpy(base_images[which]).float() / 127.5 - 1
        model_kwargs = {"low_res": low_res.permute(0, 3, 1, 2).contiguous().to(device)}
        if args.class_cond:
            model_kwargs["y"] = th.from_numpy(base_labels[which]).long().to(device)
        images = sample_images(diffusion, guided, args, generators, args.large_size, model_kwargs, device=device)
        return [images]

    logger.log("creating samples...")
    path = run_sampling(
        script="super_res_sample",
        args=args,
        out_dir=out_dir,
        image_shape=(args.large_size, args.large_size, 3),
        sample_batch=sample_batch,
        record=run_record("super_res_sample", args, checkpoint_flags=("model_path", "base_samples")),
        comm=comm,
    )
    logger.log("sampling complete")
    return path


def create_argparser():
    defaults = dict(
        clip_denoised=True,
        num_samples=10000,
        batch_size=16,
        use_ddim=False,
        base_samples="",
        model_path="",
    )
    defaults.update(sr_model_and_diffusion_defaults())
    defaults.update(pag_defaults())
    defaults.update(sampling_defaults())
    parser = FlagFileArgumentParser(description=" ".join(__doc__.split()))
    add_dict_to_argparser(parser, defaults)
    return parser


if __name__ == "__main__":
    main()

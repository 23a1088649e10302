"""
Generate a large batch of image samples from a model and save them as a large numpy array, which can be used to
compute FID and other metrics. ADM's flags and output, plus Perturbed-Attention Guidance (--pag_scale,
--pag_layers, --pag_interval), reproducible per-sample seeding (--seed), resumable runs, and a PNG grid (--grid).

Runs on one process or under `mpiexec -n N`; the samples do not depend on N or on --batch_size (see
guided_diffusion/sample_util.py). Rerunning an interrupted command with the same output folder (--out_dir or
$OPENAI_LOGDIR) finishes it without sampling anything twice.
"""

import os
import sys

from guided_diffusion import dist_util, logger
from guided_diffusion.flag_files import FlagFileArgumentParser, expand_flag_files
from guided_diffusion.sample_util import (
    UsageError,
    check_diffusion_args,
    check_pag_args,
    check_pag_scale,
    check_sampling_args,
    configure_logger,
    draw_labels,
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
    NUM_CLASSES,
    add_dict_to_argparser,
    args_to_dict,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
)


EMBEDDED_CONFIG = "digits16_sample"
EMBEDDED_MODEL = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models", "digits16.pt"
)


def uses_embedded_model(argv):
    """
    True when neither a checkpoint nor any architecture flag is given: then the embedded digits model runs.
    """
    try:
        tokens, _ = expand_flag_files(argv)
    except ValueError:
        return False  # parse_args reports the bad flag file
    given = {tok[2:].split("=", 1)[0] for tok in tokens if tok.startswith("--")}
    architecture = set(model_and_diffusion_defaults()) - {"timestep_respacing"}
    return not (given & (architecture | {"model_path"}))


def main(argv=None):
    parser = create_argparser()
    argv = sys.argv[1:] if argv is None else list(argv)
    embedded = uses_embedded_model(argv)
    if embedded:
        # Flags given by the user still override the embedded config's.
        argv = ["@" + EMBEDDED_CONFIG] + argv
    args = parser.parse_args(argv)
    if embedded:
        args.model_path = EMBEDDED_MODEL
        if not os.path.exists(EMBEDDED_MODEL):
            exit_with_usage_error(parser, UsageError(
                f"the embedded model {EMBEDDED_MODEL} is missing; it ships with the repository "
                f"(rebuild it with `python scripts/train_embedded_model.py`), or pass --model_path"
            ))
        if mpi_comm().rank == 0:
            print(
            f"No --model_path or model flags given: sampling from the embedded 16x16 digits model "
            f"({os.path.relpath(EMBEDDED_MODEL)}, flags in configs/{EMBEDDED_CONFIG}.cfg) with PAG scale "
            f"{args.pag_scale}. Pass --model_path and ADM's model flags to sample from another model."
            )
    try:
        return sample(args)
    except UsageError as exc:
        exit_with_usage_error(parser, exc)


def sample(args):
    # Check everything cheap before loading anything.
    check_sampling_args(args)
    check_pag_scale(args.pag_scale)
    parse_pag_interval(args.pag_interval, args.diffusion_steps)
    check_diffusion_args(args)
    model_path = resolve_checkpoint(args.model_path, "--model_path", "diffusion model", "diffusion")

    # No torch.distributed group is needed: ranks share work through files and MPI alone.
    comm = mpi_comm()
    out_dir = configure_logger(args.out_dir, comm)
    device = dist_util.dev()

    logger.log("creating model and diffusion...")
    try:
        model, diffusion = create_model_and_diffusion(**args_to_dict(args, model_and_diffusion_defaults().keys()))
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    t_range = check_pag_args(args, model)
    load_for_sampling(model, model_path, "--model_path", "diffusion model", args.use_fp16, device)
    guided = pag_model(model, args, t_range)
    if args.pag_scale > 0:
        logger.log(f"PAG: scale {args.pag_scale}, layers {args.pag_layers!r}, interval {args.pag_interval or 'all'}")

    def sample_batch(start, end, generators):
        model_kwargs = {}
        if args.class_cond:
            classes = draw_labels(generators, NUM_CLASSES).to(device)
            model_kwargs["y"] = classes
        images = sample_images(
            diffusion, guided, args, generators, args.image_size, model_kwargs, device=device
        )
        if args.class_cond:
            return [images, classes.cpu().numpy()]
        return [images]

    logger.log("sampling...")
    path = run_sampling(
        script="image_sample",
        args=args,
        out_dir=out_dir,
        image_shape=(args.image_size, args.image_size, 3),
        sample_batch=sample_batch,
        record=run_record("image_sample", args, checkpoint_flags=("model_path",)),
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
        model_path="",
    )
    defaults.update(model_and_diffusion_defaults())
    defaults.update(pag_defaults())
    defaults.update(sampling_defaults())
    parser = FlagFileArgumentParser(description=" ".join(__doc__.split()))
    add_dict_to_argparser(parser, defaults)
    return parser


if __name__ == "__main__":
    main()

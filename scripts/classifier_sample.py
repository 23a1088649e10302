"""
Like image_sample.py, but steer the model with a noisy-image classifier (classifier guidance, ADM's
--classifier_scale), optionally together with Perturbed-Attention Guidance (--pag_scale). Every sample gets a
class label from its own random stream; the labels are saved as arr_1 next to the images (arr_0).
"""

import math

import torch as th
import torch.nn.functional as F

from guided_diffusion import dist_util, logger
from guided_diffusion.flag_files import FlagFileArgumentParser
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
    classifier_defaults,
    create_classifier,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
)


def main(argv=None):
    parser = create_argparser()
    args = parser.parse_args(argv)
    try:
        return sample(args)
    except UsageError as exc:
        exit_with_usage_error(parser, exc)


def check_classifier_args(args):
    if not math.isfinite(args.classifier_scale):
        raise UsageError(f"--classifier_scale must be a finite number, got {args.classifier_scale}")
    if not args.classifier_path:
        raise UsageError(
            f"--classifier_scale {args.classifier_scale} needs a classifier: pass its checkpoint with "
            "--classifier_path (e.g. --classifier_path models/64x64_classifier.pt); to sample without a "
            "classifier use scripts/image_sample.py"
        )


def sample(args):
    # Check everything cheap before loading anything.
    check_sampling_args(args)
    check_pag_scale(args.pag_scale)
    parse_pag_interval(args.pag_interval, args.diffusion_steps)
    check_diffusion_args(args)
    check_classifier_args(args)
    model_path = resolve_checkpoint(args.model_path, "--model_path", "diffusion model", "diffusion")
    classifier_path = resolve_checkpoint(args.classifier_path, "--classifier_path", "classifier", "classifier")

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

    logger.log("loading classifier...")
    try:
        classifier = create_classifier(**args_to_dict(args, classifier_defaults().keys()))
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    load_for_sampling(
        classifier, classifier_path, "--classifier_path", "classifier", args.classifier_use_fp16, device
    )

    def cond_fn(x, t, y=None):
        # The gradient of log p(y | x_t), scaled: condition_mean() shifts the mean along it.
        assert y is not None
        with th.enable_grad():
            x_in = x.detach().requires_grad_(True)
            log_probs = F.log_softmax(classifier(x_in, t), dim=-1)
            chosen = log_probs[th.arange(len(y), device=y.device), y.view(-1)]
            return th.autograd.grad(chosen.sum(), x_in)[0] * args.classifier_scale

    def model_fn(x, t, y=None):
        # The labels exist for the classifier; the model sees them only if it is class-conditional.
        assert y is not None
        return guided(x, t, y=y if args.class_cond else None)

    def sample_batch(start, end, generators):
        classes = draw_labels(generators, NUM_CLASSES).to(device)
        images = sample_images(
            diffusion, model_fn, args, generators, args.image_size, {"y": classes}, cond_fn=cond_fn, device=device
        )
        return [images, classes.cpu().numpy()]

    logger.log("sampling...")
    path = run_sampling(
        script="classifier_sample",
        args=args,
        out_dir=out_dir,
        image_shape=(args.image_size, args.image_size, 3),
        sample_batch=sample_batch,
        record=run_record("classifier_sample", args, checkpoint_flags=("model_path", "classifier_path")),
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
        classifier_path="",
        classifier_scale=1.0,
    )
    defaults.update(model_and_diffusion_defaults())
    defaults.update(classifier_defaults())
    defaults.update(pag_defaults())
    defaults.update(sampling_defaults())
    parser = FlagFileArgumentParser(description=" ".join(__doc__.split()))
    add_dict_to_argparser(parser, defaults)
    return parser


if __name__ == "__main__":
    main()

"""
Like image_sample.py, but steer the model with a noisy-image classifier (classifier guidance, ADM's
--classifier_scale), optionally together with the guidance flags of guided_diffusion/run/guidance.py (e.g.
Perturbed-Attention Guidance, --pag_scale). Every sample gets a class label from its own random stream; the labels
are saved as arr_1 next to the images (arr_0).
"""

import math

import torch as th
import torch.nn.functional as F

from guided_diffusion.run import sampling_cli as cli
from guided_diffusion.common.errors import UsageError
from guided_diffusion.common.random_streams import draw_labels
from guided_diffusion.run.sampler_flags import classifier_sample_argparser
from guided_diffusion.script_util import (
    NUM_CLASSES,
    classifier_defaults,
    create_classifier,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
)


def main(argv=None):
    return cli.run_main(create_argparser(), sample, argv)


def check_classifier_args(args):
    if not math.isfinite(args.classifier_scale):
        raise UsageError(f"--classifier_scale must be a finite number, got {args.classifier_scale}")
    if not 1 <= args.classifier_num_classes <= NUM_CLASSES:
        raise UsageError(
            f"--classifier_num_classes must be between 1 and {NUM_CLASSES}, got {args.classifier_num_classes}"
        )
    if not args.classifier_path:
        raise UsageError(
            f"--classifier_scale {args.classifier_scale} needs a classifier: pass its checkpoint with "
            "--classifier_path (e.g. --classifier_path models/64x64_classifier.pt); to sample without a "
            "classifier use scripts/image_sample.py"
        )


def sample(args):
    run = cli.start_run(
        args,
        checkpoints={"model_path": "diffusion model", "classifier_path": "classifier"},
        check=check_classifier_args,
        output=("classifier_sample", args.image_size),
    )
    _, guided, diffusion = cli.build_guided_model(args, run, create_model_and_diffusion, model_and_diffusion_defaults)

    classifier = cli.create_from_flags(create_classifier, classifier_defaults, args)
    cli.load_checkpoint(run, classifier, "classifier_path", "classifier", args.classifier_use_fp16)

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
        classes = draw_labels(generators, args.classifier_num_classes).to(run.device)
        images = cli.sample_images(
            diffusion, model_fn, args, generators, args.image_size, {"y": classes}, cond_fn=cond_fn,
            device=run.device, progress=run.progress,
        )
        return [images, classes.cpu().numpy()]

    return cli.finish_run("classifier_sample", args, run, args.image_size, sample_batch)


def create_argparser():
    return classifier_sample_argparser(__doc__)


if __name__ == "__main__":
    main()

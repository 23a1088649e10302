"""
Generate a large batch of image samples from a model and save them as a large numpy array, which can be used to
compute FID and other metrics. ADM's flags and output, plus the guidance flags of guided_diffusion/guidance.py
(Perturbed-Attention Guidance: --pag_scale, --pag_layers, --pag_interval), reproducible per-sample seeding
(--seed), resumable runs, and a PNG grid (--grid).

Runs on one process or under `mpiexec -n N`. Each sample's random draws (noise, label, random PAG perturbation)
depend only on --seed and its index (see guided_diffusion/random_streams.py), so with the same --batch_size, the
same torch thread count and the same CPU kernels any N gives bit-identical samples (mpiexec gives torch one thread
per rank: compare with OMP_NUM_THREADS=1 python ...); another --batch_size or thread count can move a rare pixel by
a level, as the model's kernels round differently (docs/determinism.md).
Rerunning an interrupted command with the same output folder (--out_dir or $OPENAI_LOGDIR) finishes it without
sampling anything twice.
"""

import os
import sys

from guided_diffusion import sampling_cli as cli
from guided_diffusion.errors import UsageError
from guided_diffusion.flag_files import expand_flag_files
from guided_diffusion.guidance import describe_guidance
from guided_diffusion.random_streams import draw_labels
from guided_diffusion.run_store import mpi_comm
from guided_diffusion.script_util import NUM_CLASSES, create_model_and_diffusion, model_and_diffusion_defaults


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
    if not uses_embedded_model(argv):
        return cli.run_main(parser, sample, argv)
    # Flags given by the user still override the embedded config's.
    args = parser.parse_args(["@" + EMBEDDED_CONFIG] + argv)
    args.model_path = EMBEDDED_MODEL
    if not os.path.exists(EMBEDDED_MODEL):
        cli.exit_with_usage_error(parser, UsageError(
            f"the embedded model {EMBEDDED_MODEL} is missing; it ships with the repository "
            f"(rebuild it with `python scripts/train_embedded_model.py`), or pass --model_path"
        ))
    try:
        guidance = describe_guidance(args)  # checks the guidance flags, as run_main would
    except UsageError as exc:
        cli.exit_with_usage_error(parser, exc)
    if mpi_comm().rank == 0:
        print(
            f"No --model_path or model flags given: sampling from the embedded 16x16 digits model "
            f"({os.path.relpath(EMBEDDED_MODEL)}, flags in configs/{EMBEDDED_CONFIG}.cfg) with "
            f"{guidance}. Pass --model_path and ADM's model flags to sample from another model."
        )
    return cli.run_main(parser, sample, args=args)


def sample(args):
    run = cli.start_run(args, checkpoints={"model_path": "diffusion model"}, output=("image_sample", args.image_size))
    _, guided, diffusion = cli.build_guided_model(args, run, create_model_and_diffusion, model_and_diffusion_defaults)

    def sample_batch(start, end, generators):
        model_kwargs = {}
        if args.class_cond:
            classes = draw_labels(generators, NUM_CLASSES).to(run.device)
            model_kwargs["y"] = classes
        images = cli.sample_images(
            diffusion, guided, args, generators, args.image_size, model_kwargs, device=run.device, progress=run.progress
        )
        if args.class_cond:
            return [images, classes.cpu().numpy()]
        return [images]

    return cli.finish_run("image_sample", args, run, args.image_size, sample_batch)


def create_argparser():
    defaults = dict(model_path="")
    defaults.update(model_and_diffusion_defaults())
    return cli.create_sampling_argparser(__doc__, defaults)


if __name__ == "__main__":
    main()

"""
Generate a large batch of image samples from a model and save them as a large numpy array, which can be used to
compute FID and other metrics. ADM's flags and output, plus the guidance flags of guided_diffusion/run/guidance.py
(Perturbed-Attention Guidance: --pag_scale, --pag_layers, --pag_interval; SAG: --sag_scale; autoguidance:
--ag_scale, --ag_model_path, --ag_model_flags; scale schedules: --pag_schedule, ...), reproducible per-sample seeding
(--seed), resumable runs, a PNG grid (--grid), and with --compare a picture of the same seeds sampled without
and with the guidance flags.

With no --model_path and no model flags it samples the embedded 16x16 digits model (models/digits16.pt) with the
flags of configs/digits16/digits16_sample.cfg: 64 samples, DDIM over 10 steps, PAG s = 3 on the middle block, the same
seeds without guidance beside them (--compare), into samples/digits16; flags given override the config's.

Runs on one process or as N ranks under `mpiexec -n N`, `torchrun --nproc_per_node N` or `srun` (docs/cluster.md;
--shard i/n splits a run into independent jobs). Each sample's random draws (noise, label, random PAG perturbation)
depend only on --seed and its index (see guided_diffusion/common/random_streams.py), so with the same --batch_size, the
same torch thread count and the same CPU kernels any N gives bit-identical samples (mpiexec gives torch one thread
per rank: compare with OMP_NUM_THREADS=1 python ...); another --batch_size or thread count can move a rare pixel by
a level, as the model's kernels round differently (docs/determinism.md).
Rerunning an interrupted command with the same output folder (--out_dir or $OPENAI_LOGDIR) finishes it without
sampling anything twice.
"""

import argparse
import os
import sys
from types import SimpleNamespace

import numpy as np
import torch as th

from guided_diffusion.run import compare_picture
from guided_diffusion import dist_util
from guided_diffusion.run import sampling_cli as cli
from guided_diffusion.common.atomic_io import atomic_write
from guided_diffusion.run.checkpoints import load_for_sampling
from guided_diffusion.common.errors import UsageError
from guided_diffusion.run.flag_files import config_path, expand_flag_files
from guided_diffusion.gaussian_diffusion import get_named_beta_schedule
from guided_diffusion.run.guidance import check_guidance_args, describe_guidance, guidance_defaults, guide_model
from guided_diffusion.run.image_output import first_samples, image_bytes, to_uint8_images
from guided_diffusion.methods.pag import perturb_attention
from guided_diffusion.common.random_streams import batch_streams, draw_labels, sample_generator
from guided_diffusion.run.run_store import mpi_comm
from guided_diffusion.run.sampler_flags import image_sample_argparser
from guided_diffusion.script_util import NUM_CLASSES, create_model_and_diffusion, model_and_diffusion_defaults


EMBEDDED_CONFIG = "digits16_sample"
EMBEDDED_MODEL = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models", "digits16.pt"
)
# What compare.png says of the embedded config's result when it is sampled at its settings (docs/results.md).
EMBEDDED_RESULT = (
    "Which side is better shows over many samples, not in each one: at these settings PAG lowers this model's FID "
    "from 55 to 39 (3 seeds x 256 samples, docs/results.md)."
)


def given_flags(argv):
    """
    The names of the flags a command line gives (flag files expanded), or None when a flag file cannot be read.
    """
    try:
        tokens, _ = expand_flag_files(argv)
    except ValueError:
        return None  # parse_args reports the bad flag file
    return {tok[2:].split("=", 1)[0] for tok in tokens if tok.startswith("--")}


def uses_embedded_model(argv):
    """
    True when neither a checkpoint nor any architecture flag is given: then the embedded digits model runs.
    """
    given = given_flags(argv)
    if given is None:
        return False
    architecture = set(model_and_diffusion_defaults()) - {"timestep_respacing"}
    return not (given & (architecture | {"model_path"}))


def main(argv=None):
    parser = create_argparser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if not uses_embedded_model(argv):
        args = parser.parse_args(argv)
    else:
        # Flags given by the user still override the embedded config's.
        args = parser.parse_args(["@" + EMBEDDED_CONFIG] + argv)
        args.model_path = EMBEDDED_MODEL
        if not os.path.exists(EMBEDDED_MODEL):
            cli.exit_with_usage_error(parser, UsageError(
                f"the embedded model {EMBEDDED_MODEL} is missing; it ships with the repository "
                f"(rebuild it with `python scripts/train_embedded_model.py`), or pass --model_path"
            ))
        try:
            check_guidance_args(args)  # as run_main would, before the banner
            guidance = describe_guidance(args)
        except UsageError as exc:
            cli.exit_with_usage_error(parser, exc)
        where = unguided_embedded_run(args, given_flags(argv)) if guidance == "no guidance" else ""
        if mpi_comm().rank == 0:
            print(
                f"No --model_path or model flags given: sampling from the embedded 16x16 digits model "
                f"({os.path.relpath(EMBEDDED_MODEL)}, flags in {os.path.relpath(config_path(EMBEDDED_CONFIG))}) with "
                f"{guidance}{where}. Pass --model_path and ADM's model flags to sample from another model."
            )
    note = ""
    if args.model_path == EMBEDDED_MODEL and sampling_setting(args) == sampling_setting(
        parser.parse_args(["@" + EMBEDDED_CONFIG])
    ):
        note = EMBEDDED_RESULT
    # --compare only adds a second run and a picture: it stays out of the run record, so it never makes a
    # finished folder look like one sampled with other settings.
    compare = args.compare
    del args.compare
    if compare:
        try:
            check_compare_args(args)
        except UsageError as exc:
            cli.exit_with_usage_error(parser, exc)
    path = cli.run_main(parser, sample, args=args)
    if compare:
        write_comparison(parser, args, path, note)
    return path


def sampling_setting(args):
    """
    The flags that make a setting's samples what they are, whatever their number, seed and output folder.
    """
    keys = set(model_and_diffusion_defaults()) | set(guidance_defaults()) | {"use_ddim", "clip_denoised"}
    return {key: getattr(args, key) for key in sorted(keys)}


def unguided_embedded_run(args, given):
    """
    The embedded config turns --compare on, but without guidance there is nothing to compare: such a run just
    samples (an explicit --compare True stays an error). Unless --out_dir is given, its samples go where the
    default run keeps its unguided comparison (baseline/), so that neither run finds the other's samples in its
    folder and either reuses the other's.

    :return: words for the banner naming the folder when it was chosen here, else "".
    """
    if "compare" not in given:
        args.compare = False
    if "out_dir" in given:
        return ""
    args.out_dir = os.path.join(args.out_dir, "baseline")
    return f" into {args.out_dir} (where the guided default keeps the same seeds without guidance)"


def check_compare_args(args):
    if describe_guidance(args) == "no guidance":
        raise UsageError("--compare needs guidance to compare with (e.g. --pag_scale 1.0); none is on")
    if args.shard:
        raise UsageError("--compare draws from the whole run; sample without --shard, or merge the shards first")


def write_comparison(parser, args, guided_path, note=""):
    """
    Sample the same seeds without any guidance into baseline/ beside the guided samples (resumable, as any run)
    and write compare.png there (compare_picture.py): the first samples without guidance on the left, with it on
    the right, the ones it changed framed, and with PAG, for the samples it changed most, the x0 its plain and its
    perturbed pass predict at the step where they differ most (perturbed_predictions); `note` is printed under
    the panels.
    """
    out_dir = os.path.dirname(os.path.abspath(guided_path))
    baseline = argparse.Namespace(**vars(args))
    vars(baseline).update(guidance_defaults())
    baseline.out_dir = os.path.join(out_dir, "baseline")
    baseline.grid = ""
    baseline_path = cli.run_main(parser, sample, args=baseline)
    comm = mpi_comm()
    panels = indices = predictions = None
    if comm.rank == 0:
        with np.load(baseline_path) as plain, np.load(guided_path) as guided:
            panels = [first_samples([plain["arr_0"]]), first_samples([guided["arr_0"]])]
        indices = compare_picture.most_changed(*panels).tolist()
    if args.pag_scale != 0:
        # Every rank loads the model (the checkpoint is broadcast), so all take part.
        predictions = perturbed_predictions(args, comm.bcast(indices, root=0))
        if predictions.step is None:  # --pag_interval left no step guided
            predictions = None
    if comm.rank != 0:
        return
    titles = [f"No guidance (seed {args.seed})", f"{describe_guidance(args)} (same seeds)"]
    image, _ = compare_picture.draw(*panels, titles, predictions, note)
    picture = image_bytes(image, "PNG")
    target = os.path.join(out_dir, "compare.png")
    atomic_write(target, lambda f: f.write(picture))
    print(f"{len(panels[0])} samples without guidance (left) and with it (right), same seeds: {target}", flush=True)


def perturbed_predictions(args, indices=None, step=None):
    """
    What PAG guides away from: the samples `indices` (default: the first 8) are sampled again on their guided
    path (same seeds and random streams as the run), and at every guided step the model's x0 prediction is taken
    from the plain pass and from a pass with the PAG perturbation. Random perturbations draw that extra pass
    from the global generator.

    :param step: the sampling step (0 = the noisiest) whose predictions to keep; default: the guided step where
                 the two differ most (mean absolute difference of the uint8 images).
    :return: namespace of indices, plain and perturbed (uint8 NHWC, at the kept step), final (the guided
             samples, uint8 NHWC), step, steps, t (the step's timestep on the model's scale), differences (the
             mean absolute difference of every step, None where the step is not guided), difference (the kept
             step's), guided_steps (how many were measured), layers (the perturbed blocks, in words), scale and
             perturbation (its kind, described);
             step, t, plain and perturbed are None when no step was guided.
    """
    indices = list(range(min(8, args.num_samples)) if indices is None else indices)
    model, diffusion = cli.create_from_flags(create_model_and_diffusion, model_and_diffusion_defaults, args)
    guided = guide_model(model, diffusion, args)
    device = dist_util.dev()
    load_for_sampling(model, args.model_path, "--model_path", "diffusion model", args.use_fp16, device)
    alphas_cumprod = model_alphas_cumprod(args)
    layers = " and ".join(guided.layers) + (" block" if len(guided.layers) == 1 else " blocks")
    taken = SimpleNamespace(
        indices=indices, steps=diffusion.num_timesteps, differences=[], layers="the " + layers, scale=guided.scale,
        perturbation=guided.perturbation.describe(),
    )
    taken.step = taken.t = taken.plain = taken.perturbed = None
    taken.difference = -1.0

    def x0_from(x, t, output):
        abar = th.as_tensor(alphas_cumprod[t.cpu().numpy()], dtype=x.dtype, device=x.device).view(-1, 1, 1, 1)
        x0 = (x - (1 - abar).sqrt() * output[:, : x.shape[1]]) / abar.sqrt()
        return to_uint8_images(x0.clamp(-1, 1))

    def recording(x, t, **kwargs):
        # Called once per sampling step, from the noisiest; t is on the model's (unrespaced) scale.
        current = len(taken.differences)
        # The guided model's own rows: a step its schedule leaves unguided is no PAG step of the picture.
        if guided.guided_rows(t, len(x)) is None or step not in (None, current):
            taken.differences.append(None)
            return guided(x, t, **kwargs)
        plain = x0_from(x, t, model(x, t, **kwargs))
        with perturb_attention(model, guided.layers, guided.perturbation):
            perturbed = x0_from(x, t, model(x, t, **kwargs))
        difference = float(np.abs(plain.astype(np.int16) - perturbed.astype(np.int16)).mean())
        taken.differences.append(difference)
        if difference > taken.difference:
            taken.step, taken.t, taken.difference = current, int(t[0]), difference
            taken.plain, taken.perturbed = plain, perturbed
        return guided(x, t, **kwargs)

    generators = [sample_generator(args.seed, i) for i in indices]
    with th.no_grad(), batch_streams(args.seed, indices):
        model_kwargs = {}
        if args.class_cond:
            model_kwargs["y"] = draw_labels(generators, NUM_CLASSES).to(device)
        taken.final = cli.sample_images(diffusion, recording, args, generators, args.image_size, model_kwargs, device=device)
    taken.guided_steps = sum(difference is not None for difference in taken.differences)
    return taken


def model_alphas_cumprod(args):
    """
    The cumulative alphas of the model's own noise schedule (all --diffusion_steps), indexed by the timesteps the
    model receives under respacing.
    """
    betas = get_named_beta_schedule(args.noise_schedule, args.diffusion_steps)
    return np.cumprod(1.0 - betas)


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
    return image_sample_argparser(__doc__)


if __name__ == "__main__":
    main()

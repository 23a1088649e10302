"""
Generate a large batch of image samples from a model and save them as a large numpy array, which can be used to
compute FID and other metrics. ADM's flags and output, plus the guidance flags of guided_diffusion/run/guidance.py
(Perturbed-Attention Guidance: --pag_scale, --pag_layers, --pag_interval), reproducible per-sample seeding
(--seed), resumable runs, a PNG grid (--grid), and with --compare a picture of the same seeds sampled without
and with the guidance flags.

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

from guided_diffusion import dist_util
from guided_diffusion.run import sampling_cli as cli
from guided_diffusion.common.atomic_io import atomic_write
from guided_diffusion.run.checkpoints import load_for_sampling
from guided_diffusion.common.errors import UsageError
from guided_diffusion.run.flag_files import expand_flag_files
from guided_diffusion.gaussian_diffusion import get_named_beta_schedule
from guided_diffusion.run.guidance import describe_guidance, guidance_defaults, guide_model
from guided_diffusion.run.image_output import comparison_grid, first_samples, image_bytes, to_uint8_images
from guided_diffusion.methods.pag import perturb_attention
from guided_diffusion.common.random_streams import batch_streams, draw_labels, sample_generator
from guided_diffusion.run.run_store import mpi_comm
from guided_diffusion.run.sampler_flags import image_sample_argparser
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
            guidance = describe_guidance(args)  # checks the guidance flags, as run_main would
        except UsageError as exc:
            cli.exit_with_usage_error(parser, exc)
        if mpi_comm().rank == 0:
            print(
                f"No --model_path or model flags given: sampling from the embedded 16x16 digits model "
                f"({os.path.relpath(EMBEDDED_MODEL)}, flags in configs/{EMBEDDED_CONFIG}.cfg) with "
                f"{guidance}. Pass --model_path and ADM's model flags to sample from another model."
            )
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
        write_comparison(parser, args, path)
    return path


def check_compare_args(args):
    if describe_guidance(args) == "no guidance":
        raise UsageError("--compare needs guidance to compare with (e.g. --pag_scale 1.0); none is on")
    if args.shard:
        raise UsageError("--compare draws from the whole run; sample without --shard, or merge the shards first")


def write_comparison(parser, args, guided_path):
    """
    Sample the same seeds without any guidance into baseline/ beside the guided samples (resumable, as any run)
    and write compare.png there: the first samples without guidance on the left, with it on the right, and with
    PAG, under them, the x0 its plain and its perturbed pass predict at one step (perturbed_predictions).
    """
    out_dir = os.path.dirname(os.path.abspath(guided_path))
    baseline = argparse.Namespace(**vars(args))
    vars(baseline).update(guidance_defaults())
    baseline.out_dir = os.path.join(out_dir, "baseline")
    baseline.grid = ""
    baseline_path = cli.run_main(parser, sample, args=baseline)
    predictions = perturbed_predictions(args) if args.pag_scale != 0 else None
    if mpi_comm().rank != 0:
        return
    with np.load(baseline_path) as plain, np.load(guided_path) as guided:
        panels = [first_samples([plain["arr_0"]]), first_samples([guided["arr_0"]])]
    titles = [f"no guidance (seed {args.seed})", f"{describe_guidance(args)} (same seeds)"]
    strip = dict()
    if predictions is not None:
        count = len(predictions.plain)
        strip = dict(
            strip=np.concatenate([predictions.plain, predictions.perturbed]),
            strip_ncol=count,
            strip_title=(
                f"x0 predicted at step {predictions.step + 1} of {predictions.steps} (t = {predictions.t}) of the "
                f"first {count}: plain (top), perturbed attention (bottom)"
            ),
        )
    picture = image_bytes(comparison_grid(panels, titles, **strip), "PNG")
    target = os.path.join(out_dir, "compare.png")
    atomic_write(target, lambda f: f.write(picture))
    print(f"{len(panels[0])} samples without guidance (left) and with it (right), same seeds: {target}", flush=True)


def perturbed_predictions(args, count=8, step=None):
    """
    The "degraded structure" PAG guides away from: the first `count` samples are sampled again on their guided
    path (same seeds and random streams as the run), and at one step (default: a quarter of the way, in the noisy
    part of sampling where structure is decided) the model's x0 prediction is taken from the plain pass and from a
    pass with the PAG perturbation. Random perturbations draw that extra pass from the global generator.

    :return: namespace of plain and perturbed (uint8 NHWC), final (the guided samples, uint8 NHWC), step, steps
             and t (the step's timestep on the model's scale).
    """
    count = min(count, args.num_samples)
    model, diffusion = cli.create_from_flags(create_model_and_diffusion, model_and_diffusion_defaults, args)
    guided = guide_model(model, diffusion, args)
    device = dist_util.dev()
    load_for_sampling(model, args.model_path, "--model_path", "diffusion model", args.use_fp16, device)
    steps = diffusion.num_timesteps
    step = steps // 4 if step is None else step
    alphas_cumprod = model_alphas_cumprod(args)
    taken = SimpleNamespace(step=step, steps=steps, calls=0)

    def x0_from(x, t, output):
        abar = th.as_tensor(alphas_cumprod[t.cpu().numpy()], dtype=x.dtype, device=x.device).view(-1, 1, 1, 1)
        x0 = (x - (1 - abar).sqrt() * output[:, : x.shape[1]]) / abar.sqrt()
        return to_uint8_images(x0.clamp(-1, 1))

    def recording(x, t, **kwargs):
        # Called once per sampling step, from the noisiest; t is on the model's (unrespaced) scale.
        if taken.calls == step:
            taken.t = int(t[0])
            taken.plain = x0_from(x, t, model(x, t, **kwargs))
            with perturb_attention(model, guided.layers, guided.perturbation):
                taken.perturbed = x0_from(x, t, model(x, t, **kwargs))
        taken.calls += 1
        return guided(x, t, **kwargs)

    generators = [sample_generator(args.seed, i) for i in range(count)]
    with th.no_grad(), batch_streams(args.seed, range(count)):
        model_kwargs = {}
        if args.class_cond:
            model_kwargs["y"] = draw_labels(generators, NUM_CLASSES).to(device)
        taken.final = cli.sample_images(diffusion, recording, args, generators, args.image_size, model_kwargs, device=device)
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

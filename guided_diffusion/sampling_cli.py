"""
What the sampling scripts share around their own part (which model, which labels or base samples, which sampler
call): the common flags and their checks, the run's folder and device, building and loading the model with its
guidance, the sampler call on per-sample random streams, and the resumable run. See random_streams.py for the
seeding scheme and run_store.py for the work split and resuming.

A script is then:

    def sample(args):
        run = start_run(args, checkpoints={"model_path": "diffusion model"})
        model, guided, diffusion = build_guided_model(args, run, create_model_and_diffusion, ...)
        def sample_batch(start, end, generators): ...   # the script's own part
        return finish_run("image_sample", args, run, args.image_size, sample_batch)

Nothing is written before the run samples: every flag is checked and every checkpoint read first, so a run that
fails on bad input leaves no output folder behind. Until then messages go to stdout (rank 0) and are copied into
log.txt once the folder exists.
"""

import os
import sys
from types import SimpleNamespace

from . import dist_util, logger
from .checkpoints import load_for_sampling, resolve_checkpoint, resolve_output_folder
from .errors import UsageError, exit_with_usage_error  # noqa: F401 (re-exported for the scripts)
from .flag_files import FlagFileArgumentParser
from .guidance import check_guidance_args, guidance_defaults, guide_model
from .nonfinite import NonFiniteSampleError
from .image_output import grid_format, to_uint8_images
from .random_streams import PerSampleNoise
from .run_store import mpi_comm, run_record, run_sampling
from .script_util import add_dict_to_argparser, args_to_dict


def sampling_defaults():
    """
    Flags every sampling script has: ADM's (clip_denoised, num_samples, batch_size, use_ddim) and ours: the seed,
    an optional grid image of the first samples (--grid NAME.png: a bare file name goes into the output folder)
    and an optional output folder (default: the logger's folder, $OPENAI_LOGDIR or a fresh temporary folder, as in
    ADM).
    """
    return dict(
        clip_denoised=True,
        num_samples=10000,
        batch_size=16,
        use_ddim=False,
        seed=0,
        grid="",
        out_dir="",
    )


def create_sampling_argparser(description, defaults):
    """
    An argument parser (with @flagfile support) for the script's own defaults, the common sampling flags and
    every guidance method's flags, in ADM's add_dict_to_argparser style.
    """
    merged = sampling_defaults()
    merged.update(defaults)
    merged.update(guidance_defaults())
    parser = FlagFileArgumentParser(description=" ".join(description.split()))
    add_dict_to_argparser(parser, merged)
    return parser


def run_main(parser, sample, argv=None, args=None):
    """
    Parse the flags (unless `args` is given) and call sample(args); a UsageError becomes one error line, Ctrl-C
    one line saying how to resume.
    """
    if args is None:
        args = parser.parse_args(argv)
    try:
        return sample(args)
    except UsageError as exc:
        exit_with_usage_error(parser, exc)
    except NonFiniteSampleError as exc:
        # Raised by one rank's batch: that rank says it, and the whole job stops (the others would wait for it).
        sys.stderr.write(f"\n{parser.prog}: error: {exc}\n")
        sys.stderr.flush()
        comm = mpi_comm()
        if comm.size > 1:
            comm.Abort(1)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        if mpi_comm().rank == 0:
            sys.stderr.write(
                f"\n{parser.prog}: interrupted. Finished batches are kept: rerun the same command (same output "
                "folder) to resume where it stopped.\n"
            )
        raise SystemExit(130) from None


def check_sampling_args(args):
    if args.num_samples <= 0:
        raise UsageError(f"--num_samples must be positive, got {args.num_samples}")
    if args.batch_size <= 0:
        raise UsageError(f"--batch_size must be positive, got {args.batch_size}")
    if args.seed < 0:
        raise UsageError(f"--seed must be a non-negative integer, got {args.seed}")
    if args.grid:
        grid_format(args.grid)


def check_diffusion_args(args):
    """
    Reject the diffusion flags the factories would fail on, with messages that name the flag.
    """
    from .respace import space_timesteps

    if args.diffusion_steps <= 0:
        raise UsageError(f"--diffusion_steps must be positive, got {args.diffusion_steps}")
    if args.noise_schedule not in ("linear", "cosine"):
        raise UsageError(f"--noise_schedule must be 'linear' or 'cosine', got {args.noise_schedule!r}")
    respacing = args.timestep_respacing
    if not respacing:
        return
    if respacing.startswith("ddim"):
        if not respacing[len("ddim"):].isdigit():
            raise UsageError(
                f"--timestep_respacing {respacing!r} is malformed: 'ddimN' needs an integer N, e.g. ddim25"
            )
    else:
        try:
            counts = [int(c) for c in respacing.split(",")]
        except ValueError:
            counts = None
        if not counts or min(counts) <= 0:
            raise UsageError(
                f"--timestep_respacing {respacing!r} is malformed: use comma-separated positive step counts "
                f"(e.g. 250 or 10,15,20), 'ddimN' (e.g. ddim25), or '' for all {args.diffusion_steps} steps"
            )
    try:
        space_timesteps(args.diffusion_steps, respacing)
    except ValueError as exc:
        hint = ""
        if respacing.startswith("ddim"):
            hint = (
                "; 'ddimN' keeps every k-th step, so N must be reachable with an integer stride k "
                f"from {args.diffusion_steps} steps (give a plain count such as {respacing[4:]} instead)"
            )
            if args.use_ddim:
                hint += "; --use_ddim works with any respacing"
        raise UsageError(
            f"--timestep_respacing {respacing!r} does not fit --diffusion_steps {args.diffusion_steps}: {exc}{hint}"
        ) from None


def configure_logger(out_dir, comm):
    """
    Configure ADM's logger in one folder for all ranks: --out_dir, else $OPENAI_LOGDIR, else rank 0's fresh
    temporary folder (each rank would otherwise make its own).
    :return: the folder the samples go to.
    """
    # Sampling logs no key-value pairs, so ADM's default progress.csv would stay empty: leave it out.
    formats = os.environ.get("OPENAI_LOG_FORMAT", "stdout,log").split(",")
    folder = None
    if comm.rank == 0:
        logger.configure(dir=out_dir or None, format_strs=formats)
        folder = logger.get_dir()
    folder = comm.bcast(folder, root=0)
    if comm.rank != 0:
        logger.configure(dir=folder)
    return folder


def start_run(args, checkpoints, kind="diffusion", check=None):
    """
    Check every flag that can be checked without loading anything and resolve the checkpoints. Creates nothing:
    the output folder is made by finish_run, once the models have loaded.

    :param checkpoints: {flag name: what it holds}, e.g. {"model_path": "diffusion model"}; --model_path's
                        example file name uses `kind`, the others' "classifier".
    :param check: the script's own checks, check(args) -> anything (kept as run.checked).
    :return: a namespace with comm, device, paths ({flag name: checkpoint path}), checked, progress (what the
             sampling loops' `progress` takes: a bar over a batch's steps on rank 0, False elsewhere) and notes
             (the messages said before the log folder exists).
    """
    check_sampling_args(args)
    check_guidance_args(args)
    check_diffusion_args(args)
    checked = check(args) if check is not None else None
    paths = {
        flag: resolve_checkpoint(getattr(args, flag), f"--{flag}", what, kind if flag == "model_path" else "classifier")
        for flag, what in checkpoints.items()
    }
    resolve_output_folder(args.out_dir, "--out_dir")
    # No torch.distributed group is needed: ranks share work through files and MPI alone.
    comm = mpi_comm()
    return SimpleNamespace(
        comm=comm,
        device=dist_util.dev(),
        paths=paths,
        checked=checked,
        # Inside the run's bar over samples, a batch's bar over steps goes away when the batch is done.
        progress={"leave": False} if comm.rank == 0 else False,
        notes=[],
    )


def say(run, message):
    """
    A log line before the output folder exists: printed by rank 0 now, copied into log.txt by finish_run.
    """
    run.notes.append(message)
    if run.comm.rank == 0:
        print(message, flush=True)


def load_checkpoint(run, module, flag, what, use_fp16):
    say(run, f"loading {what} from {run.paths[flag]}...")
    return load_for_sampling(module, run.paths[flag], f"--{flag}", what, use_fp16, run.device)


def create_from_flags(create, defaults, args):
    """
    create(**flags) with the flags named by defaults(); an architecture the factories reject is a UsageError.
    """
    try:
        return create(**args_to_dict(args, defaults().keys()))
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def build_guided_model(args, run, create, defaults, what="diffusion model"):
    """
    Build the model and diffusion from the flags, check the guidance flags against the model, load
    --model_path and wrap the model in the guidance the flags ask for.
    :return: (model, guided model, diffusion).
    """
    say(run, f"creating {what} and diffusion...")
    model, diffusion = create_from_flags(create, defaults, args)
    guided = guide_model(model, diffusion, args, log=lambda line: say(run, line))
    load_checkpoint(run, model, "model_path", what, args.use_fp16)
    return model, guided, diffusion


def sample_images(
    diffusion, model_fn, args, generators, image_size, model_kwargs, cond_fn=None, device=None, progress=False
):
    """
    Run ADM's sampler (DDIM with --use_ddim, else ancestral) on one batch whose random draws all come from the
    samples' own generators. :param progress: the sampling loop's progress (e.g. run.progress). :return: uint8 NHWC
    images.
    """
    noise = PerSampleNoise(generators)
    shape = (len(generators), 3, image_size, image_size)
    loop = diffusion.ddim_sample_loop if args.use_ddim else diffusion.p_sample_loop
    sample = loop(
        model_fn,
        shape,
        noise=noise.draw(shape, device),
        clip_denoised=args.clip_denoised,
        cond_fn=cond_fn,
        model_kwargs=model_kwargs,
        device=device,
        progress=progress,
        noise_fn=noise,
    )
    return to_uint8_images(sample)


def finish_run(script, args, run, image_size, sample_batch, input_flags=(), write_grid=None):
    """
    Sample every index with all ranks, resumably, and write the final .npz (see run_store.run_sampling).

    :param input_flags: flags naming input files besides the checkpoints (e.g. base_samples) that the run record
                        fingerprints, so a resumed run cannot mix outputs of two different inputs.
    :param write_grid: how the script draws its --grid from the output arrays (default: the first samples).
    :return: the path of the final .npz.
    """
    out_dir = configure_logger(args.out_dir, run.comm)
    logger.log_to_files(*run.notes)
    logger.log("sampling...")
    path = run_sampling(
        script=script,
        args=args,
        out_dir=out_dir,
        image_shape=(image_size, image_size, 3),
        sample_batch=sample_batch,
        record=run_record(script, args, checkpoint_flags=tuple(run.paths) + tuple(input_flags)),
        comm=run.comm,
        write_grid=write_grid,
    )
    logger.log("sampling complete")
    return path

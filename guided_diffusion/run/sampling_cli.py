"""
What the sampling scripts share around their own part (which model, which labels or base samples, which sampler
call): the common flags and their checks, the run's folder and device, building and loading the model with its
guidance, the sampler call on per-sample random streams, and the resumable run. See random_streams.py for the
seeding scheme and run_store.py for the work split and resuming.

A script is then:

    def sample(args):
        run = start_run(args, checkpoints={"model_path": "diffusion model"}, output=("image_sample", args.image_size))
        model, guided, diffusion = build_guided_model(args, run, create_model_and_diffusion, ...)
        def sample_batch(start, end, generators): ...   # the script's own part
        return finish_run("image_sample", args, run, args.image_size, sample_batch)

Nothing is written before the run samples: every flag is checked, every output path tried and every checkpoint
read first, so a run that fails on bad input leaves no output folder behind. Until then messages go to stdout
(rank 0) and are copied into log.txt once the folder exists. A finished run's folder is recognised at start (the
run says so and exits 0; --overwrite True samples again), and another job's live folder is refused.
"""

import datetime
import inspect
import os
import sys
import tempfile
from types import SimpleNamespace

from .. import dist_util, logger
from ..common.attention_backends import get_attention_backend
from .checkpoints import load_for_sampling, resolve_checkpoint, resolve_output_folder
from ..common.errors import UsageError, exit_with_usage_error  # noqa: F401 (re-exported for the scripts)
from .flag_files import FlagFileArgumentParser
from .guidance import check_guidance_args, guidance_defaults, guide_model, ignored_flags_warnings
from ..common.nonfinite import NonFiniteSampleError
from .image_output import grid_format, to_uint8_images
from .precision import apply_precision_policy, not_deterministic_note
from ..common.random_streams import PerSampleNoise
from . import run_store
from ..respace import space_timesteps
from .run_store import RunComplete, mpi_comm, parse_shard, run_record, run_sampling, shard_range
from ..script_util import add_dict_to_argparser, args_to_dict, check_channel_flags


def sampling_defaults():
    """
    Flags every sampling script has: ADM's (clip_denoised, num_samples, batch_size, use_ddim) and ours: the seed,
    an optional grid image of the first samples (--grid NAME.png: a bare file name goes into the output folder)
    and an optional output folder (default: the logger's folder, $OPENAI_LOGDIR or a fresh temporary folder, as in
    ADM), --overwrite to sample again into a folder that holds a finished run, --shard i/n (run_store) and the
    CUDA precision policy's --allow_tf32 and --deterministic (precision.py).
    """
    return dict(
        clip_denoised=True,
        num_samples=10000,
        batch_size=16,
        use_ddim=False,
        seed=0,
        grid="",
        out_dir="",
        overwrite=False,
        shard="",
        allow_tf32=False,
        deterministic=False,
    )


def create_sampling_argparser(description, defaults, script=None):
    """
    An argument parser (with @flagfile support) for the script's own defaults, the common sampling flags and
    every guidance method's flags, in ADM's add_dict_to_argparser style; `script` picks the help of flags whose
    meaning is the script's own (flag_help.SCRIPT_HELP).
    """
    merged = sampling_defaults()
    merged.update(defaults)
    merged.update(guidance_defaults())
    parser = FlagFileArgumentParser(
        description=inspect.cleandoc(description),
        epilog="Flags can also come from a file: @configs/NAME.cfg or @NAME (later flags override it).",
    )
    add_dict_to_argparser(parser, merged, script=script)
    return parser


def run_main(parser, sample, argv=None, args=None):
    """
    Parse the flags (unless `args` is given) and call sample(args); a UsageError becomes one error line, Ctrl-C
    one line saying how to resume. A folder that already holds the finished run returns its .npz.
    """
    global _run_folder
    _run_folder = None
    if args is None:
        args = parser.parse_args(argv)
    try:
        return sample(args)
    except RunComplete as done:
        return done.path
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
            sys.stderr.write(f"\n{parser.prog}: interrupted. {_how_to_resume(args)}\n")
        raise SystemExit(130) from None


# The output folder of the run in progress, once start_run has chosen it (for the interrupt message).
_run_folder = None


def _how_to_resume(args):
    if _run_folder is None:
        return "Nothing was sampled yet."
    return (
        f"Finished batches are kept in {_run_folder}: rerun the same command with --out_dir {_run_folder} to "
        "resume where it stopped."
    )


def choose_run_folder(out_dir, comm):
    """
    The run's output folder: --out_dir, else $OPENAI_LOGDIR, else a fresh temporary folder named as ADM's logger
    names it (chosen by rank 0 for all ranks).
    """
    folder = None
    if comm.rank == 0:
        folder = out_dir or os.getenv("OPENAI_LOGDIR") or os.path.join(
            tempfile.gettempdir(), datetime.datetime.now().strftime("openai-%Y-%m-%d-%H-%M-%S-%f")
        )
        folder = os.path.expanduser(folder)
    return comm.bcast(folder, root=0)


def check_sampling_args(args):
    if args.num_samples <= 0:
        raise UsageError(f"--num_samples must be positive, got {args.num_samples}")
    if args.batch_size <= 0:
        raise UsageError(f"--batch_size must be positive, got {args.batch_size}")
    if args.seed < 0:
        raise UsageError(f"--seed must be a non-negative integer, got {args.seed}")
    if args.grid:
        grid_format(args.grid)
    shard_range(args.num_samples, args.batch_size, parse_shard(getattr(args, "shard", "")))


def check_diffusion_args(args):
    """
    Reject the diffusion flags the factories would fail on, with messages that name the flag.
    """
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


def start_run(args, checkpoints, kind="diffusion", check=None, output=None, input_flags=(), write_grid=None):
    """
    Check every flag that can be checked without loading anything, resolve the checkpoints and check the outputs
    (run_store.check_outputs). Creates nothing: the output folder is made by finish_run, once the models have
    loaded.

    :param checkpoints: {flag name: what it holds}, e.g. {"model_path": "diffusion model"}; --model_path's
                        example file name uses `kind`, the others' "classifier".
    :param check: the script's own checks, check(args) -> anything (kept as run.checked).
    :param output: (script name, image size) as finish_run will get them: then a folder that already holds this
                   run's finished samples is found here (RunComplete), before any model loads.
    :param input_flags, write_grid: as finish_run's.
    :return: a namespace with comm, device, paths ({flag name: checkpoint path}), checked, progress (what the
             sampling loops' `progress` takes: a bar over a batch's steps on rank 0, False elsewhere), notes
             (the messages said before the log folder exists) and flags (the script's flag names, for messages).
    """
    check_sampling_args(args)
    check_guidance_args(args)
    check_diffusion_args(args)
    check_attention_backend()
    checked = check(args) if check is not None else None
    paths = {
        flag: resolve_checkpoint(getattr(args, flag), f"--{flag}", what, kind if flag == "model_path" else "classifier")
        for flag, what in checkpoints.items()
    }
    resolve_output_folder(args.out_dir, "--out_dir")
    # Ranks share work through files and the launcher's communicator (MPI, or torch.distributed's gloo under
    # torchrun and srun).
    comm = mpi_comm()
    apply_precision_policy(getattr(args, "allow_tf32", False), getattr(args, "deterministic", False))
    global _run_folder
    out_dir = choose_run_folder(args.out_dir, comm)
    final_path, record = None, None
    if output is not None:
        script, image_size = output
        final_path = run_store.run_output_path(out_dir, args, (image_size, image_size, 3))
        if comm.rank == 0:
            record = run_record(script, args, checkpoint_flags=tuple(paths) + tuple(input_flags))
    run_store.check_outputs(comm, out_dir, args, final_path, record, write_grid)
    _run_folder = out_dir
    run = SimpleNamespace(
        comm=comm,
        device=dist_util.dev(),
        paths=paths,
        checked=checked,
        # Inside the run's bar over samples, a batch's bar over steps goes away when the batch is done.
        progress={"leave": False} if comm.rank == 0 else False,
        notes=[],
        out_dir=out_dir,
        record=record,
        flags=set(vars(args)),
    )
    for line in ignored_flags_warnings(args):
        say(run, line, file=sys.stderr)
    return run


def check_attention_backend():
    """
    Refuse a bad $PAG_ADM_ATTENTION now: the attention layers would only read it at the first sampling step.
    """
    try:
        get_attention_backend()
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def say(run, message, file=None):
    """
    A log line before the output folder exists: printed by rank 0 now (to `file`, default stdout; warnings go to
    stderr), copied into log.txt by finish_run.
    """
    run.notes.append(message)
    if run.comm.rank == 0:
        print(message, file=file or sys.stdout, flush=True)


def say_if_not_deterministic(run, args, reason):
    """
    Say in one line that --deterministic cannot hold on this run's device because `reason` (what runs a backward
    pass through reflection padding, or None) has no deterministic CUDA kernel.
    """
    note = not_deterministic_note(getattr(args, "deterministic", False), run.device, reason)
    if note:
        say(run, note)


def load_checkpoint(run, module, flag, what, use_fp16):
    say(run, f"loading {what} from {run.paths[flag]}...")
    return load_for_sampling(
        module, run.paths[flag], f"--{flag}", what, use_fp16, run.device, flags=getattr(run, "flags", None)
    )


def create_from_flags(create, defaults, args):
    """
    create(**flags) with the flags named by defaults(); an architecture the factories reject is a UsageError.
    """
    keys = defaults().keys()
    try:
        check_channel_flags(args, keys)
        return create(**args_to_dict(args, keys))
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
    if run.record is None and run.comm.rank == 0:
        run.record = run_record(script, args, checkpoint_flags=tuple(run.paths) + tuple(input_flags))
    final_path = run_store.run_output_path(run.out_dir, args, (image_size, image_size, 3))
    lock = run_store.acquire_run_lock(run.out_dir, run.comm, run_store.lock_name(args))
    try:
        # Again under the lock: another job may have finished or started this folder since start_run looked.
        run_store.check_outputs(run.comm, run.out_dir, args, final_path, run.record, write_grid, locked=True)
        out_dir = configure_logger(run.out_dir, run.comm)
        logger.log_to_files(*run.notes)
        if not args.out_dir and run.comm.rank == 0:
            logger.log(f"output folder {out_dir} (to resume this run if it stops, rerun with --out_dir {out_dir})")
        logger.log("sampling...")
        path = run_sampling(
            script=script,
            args=args,
            out_dir=out_dir,
            image_shape=(image_size, image_size, 3),
            sample_batch=sample_batch,
            record=run.record,
            comm=run.comm,
            write_grid=write_grid,
            device=run.device,
        )
    finally:
        lock.release()
    logger.log("sampling complete")
    return path

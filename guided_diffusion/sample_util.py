"""
What the sampling scripts share: PAG and sampling flags, per-sample random streams, the split of the work over
MPI ranks, resumable runs, the final .npz and a PNG grid.

Reproducibility
---------------
Sample i of a run with --seed S owns one CPU torch.Generator, seeded from numpy's
SeedSequence(S, spawn_key=(i,)) (the i-th child of SeedSequence(S)). From it, and from nothing else, the sample
takes in this order:

  1. its class label, one randint(NUM_CLASSES) draw, when the script draws labels (image_sample.py with a
     class-conditional model, classifier_sample.py always; super_res_sample.py takes them from its base samples);
  2. its starting noise x_T, one standard normal draw shaped (C, H, W);
  3. one standard normal draw shaped (C, H, W) each time the sampler asks for noise, i.e. once per step in the
     diffusion's own draw order (p_sample and ddim_sample both draw at every step, the last one included).

A batch's noise is the stack of its samples' draws (PerSampleNoise), so what sample i becomes depends on S and i
only, not on the batch size, the number of ranks or which batch or rank it lands in. Draws happen on the CPU and
are then moved to the model's device, so the streams are the same on every device. (The model itself may round
differently for different batch shapes on some backends; the random streams never do.)

Work split and resuming
-----------------------
The output samples_{N}x{H}x{W}x{C}.npz gets a work folder next to it, samples_{N}x{H}x{W}x{C}_parts/, holding
run.json (the flags that shape the samples) and one .npz per finished batch, named by the half-open range of
sample indices it holds, e.g. 000000016-000000032.npz. Each part is written to a temporary file and renamed, so a
part either exists complete or not at all. A run lists the finished ranges, cuts the missing indices into
batches of --batch_size and deals them to the ranks round-robin; rerunning an interrupted command (with any batch
size or number of ranks) therefore only samples what is missing. When every index is present, rank 0 joins the
parts into the final .npz (atomically) and removes the work folder.
"""

import json
import math
import os
import shutil
import struct
import zlib

import numpy as np
import torch as th

from .atomic_io import atomic_write, remove_temporary_files, save_npz_atomic

# Set to a positive integer k, a run stops (exit status 3) after each rank has finished k batches: an interrupted
# run on demand, for testing resumption.
STOP_AFTER_ENV = "GUIDED_DIFFUSION_SAMPLE_STOP_AFTER"
STOP_EXIT_CODE = 3

# The grid written by --grid shows at most this many of the first samples.
GRID_MAX_IMAGES = 64

# Flags that do not change the samples, so a resumed run may change them.
_FLAGS_FREE_ON_RESUME = ("batch_size", "grid", "out_dir")


class UsageError(ValueError):
    """
    A flag value the scripts cannot run with; the message says which flag and what to pass instead.
    """


def exit_with_usage_error(parser, exc):
    """
    Print a UsageError as argparse prints its own errors, without the long usage text (ADM's scripts have dozens
    of flags) and once per run rather than once per MPI rank; exit with status 2.
    """
    if mpi_comm().rank == 0:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    raise SystemExit(2)


def pag_defaults():
    """
    Defaults of the Perturbed-Attention Guidance flags: PAG is off unless --pag_scale > 0.
    """
    return dict(pag_scale=0.0, pag_layers="middle", pag_interval="")


def sampling_defaults():
    """
    Flags every sampling script adds to ADM's: the seed, an optional PNG grid and an optional output folder
    (default: the logger's folder, $OPENAI_LOGDIR or a fresh temporary folder, as in ADM).
    """
    return dict(seed=0, grid="", out_dir="")


# --- checking flags -------------------------------------------------------------------------------------------


def check_sampling_args(args):
    if args.num_samples <= 0:
        raise UsageError(f"--num_samples must be positive, got {args.num_samples}")
    if args.batch_size <= 0:
        raise UsageError(f"--batch_size must be positive, got {args.batch_size}")
    if args.seed < 0:
        raise UsageError(f"--seed must be a non-negative integer, got {args.seed}")


def check_pag_scale(scale):
    if not math.isfinite(scale) or scale < 0:
        raise UsageError(
            f"--pag_scale must be a finite number >= 0 (0 turns PAG off), got {scale}"
        )
    return scale


def parse_pag_interval(text, diffusion_steps):
    """
    "" -> None (PAG at every step); "lo,hi" -> (lo, hi), an inclusive range of the model's timesteps
    0 .. diffusion_steps - 1 (the original, un-respaced ones).
    """
    text = (text or "").strip()
    if not text:
        return None
    parts = [p.strip() for p in text.split(",")]
    expected = f"expected 'lo,hi' with integers 0 <= lo <= hi <= {diffusion_steps - 1} (--diffusion_steps - 1)"
    try:
        if len(parts) != 2:
            raise ValueError
        lo, hi = int(parts[0]), int(parts[1])
    except ValueError:
        raise UsageError(f"--pag_interval {text!r} is malformed: {expected}, or '' for every step") from None
    if not 0 <= lo <= hi <= diffusion_steps - 1:
        raise UsageError(f"--pag_interval {text!r} is out of range: {expected}")
    return lo, hi


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


def default_checkpoint(kind):
    """
    The checkpoint to use when the flag naming one is empty. None for now: there is no built-in model yet.
    A later version may return a bundled file here, and the scripts then need no other change.
    """
    return None


def resolve_checkpoint(path, flag, what, kind):
    """
    The checkpoint file behind `--flag path`, or a UsageError that says which file is needed and where to pass it.
    """
    if not path:
        path = default_checkpoint(kind)
        if path is None:
            raise UsageError(
                f"{flag} is required: pass the {what} checkpoint (a .pt file whose architecture matches the model "
                f"flags), e.g. {flag} models/64x64_{kind}.pt"
            )
    if not os.path.isfile(path):
        raise UsageError(f"{flag} {path!r}: no such file; pass the path of an existing {what} checkpoint (.pt)")
    return path


def load_for_sampling(module, path, flag, what, use_fp16, device):
    """
    Load a checkpoint into a model or classifier (every rank together: dist_util reads it on rank 0 and
    broadcasts it), then move it to `device`, convert it to fp16 if asked and put it in eval mode, as ADM does.
    """
    from . import dist_util

    state = dist_util.load_state_dict(path, map_location="cpu")
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        raise UsageError(
            f"{flag} {path!r} does not fit the {what} built from the flags given (pass the flags the checkpoint "
            f"was trained with):\n{exc}"
        ) from None
    module.to(device)
    if use_fp16:
        module.convert_to_fp16()
    module.eval()
    return module


# --- PAG ------------------------------------------------------------------------------------------------------


def check_pag_args(args, model):
    """
    Validate the PAG flags against the model (even with --pag_scale 0, so a typo never goes unnoticed).
    :return: the PAG t_range to pass on, in the timesteps the model sees.
    """
    check_pag_scale(args.pag_scale)
    t_range = parse_pag_interval(args.pag_interval, args.diffusion_steps)
    from .pag import resolve_layers

    try:
        resolve_layers(model, args.pag_layers)
    except ValueError as exc:
        raise UsageError(f"--pag_layers {args.pag_layers!r}: {exc}") from None
    if t_range is not None and args.rescale_timesteps:
        # With rescale_timesteps the model is called with t * 1000 / diffusion_steps, not t.
        scale = 1000.0 / args.diffusion_steps
        t_range = (t_range[0] * scale, t_range[1] * scale)
    return t_range


def pag_model(model, args, t_range):
    """
    The model with PAG applied, or the model itself when --pag_scale is 0.
    """
    if args.pag_scale == 0:
        return model
    from .pag import PAGGuidedModel

    return PAGGuidedModel(model, scale=args.pag_scale, layers=args.pag_layers, t_range=t_range)


# --- random streams -------------------------------------------------------------------------------------------


def sample_generator(seed, index):
    """
    The CPU generator that owns every random draw of sample `index` (see the module docstring).
    """
    state = np.random.SeedSequence(seed, spawn_key=(index,)).generate_state(2, np.uint32)
    gen = th.Generator(device="cpu")
    gen.manual_seed(int(state[0]) | (int(state[1]) << 32))
    return gen


def draw_labels(generators, num_classes):
    return th.stack([th.randint(num_classes, (), generator=g) for g in generators])


class PerSampleNoise:
    """
    A noise source for the diffusion's sampling loops (its noise_fn): each call returns a tensor like x whose
    row k is the next standard normal draw of generator k.
    """

    def __init__(self, generators):
        self.generators = list(generators)

    def __call__(self, x):
        return self.draw(x.shape, x.device, x.dtype)

    def draw(self, shape, device, dtype=th.float32):
        if shape[0] != len(self.generators):
            raise ValueError(f"noise for a batch of {shape[0]} asked from {len(self.generators)} generators")
        rows = [th.randn(tuple(shape[1:]), generator=g) for g in self.generators]
        return th.stack(rows).to(device=device, dtype=dtype)


def sample_images(diffusion, model_fn, args, generators, image_size, model_kwargs, cond_fn=None, device=None):
    """
    Run ADM's sampler (DDIM with --use_ddim, else ancestral) on one batch whose random draws all come from the
    samples' own generators. :return: uint8 NHWC images.
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
        noise_fn=noise,
    )
    return to_uint8_images(sample)


def to_uint8_images(sample):
    """
    Samples in [-1, 1], NCHW -> uint8 NHWC numpy, rounding as ADM does (scale, clamp, truncate).
    """
    sample = ((sample + 1) * 127.5).clamp(0, 255).to(th.uint8)
    return sample.permute(0, 2, 3, 1).contiguous().cpu().numpy()


# --- MPI ------------------------------------------------------------------------------------------------------


def mpi_comm():
    from mpi4py import MPI

    return MPI.COMM_WORLD


def configure_logger(out_dir, comm):
    """
    Configure ADM's logger in one folder for all ranks: --out_dir, else $OPENAI_LOGDIR, else rank 0's fresh
    temporary folder (each rank would otherwise make its own).
    :return: the folder the samples go to.
    """
    from . import logger

    folder = None
    if comm.rank == 0:
        logger.configure(dir=out_dir or None)
        folder = logger.get_dir()
    folder = comm.bcast(folder, root=0)
    if comm.rank != 0:
        logger.configure(dir=folder)
    return folder


def _all_ok(comm, error):
    """
    Share rank 0's error (a message or None), so that all ranks stop together instead of some hanging.
    """
    error = comm.bcast(error, root=0)
    if error is not None:
        raise UsageError(error)


# --- parts and outputs ----------------------------------------------------------------------------------------


def output_paths(out_dir, num_samples, image_shape):
    """
    (final .npz, work folder) for a run; image_shape is (H, W, C).
    """
    shape_str = "x".join(str(d) for d in (num_samples, *image_shape))
    final = os.path.join(out_dir, f"samples_{shape_str}.npz")
    return final, final[: -len(".npz")] + "_parts"


def part_name(start, end):
    return f"{start:09d}-{end:09d}.npz"


def parse_part_name(name):
    """
    (start, end) for a part file name, or None for anything else (temporary files, run.json).
    """
    stem, ext = os.path.splitext(name)
    pieces = stem.split("-")
    if ext != ".npz" or len(pieces) != 2 or not all(p.isdigit() for p in pieces):
        return None
    start, end = int(pieces[0]), int(pieces[1])
    return (start, end) if start < end else None


def finished_ranges(parts_dir):
    """
    The sorted sample ranges of the part files in a work folder.
    """
    if not os.path.isdir(parts_dir):
        return []
    ranges = [parse_part_name(n) for n in os.listdir(parts_dir)]
    return sorted(r for r in ranges if r is not None)


def missing_batches(num_samples, done, batch_size):
    """
    Cut the indices 0 .. num_samples - 1 that no range in `done` covers into batches of at most batch_size
    consecutive indices; each run of missing indices is cut separately, so every batch is one range.
    """
    covered = np.zeros(num_samples, dtype=bool)
    for start, end in done:
        covered[start:end] = True
    batches = []
    index = 0
    while index < num_samples:
        if covered[index]:
            index += 1
            continue
        run_end = index
        while run_end < num_samples and not covered[run_end]:
            run_end += 1
        for start in range(index, run_end, batch_size):
            batches.append((start, min(start + batch_size, run_end)))
        index = run_end
    return batches


def _checkpoint_record(path):
    if not path:
        return None
    return {"path": os.path.abspath(path), "bytes": os.path.getsize(path)}


def run_record(script, args, checkpoint_flags=()):
    """
    What a work folder must agree on to be resumed: the script and every flag that shapes the samples, with the
    checkpoints named by absolute path and size.
    """
    flags = {k: v for k, v in sorted(vars(args).items()) if k not in _FLAGS_FREE_ON_RESUME}
    for flag in checkpoint_flags:
        flags[flag] = _checkpoint_record(flags[flag])
    return {"script": script, "flags": flags}


def _record_mismatch(parts_dir, old, new):
    diffs = []
    if old.get("script") != new["script"]:
        diffs.append(f"script {old.get('script')} (now {new['script']})")
    old_flags, new_flags = old.get("flags", {}), new["flags"]
    for key in sorted(set(old_flags) | set(new_flags)):
        if old_flags.get(key, "<unset>") != new_flags.get(key, "<unset>"):
            diffs.append(f"--{key} {old_flags.get(key, '<unset>')!r} (now {new_flags.get(key, '<unset>')!r})")
    if not diffs:
        return None
    return (
        f"cannot resume: the unfinished run in {parts_dir} was started with different settings: "
        + "; ".join(diffs)
        + f". Rerun with the same flags to finish it, or delete {parts_dir} to start over."
    )


def _prepare_work_folder(parts_dir, record):
    """
    Rank 0: create the work folder or check that it belongs to this run; clear temporary files that an
    interrupted run left behind. :return: an error message or None.
    """
    record_path = os.path.join(parts_dir, "run.json")
    if os.path.isdir(parts_dir):
        if os.path.exists(record_path):
            with open(record_path) as f:
                try:
                    old = json.load(f)
                except json.JSONDecodeError:
                    return f"cannot resume: {record_path} is unreadable; delete {parts_dir} to start over"
            error = _record_mismatch(parts_dir, old, record)
            if error:
                return error
        elif finished_ranges(parts_dir):
            return f"cannot resume: {parts_dir} holds sample parts but no run.json; delete it to start over"
        remove_temporary_files(parts_dir)
    os.makedirs(parts_dir, exist_ok=True)
    if not os.path.exists(record_path):
        text = json.dumps(record, indent=2, sort_keys=True)
        atomic_write(record_path, lambda f: f.write(text.encode()))
    return None


def _join_parts(parts_dir, num_samples):
    """
    Read the parts and return the lists of arrays of the whole run, checking that every index is there once.
    """
    ranges = finished_ranges(parts_dir)
    expected = 0
    for start, end in ranges:
        if start != expected:
            kind = "overlap" if start < expected else "gap"
            raise RuntimeError(f"sample parts in {parts_dir} {kind} at index {min(start, expected)}")
        expected = end
    if expected != num_samples:
        raise RuntimeError(f"sample parts in {parts_dir} end at index {expected}, expected {num_samples}")
    columns = None
    for start, end in ranges:
        with np.load(os.path.join(parts_dir, part_name(start, end))) as data:
            arrays = [data[f"arr_{k}"] for k in range(len(data.files))]
        if any(len(a) != end - start for a in arrays):
            raise RuntimeError(f"sample part {part_name(start, end)} in {parts_dir} holds the wrong count")
        if columns is None:
            columns = [[] for _ in arrays]
        for column, array in zip(columns, arrays):
            column.append(array)
    return [np.concatenate(column) for column in columns]


def _stop_after():
    value = os.environ.get(STOP_AFTER_ENV, "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) == 0:
        raise UsageError(f"${STOP_AFTER_ENV} must be a positive number of batches, got {value!r}")
    return int(value)


def run_sampling(*, script, args, out_dir, image_shape, sample_batch, record, comm=None):
    """
    Sample indices 0 .. args.num_samples - 1 with all ranks, resumably, and write the final .npz.

    :param sample_batch: sample_batch(start, end, generators) -> list of numpy arrays with end - start rows
                         each (arr_0, arr_1, ... of the output), generators being the samples' own generators.
    :param record: run_record(...) of this run, checked against the work folder's on resumption.
    :return: the path of the final .npz (on every rank).
    """
    from tqdm.auto import tqdm

    from . import logger

    comm = comm if comm is not None else mpi_comm()
    stop_after = _stop_after()
    final_path, parts_dir = output_paths(out_dir, args.num_samples, image_shape)

    error = _prepare_work_folder(parts_dir, record) if comm.rank == 0 else None
    _all_ok(comm, error)
    # Every rank plans from rank 0's listing, so all of them agree on who samples what.
    done = comm.bcast(finished_ranges(parts_dir) if comm.rank == 0 else None, root=0)
    todo = missing_batches(args.num_samples, done, args.batch_size)
    mine = todo[comm.rank :: comm.size]
    done_count = sum(end - start for start, end in done)
    if comm.rank == 0:
        if done:
            logger.log(f"resuming: {done_count} of {args.num_samples} samples already in {parts_dir}")
        logger.log(f"sampling {args.num_samples - done_count} images in {len(todo)} batches on {comm.size} rank(s)")

    progress = tqdm(
        total=args.num_samples,
        initial=done_count,
        unit="sample",
        desc="sampling",
        disable=comm.rank != 0,
        dynamic_ncols=True,
    )
    for batch_number, (start, end) in enumerate(mine):
        generators = [sample_generator(args.seed, i) for i in range(start, end)]
        arrays = sample_batch(start, end, generators)
        save_npz_atomic(os.path.join(parts_dir, part_name(start, end)), arrays)
        if comm.rank == 0:
            # The parts on disk count the other ranks' work too.
            progress.update(sum(e - s for s, e in finished_ranges(parts_dir)) - progress.n)
        if stop_after is not None and batch_number + 1 >= stop_after and batch_number + 1 < len(mine):
            progress.close()
            logger.log(f"stopping after {stop_after} batches ({STOP_AFTER_ENV} is set); rerun to resume")
            raise SystemExit(STOP_EXIT_CODE)
    comm.Barrier()
    if comm.rank == 0:
        progress.update(args.num_samples - progress.n)
    progress.close()

    error = None
    if comm.rank == 0:
        try:
            arrays = _join_parts(parts_dir, args.num_samples)
        except RuntimeError as exc:
            error = f"{exc}; delete {parts_dir} and rerun"
        else:
            save_npz_atomic(final_path, arrays)
            if args.grid:
                save_grid(args.grid, arrays[0][:GRID_MAX_IMAGES])
            shutil.rmtree(parts_dir)
            logger.log(f"saving to {final_path}")
            if args.grid:
                logger.log(f"grid of the first samples in {args.grid}")
    _all_ok(comm, error)
    comm.Barrier()
    return final_path


# --- PNG ------------------------------------------------------------------------------------------------------


def image_grid(images, padding=2):
    """
    uint8 NHWC images -> one uint8 HWC image: a near-square grid, `padding` black pixels around every image.
    """
    count, height, width, channels = images.shape
    ncol = math.ceil(math.sqrt(count))
    nrow = math.ceil(count / ncol)
    grid = np.zeros(
        (nrow * (height + padding) + padding, ncol * (width + padding) + padding, channels), dtype=np.uint8
    )
    for k, image in enumerate(images):
        row, col = divmod(k, ncol)
        top = padding + row * (height + padding)
        left = padding + col * (width + padding)
        grid[top : top + height, left : left + width] = image
    return grid


def png_bytes(image):
    """
    Encode a uint8 HWC image (C = 1, 3 or 4) as PNG, with zlib alone, so that no imaging library is needed.
    """
    image = np.ascontiguousarray(image, dtype=np.uint8)
    if image.ndim == 2:
        image = image[:, :, None]
    height, width, channels = image.shape
    color_type = {1: 0, 3: 2, 4: 6}[channels]

    def chunk(kind, data):
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    # Every scanline starts with filter type 0 (none).
    raw = np.concatenate([np.zeros((height, 1), np.uint8), image.reshape(height, -1)], axis=1)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw.tobytes(), 6))
        + chunk(b"IEND", b"")
    )


def enlarge_small(images, min_size=32, target=64):
    """
    Nearest-neighbour enlarge images smaller than min_size pixels to about target pixels, so a grid of 16x16
    samples can be looked at; larger images are left as they are.
    """
    size = max(images.shape[1:3])
    if size >= min_size:
        return images
    factor = max(1, target // size)
    return images.repeat(factor, axis=1).repeat(factor, axis=2)


def save_grid(path, images):
    data = png_bytes(image_grid(enlarge_small(images)))
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    atomic_write(path, lambda f: f.write(data))


"""
The resumable run store of the sampling scripts: the split of the work over MPI ranks, one file per finished
batch, and the final .npz.

The output samples_{N}x{H}x{W}x{C}.npz gets a work folder next to it, samples_{N}x{H}x{W}x{C}_parts/, holding
run.json (the flags that shape the samples) and one .npz per finished batch, named by the half-open range of
sample indices it holds, e.g. 000000016-000000032.npz. Each part is written to a temporary file and renamed, so a
part either exists complete or not at all. A run lists the finished ranges, cuts the missing indices into
batches of --batch_size and deals them to the ranks round-robin; rerunning an interrupted command (with any batch
size or number of ranks) therefore only samples what is missing. When every index is present, rank 0 joins the
parts into the final .npz (atomically) and removes the work folder.
"""

import json
import os
import shutil

import numpy as np

from .atomic_io import atomic_write, remove_temporary_files, save_npz_atomic
from .errors import UsageError
from .image_output import first_samples, save_grid
from .random_streams import batch_streams, sample_generator

# Set to a positive integer k, a run stops (exit status 3) after each rank has finished k batches: an interrupted
# run on demand, for testing resumption.
STOP_AFTER_ENV = "GUIDED_DIFFUSION_SAMPLE_STOP_AFTER"
STOP_EXIT_CODE = 3

# Flags that do not change the samples, so a resumed run may change them.
FLAGS_FREE_ON_RESUME = ("batch_size", "grid", "out_dir")


def mpi_comm():
    from mpi4py import MPI

    return MPI.COMM_WORLD


def _all_ok(comm, error):
    """
    Share rank 0's error (a message or None), so that all ranks stop together instead of some hanging.
    """
    error = comm.bcast(error, root=0)
    if error is not None:
        raise UsageError(error)


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
    flags = {k: v for k, v in sorted(vars(args).items()) if k not in FLAGS_FREE_ON_RESUME}
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


def grid_path(grid, out_dir):
    """
    Where --grid goes: a bare file name into the run's own output folder, a path as given.
    """
    if grid and not os.path.dirname(grid):
        return os.path.join(out_dir, grid)
    return grid


def _write_first_samples(path, arrays):
    save_grid(path, first_samples(arrays))
    return "the first samples"


def run_sampling(*, script, args, out_dir, image_shape, sample_batch, record, comm=None, write_grid=None):
    """
    Sample indices 0 .. args.num_samples - 1 with all ranks, resumably, and write the final .npz.

    :param sample_batch: sample_batch(start, end, generators) -> list of numpy arrays with end - start rows
                         each (arr_0, arr_1, ... of the output), generators being the samples' own generators.
    :param record: run_record(...) of this run, checked against the work folder's on resumption.
    :param write_grid: write_grid(path, arrays) writes the --grid image from the output arrays and returns what it
                       shows, for the log; default: a grid of the first samples.
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
        with batch_streams(args.seed, range(start, end)):
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
            grid = grid_path(args.grid, out_dir)
            if grid:
                shown = (write_grid or _write_first_samples)(grid, arrays)
            shutil.rmtree(parts_dir)
            logger.log(f"saving to {final_path}")
            if grid:
                logger.log(f"grid of {shown} in {grid}")
    _all_ok(comm, error)
    comm.Barrier()
    return final_path

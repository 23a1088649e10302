"""
The resumable run store of the sampling scripts: the split of the work over MPI ranks, one file per finished
batch, and the final .npz.

The output samples_{N}x{H}x{W}x{C}.npz gets a work folder next to it, samples_{N}x{H}x{W}x{C}_parts/, holding
run.json (the flags that shape the samples) and one .npz per finished batch, named by the half-open range of
sample indices it holds, e.g. 000000016-000000032.npz. Each part is written to a temporary file and renamed, so a
part either exists complete or not at all. A run lists the finished ranges, cuts the missing indices into
batches of --batch_size and deals them to the ranks round-robin; rerunning an interrupted command (with any batch
size or number of ranks) therefore only samples what is missing. When every index is present, rank 0 joins the
parts into the final .npz (atomically), keeps the run's record beside it (samples_{N}x{H}x{W}x{C}.json: every
flag, the seed, the checkpoints' digests, git commit, torch version, device and rank count) and removes the work
folder. Rerunning a finished command finds that record and stops at once (--overwrite True samples again).

Checkpoints and input files are named in the records by path and SHA-256 (file_digest.py), so a resumed run
cannot mix samples of two models whose files share a name and size.

A run holds a lock on its output folder (.run.lock, an flock the kernel drops when the process dies), taken by
rank 0, so a second job on the same folder stops at start and names the holder instead of racing on the parts.

With --shard i/n a run samples only the i-th of n contiguous slices of the row's batches (so its batches are the
whole run's batches), into samples_{N}x{H}x{W}x{C}_shard{i}of{n}.npz with its own work folder; each shard is an
independent, resumable job, and merge_shards joins the n shard files into the single .npz one run would write.
"""

import errno
import json
import os
import re
import shutil
import socket
import time
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

# dist_util registers the torch.distributed set-up that launch_env.comm() needs under torchrun and srun.
from .. import dist_util, logger  # noqa: F401
from ..common.atomic_io import (
    atomic_write,
    remove_temporary_files,
    save_npz_atomic,
    unwritable_reason,
    write_json_atomic,
)
from ..common.errors import UsageError
from ..common.file_digest import file_record
from .image_output import first_samples, save_grid
from ..common.launch_env import comm
from ..common.random_streams import batch_streams, sample_generator
from .run_info import environment

# Set to a positive integer k, a run stops (exit status 3) after each rank has finished k batches: an interrupted
# run on demand, for testing resumption.
STOP_AFTER_ENV = "GUIDED_DIFFUSION_SAMPLE_STOP_AFTER"
STOP_EXIT_CODE = 3

# Flags that do not change the samples, so a resumed run may change them.
FLAGS_FREE_ON_RESUME = ("batch_size", "grid", "out_dir", "overwrite")

LOCK_NAME = ".run.lock"


class RunComplete(Exception):
    """
    The output folder already holds this run's finished samples (.path); nothing is left to do.
    """

    def __init__(self, path):
        super().__init__(path)
        self.path = path


def mpi_comm():
    """
    The run's communicator, whichever launcher started it (mpiexec, torchrun, srun; see launch_env.py).
    """
    return comm()


def _all_ok(comm, error):
    """
    Share rank 0's error (a message or None), so that all ranks stop together instead of some hanging.
    """
    error = comm.bcast(error, root=0)
    if error is not None:
        raise UsageError(error)


def run_output_path(out_dir, args, image_shape):
    """
    The .npz a run of these flags writes (the shard's own file under --shard).
    """
    return output_paths(out_dir, args.num_samples, image_shape, parse_shard(getattr(args, "shard", "")))[0]


def lock_name(args):
    """
    The lock file of a run: one per output folder, or one per shard, since a row's shards are independent jobs
    that share their folder.
    """
    shard = parse_shard(getattr(args, "shard", ""))
    return f".run-shard{shard[0]}of{shard[1]}.lock" if shard else LOCK_NAME


def output_paths(out_dir, num_samples, image_shape, shard=None):
    """
    (final .npz, work folder) for a run; image_shape is (H, W, C); shard (i, n) or None.
    """
    shape_str = "x".join(str(d) for d in (num_samples, *image_shape))
    suffix = f"_shard{shard[0]}of{shard[1]}" if shard else ""
    final = os.path.join(out_dir, f"samples_{shape_str}{suffix}.npz")
    return final, final[: -len(".npz")] + "_parts"


def parse_shard(text):
    """
    (i, n) for --shard "i/n" (0 <= i < n), None for "".
    """
    if not text:
        return None
    pieces = str(text).split("/")
    if len(pieces) != 2 or not all(p.strip().isdigit() for p in pieces):
        raise UsageError(f"--shard {text!r} is malformed: expected i/n, e.g. 0/4 for the first of four shards")
    index, count = int(pieces[0]), int(pieces[1])
    if not 0 <= index < count:
        raise UsageError(f"--shard {text!r}: the shard index must be 0 .. {count - 1} for {count} shards")
    return index, count


def shard_range(num_samples, batch_size, shard):
    """
    The half-open index range of shard (i, n): the i-th of n contiguous, near-equal slices of the run's batches of
    batch_size, so that every shard samples exactly the batches one whole run would.
    """
    batches = -(-num_samples // batch_size)
    if shard is None:
        return 0, num_samples
    index, count = shard
    if count > batches:
        raise UsageError(
            f"--shard {index}/{count}: {num_samples} samples in batches of {batch_size} make only {batches} "
            f"batch(es); use at most {batches} shards"
        )
    first, last = index * batches // count, (index + 1) * batches // count
    return first * batch_size, min(num_samples, last * batch_size)


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


def missing_batches(num_samples, done, batch_size, first=0):
    """
    Cut the indices first .. num_samples - 1 that no range in `done` covers into batches of at most batch_size
    consecutive indices; each run of missing indices is cut separately, so every batch is one range.
    """
    covered = np.zeros(num_samples, dtype=bool)
    for start, end in done:
        covered[start:end] = True
    batches = []
    index = first
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


def run_record(script, args, checkpoint_flags=()):
    """
    What a work folder must agree on to be resumed: the script and every flag that shapes the samples, with the
    checkpoints (and input files) named by absolute path, size and SHA-256.
    """
    flags = {k: v for k, v in sorted(vars(args).items()) if k not in FLAGS_FREE_ON_RESUME}
    for flag in checkpoint_flags:
        flags[flag] = file_record(flags[flag])
    shard = parse_shard(getattr(args, "shard", ""))
    if shard:
        # A shard's slice follows from --batch_size, so a resumed shard must keep it.
        first, last = shard_range(args.num_samples, args.batch_size, shard)
        flags["shard_range"] = f"{first}-{last}"
    return {"script": script, "flags": flags}


def _describe_flag_value(value):
    if isinstance(value, dict) and "sha256" in value:
        return f"{value.get('path')} (sha256 {value['sha256'][:12]})"
    return repr(value)


def record_differences(old, new):
    """
    The settings in which two run records differ, as '--flag OLD (now NEW)' texts.
    """
    diffs = []
    if old.get("script") != new["script"]:
        diffs.append(f"script {old.get('script')} (now {new['script']})")
    old_flags, new_flags = old.get("flags", {}), new["flags"]
    for key in sorted(set(old_flags) | set(new_flags)):
        before, now = old_flags.get(key, "<unset>"), new_flags.get(key, "<unset>")
        if before == now:
            continue
        if isinstance(before, dict) and isinstance(now, dict) and before.get("path") == now.get("path"):
            diffs.append(
                f"--{key} {now.get('path')} holds other content (sha256 {str(before.get('sha256'))[:12]}, now "
                f"{str(now.get('sha256'))[:12]})"
            )
        else:
            diffs.append(f"--{key} {_describe_flag_value(before)} (now {_describe_flag_value(now)})")
    return diffs


def _record_mismatch(parts_dir, old, new):
    diffs = record_differences(old, new)
    if not diffs:
        return None
    return (
        f"cannot resume: the unfinished run in {parts_dir} was started with different settings: "
        + "; ".join(diffs)
        + f". Rerun with the same flags to finish it, or delete {parts_dir} (or pass --overwrite True) to start over."
    )


def final_record_path(final_path):
    """
    The record kept beside a finished run's .npz: samples_NxHxWxC.json.
    """
    return final_path[: -len(".npz")] + ".json"


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


# --- the lock on an output folder ------------------------------------------------------------------------------


def _holder_text(lock_path):
    info = _read_json(lock_path) or {}
    if not info:
        return "another process"
    text = f"pid {info.get('pid')} on {info.get('host')}"
    if info.get("started"):
        text += f", started {info['started']}"
    return text


def _held_message(out_dir, holder):
    return (
        f"{out_dir} is in use by another sampling run ({holder}); wait for it to finish, or pass another "
        "--out_dir. (The lock goes away with that process; nothing needs deleting.)"
    )


def lock_holder(out_dir, name=LOCK_NAME):
    """
    Who holds the lock on out_dir (a text naming the pid and host), or None when nobody does. Creates nothing.
    """
    import fcntl  # POSIX only: imported where a lock is taken

    lock_path = os.path.join(out_dir, name)
    try:
        fd = os.open(lock_path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            return _holder_text(lock_path)
        return None  # a filesystem without flock: acquire_lock says so
    finally:
        os.close(fd)
    return None


class RunLock:
    """
    An exclusive flock on out_dir/.run.lock holding the holder's pid, host and start time. The kernel releases it
    when the process ends in any way, so a lock left by a killed job is simply taken over.
    """

    def __init__(self, out_dir, name=LOCK_NAME):
        self.path = os.path.join(out_dir, name)
        self.fd = None

    def acquire(self):
        """
        :return: None, or a warning when the filesystem cannot lock (the run then goes on unlocked).
        :raises UsageError: naming the holder when another process has the lock.
        """
        import fcntl  # POSIX only: imported where a lock is taken

        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise UsageError(_held_message(os.path.dirname(self.path), _holder_text(self.path))) from None
                return f"cannot lock {os.path.dirname(self.path)} ({exc.strerror}): make sure no other job uses it"
            # The previous holder unlinks the file before it lets go: a lock on an unlinked file is no lock.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(info).encode())
        self.fd = fd
        return None

    def release(self):
        if self.fd is None:
            return
        try:
            os.remove(self.path)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None


def acquire_run_lock(out_dir, comm, name=LOCK_NAME):
    """
    Rank 0 takes the lock on out_dir; every rank raises the same UsageError when another job holds it.
    :return: the RunLock (release it when the run ends; a no-op on other ranks).
    """
    lock = RunLock(out_dir, name)
    error = None
    if comm.rank == 0:
        try:
            warning = lock.acquire()
        except UsageError as exc:
            error = str(exc)
        else:
            if warning:
                logger.log(f"warning: {warning}")
    _all_ok(comm, error)
    return lock


# --- before any work ------------------------------------------------------------------------------------------


def check_outputs(comm, out_dir, args, final_path=None, record=None, write_grid=None, locked=False):
    """
    Before anything loads: check that the output folder and the grid can be written and that no other job holds
    the folder, and (given the final .npz path and this run's record) whether the folder already holds this
    run's finished samples. Rank 0 checks, every rank gets the outcome. Creates nothing. With locked=True (this
    process holds the folder's lock) the lock is not looked at.

    :raises UsageError: an unwritable output, a held folder, or finished samples of other settings (unless
                        --overwrite).
    :raises RunComplete: the finished samples are there with the same settings (the grid, if asked for, is
                         written from them).
    """
    outcome = None
    if comm.rank == 0:
        try:
            outcome = _check_outputs(out_dir, args, final_path, record, write_grid, locked)
        except UsageError as exc:
            outcome = ("error", str(exc))
    outcome = comm.bcast(outcome, root=0)
    if outcome is None:
        return
    kind, value = outcome
    if kind == "error":
        raise UsageError(value)
    raise RunComplete(value)


def _check_outputs(out_dir, args, final_path, record, write_grid, locked):
    reason = unwritable_reason(out_dir)
    if reason:
        flag = "--out_dir" if args.out_dir else ("$OPENAI_LOGDIR" if os.getenv("OPENAI_LOGDIR") else "the output folder")
        raise UsageError(f"{flag} {reason}; pass --out_dir with a folder you can write to")
    grid = grid_path(args.grid, out_dir)
    if grid:
        reason = unwritable_reason(grid, is_folder=False)
        if reason:
            raise UsageError(f"--grid {reason}; pass a path you can write to, or a bare file name for the output folder")
    holder = None if locked else lock_holder(out_dir, lock_name(args))
    if holder:
        raise UsageError(_held_message(out_dir, holder))
    if final_path is None or getattr(args, "overwrite", False):
        return None
    if not os.path.isfile(final_path):
        # An unfinished run of other settings is refused now rather than once the models have loaded.
        parts_dir = final_path[: -len(".npz")] + "_parts"
        old = _read_json(os.path.join(parts_dir, "run.json"))
        error = _record_mismatch(parts_dir, old, record) if old else None
        if error:
            raise UsageError(error)
        return None
    old = _read_json(final_record_path(final_path))
    if not old or not old.get("complete"):
        raise UsageError(
            f"{final_path} already exists but has no record of the settings it was made with "
            f"({os.path.basename(final_record_path(final_path))}); pass --overwrite True to sample it again, or "
            "another --out_dir"
        )
    diffs = record_differences(old.get("record", {}), record)
    if diffs:
        raise UsageError(
            f"{final_path} holds finished samples made with other settings: {'; '.join(diffs)}. Pass --overwrite "
            "True to replace them, or another --out_dir"
        )
    print(
        f"{final_path} is already complete (same settings; see {os.path.basename(final_record_path(final_path))}): "
        "nothing to sample. Pass --overwrite True to sample it again.",
        flush=True,
    )
    if grid:
        with np.load(final_path) as data:
            arrays = [data[f"arr_{k}"] for k in range(len(data.files))]
        print(f"grid of {_draw_grid(grid, arrays, write_grid, final_path)} in {grid}", flush=True)
    return ("complete", final_path)


def _draw_grid(grid, arrays, write_grid, final_path):
    try:
        return (write_grid or _write_first_samples)(grid, arrays)
    except OSError as exc:
        raise UsageError(
            f"--grid {grid}: cannot write it ({exc.strerror or exc}); the samples are complete in {final_path}, "
            "rerun with another --grid to draw it from them"
        ) from None


def _remove_earlier_outputs(final_path, parts_dir, grid):
    """
    --overwrite: the finished samples, their record, an unfinished run's parts and the grid go before sampling,
    so nothing of the earlier run can be mistaken for this one's if it stops.
    """
    old = _read_json(final_record_path(final_path)) or {}
    old_grid = old.get("grid")
    for path in (final_path, final_record_path(final_path), grid, old_grid):
        if path and os.path.isfile(path):
            os.remove(path)
    if os.path.isdir(parts_dir):
        shutil.rmtree(parts_dir)


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
                    return (
                        f"cannot resume: {record_path} is unreadable; delete {parts_dir} (or pass --overwrite True) "
                        "to start over"
                    )
            error = _record_mismatch(parts_dir, old, record)
            if error:
                return error
        elif finished_ranges(parts_dir):
            return (
                f"cannot resume: {parts_dir} holds sample parts but no run.json; delete it (or pass --overwrite True) "
                "to start over"
            )
        remove_temporary_files(parts_dir)
    os.makedirs(parts_dir, exist_ok=True)
    if not os.path.exists(record_path):
        text = json.dumps(record, indent=2, sort_keys=True)
        atomic_write(record_path, lambda f: f.write(text.encode()))
    return None


def _join_parts(parts_dir, num_samples, first=0):
    """
    Read the parts and return the lists of arrays of the whole run (indices first .. num_samples - 1), checking
    that every index is there once.
    """
    ranges = finished_ranges(parts_dir)
    expected = first
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


def run_sampling(
    *, script, args, out_dir, image_shape, sample_batch, record, comm=None, write_grid=None, device=None
):
    """
    Sample indices 0 .. args.num_samples - 1 with all ranks, resumably, and write the final .npz and its record.
    The caller holds the folder's lock (acquire_run_lock) and has run check_outputs.

    :param sample_batch: sample_batch(start, end, generators) -> list of numpy arrays with end - start rows
                         each (arr_0, arr_1, ... of the output), generators being the samples' own generators.
    :param record: run_record(...) of this run (needed on rank 0 only), checked against the work folder's on
                   resumption and kept in the final record.
    :param write_grid: write_grid(path, arrays) writes the --grid image from the output arrays and returns what it
                       shows, for the log; default: a grid of the first samples.
    :param device: the device the samples are computed on, for the final record.
    :return: the path of the final .npz (on every rank).
    """
    comm = comm if comm is not None else mpi_comm()
    stop_after = _stop_after()
    plan = plan_batches(args, out_dir, image_shape, record, comm)
    sample_missing_batches(plan, args, sample_batch, comm, stop_after)
    error = None
    if comm.rank == 0:
        try:
            arrays = _join_parts(plan.parts_dir, plan.last, plan.first)
        except RuntimeError as exc:
            error = f"{exc}; delete {plan.parts_dir} and rerun"
        else:
            write_final_samples(plan, arrays, script, args, record, device, comm.size)
            if plan.grid:
                error = draw_run_grid(plan, arrays, write_grid)
    _all_ok(comm, error)
    comm.Barrier()
    return plan.final_path


@dataclass(frozen=True)
class SamplingPlan:
    """
    Where a run's samples go and which batches are left: `done` the finished (start, end) parts, `mine` the
    batches this rank samples.
    """

    out_dir: str
    shard: object
    first: int
    last: int
    final_path: str
    parts_dir: str
    grid: str
    done: list
    todo: list
    mine: list

    @property
    def total(self):
        return self.last - self.first

    @property
    def done_count(self):
        return sum(end - start for start, end in self.done)


def plan_batches(args, out_dir, image_shape, record, comm):
    """
    Prepare the work folder (rank 0: --overwrite, a stale grid, resumption) and plan the batches left, which
    every rank takes from rank 0's listing so that all of them agree on who samples what. :return: SamplingPlan.
    """
    shard = parse_shard(getattr(args, "shard", ""))
    first, last = shard_range(args.num_samples, args.batch_size, shard)
    final_path, parts_dir = output_paths(out_dir, args.num_samples, image_shape, shard)
    # Shards share one output folder: the grid comes with the merge, not from each shard.
    grid = grid_path(args.grid, out_dir) if not shard else ""

    error = None
    if comm.rank == 0:
        if getattr(args, "overwrite", False):
            _remove_earlier_outputs(final_path, parts_dir, grid)
        elif grid and os.path.isfile(grid):
            os.remove(grid)  # it would show other samples than the ones this run makes
        error = _prepare_work_folder(parts_dir, record)
    _all_ok(comm, error)
    done = comm.bcast(finished_ranges(parts_dir) if comm.rank == 0 else None, root=0)
    todo = missing_batches(last, done, args.batch_size, first)
    plan = SamplingPlan(
        out_dir, shard, first, last, final_path, parts_dir, grid, done, todo, todo[comm.rank :: comm.size]
    )
    if comm.rank == 0:
        if shard:
            logger.log(f"shard {shard[0]}/{shard[1]}: samples {first} .. {last - 1} of {args.num_samples}")
            if args.grid:
                logger.log("no --grid for a shard: scripts/merge_shards.py --grid draws it from the merged samples")
        if done:
            logger.log(f"resuming: {plan.done_count} of {plan.total} samples already in {parts_dir}")
        logger.log(f"sampling {plan.total - plan.done_count} images in {len(todo)} batches on {comm.size} rank(s)")
    return plan


def sample_missing_batches(plan, args, sample_batch, comm, stop_after=None):
    """
    Sample this rank's batches of the plan into part files, each on its samples' own streams, with one bar on
    rank 0 over the run's samples; stop after `stop_after` batches (the tests' $STOP_AFTER_ENV). Returns when
    every rank is done.
    """
    progress = tqdm(
        total=plan.total,
        initial=plan.done_count,
        unit="sample",
        desc="sampling",
        disable=comm.rank != 0,
        dynamic_ncols=True,
    )
    for batch_number, (start, end) in enumerate(plan.mine):
        generators = [sample_generator(args.seed, i) for i in range(start, end)]
        with batch_streams(args.seed, range(start, end)):
            arrays = sample_batch(start, end, generators)
        save_npz_atomic(os.path.join(plan.parts_dir, part_name(start, end)), arrays)
        if comm.rank == 0:
            # The parts on disk count the other ranks' work too.
            progress.update(sum(e - s for s, e in finished_ranges(plan.parts_dir)) - progress.n)
        if stop_after is not None and batch_number + 1 >= stop_after and batch_number + 1 < len(plan.mine):
            progress.close()
            _stop(stop_after, plan.out_dir)
    comm.Barrier()
    if comm.rank == 0:
        progress.update(plan.total - progress.n)
    progress.close()


def _stop(stop_after, out_dir):
    logger.log(
        f"stopping after {stop_after} batches ({STOP_AFTER_ENV} is set); rerun with --out_dir {out_dir} to resume"
    )
    raise SystemExit(STOP_EXIT_CODE)


def write_final_samples(plan, arrays, script, args, record, device, ranks):
    """
    Rank 0: the final record, then the final .npz (a shard's with its sample_range); the parts go.
    """
    # The record first: a run stopped between the two leaves its parts, so the rerun just joins them.
    summary = final_record(script, args, record, plan.final_path, plan.grid, device, ranks)
    write_json_atomic(final_record_path(plan.final_path), summary)
    if plan.shard:
        named = {f"arr_{k}": a for k, a in enumerate(arrays)}
        save_npz_atomic(plan.final_path, dict(named, sample_range=np.array([plan.first, plan.last])))
    else:
        save_npz_atomic(plan.final_path, arrays)
    shutil.rmtree(plan.parts_dir)
    logger.log(f"saving to {plan.final_path}")


def draw_run_grid(plan, arrays, write_grid):
    """
    Rank 0: draw the --grid image from the finished samples. :return: an error message or None.
    """
    try:
        logger.log(f"grid of {_draw_grid(plan.grid, arrays, write_grid, plan.final_path)} in {plan.grid}")
    except UsageError as exc:
        return str(exc)
    return None


def final_record(script, args, record, final_path, grid, device, ranks):
    """
    What is kept beside a finished run's .npz: every flag as given, the seed, the record that identifies the
    samples (checkpoint digests included) and what they were made with.
    """
    return {
        "complete": True,
        "script": script,
        "npz": os.path.basename(final_path),
        "num_samples": args.num_samples,
        "seed": args.seed,
        "flags": {k: v for k, v in sorted(vars(args).items())},
        "record": record,
        "grid": os.path.abspath(grid) if grid else None,
        "environment": environment(device=device, ranks=ranks),
    }


def merge_shards(folder):
    """
    Join the shard files samples_{N}x{H}x{W}x{C}_shard{i}of{n}.npz in `folder` into samples_{N}x{H}x{W}x{C}.npz
    (atomically), the file one run of the whole row writes; the shard files stay. :return: the merged path.
    """
    pattern = re.compile(r"samples_(\d+(?:x\d+)+)_shard(\d+)of(\d+)\.npz")
    groups = {}
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        match = pattern.fullmatch(name)
        if match:
            groups.setdefault((match.group(1), int(match.group(3))), {})[int(match.group(2))] = name
    if not groups:
        raise UsageError(f"no shard files (samples_NxHxWxC_shardIofN.npz) in {folder}")
    if len(groups) > 1:
        kinds = ", ".join(f"samples_{shape}_shard*of{n}" for shape, n in sorted(groups))
        raise UsageError(f"{folder} holds shards of more than one run ({kinds}); keep one run's shards per folder")
    (shape, count), names = next(iter(groups.items()))
    missing = [i for i in range(count) if i not in names]
    if missing:
        raise UsageError(
            f"shard(s) {', '.join(f'{i}/{count}' for i in missing)} of samples_{shape} are not finished in "
            f"{folder}; run them (--shard i/{count}) and merge again"
        )
    num_samples = int(shape.split("x")[0])
    columns, expected = None, 0
    for index in range(count):
        path = os.path.join(folder, names[index])
        with np.load(path) as data:
            start, end = (int(v) for v in data["sample_range"])
            arrays = [data[f"arr_{k}"] for k in range(len(data.files) - 1)]
        if start != expected or any(len(a) != end - start for a in arrays):
            raise UsageError(
                f"{names[index]} holds samples {start} .. {end - 1}, but the shards before it end at "
                f"{expected}: the shards were run with different --batch_size; rerun them with one"
            )
        expected = end
        if columns is None:
            columns = [[] for _ in arrays]
        if len(arrays) != len(columns):
            raise UsageError(f"{names[index]} holds {len(arrays)} arrays, the first shard {len(columns)}")
        for column, array in zip(columns, arrays):
            column.append(array)
    if expected != num_samples:
        raise UsageError(f"the shards of samples_{shape} end at sample {expected}, expected {num_samples}")
    final = os.path.join(folder, f"samples_{shape}.npz")
    save_npz_atomic(final, [np.concatenate(column) for column in columns])
    return final

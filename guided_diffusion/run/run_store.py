"""
The resumable run store of the sampling scripts: the split of the work over MPI ranks, one file per finished
batch, and the final .npz.

The output samples_{N}x{H}x{W}x{C}.npz gets a work folder next to it, samples_{N}x{H}x{W}x{C}_parts/, holding
run.json (the flags that shape the samples) and one .npz per finished batch, named by the half-open range of
sample indices it holds, e.g. 000000016-000000032.npz. Each part is written to a temporary file and renamed, so a
part either exists complete or not at all. A run lists the finished ranges, cuts the missing indices into
batches of --batch_size and deals them to the ranks round-robin; rerunning an interrupted command (with any batch
size or number of ranks) therefore only samples what is missing. A resumed run first reads every part back (the
zip's CRC-32s find a truncated file or a flipped bit) and sets a damaged one aside as *.bad, so that its samples
are sampled again. When every index is present, rank 0 checks the free disk space and streams the parts into the
final .npz (atomically, in the memory of a chunk: npz_stream.join_npz), then keeps the run's record beside it
(samples_{N}x{H}x{W}x{C}.json: every flag, the seed, the checkpoints' digests, git commit, torch version, device
and rank count) and removes the work folder; in this order a run killed at any point leaves its parts or its
recorded samples, and the temporary .npz of a killed final write is removed by the next run. Rerunning a finished
command finds that record and stops at once (--overwrite True samples again). A full disk stops the run with one
line naming the file; the finished parts stay, and the same command resumes.

Checkpoints and input files are named in the records by path and SHA-256 (file_digest.py), so a resumed run
cannot mix samples of two models whose files share a name and size.

A run holds a lock on its output folder (.run.lock, an flock the kernel drops when the process dies), taken by
rank 0, so a second job on the same folder stops at start and names the holder instead of racing on the parts.

With --shard i/n a run samples only the i-th of n contiguous slices of the row's batches (so its batches are the
whole run's batches), into samples_{N}x{H}x{W}x{C}_shard{i}of{n}.npz with its own work folder; each shard is an
independent, resumable job, and merge_shards joins the n shard files into the single .npz one run would write.
"""

import copy
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
    remove_stale_temporary_files,
    remove_temporary_files,
    save_npz_atomic,
    unwritable_reason,
    write_json_atomic,
)
from ..common.errors import UsageError
from ..common.file_digest import file_record
from .image_output import GRID_MAX_IMAGES, first_samples, save_grid
from ..common.launch_env import comm
from ..common.npz_stream import NpzReadError, join_npz, npz_heads, npz_layout, verify_npz
from ..common.random_streams import batch_streams, sample_generator
from .sampling_cost import measure_batch, summarize_parts, write_batch_cost
from .run_info import environment

# Set to a positive integer k, a run stops (exit status 3) after each rank has finished k batches: an interrupted
# run on demand, for testing resumption.
STOP_AFTER_ENV = "GUIDED_DIFFUSION_SAMPLE_STOP_AFTER"
STOP_EXIT_CODE = 3

# Flags that do not change the samples, so a resumed run may change them.
FLAGS_FREE_ON_RESUME = ("batch_size", "grid", "out_dir", "overwrite")

LOCK_NAME = ".run.lock"


class DiskFullError(Exception):
    """
    A write failed for want of space (ENOSPC, or a quota): the message names the file and says the finished parts
    are safe and how to resume. Raised on the rank that hit it, which says so and stops the job.
    """


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


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
        parts_dir = final_path[: -len(".npz")] + "_parts"
        parts_record = _read_json(os.path.join(parts_dir, "run.json"))
        if parts_record and not _record_mismatch(parts_dir, parts_record, record):
            # Stopped between the final .npz and its record: the parts are still there, the join is redone.
            return None
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
        arrays = _output_heads(final_path)
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


def _output_heads(path):
    """
    The first rows of each array of a run's .npz, all a --grid draws (first_samples; the scripts' own grids take
    fewer), without loading the samples.
    """
    return npz_heads(path, GRID_MAX_IMAGES)


def _part_problem(path, count, image_shape, verify):
    """
    (what is wrong with a part of `count` samples, None) or (None, its layout). With verify=True every byte is
    read, so that the zip's CRC-32s find a flipped bit in the samples too.
    """
    try:
        layout = verify_npz(path) if verify else npz_layout(path)
    except NpzReadError as exc:
        return exc.reason, None
    keys = [key for key, _, _ in layout]
    if not keys or keys != [f"arr_{k}" for k in range(len(keys))]:
        return f"it holds the arrays {keys or 'none'}, expected arr_0, arr_1, ...", None
    for key, shape, _ in layout:
        if not shape or shape[0] != count:
            return f"'{key}' has shape {shape}, expected {count} rows", None
    _, shape, dtype = layout[0]
    if shape[1:] != tuple(image_shape) or dtype != np.uint8:
        return f"'arr_0' holds {dtype} of shape {shape}, expected uint8 images of shape {(count, *image_shape)}", None
    return None, layout


def _signature(layout):
    return tuple((key, shape[1:], dtype.str) for key, shape, dtype in layout)


def _set_aside(path, reason):
    """
    Rename a damaged part to *.bad (out of the run's listing, kept for a look) and say so in one line.
    """
    os.replace(path, path + ".bad")
    return f"set aside the damaged sample part {path} as {os.path.basename(path)}.bad ({reason})"


def check_parts(parts_dir, ranges, image_shape, verify):
    """
    Rank 0: check the part files of `ranges` (readable, right shapes and dtype, and all alike: the layout most of
    them share wins) and set the damaged ones aside.

    :return: ({range: layout} of the good parts, [one line per part set aside]).
    """
    layouts, notes = {}, []
    for start, end in ranges:
        path = os.path.join(parts_dir, part_name(start, end))
        problem, layout = _part_problem(path, end - start, image_shape, verify)
        if problem:
            notes.append(_set_aside(path, problem))
        else:
            layouts[(start, end)] = layout
    signatures = [_signature(layout) for layout in layouts.values()]
    if signatures:
        usual = max(set(signatures), key=signatures.count)
        for (start, end), layout in list(layouts.items()):
            if _signature(layout) != usual:
                found = ", ".join(f"{k} {d} x {s}" for k, s, d in _signature(layout))
                path = os.path.join(parts_dir, part_name(start, end))
                notes.append(_set_aside(path, f"its arrays ({found}) differ from the other parts'"))
                del layouts[(start, end)]
    return layouts, notes


def _format_bytes(count):
    return f"{count} bytes ({count / 2**30:.2f} GiB)"


def check_free_space(folder, needed, what, kept):
    """
    None when `folder` has `needed` bytes free, else one line naming the folder, the bytes needed and free and
    what is kept (the inputs stay in place).
    """
    free = shutil.disk_usage(folder).free
    if free >= needed:
        return None
    return (
        f"not enough free disk space in {folder} to write {what}: it needs {_format_bytes(needed)}, "
        f"{_format_bytes(free)} are free. {kept}"
    )


def _resume_hint(args, out_dir):
    if getattr(args, "out_dir", ""):
        return "rerun the same command to resume"
    return f"rerun the same command with --out_dir {out_dir} to resume"


def disk_full_message(path, plan, args):
    return (
        f"cannot write {path}: no space left on device. The finished parts in {plan.parts_dir} are safe: free some "
        f"space and {_resume_hint(args, plan.out_dir)}"
    )


def join_parts(plan, image_shape, args):
    """
    Rank 0: stream the parts of the whole run (indices plan.first .. plan.last - 1, each there once) into the final
    .npz, atomically, in the memory of one chunk; a shard's file also gets its sample_range. The parts stay.

    :return: None, or one line saying what went wrong (the parts are kept; a damaged one is set aside to be sampled
             again by the next run).
    """
    parts_dir = plan.parts_dir
    ranges = finished_ranges(parts_dir)
    expected = plan.first
    for start, end in ranges:
        if start != expected:
            kind = "overlap" if start < expected else "gap"
            return f"sample parts in {parts_dir} {kind} at index {min(start, expected)}; delete {parts_dir} and rerun"
        expected = end
    if expected != plan.last:
        return (
            f"sample parts in {parts_dir} end at index {expected}, expected {plan.last}; delete {parts_dir} and rerun"
        )
    again = f"{_resume_hint(args, plan.out_dir).replace('to resume', 'to sample it again')}"
    layouts, notes = check_parts(parts_dir, ranges, image_shape, verify=False)
    if notes:
        return f"{notes[0]}; {again}"
    paths = [os.path.join(parts_dir, part_name(start, end)) for start, end in ranges]
    needed = sum(os.path.getsize(path) for path in paths)
    error = check_free_space(
        os.path.dirname(os.path.abspath(plan.final_path)), needed, os.path.basename(plan.final_path),
        f"The finished parts are kept in {parts_dir}: free some space and {_resume_hint(args, plan.out_dir)}",
    )
    if error:
        return error
    keys = [key for key, _, _ in layouts[ranges[0]]]
    extra = {"sample_range": np.array([plan.first, plan.last])} if plan.shard else None
    sources = [(path, layouts[r]) for path, r in zip(paths, ranges)]
    try:
        join_npz(plan.final_path, sources, keys, extra)
    except NpzReadError as exc:
        return f"{_set_aside(exc.path, exc.reason)}; {again}"
    except OSError as exc:
        if exc.errno in DISK_FULL_ERRNOS:
            return disk_full_message(plan.final_path, plan, args)
        raise
    return None


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
    sample_missing_batches(plan, args, sample_batch, comm, stop_after, device)
    error = None
    if comm.rank == 0:
        error = join_parts(plan, image_shape, args)
        if error is None:
            error = write_final_record(plan, script, args, record, device, comm.size)
        if error is None and plan.grid:
            error = draw_run_grid(plan, _output_heads(plan.final_path), write_grid)
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
        if error is None:
            _clear_earlier_attempts(final_path, parts_dir, image_shape)
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
        warning = _disk_space_warning(plan, image_shape)
        if warning:
            logger.log(warning)
    return plan


def _disk_space_warning(plan, image_shape):
    """
    A warning when the output folder lacks the space the run will take: the missing parts, then the final .npz
    beside all of them (the images alone; labels add 8 bytes a sample). Only a warning: space may be freed while
    it samples, and the join checks again.
    """
    image_bytes = int(np.prod(image_shape))
    needed = (plan.total - plan.done_count) * image_bytes + plan.total * image_bytes
    free = shutil.disk_usage(plan.out_dir).free
    if free >= needed:
        return None
    return (
        f"warning: {plan.out_dir} has {_format_bytes(free)} free, but this run needs about {_format_bytes(needed)} "
        f"(the parts, then the final .npz beside them); free some space before it ends"
    )


def _clear_earlier_attempts(final_path, parts_dir, image_shape):
    """
    Rank 0, holding the folder's lock, before sampling: remove what a killed final write left (its temporary
    .npz), and check the parts of an earlier attempt, setting damaged ones aside so that they are sampled again.
    """
    names = {os.path.basename(final_path), os.path.basename(final_record_path(final_path))}
    for path in remove_stale_temporary_files(os.path.dirname(final_path) or ".", names):
        logger.log(f"removed {path}, left by a run killed while it wrote its final samples")
    ranges = finished_ranges(parts_dir)
    if ranges:
        for note in check_parts(parts_dir, ranges, image_shape, verify=True)[1]:
            logger.log(f"{note}; its samples are sampled again")


def _save_part(path, arrays, plan, args):
    try:
        save_npz_atomic(path, arrays)
    except OSError as exc:
        if exc.errno in DISK_FULL_ERRNOS:
            raise DiskFullError(disk_full_message(path, plan, args)) from None
        raise


def sample_missing_batches(plan, args, sample_batch, comm, stop_after=None, device=None):
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
        with batch_streams(args.seed, range(start, end)), measure_batch(end - start) as cost:
            arrays = sample_batch(start, end, generators)
        # The cost first: a part never lacks it unless its run was stopped in between.
        write_batch_cost(plan.parts_dir, start, end, cost, device)
        _save_part(os.path.join(plan.parts_dir, part_name(start, end)), arrays, plan, args)
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


def write_final_record(plan, script, args, record, device, ranks):
    """
    Rank 0, once the final .npz is in place: its record, then the parts go. In this order a run killed at any
    point leaves either the parts (the next run joins them again) or the finished, recorded samples, and never a
    record of samples that are not there. :return: None or one line on a full disk.
    """
    cost = summarize_parts(plan.parts_dir, finished_ranges(plan.parts_dir))
    summary = final_record(script, args, record, plan.final_path, plan.grid, device, ranks, cost)
    path = final_record_path(plan.final_path)
    try:
        write_json_atomic(path, summary)
    except OSError as exc:
        if exc.errno in DISK_FULL_ERRNOS:
            return disk_full_message(path, plan, args)
        raise
    shutil.rmtree(plan.parts_dir)
    logger.log(f"saving to {plan.final_path}")
    return None


def draw_run_grid(plan, arrays, write_grid):
    """
    Rank 0: draw the --grid image from the finished samples. :return: an error message or None.
    """
    try:
        logger.log(f"grid of {_draw_grid(plan.grid, arrays, write_grid, plan.final_path)} in {plan.grid}")
    except UsageError as exc:
        return str(exc)
    return None


def final_record(script, args, record, final_path, grid, device, ranks, cost=None):
    """
    What is kept beside a finished run's .npz: every flag as given, the seed, the record that identifies the
    samples (checkpoint digests included), what they were made with and what they cost (sampling_cost.py).
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
        "cost": cost,
    }


def merge_shards(folder, grid=""):
    """
    Join the shard files samples_{N}x{H}x{W}x{C}_shard{i}of{n}.npz in `folder` into samples_{N}x{H}x{W}x{C}.npz
    (atomically, streamed in bounded memory), the file one run of the whole row writes, and write its record
    (samples_{N}x{H}x{W}x{C}.json) as that run would, from the shards' records; the shard files stay.
    :param grid: the --grid path the merge draws (for the record). :return: the merged path.
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
    sources, keys, expected = [], None, 0
    for index in range(count):
        path = os.path.join(folder, names[index])
        start, end, layout = _shard_layout(path)
        arrays = [(k, s, d) for k, s, d in layout if k != "sample_range"]
        if start != expected or any(s[0] != end - start for _, s, _ in arrays):
            raise UsageError(
                f"{names[index]} holds samples {start} .. {end - 1}, but the shards before it end at "
                f"{expected}: the shards were run with different --batch_size; rerun them with one"
            )
        expected = end
        if keys is None:
            keys, first = [k for k, _, _ in arrays], arrays
        if len(arrays) != len(keys):
            raise UsageError(f"{names[index]} holds {len(arrays)} arrays, the first shard {len(keys)}")
        if _signature(arrays) != _signature(first):
            raise UsageError(f"{names[index]} holds arrays of other shapes or types than {names[0]}")
        sources.append((path, arrays))
    if expected != num_samples:
        raise UsageError(f"the shards of samples_{shape} end at sample {expected}, expected {num_samples}")
    final = os.path.join(folder, f"samples_{shape}.npz")
    summary = _merged_record([os.path.join(folder, names[i]) for i in range(count)], final, grid)
    remove_stale_temporary_files(folder, {os.path.basename(final), os.path.basename(final_record_path(final))})
    kept = "The shard files are kept: free some space and merge again"
    error = check_free_space(folder, sum(os.path.getsize(path) for path, _ in sources), os.path.basename(final), kept)
    if error:
        raise UsageError(error)
    try:
        join_npz(final, sources, keys)
        if summary is not None:
            write_json_atomic(final_record_path(final), summary)
    except NpzReadError as exc:
        raise UsageError(f"{exc}; sample that shard again (delete it and rerun it), then merge again") from None
    except OSError as exc:
        if exc.errno in DISK_FULL_ERRNOS:
            raise UsageError(f"cannot write {exc.filename or final}: no space left on device. {kept}") from None
        raise
    return final


def _shard_layout(path):
    try:
        layout = npz_layout(path)
        with np.load(path) as data:
            start, end = (int(v) for v in data["sample_range"])
    except NpzReadError as exc:
        raise UsageError(f"{exc}; sample that shard again (delete it and rerun it), then merge again") from None
    except Exception as exc:  # noqa: BLE001 (a damaged sample_range member)
        raise UsageError(f"{path}: no readable sample_range ({exc}); is it a shard file?") from None
    return start, end, layout


def _merged_record(shard_paths, final, grid):
    """
    The record one run of the whole row would keep, from the shards' records (which must agree on every setting
    but the shard); None, with a warning, when a shard has none.
    """
    records = []
    for path in shard_paths:
        record = _read_json(final_record_path(path))
        if not record or not record.get("complete"):
            print(f"warning: {final_record_path(path)} is missing: the merged samples get no record", flush=True)
            return None
        records.append(record)

    def whole_run(record):
        flags = dict(record.get("record", {}).get("flags", {}), shard="")
        flags.pop("shard_range", None)
        return dict(record.get("record", {}), flags=flags)

    merged = whole_run(records[0])
    for path, record in zip(shard_paths[1:], records[1:]):
        diffs = record_differences(merged, whole_run(record))
        if diffs:
            raise UsageError(
                f"{os.path.basename(path)} was sampled with other settings than {os.path.basename(shard_paths[0])}: "
                f"{'; '.join(diffs)}; rerun it with the same flags"
            )
    summary = copy.deepcopy(records[0])
    summary.update(
        npz=os.path.basename(final),
        flags=dict(summary.get("flags", {}), shard="", grid=grid or ""),
        record=merged,
        grid=os.path.abspath(grid) if grid else None,
        merged_from=[
            {"npz": os.path.basename(path), "environment": record.get("environment")}
            for path, record in zip(shard_paths, records)
        ],
    )
    return summary

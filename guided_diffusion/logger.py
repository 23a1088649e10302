"""
ADM's logger: key/value diagnostics dumped as a table, CSV or JSON lines, plus leveled text messages.

Usage: `configure()` once, then `logkv`/`logkv_mean` during a step and `dumpkvs()` at its end; `log()` for text.
"""

import datetime
import json
import os
import os.path as osp
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from contextlib import contextmanager

from .common.launch_env import rank_from_env

DEBUG = 10
INFO = 20
WARN = 30
ERROR = 40
DISABLED = 50


class KVWriter:
    """An output that accepts a dict of key/values per dump."""

    def writekvs(self, kvs):
        raise NotImplementedError


class SeqWriter:
    """An output that accepts free-form text lines."""

    def writeseq(self, seq):
        raise NotImplementedError


class HumanOutputFormat(KVWriter, SeqWriter):
    """A boxed two-column table, to a stream or a text file."""

    def __init__(self, filename_or_file):
        if isinstance(filename_or_file, str):
            self.file = open(filename_or_file, "a")
            self.own_file = True
        else:
            if not hasattr(filename_or_file, "write"):
                raise TypeError(f"expected a file name or a writable stream, got {filename_or_file!r}")
            self.file = filename_or_file
            self.own_file = False

    def writekvs(self, kvs):
        rows = []
        for key, val in sorted(kvs.items(), key=lambda kv: kv[0].lower()):
            valstr = "%-8.3g" % float(val) if hasattr(val, "__float__") else str(val)
            rows.append((self._truncate(key), self._truncate(valstr)))
        if not rows:
            warnings.warn("tried to write an empty key-value dict")
            return
        keywidth = max(len(k) for k, _ in rows)
        valwidth = max(len(v) for _, v in rows)
        rule = "-" * (keywidth + valwidth + 7)
        lines = [rule]
        for k, v in rows:
            lines.append(f"| {k}{' ' * (keywidth - len(k))} | {v}{' ' * (valwidth - len(v))} |")
        lines.append(rule)
        self.file.write("\n".join(lines) + "\n")
        self.file.flush()

    @staticmethod
    def _truncate(s):
        # Long keys would make the table unreadable in a terminal.
        maxlen = 30
        return s[: maxlen - 3] + "..." if len(s) > maxlen else s

    def writeseq(self, seq):
        self.file.write(" ".join(seq) + "\n")
        self.file.flush()

    def close(self):
        if self.own_file:
            self.file.close()


class JSONOutputFormat(KVWriter):
    """One JSON object per dump."""

    def __init__(self, filename):
        self.file = open(filename, "a")

    def writekvs(self, kvs):
        out = {}
        for k, v in sorted(kvs.items()):
            # numpy and torch scalars are not JSON-serialisable.
            if hasattr(v, "dtype"):
                v = float(v)
            out[k] = v
        self.file.write(json.dumps(out) + "\n")
        self.file.flush()

    def close(self):
        self.file.close()


class CSVOutputFormat(KVWriter):
    """A CSV table; a key first seen late adds a column and the earlier rows get it empty."""

    def __init__(self, filename):
        self.filename = filename
        self.file = open(filename, "a+t")
        self.keys = []
        self.sep = ","

    def writekvs(self, kvs):
        new_keys = sorted(set(kvs.keys()) - set(self.keys))
        if new_keys:
            self.keys.extend(new_keys)
            self._rewrite_with_header()
        row = ["" if kvs.get(k) is None else str(kvs[k]) for k in self.keys]
        self.file.write(self.sep.join(row) + "\n")
        self.file.flush()

    def _rewrite_with_header(self):
        self.file.seek(0)
        old_lines = self.file.read().splitlines()
        old_rows = old_lines[1:]
        self.file.seek(0)
        self.file.truncate()
        self.file.write(self.sep.join(self.keys) + "\n")
        for line in old_rows:
            pad = len(self.keys) - (line.count(self.sep) + 1)
            self.file.write(line + self.sep * pad + "\n")
        self.file.flush()

    def close(self):
        self.file.close()


def make_output_format(format, ev_dir, log_suffix=""):
    os.makedirs(ev_dir, exist_ok=True)
    if format == "stdout":
        return HumanOutputFormat(sys.stdout)
    elif format == "log":
        return HumanOutputFormat(osp.join(ev_dir, f"log{log_suffix}.txt"))
    elif format == "json":
        return JSONOutputFormat(osp.join(ev_dir, f"progress{log_suffix}.json"))
    elif format == "csv":
        return CSVOutputFormat(osp.join(ev_dir, f"progress{log_suffix}.csv"))
    raise ValueError(f"Unknown format specified: {format!r} (expected stdout, log, json or csv)")


# ================================================================
# API
# ================================================================


def logkv(key, val):
    """
    Log a value for this iteration; a later call with the same key overwrites it.
    """
    get_current().logkv(key, val)


def logkv_mean(key, val):
    """
    Log a value for this iteration, averaged with the other values logged under the key.
    """
    get_current().logkv_mean(key, val)


def logkvs(d):
    for k, v in d.items():
        logkv(k, v)


def dumpkvs():
    """
    Write this iteration's key/values to every output and clear them.
    """
    return get_current().dumpkvs()


def getkvs():
    return get_current().name2val


def log(*args, level=INFO):
    """
    Write the arguments, space-separated, to the text outputs (stdout, log).
    """
    get_current().log(*args, level=level)


def log_to_files(*lines):
    """
    Write lines to the text log files only, not stdout: for lines already printed before the logger's folder was
    configured.
    """
    for fmt in get_current().output_formats:
        if isinstance(fmt, HumanOutputFormat) and fmt.own_file:
            fmt.writeseq([str(line) for line in lines])


def debug(*args):
    log(*args, level=DEBUG)


def info(*args):
    log(*args, level=INFO)


def warn(*args):
    log(*args, level=WARN)


def error(*args):
    log(*args, level=ERROR)


def set_level(level):
    """
    Messages below this level are dropped.
    """
    get_current().set_level(level)


def set_comm(comm):
    get_current().set_comm(comm)


def get_dir():
    """
    The directory logs go to, or None when there are no outputs.
    """
    return get_current().get_dir()


record_tabular = logkv
dump_tabular = dumpkvs


@contextmanager
def profile_kv(scopename):
    """
    Add the seconds spent in the block to the key "wait_<scopename>".
    """
    logkey = "wait_" + scopename
    tstart = time.time()
    try:
        yield
    finally:
        get_current().name2val[logkey] += time.time() - tstart


def profile(n):
    """
    Decorator form of profile_kv.
    """

    def decorator_with_name(func):
        def func_wrapper(*args, **kwargs):
            with profile_kv(n):
                return func(*args, **kwargs)

        return func_wrapper

    return decorator_with_name


# ================================================================
# Backend
# ================================================================


def get_current():
    if Logger.CURRENT is None:
        _configure_default_logger()
    return Logger.CURRENT


class Logger:
    # A logger writing to stdout only, used until configure() is called.
    DEFAULT = None
    CURRENT = None

    def __init__(self, dir, output_formats, comm=None):
        self.name2val = defaultdict(float)
        self.name2cnt = defaultdict(int)
        self.level = INFO
        self.dir = dir
        self.output_formats = output_formats
        self.comm = comm

    def logkv(self, key, val):
        self.name2val[key] = val

    def logkv_mean(self, key, val):
        oldval, cnt = self.name2val[key], self.name2cnt[key]
        self.name2val[key] = oldval * cnt / (cnt + 1) + val / (cnt + 1)
        self.name2cnt[key] = cnt + 1

    def dumpkvs(self):
        if self.comm is None:
            d = self.name2val
        else:
            d = mpi_weighted_mean(
                self.comm,
                {name: (val, self.name2cnt.get(name, 1)) for name, val in self.name2val.items()},
            )
            if self.comm.rank != 0:
                # Only rank 0 receives the averages; the others still write a row so their
                # outputs stay in step.
                d["dummy"] = 1
        out = d.copy()
        for fmt in self.output_formats:
            if isinstance(fmt, KVWriter):
                fmt.writekvs(d)
        self.name2val.clear()
        self.name2cnt.clear()
        return out

    def log(self, *args, level=INFO):
        if self.level <= level:
            for fmt in self.output_formats:
                if isinstance(fmt, SeqWriter):
                    fmt.writeseq(map(str, args))

    def set_level(self, level):
        self.level = level

    def set_comm(self, comm):
        self.comm = comm

    def get_dir(self):
        return self.dir

    def close(self):
        for fmt in self.output_formats:
            fmt.close()


def get_rank_without_mpi_import():
    # Checking the launcher's environment (mpiexec, torchrun or srun) avoids initialising MPI just to name log
    # files.

    return rank_from_env()


def mpi_weighted_mean(comm, local_name2valcount):
    """
    Average values over ranks, weighting each by its count.

    local_name2valcount: {name: (value, count)} on this rank.
    Returns {name: mean} on rank 0 and {} elsewhere.
    """
    all_name2valcount = comm.gather(local_name2valcount)
    if comm.rank != 0:
        return {}
    name2sum = defaultdict(float)
    name2count = defaultdict(float)
    for n2vc in all_name2valcount:
        for name, (val, count) in n2vc.items():
            try:
                val = float(val)
            except (TypeError, ValueError):
                warnings.warn(f"WARNING: tried to compute mean on non-float {name}={val!r}")
            else:
                name2sum[name] += val * count
                name2count[name] += count
    return {name: name2sum[name] / name2count[name] for name in name2sum}


def configure(dir=None, format_strs=None, comm=None, log_suffix=""):
    """
    Send logs to `dir` (default: $OPENAI_LOGDIR, else a fresh folder under the temp dir).

    Rank 0 writes $OPENAI_LOG_FORMAT (default stdout,log,csv); other ranks write
    $OPENAI_LOG_FORMAT_MPI (default log) with a "-rankNNN" suffix.
    """
    if dir is None:
        dir = os.getenv("OPENAI_LOGDIR")
    if dir is None:
        dir = osp.join(
            tempfile.gettempdir(),
            datetime.datetime.now().strftime("openai-%Y-%m-%d-%H-%M-%S-%f"),
        )
    if not isinstance(dir, str):
        raise TypeError(f"log dir must be a string, got {dir!r}")
    dir = osp.expanduser(dir)
    os.makedirs(dir, exist_ok=True)

    rank = get_rank_without_mpi_import()
    if rank > 0:
        log_suffix = log_suffix + f"-rank{rank:03d}"

    if format_strs is None:
        if rank == 0:
            format_strs = os.getenv("OPENAI_LOG_FORMAT", "stdout,log,csv").split(",")
        else:
            format_strs = os.getenv("OPENAI_LOG_FORMAT_MPI", "log").split(",")
    format_strs = [f for f in format_strs if f]
    output_formats = [make_output_format(f, dir, log_suffix) for f in format_strs]

    Logger.CURRENT = Logger(dir=dir, output_formats=output_formats, comm=comm)
    if output_formats:
        log(f"Logging to {dir}")


def _configure_default_logger():
    configure()
    Logger.DEFAULT = Logger.CURRENT


def reset():
    if Logger.CURRENT is not Logger.DEFAULT:
        Logger.CURRENT.close()
        Logger.CURRENT = Logger.DEFAULT
        log("Reset logger")


@contextmanager
def scoped_configure(dir=None, format_strs=None, comm=None):
    """
    Log to a different place inside the block, then restore the previous logger.
    """
    prevlogger = Logger.CURRENT
    configure(dir=dir, format_strs=format_strs, comm=comm)
    try:
        yield
    finally:
        Logger.CURRENT.close()
        Logger.CURRENT = prevlogger

"""
Running table rows for scripts/reproduce.py. One run of a row (once per --seeds seed) goes through these steps:

    prepare_run      the sampler command and flags (sampler_launch.py), and every file the row needs (checkpoints,
                     reference batch or images to restore, feature network), all missing ones in one message
                     before any sampling
    run_key          what the figures depend on: the sampler's flags and inputs by content, the reference batch,
                     the feature network and the evaluator's scoring version
    sample_row       the samples, unless the folder already holds those of the same settings (a stopped run resumes)
    evaluate_row     the figures: the evaluator's, or PSNR/SSIM/FID/KID of an inverse-problem row's reconstructions
    metrics_record   results/<row>[/seed<k>]/metrics.json, whose key makes the next call skip the row

run_rows runs the rows of one call and says what became of each, for the results table (results_table.py).
"""

import argparse
import os
import time
from dataclasses import dataclass
from typing import Any, List, Optional

import numpy as np

from evaluations.device import default_device
from evaluations.evaluator import CACHE_ENV, Evaluator, SCORING_VERSION, default_cache_dir
from evaluations.feature_nets import load_feature_net
from evaluations.npz_io import BatchFormatError
from evaluations.restoration import restoration_metrics

from ..common.assets import fetch_command, fetch_hint
from ..common.atomic_io import unwritable_reason, write_json_atomic
from ..common.errors import REPO_ROOT
from ..common.file_digest import file_record
from ..run.run_info import environment
from ..run.run_store import (
    FLAGS_FREE_ON_RESUME,
    STOP_AFTER_ENV,
    STOP_EXIT_CODE,
    final_record_path,
    output_paths,
    record_differences,
    run_record,
)
from .sampler_launch import CHECKPOINT_FLAGS, run_streaming, sampler_command, sampler_env
from .table_rows import ReproduceError, how_to_get, read_json

# Flags that do not change the samples, left out of the records compared (as in the samplers' resumable runs).
FREE_FLAGS = FLAGS_FREE_ON_RESUME


def log(msg):
    print(msg, flush=True)


# --- pre-flight -------------------------------------------------------------------------------------------------


class FeatureNets:
    """
    The evaluator's feature networks of one reproduce.py call by spec, each loaded once for all its rows.
    """

    def __init__(self, device=None, inception_path=None):
        self.device = device
        self.inception_path = inception_path
        self._nets = {}

    def get(self, spec):
        if spec not in self._nets:
            device = self.device or default_device()
            self._nets[spec] = load_feature_net(spec, device=device, inception_path=self.inception_path)
        return self._nets[spec]


@dataclass
class RowRun:
    """
    One sampling and evaluation of a row, with everything it needs found.
    """

    row: Any
    command: List[str]
    args: argparse.Namespace
    out_dir: str
    ref_batch: Optional[str]  # None for an inverse-problem row: its ground truth comes with its samples
    feature_net: str
    net: Any


def reference_batch(row, opts, args, missing):
    """
    The reference batch the row is scored against (None for an inverse-problem row, whose images to restore are
    checked instead); missing files are noted in `missing`.
    """
    if row.restoration:
        # Scored against the ground truth the sampler saves beside its reconstructions (arr_2).
        if args.num_samples <= 0:
            raise ReproduceError(f"row {row.name}: give --num_samples (the number of images to restore)")
        if not os.path.exists(args.data_dir):
            missing.append(
                f"the images to restore are not at --data_dir {args.data_dir}: put them there (a folder of images "
                "or an npz; see docs/inverse.md) or pass --data_dir after `--`"
            )
        return None
    ref_batch = os.path.abspath(opts.ref_batch) if opts.ref_batch else os.path.join(REPO_ROOT, row.meta["ref_batch"])
    if not os.path.isfile(ref_batch):
        missing.append(
            f"reference batch {os.path.basename(ref_batch)} not found at {ref_batch}. "
            f"{how_to_get(row, 'ref_batch_source')}put it there, or pass --ref_batch PATH{fetch_hint(ref_batch)}."
        )
    return ref_batch


def feature_net(spec, nets, missing):
    """
    The loaded feature network, or None with the reason noted in `missing`.
    """
    try:
        return nets.get(spec)
    except FileNotFoundError as exc:
        missing.append(str(exc))
    except (ImportError, AttributeError, TypeError, ValueError) as exc:
        missing.append(f"feature network {spec!r} cannot be loaded: {exc}")
    return None


def raise_if_missing(row, missing):
    if len(missing) == 1:
        raise ReproduceError(f"row {row.name}: {missing[0]}")
    if missing:
        raise ReproduceError(
            f"row {row.name}: {len(missing)} problems:" + "".join(f"\n  - {m}" for m in missing)
            + f"\n  (`{fetch_command()} {row.name}` fetches the released files the row needs)"
        )


def prepare_run(row, opts, extra, nets, subfolder=""):
    """
    The row's sampler command and inputs, or a ReproduceError naming every missing file of the row at once.
    """
    missing = []
    command, args, out_dir = sampler_command(row, opts, extra, missing, subfolder)
    ref_batch = reference_batch(row, opts, args, missing)
    spec = opts.feature_net or row.feature_net
    net = feature_net(spec, nets, missing)
    raise_if_missing(row, missing)
    return RowRun(row, command, args, out_dir, ref_batch, spec, net)


def output_problem(opts, rows):
    """
    Why reproduce.py could not write its outputs (the results folder, the evaluator's activation cache), or None;
    checked before any row runs.
    """
    reason = unwritable_reason(opts.results)
    if reason:
        return f"--results {reason}; pass a results folder you can write to"
    if any(not row.restoration for row in rows):
        reason = unwritable_reason(default_cache_dir())
        if reason:
            where = f"${CACHE_ENV}" if os.environ.get(CACHE_ENV) else f"the activation cache (set by ${CACHE_ENV})"
            return f"{where} {reason}; set ${CACHE_ENV} to a folder you can write to"
    return None


# --- the record that makes a row done -----------------------------------------------------------------------------


def scoring_version():
    return SCORING_VERSION


def run_key(run):
    """
    (the sampler's record of its flags and inputs, the key of the metrics record). Checkpoints and input files
    count by content, as the sampler's own record names them.
    """
    checkpoints = [f for f in CHECKPOINT_FLAGS if getattr(run.args, f, "")]
    if run.row.restoration:
        checkpoints.append("data_dir")
    sampling = run_record(run.row.script[:-3], run.args, checkpoint_flags=checkpoints)
    key = {
        "sampling": sampling,
        "ref_batch": file_record(run.ref_batch) if run.ref_batch else None,
        "feature_net": run.feature_net,
    }
    key["scoring"] = scoring_version()  # figures from an older way of scoring (other statistics) are redone
    return sampling, key


def metrics_record(run, key, sample_batch, results, seconds, device):
    """
    What results/<row>/metrics.json holds: the row, how it was sampled, its figures beside the published ones,
    timing, both environments and the key.
    :param seconds: (sampling seconds or None when the samples were there, evaluation seconds).
    """
    row, args = run.row, run.args
    sampler_record = read_json(final_record_path(sample_batch)) or {}
    sampling_seconds, evaluation_seconds = seconds
    return {
        "config": row.name,
        "config_path": row.path,
        # The grid point this row is (sweeps.py), or None.
        "sweep": getattr(row, "sweep", None),
        "title": row.title,
        "script": row.script,
        "command": run.command,
        "flags": {k: v for k, v in sorted(vars(args).items()) if k not in FREE_FLAGS},
        "num_samples": args.num_samples,
        "sample_batch": sample_batch,
        "ref_batch": run.ref_batch,
        "feature_net": run.feature_net,
        "metrics": {k: results.get(k) for k, _, _ in row.metrics},
        "kid_unit": results.get("kid_unit"),
        "ref_stats": results.get("ref_stats"),
        "published": row.published or None,
        "source": row.source or None,
        "timing": {
            "sampling_seconds": sampling_seconds,
            "evaluation_seconds": evaluation_seconds,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
        # Where the figures were computed, and where the samples were (git commit, torch, device, ranks).
        "environment": environment(device=device or "cpu", ranks=1),
        "sampling_environment": sampler_record.get("environment"),
        # Model evaluations and seconds per sample, measured by the sampler (sampling_cost.py).
        "cost": sampler_record.get("cost"),
        "key": key,
    }


# --- sampling and evaluating ----------------------------------------------------------------------------------


def sample_row(row, command, args, out_dir, key, device=None):
    """
    Sample unless this folder already holds the finished samples of the same settings.
    :return: (seconds spent sampling, None when the samples were there; path of the samples .npz).
    """
    final, parts = output_paths(out_dir, args.num_samples, (args.image_size, args.image_size, 3))
    record_path = os.path.join(out_dir, "samples.json")
    old = read_json(record_path)
    if old and old.get("key") == key and os.path.isfile(final):
        log(f"  samples cached: {final}")
        return None, final
    if old and old.get("key") != key:
        # What the folder holds was made with other settings (or another checkpoint): the sampler starts over
        # rather than resume or keep it.
        changed = record_differences(old.get("key") or {}, key) if isinstance(old.get("key"), dict) else []
        log(f"  {out_dir} holds samples of other settings ({'; '.join(changed) or 'an older record'}): sampling again")
        if os.path.isfile(old.get("sample_batch", "")):
            os.remove(old["sample_batch"])
        command = [*command, "--overwrite", "True"]
    write_json_atomic(record_path, {"key": key, "sample_batch": final})
    log(f"  sampling {args.num_samples} images into {out_dir}" + (" (resuming)" if os.path.isdir(parts) else ""))
    start = time.time()
    try:
        status, tail = run_streaming(command, sampler_env(device))
    except FileNotFoundError as exc:
        raise ReproduceError(f"row {row.name}: cannot run {command[0]}: {exc}") from None
    if status == STOP_EXIT_CODE:
        raise ReproduceError(
            f"row {row.name}: sampling stopped early (exit status {status}; ${STOP_AFTER_ENV} is set); "
            f"rerun the same command to resume from {parts}"
        )
    if status != 0 or not os.path.isfile(final):
        detail = next((line for line in reversed(tail) if "error" in line.lower()), tail[-1] if tail else "")
        raise ReproduceError(f"row {row.name}: {row.script} failed (exit status {status}): {detail}")
    return time.time() - start, final


def evaluate_row(row, net, opts, ref_batch, sample_batch, spec):
    """
    The row's figures: the evaluator's against the reference batch, or for an inverse-problem row PSNR, SSIM,
    FID and KID of the reconstructions (arr_0) against their ground truth (arr_2).
    """
    device = opts.device or "cpu"
    if row.restoration:
        log(f"  scoring the reconstructions against their ground truth with feature network {spec}")
        with np.load(sample_batch) as data:
            return restoration_metrics(data["arr_2"], data["arr_0"], feature_net=net, device=device)

    log(f"  evaluating against {ref_batch} with feature network {spec}")
    evaluator = Evaluator(net, device=device, batch_size=opts.batch_size, cache_dir=default_cache_dir())
    try:
        return evaluator.evaluate(ref_batch, sample_batch, log=lambda m: log("  " + m))
    except (BatchFormatError, FileNotFoundError, ValueError) as exc:
        raise ReproduceError(f"row {row.name}: evaluation failed: {exc}") from None


# --- rows -------------------------------------------------------------------------------------------------------


def run_one(row, opts, extra, nets, subfolder=""):
    """
    Sample, evaluate and record one row with one set of sampler flags. :return: (flags, metrics record, status).
    """
    run = prepare_run(row, opts, extra, nets, subfolder)
    sampling, key = run_key(run)
    metrics_path = os.path.join(run.out_dir, "metrics.json")
    old = read_json(metrics_path)
    if old and old.get("key") == key:
        log(f"  cached: {metrics_path}")
        return run.args, old, "cached"

    sampling_seconds, sample_batch = sample_row(row, run.command, run.args, run.out_dir, sampling, opts.device)
    start = time.time()
    results = evaluate_row(row, run.net, opts, run.ref_batch, sample_batch, run.feature_net)
    seconds = (sampling_seconds, time.time() - start)
    record = metrics_record(run, key, sample_batch, results, seconds, opts.device)
    write_json_atomic(metrics_path, record)
    log("  " + ", ".join(f"{label} {results.get(k)}" for k, label, _ in row.metrics))
    return run.args, record, "done"


def run_row(row, opts, extra, nets):
    """
    Sample, evaluate and record one row, once per --seeds seed if given.
    :return: (parsed sampler flags, list of metrics records, status text).
    """
    if not opts.seeds:
        args, record, status = run_one(row, opts, extra, nets)
        return args, [record], status
    records, statuses = [], []
    for seed in opts.seeds:
        log(f"  seed {seed}")
        args, record, status = run_one(row, opts, [*extra, "--seed", str(seed)], nets, subfolder=f"seed{seed}")
        records.append(record)
        statuses.append(status)
    return args, records, "cached" if set(statuses) == {"cached"} else "done"


def run_rows(rows, opts, extra):
    """
    Run the rows in order, stopping at the first error unless --keep_going.
    :return: ([(row, parsed flags or None, metrics records or None, status, layout)] for the table, names of the
        rows that failed).
    """
    nets = FeatureNets(opts.device, opts.inception_path)
    this_call, failures = [], []
    layout = "seeds" if opts.seeds else "single"
    for index, row in enumerate(rows):
        if failures and not opts.keep_going:
            this_call.append((row, None, None, "not run (stopped at an earlier error)", layout))
            continue
        log(f"[{index + 1}/{len(rows)}] {row.name}: {row.title}")
        try:
            args, records, status = run_row(row, opts, extra, nets)
            this_call.append((row, args, records, status, layout))
        except ReproduceError as exc:
            log(f"error: {exc}")
            failures.append(row.name)
            this_call.append((row, None, None, f"failed: {exc}", layout))
    return this_call, failures

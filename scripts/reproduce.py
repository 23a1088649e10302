"""
Reproduce table rows: for each config, sample with the config's script, evaluate the samples against the
reference batch, write results/<name>/metrics.json, then results/table.md and results/table.json with every result
the results folder holds.

    python scripts/reproduce.py 'adm256_*' --mpi 8 -- --batch_size 32
    python scripts/reproduce.py 'adm256_*' --launcher torchrun --nproc 8 -- --batch_size 32
    python scripts/reproduce.py 'digits16_*'

CONFIG is a config name (configs/NAME.cfg), a path, or a glob over config names. Flags after `--` go to the
sampler. Finished rows (same flags, sample count, reference batch and feature network) are not redone, and an
interrupted row resumes where it stopped. See docs/reproduce.md.
"""

import argparse
import importlib.util
import os
import signal
import sys
import time

SCRIPTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(SCRIPTS)
for folder in (REPO, SCRIPTS):
    if folder not in sys.path:
        sys.path.insert(0, folder)

from guided_diffusion.assets import fetch_command, fetch_hint  # noqa: E402
from guided_diffusion.flag_files import CONFIG_DIR  # noqa: E402
from guided_diffusion.atomic_io import unwritable_reason, write_json_atomic, write_text_atomic  # noqa: E402
from guided_diffusion.run_info import environment  # noqa: E402
from reproduce_rows import (  # noqa: E402
    FREE_FLAGS,
    ReproduceError,
    file_identity,
    how_to_get,
    resolve_checkpoint,
    run_streaming,
    read_json,
    render_table,
    select_configs,
    table_entries,
)
from guided_diffusion.run_store import (  # noqa: E402
    STOP_AFTER_ENV,
    STOP_EXIT_CODE,
    final_record_path,
    output_paths,
    record_differences,
    run_record,
)

CHECKPOINT_FLAGS = ("model_path", "classifier_path")
LAUNCHERS = ("mpiexec", "torchrun", "srun", "none")


def launch_settings(opts):
    """
    (launcher, number of ranks) from --launcher, --nproc and --mpi (an alias of --launcher mpiexec --nproc N);
    ValueError for a contradiction.
    """
    launcher, nproc, mpi = getattr(opts, "launcher", None), getattr(opts, "nproc", None), getattr(opts, "mpi", None)
    if mpi is not None:
        if launcher not in (None, "mpiexec") or nproc not in (None, mpi):
            raise ValueError(f"--mpi {mpi} means --launcher mpiexec --nproc {mpi}; give one or the other")
        launcher, nproc = "mpiexec", mpi
    if nproc is not None and nproc < 1:
        raise ValueError(f"--nproc must be at least 1, got {nproc}")
    if launcher is None:
        launcher = "mpiexec" if nproc else "none"
    if launcher == "none" and nproc not in (None, 1):
        raise ValueError(f"--launcher none runs one process; --nproc {nproc} needs mpiexec, torchrun or srun")
    if launcher != "none" and nproc is None:
        raise ValueError(f"--launcher {launcher} needs --nproc N, the number of ranks")
    return launcher, nproc


def launch_prefix(launcher, nproc):
    """
    The words before `python script.py ...` that start nproc ranks with the launcher.
    """
    if launcher in (None, "none"):
        return []
    if launcher == "mpiexec":
        return ["mpiexec", "-n", str(nproc)]
    if launcher == "torchrun":
        # torchrun as a module of this interpreter, so the ranks run the same Python; it then takes the script.
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    if launcher == "srun":
        return ["srun", "--ntasks", str(nproc)]
    raise ValueError(f"unknown launcher {launcher!r}")


def create_argparser():
    parser = argparse.ArgumentParser(
        usage="%(prog)s [options] CONFIG [CONFIG ...] [-- SAMPLER FLAGS ...]",
        description=__doc__.strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("configs", nargs="+", metavar="CONFIG", help="config names, paths or globs ('digits16_*')")
    parser.add_argument("--ref_batch", help="reference batch for every row (default: the config's ref_batch)")
    parser.add_argument("--num_samples", type=int, help="samples per row (default: the config's)")
    parser.add_argument(
        "--launcher", choices=LAUNCHERS,
        help="how to start the sampler's ranks: mpiexec -n N, torchrun --standalone --nproc_per_node N (one node), "
        "srun --ntasks N (inside a SLURM allocation), or none (one process); default mpiexec with --nproc, else none",
    )
    parser.add_argument("--nproc", type=int, help="number of sampler ranks for --launcher")
    parser.add_argument("--mpi", type=int, help="sample with `mpiexec -n MPI` (the same as --launcher mpiexec --nproc MPI)")
    parser.add_argument("--results", default=os.path.join(REPO, "results"), help="results folder")
    parser.add_argument("--feature_net", help="evaluator feature network (default: the config's)")
    parser.add_argument("--batch_size", type=int, default=64, help="evaluator images per forward pass")
    parser.add_argument(
        "--device",
        help="device of the sampler and the evaluator: cpu, cuda or cuda:N (default: cuda if available)",
    )
    parser.add_argument("--inception_path", help="Inception weights (see evaluations/README.md)")
    parser.add_argument("--model_dir", help="folder holding the checkpoints the configs name")
    parser.add_argument("--keep_going", action="store_true", help="go on with the other rows after an error")
    parser.add_argument(
        "--seeds",
        help="comma-separated sampling seeds, e.g. 0,1,2: each row is sampled and evaluated once per seed (in "
        "results/<row>/seed<k>/) and the table gives the mean and standard deviation over them",
    )
    parser.add_argument("--config_dir", default=CONFIG_DIR, help="where names and globs are looked up")
    return parser


def log(msg):
    print(msg, flush=True)


def load_script(name, _cache={}):
    if name not in _cache:
        spec = importlib.util.spec_from_file_location(f"_reproduce_{name[:-3]}", os.path.join(REPO, "scripts", name))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _cache[name] = module
    return _cache[name]


def parse_sampler_flags(row, tokens):
    parser = load_script(row.script).create_argparser()
    try:
        return parser.parse_args(tokens)
    except SystemExit:
        raise ReproduceError(f"row {row.name}: its flags do not parse with {row.script} (see the message above)")


def sampler_command(row, opts, extra, missing=None, subfolder=""):
    """
    (command, parsed flags, output folder) for sampling one row; missing checkpoints are noted in `missing`.
    """
    missing = [] if missing is None else missing
    for flag in ("out_dir",):
        if f"--{flag}" in extra:
            raise ReproduceError(f"--{flag} cannot be passed to the sampler: reproduce.py sets it (--results)")
    if any(token == "--shard" or token.startswith("--shard=") for token in extra):
        raise ReproduceError(
            "--shard cannot be passed through reproduce.py, which samples whole rows: run the shards with the "
            "sampler itself, join them with scripts/merge_shards.py and evaluate the merged .npz with "
            "evaluations/evaluator.py"
        )
    out_dir = os.path.join(os.path.abspath(opts.results), row.name, *([subfolder] if subfolder else []))
    first = parse_sampler_flags(row, ["@" + row.path, *extra])
    tokens = ["@" + row.path, *extra]
    for flag in CHECKPOINT_FLAGS:
        value = getattr(first, flag, "")
        if value:
            path = resolve_checkpoint(row, flag, value, opts, f"--{flag}" in extra, missing)
            tokens += [f"--{flag}", path]
    data_dir = getattr(first, "data_dir", "")
    if row.restoration and data_dir and not os.path.isabs(data_dir) and not os.path.exists(data_dir):
        # Configs name the shipped data relative to the repository, like the checkpoints.
        if os.path.exists(os.path.join(REPO, data_dir)):
            tokens += ["--data_dir", os.path.join(REPO, data_dir)]
    if opts.num_samples is not None:
        tokens += ["--num_samples", str(opts.num_samples)]
    tokens += ["--out_dir", out_dir]
    args = parse_sampler_flags(row, tokens)
    command = [sys.executable, os.path.join(REPO, "scripts", row.script), *tokens]
    launcher, nproc = launch_settings(opts)
    if launcher == "torchrun":
        command = command[1:]  # torchrun starts the interpreter itself
    command = [*launch_prefix(launcher, nproc), *command]
    return command, args, out_dir


def sampler_env(device, environ=None):
    """
    The environment that puts the sampler on `device`: the samplers take a GPU whenever one is visible (ADM's
    dist_util.dev()), so cpu hides them all and cuda:N shows only GPU N.
    """
    environ = os.environ if environ is None else environ
    if device == "cpu":
        return {"CUDA_VISIBLE_DEVICES": ""}
    if device and device.startswith("cuda:"):
        index = device[len("cuda:"):]
        visible = [d for d in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
        if not index.isdigit() or (visible and int(index) >= len(visible)):
            raise ReproduceError(f"--device {device!r}: no such GPU (CUDA_VISIBLE_DEVICES={','.join(visible)})")
        return {"CUDA_VISIBLE_DEVICES": visible[int(index)] if visible else index}
    return {}


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


def load_net(spec, opts, _cache={}):
    if spec not in _cache:
        from evaluations.device import default_device
        from evaluations.feature_nets import load_feature_net

        _cache[spec] = load_feature_net(spec, device=opts.device or default_device(), inception_path=opts.inception_path)
    return _cache[spec]


def run_row(row, opts, extra):
    """
    Sample, evaluate and record one row, once per --seeds seed if given.
    :return: (parsed sampler flags, list of metrics records, status text).
    """
    if not opts.seeds:
        args, record, status = run_one(row, opts, extra)
        return args, [record], status
    records, statuses = [], []
    for seed in opts.seeds:
        log(f"  seed {seed}")
        args, record, status = run_one(row, opts, [*extra, "--seed", str(seed)], subfolder=f"seed{seed}")
        records.append(record)
        statuses.append(status)
    return args, records, "cached" if set(statuses) == {"cached"} else "done"


def run_one(row, opts, extra, subfolder=""):
    """
    Sample, evaluate and record one row with one set of sampler flags. :return: (flags, metrics record, status).
    """
    # Every missing file of the row in one message, before any time goes into sampling.
    missing = []
    command, args, out_dir = sampler_command(row, opts, extra, missing, subfolder)
    if row.restoration:
        # Scored against the ground truth the sampler saves beside its reconstructions (arr_2).
        ref_batch = None
        if args.num_samples <= 0:
            raise ReproduceError(f"row {row.name}: give --num_samples (the number of images to restore)")
        if not os.path.exists(args.data_dir):
            missing.append(
                f"the images to restore are not at --data_dir {args.data_dir}: put them there (a folder of images "
                "or an npz; see docs/inverse.md) or pass --data_dir after `--`"
            )
    elif opts.ref_batch:
        ref_batch = os.path.abspath(opts.ref_batch)
    else:
        ref_batch = os.path.join(REPO, row.meta["ref_batch"])
    if ref_batch is not None and not os.path.isfile(ref_batch):
        missing.append(
            f"reference batch {os.path.basename(ref_batch)} not found at {ref_batch}. "
            f"{how_to_get(row, 'ref_batch_source')}put it there, or pass --ref_batch PATH{fetch_hint(ref_batch)}."
        )
    spec = opts.feature_net or row.feature_net
    try:
        net = load_net(spec, opts)
    except FileNotFoundError as exc:
        missing.append(str(exc))
    except (ImportError, AttributeError, TypeError, ValueError) as exc:
        missing.append(f"feature network {spec!r} cannot be loaded: {exc}")
    if len(missing) == 1:
        raise ReproduceError(f"row {row.name}: {missing[0]}")
    if missing:
        raise ReproduceError(
            f"row {row.name}: {len(missing)} problems:" + "".join(f"\n  - {m}" for m in missing)
            + f"\n  (`{fetch_command()} {row.name}` fetches the released files the row needs)"
        )

    # Checkpoints and input files by content, as the sampler's own record names them.
    checkpoints = [f for f in CHECKPOINT_FLAGS if getattr(args, f, "")]
    if row.restoration:
        checkpoints.append("data_dir")
    sampling = run_record(row.script[:-3], args, checkpoint_flags=checkpoints)
    key = {"sampling": sampling, "ref_batch": file_identity(ref_batch) if ref_batch else None, "feature_net": spec}
    key["scoring"] = scoring_version()  # figures from an older way of scoring (other statistics) are redone
    metrics_path = os.path.join(out_dir, "metrics.json")
    old = read_json(metrics_path)
    if old and old.get("key") == key:
        log(f"  cached: {metrics_path}")
        return args, old, "cached"

    sampling_seconds, sample_batch = sample_row(row, command, args, out_dir, sampling, opts.device)
    start = time.time()
    results = evaluate_row(row, net, opts, ref_batch, sample_batch, spec)
    sampler_record = read_json(final_record_path(sample_batch)) or {}
    record = {
        "config": row.name,
        "config_path": row.path,
        "title": row.title,
        "script": row.script,
        "command": command,
        "flags": {k: v for k, v in sorted(vars(args).items()) if k not in FREE_FLAGS},
        "num_samples": args.num_samples,
        "sample_batch": sample_batch,
        "ref_batch": ref_batch,
        "feature_net": spec,
        "metrics": {k: results.get(k) for k, _, _ in row.metrics},
        "ref_stats": results.get("ref_stats"),
        "published": row.published or None,
        "source": row.source or None,
        "timing": {
            "sampling_seconds": sampling_seconds,
            "evaluation_seconds": time.time() - start,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
        # Where the figures were computed, and where the samples were (git commit, torch, device, ranks).
        "environment": environment(device=opts.device or "cpu", ranks=1),
        "sampling_environment": sampler_record.get("environment"),
        "key": key,
    }
    write_json_atomic(metrics_path, record)
    log("  " + ", ".join(f"{label} {results.get(k)}" for k, label, _ in row.metrics))
    return args, record, "done"


def scoring_version():
    from evaluations.evaluator import SCORING_VERSION

    return SCORING_VERSION


def evaluate_row(row, net, opts, ref_batch, sample_batch, spec):
    """
    The row's figures: the evaluator's against the reference batch, or for an inverse-problem row PSNR, SSIM,
    FID and KID of the reconstructions (arr_0) against their ground truth (arr_2).
    """
    from evaluations.npz_io import BatchFormatError

    device = opts.device or "cpu"
    if row.restoration:
        import numpy as np

        from evaluations.restoration import restoration_metrics

        log(f"  scoring the reconstructions against their ground truth with feature network {spec}")
        with np.load(sample_batch) as data:
            return restoration_metrics(data["arr_2"], data["arr_0"], feature_net=net, device=device)
    from evaluations.evaluator import Evaluator, default_cache_dir

    log(f"  evaluating against {ref_batch} with feature network {spec}")
    evaluator = Evaluator(net, device=device, batch_size=opts.batch_size, cache_dir=default_cache_dir())
    try:
        return evaluator.evaluate(ref_batch, sample_batch, log=lambda m: log("  " + m))
    except (BatchFormatError, FileNotFoundError, ValueError) as exc:
        raise ReproduceError(f"row {row.name}: evaluation failed: {exc}") from None


def output_problem(opts, rows):
    """
    Why reproduce.py could not write its outputs (the results folder, the evaluator's activation cache), or None;
    checked before any row runs.
    """
    reason = unwritable_reason(opts.results)
    if reason:
        return f"--results {reason}; pass a results folder you can write to"
    if any(not row.restoration for row in rows):
        from evaluations.evaluator import CACHE_ENV, default_cache_dir

        reason = unwritable_reason(default_cache_dir())
        if reason:
            where = f"${CACHE_ENV}" if os.environ.get(CACHE_ENV) else f"the activation cache (set by ${CACHE_ENV})"
            return f"{where} {reason}; set ${CACHE_ENV} to a folder you can write to"
    return None


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    parser = create_argparser()
    opts = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    if opts.mpi is not None and opts.mpi < 1:
        parser.error(f"--mpi must be at least 1, got {opts.mpi}")
    try:
        launch_settings(opts)
    except ValueError as exc:
        parser.error(str(exc))
    if opts.num_samples is not None and opts.num_samples < 1:
        parser.error(f"--num_samples must be positive, got {opts.num_samples}")
    if opts.seeds is not None:
        try:
            opts.seeds = [int(seed) for seed in opts.seeds.split(",")]
        except ValueError:
            parser.error(f"--seeds must be comma-separated integers such as 0,1,2, got {opts.seeds!r}")
        if len(set(opts.seeds)) != len(opts.seeds) or min(opts.seeds) < 0:
            parser.error(f"--seeds must be distinct non-negative integers, got {opts.seeds}")
        if "--seed" in extra:
            parser.error("--seed after `--` conflicts with --seeds: give the seeds with --seeds only")
    try:
        rows = select_configs(opts.configs, opts.config_dir)
    except ReproduceError as exc:
        parser.error(str(exc))
    problem = output_problem(opts, rows)
    if problem:
        sys.stderr.write(f"{parser.prog}: error: {problem}\n")
        return 2
    if opts.device is None:
        from evaluations.device import default_device

        opts.device = default_device()
    try:
        sampler_env(opts.device)
    except ReproduceError as exc:
        parser.error(str(exc))

    this_call, failures = [], []
    layout = "seeds" if opts.seeds else "single"
    for index, row in enumerate(rows):
        if failures and not opts.keep_going:
            this_call.append((row, None, None, "not run (stopped at an earlier error)", layout))
            continue
        log(f"[{index + 1}/{len(rows)}] {row.name}: {row.title}")
        try:
            args, records, status = run_row(row, opts, extra)
            this_call.append((row, args, records, status, layout))
        except ReproduceError as exc:
            log(f"error: {exc}")
            failures.append(row.name)
            this_call.append((row, None, None, f"failed: {exc}", layout))
    results = os.path.abspath(opts.results)
    # This call's rows and every earlier result in the folder, so no call narrows the table to its own rows.
    entries = table_entries(results, this_call)
    table_md = os.path.join(results, "table.md")
    write_text_atomic(table_md, render_table(entries))
    write_json_atomic(os.path.join(results, "table.json"), {"rows": entries})
    earlier = sum(1 for e in entries if e["status"].startswith("earlier run"))
    log(f"wrote {table_md}" + (f" ({earlier} of its lines from earlier runs in {results})" if earlier else ""))
    if failures:
        log(f"{len(failures)} of {len(rows)} rows failed: {', '.join(failures)} (see the errors above)")
        return 1
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def run_command_line(argv=None):
    # A SIGTERM (a scheduler ending the job, `kill`) takes the same way out as Ctrl-C: the running sampler is
    # stopped and the message says how to resume.
    before = signal.signal(signal.SIGTERM, _interrupt)
    try:
        return main(argv)
    except KeyboardInterrupt:
        sys.stderr.write(
            "\nreproduce.py: interrupted. Finished rows and finished sample batches are kept: rerun the same command "
            "to resume where it stopped.\n"
        )
        return 130
    finally:
        signal.signal(signal.SIGTERM, before)


if __name__ == "__main__":
    sys.exit(run_command_line())

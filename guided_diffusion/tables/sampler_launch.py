"""
Starting a table row's sampling script for scripts/reproduce.py: its command (the row's flags checked with the
script's own parser, checkpoints found, the output folder set), the launcher that starts its ranks (mpiexec,
torchrun, srun or one process), the environment that puts it on the chosen device, and running it with its output
passed through and stopped with the caller.
"""

import os
import subprocess
import sys

from ..common.assets import fetch_hint
from ..common.errors import REPO_ROOT
from ..run.sampler_flags import SAMPLER_ARGPARSERS
from .table_rows import ReproduceError, how_to_get

CHECKPOINT_FLAGS = ("model_path", "classifier_path")
LAUNCHERS = ("mpiexec", "torchrun", "srun", "none")


def parse_sampler_flags(row, tokens):
    # Imported with the first row: the sampling layer is not needed to refuse a bad command line.

    parser = SAMPLER_ARGPARSERS[row.script]()
    try:
        return parser.parse_args(tokens)
    except SystemExit:
        raise ReproduceError(f"row {row.name}: its flags do not parse with {row.script} (see the message above)")


def check_passed_flags(extra):
    """
    Refuse sampler flags (after `--`) that reproduce.py sets itself or cannot honour.
    """
    for flag in ("out_dir",):
        if f"--{flag}" in extra:
            raise ReproduceError(f"--{flag} cannot be passed to the sampler: reproduce.py sets it (--results)")
    if any(token == "--shard" or token.startswith("--shard=") for token in extra):
        raise ReproduceError(
            "--shard cannot be passed through reproduce.py, which samples whole rows: run the shards with the "
            "sampler itself, join them with scripts/merge_shards.py and evaluate the merged .npz with "
            "evaluations/evaluator.py"
        )


def sampler_command(row, opts, extra, missing=None, subfolder=""):
    """
    (command, parsed flags, output folder) for sampling one row; missing checkpoints are noted in `missing`.
    """
    missing = [] if missing is None else missing
    check_passed_flags(extra)
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
        if os.path.exists(os.path.join(REPO_ROOT, data_dir)):
            tokens += ["--data_dir", os.path.join(REPO_ROOT, data_dir)]
    if opts.num_samples is not None:
        tokens += ["--num_samples", str(opts.num_samples)]
    tokens += ["--out_dir", out_dir]
    args = parse_sampler_flags(row, tokens)
    command = launch_command([sys.executable, os.path.join(REPO_ROOT, "scripts", row.script), *tokens], opts)
    return command, args, out_dir


def resolve_checkpoint(row, flag, value, opts, from_command_line, missing):
    """
    The absolute path of a checkpoint flag: --model_dir/FILE when given, else the config's path taken from the
    repository root (the command line's from the current folder). A missing file is noted in `missing`.
    """
    name = (row.meta.get("model") if flag == "model_path" else "") or os.path.basename(value)
    if opts.model_dir and not from_command_line:
        path = os.path.join(os.path.abspath(opts.model_dir), name)
    else:
        path = os.path.abspath(value) if from_command_line else os.path.join(REPO_ROOT, value)
    if not os.path.isfile(path):
        missing.append(
            f"checkpoint {name} (--{flag}) not found at {path}. {how_to_get(row, 'model_source')}put it there, "
            f"or pass --model_dir DIR with {name} in DIR{fetch_hint(path)}."
        )
    return path


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


def launch_command(script_command, opts):
    """
    `script_command` ([sys.executable, script, flags...]) started the way --launcher/--nproc/--mpi say.
    """
    launcher, nproc = launch_settings(opts)
    if launcher == "torchrun":
        script_command = script_command[1:]  # torchrun starts the interpreter itself
    return [*launch_prefix(launcher, nproc), *script_command]


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


def run_streaming(command, extra_env=None):
    """
    Run a command with its output (stdout and stderr together) passed through; return (status, last lines).
    :param extra_env: environment variables to set for the command.
    """
    env = dict(os.environ, **(extra_env or {}))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p)
    proc = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    tail = b""
    try:
        while True:
            chunk = proc.stdout.read1(65536)
            if not chunk:
                break
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
            tail = (tail + chunk)[-8192:]
    except BaseException:
        # Interrupted or terminated on its own (a Ctrl-C reaches the whole process group, but a scheduler's or a
        # user's `kill` reaches this process only): stop the sampler too, or it would go on writing the row that
        # the next run resumes.
        stop_child(proc)
        raise
    return proc.wait(), tail.decode(errors="replace").replace("\r", "\n").strip().splitlines()


def stop_child(proc, grace_s=10):
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()

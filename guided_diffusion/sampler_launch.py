"""
Starting a sampling script for scripts/reproduce.py: the launcher that starts its ranks (mpiexec, torchrun, srun
or one process), the environment that puts it on the chosen device, and running it with its output passed through
and stopped with the caller.
"""

import os
import subprocess
import sys

from .errors import REPO_ROOT
from .table_rows import ReproduceError

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

"""
Launch detection (mpiexec, torchrun, srun, one process), the rank-to-GPU mapping, and two-rank runs under torchrun
and an srun emulation (two processes with SLURM's variables) on the CPU with gloo.
"""

import json
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch as th

from conftest import REPO_ROOT, load_script

from guided_diffusion import dist_util
from guided_diffusion.common import launch_env
from guided_diffusion.common.errors import UsageError

IMAGE_SAMPLE = os.path.join(REPO_ROOT, "scripts", "image_sample.py")
HELPER = os.path.join(REPO_ROOT, "tests", "mpi_dist_helper.py")
# The embedded digits model, five steps, five samples in batches of two: three batches over two ranks.
TINY_RUN = ["--timestep_respacing", "5", "--num_samples", "5", "--batch_size", "2", "--seed", "3", "--grid", ""]
# The embedded default also samples an unguided comparison (--compare True); these tests check one run.
TINY_RUN += ["--compare", "False"]
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
               "TORCHELASTIC_RUN_ID", "PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")


class FakeWorld:
    def __init__(self, size=1, rank=0):
        self.size, self.rank = size, rank

    def Get_size(self):
        return self.size

    def Get_rank(self):
        return self.rank


def _clean_env():
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and not k.startswith("SLURM_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, os.environ.get("PYTHONPATH")) if p)
    env["OMP_NUM_THREADS"] = "1"
    # Two ranks on a host with one GPU share it.
    env[launch_env.SHARE_GPUS_ENV] = "1"
    env.pop("GUIDED_DIFFUSION_SAMPLE_STOP_AFTER", None)
    return env


# ---------------------------------------------------------------- detection


def test_detect_single_process():
    launch = launch_env.detect(env={}, mpi_world=lambda: FakeWorld(1))
    assert (launch.launcher, launch.rank, launch.world_size, launch.local_rank) == ("none", 0, 1, 0)


def test_detect_torchrun():
    env = dict(RANK="5", WORLD_SIZE="8", LOCAL_RANK="1", LOCAL_WORLD_SIZE="4", MASTER_ADDR="10.0.0.2",
               MASTER_PORT="29500", TORCHELASTIC_RUN_ID="x")
    # torchrun wins over the SLURM variables of the job it runs in.
    env.update(SLURM_PROCID="0", SLURM_STEP_ID="0", SLURM_NTASKS="2", SLURM_LOCALID="0")
    launch = launch_env.detect(env=env, mpi_world=lambda: pytest.fail("MPI asked under torchrun"))
    assert launch.launcher == "torchrun"
    assert (launch.rank, launch.world_size, launch.local_rank, launch.local_world_size) == (5, 8, 1, 4)
    assert (launch.master_addr, launch.master_port) == ("10.0.0.2", 29500)


def test_detect_srun_step():
    env = dict(SLURM_PROCID="7", SLURM_STEP_ID="0", SLURM_NTASKS="16", SLURM_STEP_NUM_TASKS="12",
               SLURM_LOCALID="1", SLURM_NODEID="1", SLURM_STEP_NUM_NODES="2", SLURM_STEP_TASKS_PER_NODE="6(x2)",
               SLURM_STEP_NODELIST="gpu[07-08]", SLURM_JOB_ID="123456")
    resolved = {}

    def fake_resolve(name):
        resolved["name"] = name
        return "10.1.0.7"

    orig = launch_env.resolve_host
    launch_env.resolve_host = fake_resolve
    try:
        launch = launch_env.detect(env=env, mpi_world=lambda: FakeWorld(1))
    finally:
        launch_env.resolve_host = orig
    assert launch.launcher == "srun"
    assert (launch.rank, launch.world_size, launch.local_rank, launch.local_world_size) == (7, 12, 1, 6)
    assert resolved == {"name": "gpu07"} and launch.master_addr == "10.1.0.7"
    assert launch.master_port == 20000 + 123456 % 20000
    # A launcher's own MASTER_ADDR / MASTER_PORT are used as given.
    env.update(MASTER_ADDR="10.9.9.9", MASTER_PORT="1234")
    launch = launch_env.detect(env=env, mpi_world=lambda: FakeWorld(1))
    assert (launch.master_addr, launch.master_port) == ("10.9.9.9", 1234)


def test_batch_script_is_not_an_srun_step():
    # sbatch's script itself carries SLURM_PROCID=0 and the job's task count: a plain python there is one process.
    env = dict(SLURM_PROCID="0", SLURM_NTASKS="4", SLURM_LOCALID="0", SLURM_JOB_ID="9")
    assert launch_env.detect(env=env, mpi_world=lambda: FakeWorld(1)).launcher == "none"
    assert launch_env.rank_from_env(env) == 0


def test_rank_from_env():
    assert launch_env.rank_from_env({"PMI_RANK": "3"}) == 3
    assert launch_env.rank_from_env({"OMPI_COMM_WORLD_RANK": "2"}) == 2
    assert launch_env.rank_from_env({"RANK": "4", "WORLD_SIZE": "8", "LOCAL_RANK": "0"}) == 4
    assert launch_env.rank_from_env({"SLURM_PROCID": "5", "SLURM_STEP_ID": "1"}) == 5
    assert launch_env.rank_from_env({}) == 0


def test_logger_names_rank_files_under_torchrun_and_srun(tmp_path, monkeypatch):
    from guided_diffusion import logger

    for var in LAUNCH_VARS:
        monkeypatch.delenv(var, raising=False)
    previous = logger.Logger.CURRENT
    try:
        monkeypatch.setenv("RANK", "2")
        monkeypatch.setenv("WORLD_SIZE", "4")
        monkeypatch.setenv("LOCAL_RANK", "0")
        logger.configure(dir=str(tmp_path / "t"))
        logger.get_current().close()
        monkeypatch.delenv("RANK")
        monkeypatch.delenv("WORLD_SIZE")
        monkeypatch.delenv("LOCAL_RANK")
        monkeypatch.setenv("SLURM_PROCID", "1")
        monkeypatch.setenv("SLURM_STEP_ID", "0")
        logger.configure(dir=str(tmp_path / "s"))
        logger.get_current().close()
    finally:
        logger.Logger.CURRENT = previous
    assert os.listdir(tmp_path / "t") == ["log-rank002.txt"]
    assert os.listdir(tmp_path / "s") == ["log-rank001.txt"]


def test_slurm_lists():
    assert launch_env.slurm_tasks_on_node("4(x2),3", 0) == 4
    assert launch_env.slurm_tasks_on_node("4(x2),3", 1) == 4
    assert launch_env.slurm_tasks_on_node("4(x2),3", 2) == 3
    with pytest.raises(RuntimeError, match="node id 3 is not in the tasks per node"):
        launch_env.slurm_tasks_on_node("4(x2),3", 3)
    assert launch_env.slurm_first_host("gpu[07-09,12],cpu1") == "gpu07"
    assert launch_env.slurm_first_host("node3,node4") == "node3"
    assert launch_env.slurm_first_host("single") == "single"


# ---------------------------------------------------------------- GPU mapping


def _devices(monkeypatch, count, launch):
    monkeypatch.setattr(th.cuda, "is_available", lambda: True)
    monkeypatch.setattr(th.cuda, "device_count", lambda: count)
    monkeypatch.setattr(launch_env, "_INFO", launch)


def _launch(rank, world, local_world):
    return SimpleNamespace(launcher="mpiexec", rank=rank, world_size=world, local_rank=rank % local_world,
                           local_world_size=local_world, master_addr=None, master_port=None)


def test_one_gpu_two_ranks_is_an_error(monkeypatch):
    monkeypatch.delenv(launch_env.SHARE_GPUS_ENV, raising=False)
    for rank in (0, 1):
        _devices(monkeypatch, 1, _launch(rank, 2, 2))
        with pytest.raises(UsageError) as info:
            dist_util.dev()
        assert str(info.value) == (
            "2 ranks run on this node but it has 1 GPU(s) visible: start at most 1 ranks per node, "
            "or set GUIDED_DIFFUSION_SHARE_GPUS=1 to let ranks share GPUs"
        )


def test_sharing_gpus_is_opt_in(monkeypatch):
    monkeypatch.setenv(launch_env.SHARE_GPUS_ENV, "1")
    seen = []
    for rank in range(3):
        _devices(monkeypatch, 2, _launch(rank, 3, 3))
        seen.append(str(dist_util.dev()))
    assert seen == ["cuda:0", "cuda:1", "cuda:0"]


def test_six_gpus_twelve_ranks_two_nodes(monkeypatch):
    monkeypatch.delenv(launch_env.SHARE_GPUS_ENV, raising=False)
    # Round-robin placement over the nodes: global rank r runs on node r % 2 as that node's local rank r // 2.
    by_node = {0: [], 1: []}
    for rank in range(12):
        launch = SimpleNamespace(launcher="mpiexec", rank=rank, world_size=12, local_rank=rank // 2,
                                 local_world_size=6, master_addr=None, master_port=None)
        _devices(monkeypatch, 6, launch)
        by_node[rank % 2].append(str(dist_util.dev()))
    for node, devices in by_node.items():
        assert sorted(devices) == [f"cuda:{i}" for i in range(6)], (node, devices)


# ---------------------------------------------------------------- two ranks


def _srun_env(rank, port):
    env = _clean_env()
    env.update(SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank), SLURM_NTASKS="2", SLURM_STEP_NUM_TASKS="2",
               SLURM_STEP_ID="0", SLURM_NODEID="0", SLURM_STEP_NUM_NODES="1", SLURM_STEP_TASKS_PER_NODE="2",
               SLURM_JOB_ID="42", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    return env


def run_srun_emulation(args, timeout=180):
    """
    Two processes with the variables srun gives a two-task step on one node; returns their (code, output) pairs.
    """
    port = dist_util._find_free_port()
    procs = [
        subprocess.Popen([sys.executable, *args], env=_srun_env(rank, port), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
        for rank in range(2)
    ]
    results = []
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        results.append((proc.returncode, out))
    return results


def run_torchrun(args, timeout=180):
    torchrun = shutil.which("torchrun")
    command = [torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]
    command += ["--standalone", "--nproc_per_node", "2", *args]
    return subprocess.run(command, env=_clean_env(), capture_output=True, text=True, timeout=timeout)


def test_collectives_under_torchrun(tmp_path):
    res = run_torchrun([HELPER, str(tmp_path), "torchrun"])
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "ALL OK" in res.stdout


def test_training_under_torchrun_keeps_replicas_equal(tmp_path):
    res = run_torchrun([os.path.join(REPO_ROOT, "tests", "mpi_train_helper.py"), str(tmp_path)])
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "ALL OK" in res.stdout


def test_collectives_under_srun_emulation(tmp_path):
    results = run_srun_emulation([HELPER, str(tmp_path), "srun"])
    assert all(code == 0 for code, _ in results), [out[-3000:] for _, out in results]
    assert "ALL OK" in results[0][1]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    res = subprocess.run([sys.executable, IMAGE_SAMPLE, *TINY_RUN, "--out_dir", str(out)], env=_clean_env(),
                         capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    with np.load(out / "samples_5x16x16x3.npz") as data:
        return data["arr_0"]


def _check_two_rank_run(out, expected):
    assert sorted(os.listdir(out)) == [
        "log-rank001.txt", "log.txt", "samples_5x16x16x3.json", "samples_5x16x16x3.npz"
    ]
    with open(out / "log.txt") as f:
        assert "sampling 5 images in 3 batches on 2 rank(s)" in f.read()
    with open(out / "samples_5x16x16x3.json") as f:
        assert json.load(f)["environment"]["ranks"] == 2
    with np.load(out / "samples_5x16x16x3.npz") as data:
        np.testing.assert_array_equal(data["arr_0"], expected)


def test_torchrun_two_ranks_match_one_process(one_process, tmp_path):
    res = run_torchrun([IMAGE_SAMPLE, *TINY_RUN, "--out_dir", str(tmp_path)])
    assert res.returncode == 0, res.stderr[-3000:]
    _check_two_rank_run(tmp_path, one_process)


def test_srun_two_ranks_match_one_process(one_process, tmp_path):
    results = run_srun_emulation([IMAGE_SAMPLE, *TINY_RUN, "--out_dir", str(tmp_path)])
    assert all(code == 0 for code, _ in results), [out[-3000:] for _, out in results]
    _check_two_rank_run(tmp_path, one_process)


def test_single_process_without_mpi(monkeypatch):
    def no_mpi():
        raise ImportError("No module named 'mpi4py'")

    launch = launch_env.detect(env={}, mpi_world=no_mpi)
    assert (launch.launcher, launch.rank, launch.world_size) == ("none", 0, 1)
    monkeypatch.setattr(launch_env, "_mpi_world", no_mpi)
    monkeypatch.setattr(launch_env, "_INFO", launch)
    monkeypatch.setattr(launch_env, "_COMM", None)
    comm = launch_env.comm()
    assert (comm.rank, comm.size, comm.bcast("x"), comm.allgather(3), comm.gather(4)) == (0, 1, "x", [3], [4])
    comm.Barrier()


def test_oversubscribed_node_is_one_line_from_a_sampler(monkeypatch, capsys, tmp_path):
    # Two torchrun-style ranks on a node with one GPU: the sampler stops on its first device lookup, in one line.
    image_sample = load_script("image_sample")
    monkeypatch.delenv(launch_env.SHARE_GPUS_ENV, raising=False)
    _devices(monkeypatch, 1, SimpleNamespace(launcher="none", rank=0, world_size=1, local_rank=0,
                                              local_world_size=2, master_addr=None, master_port=None))
    with pytest.raises(SystemExit) as stopped:
        image_sample.main(TINY_RUN + ["--out_dir", str(tmp_path / "run")])
    assert stopped.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        "error: 2 ranks run on this node but it has 1 GPU(s) visible: start at most 1 ranks per node, or set "
        "GUIDED_DIFFUSION_SHARE_GPUS=1 to let ranks share GPUs"
    )
    assert not os.path.exists(tmp_path / "run")


def test_one_task_srun_step_is_one_process():
    env = dict(SLURM_PROCID="0", SLURM_STEP_ID="3", SLURM_STEP_NUM_TASKS="1", SLURM_NTASKS="8", SLURM_LOCALID="0")
    assert launch_env.detect(env=env, mpi_world=lambda: FakeWorld(1)).launcher == "none"

"""
Run with two ranks under any launcher: `mpiexec -n 2`, `torchrun --nproc_per_node 2`, or two srun-like processes
(python tests/mpi_dist_helper.py TMPDIR LAUNCHER); tests/adm/test_dist_logger.py and tests/common/test_launch.py drive it.

Each check raises on failure; rank 0 prints "ALL OK" at the end.
"""

import os
import sys

import torch as th
import torch.distributed as dist
from guided_diffusion import dist_util, logger
from guided_diffusion.common import launch_env


def main():
    tmpdir = sys.argv[1]
    launcher = sys.argv[2] if len(sys.argv) > 2 else "mpiexec"
    launch = launch_env.info()
    assert launch.launcher == launcher, launch
    assert (launch.world_size, launch.local_world_size, launch.local_rank) == (2, 2, launch.rank), launch
    launched_with = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    comm = launch_env.comm()
    rank = comm.Get_rank()
    assert comm.Get_size() == 2 and rank == launch.rank, (comm.Get_size(), rank)
    assert comm.allgather(rank * 10) == [0, 10]
    assert comm.bcast("from 0" if rank == 0 else None, root=0) == "from 0"

    dist_util.setup_dist()
    dist_util.setup_dist()  # a second call must be a no-op
    assert {k: os.environ.get(k) for k in launched_with} == launched_with, "the launcher's variables changed"
    assert dist.get_world_size() == 2 and dist.get_rank() == rank
    assert dist.get_backend() == ("cuda:nccl,cpu:gloo" if th.cuda.is_available() else "gloo")
    total = th.tensor([float(rank + 1)])
    dist.all_reduce(total)
    assert total.item() == 3.0, total

    # load_state_dict: only rank 0 touches the file; a tiny chunk size forces several broadcasts.
    path = os.path.join(tmpdir, "ckpt.pt")
    expected = {"w": th.arange(100, dtype=th.float32).reshape(10, 10), "step": 7}
    if rank == 0:
        th.save(expected, path)
    comm.Barrier()
    dist_util._CHUNK_SIZE = 37
    loaded = dist_util.load_state_dict(path if rank == 0 else "/nonexistent/only-rank-0-reads.pt")
    assert loaded["step"] == 7 and th.equal(loaded["w"], expected["w"]), loaded

    # A missing file must raise on every rank instead of leaving the others waiting.
    missing = os.path.join(tmpdir, "missing.pt")
    try:
        dist_util.load_state_dict(missing)
    except FileNotFoundError as exc:
        assert str(exc) == f"checkpoint file not found: {missing}", str(exc)
    else:
        raise AssertionError("missing checkpoint did not raise")

    # sync_params copies rank 0's values everywhere.
    params = [th.full((3, 2), float(rank + 1)), th.full((4,), 10.0 * (rank + 1))]
    dist_util.sync_params(params)
    assert th.equal(params[0], th.ones(3, 2)) and th.equal(params[1], th.full((4,), 10.0)), params

    # mpi_weighted_mean weights by counts and returns results on rank 0 only.
    local = [{"a": (1.0, 1), "b": (2.0, 3)}, {"a": (3.0, 3), "c": (5.0, 1)}][rank]
    means = logger.mpi_weighted_mean(comm, local)
    if rank == 0:
        assert means == {"a": 2.5, "b": 2.0, "c": 5.0}, means
    else:
        assert means == {}, means

    # dumpkvs with a communicator averages logkv_mean values over ranks.
    logdir = os.path.join(tmpdir, "logs")
    logger.configure(dir=logdir, format_strs=["csv"], comm=comm)
    for v in [[1.0, 2.0], [6.0]][rank]:
        logger.logkv_mean("loss", v)
    out = logger.dumpkvs()
    if rank == 0:
        assert out == {"loss": 3.0}, out  # (1 + 2 + 6) / 3
    else:
        assert out == {"dummy": 1}, out
    comm.Barrier()
    # The logger names rank 1's file from the launcher's variables alone.
    expected_files = {"progress.csv", "progress-rank001.csv"}
    assert set(os.listdir(logdir)) == expected_files, os.listdir(logdir)

    comm.Barrier()
    if rank == 0:
        print("ALL OK", flush=True)


if __name__ == "__main__":
    main()

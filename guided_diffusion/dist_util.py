"""
Helpers for distributed training and sampling: a launcher starts the processes (mpiexec as in ADM, torchrun, or
SLURM's srun; see launch_env.py), torch.distributed moves the tensors.

Works as a single plain process too. The process group serves CUDA tensors with NCCL and CPU tensors with gloo
("cuda:nccl,cpu:gloo") on GPU hosts, plain gloo elsewhere, so CPU collectives work everywhere. Each node-local rank
gets its own GPU.
"""

import atexit
import io
import os
import socket
import time

import blobfile as bf
import torch as th
import torch.distributed as dist

from .common import launch_env
from .common.errors import UsageError

# Bytes per broadcast when sharing a checkpoint; pickled MPI messages above 2 GiB fail.
_CHUNK_SIZE = 2**30


def backend():
    """
    The torch.distributed backend: NCCL for CUDA tensors plus gloo for CPU ones on GPU hosts, gloo alone elsewhere.
    """
    return "cuda:nccl,cpu:gloo" if th.cuda.is_available() else "gloo"


def setup_dist():
    """
    Set up a torch.distributed process group spanning the launcher's ranks. Leaves the launcher's variables
    (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) as they are; under mpiexec, rank 0 picks the address and a free
    port unless MASTER_ADDR / MASTER_PORT are set.

    Calling it again once the group exists does nothing.
    """
    if dist.is_initialized():
        return
    launch = launch_env.info()
    if th.cuda.is_available():
        th.cuda.set_device(dev())

    if launch.launcher == "mpiexec":
        comm = launch_env.comm()
        hostnames = comm.allgather(socket.gethostname())
        single_host = len(set(hostnames)) == 1
        addr = launch.master_addr
        if addr is None:
            addr = comm.bcast(_master_address(single_host) if comm.rank == 0 else None, root=0)
        port = launch.master_port
        if port is None:
            port = comm.bcast(_find_free_port() if comm.rank == 0 else None, root=0)
    elif launch.launcher in ("torchrun", "srun"):
        addr, port = launch.master_addr, launch.master_port
        if addr is None or port is None:
            raise UsageError(
                f"{launch.launcher} started {launch.world_size} ranks but MASTER_ADDR / MASTER_PORT are not set; "
                "export both (rank 0's host and a free port) before launching"
            )
        single_host = launch.local_world_size == launch.world_size
    else:
        addr, port, single_host = "127.0.0.1", _find_free_port(), True
    if single_host and "GLOO_SOCKET_IFNAME" not in os.environ:
        # Gloo otherwise binds to whatever the hostname resolves to, which in containers is often missing or
        # unreachable; all ranks share this machine, so loopback works.
        os.environ["GLOO_SOCKET_IFNAME"] = _loopback_interface()

    if launch.launcher == "torchrun":
        # torchrun's own rendezvous variables (and its agent's store, when it offers one).
        init = "env://"
    else:
        init = f"tcp://{_url_host(addr)}:{port}"
    dist.init_process_group(
        backend=backend(), init_method=init, rank=launch.rank, world_size=launch.world_size
    )
    # Tear the group down before MPI finalizes; a live gloo group at interpreter exit aborts
    # the process under mpiexec.
    atexit.register(_destroy_process_group)


def _url_host(addr):
    return f"[{addr}]" if ":" in addr else addr


def _destroy_process_group():
    if not dist.is_initialized():
        return
    # Every rank tears its group down together, and none exits before all have: a rank that exits first closes
    # its gloo sockets (rank 0 also the rendezvous store) under the others' background threads, which then abort
    # the process ("terminate called without an active exception", seen about once in ten two-rank runs).
    if launch_env.info().launcher == "mpiexec":
        comm = launch_env.comm()
        comm.Barrier()
        dist.destroy_process_group()
        comm.Barrier()
    else:
        # No MPI to meet in after the group is gone: the rendezvous store (kept alive by this reference) counts the
        # ranks out, and rank 0, which may host it, leaves last.
        store = dist.distributed_c10d._get_default_store()
        rank, world = dist.get_rank(), dist.get_world_size()
        launch_env.comm().Barrier()
        dist.destroy_process_group()
        _leave_together(store, rank, world)


def _leave_together(store, rank, world, timeout_s=60.0):
    """
    Wait until every rank has destroyed its group; rank 0 then also waits until the others are done with the store.
    A rank that never arrives (it died) costs at most timeout_s per phase, not a hang.
    """
    def count_up_to(key):
        deadline = time.monotonic() + timeout_s
        while store.add(key, 0) < world and time.monotonic() < deadline:
            time.sleep(0.01)

    try:
        store.add("pag_adm/destroyed", 1)
        count_up_to("pag_adm/destroyed")
        store.add("pag_adm/left", 1)
        if rank == 0:
            count_up_to("pag_adm/left")
    except Exception:  # noqa: BLE001 -- a store already closed by its host: nothing left to wait for
        pass


def _master_address(single_host):
    if single_host:
        # Every rank runs here, so loopback always reaches rank 0.
        return "127.0.0.1"
    return launch_env.resolve_host(socket.getfqdn())


def _loopback_interface():
    for _, name in socket.if_nameindex():
        if name == "lo" or name.startswith("lo"):
            return name
    return "lo"


def dev():
    """
    The device this rank should use: the GPU of its node-local rank (one each; see gpu_index), else
    the CPU.
    """
    if th.cuda.is_available():
        launch = launch_env.info()
        index = gpu_index(launch.local_rank, launch.local_world_size, th.cuda.device_count())
        return th.device(f"cuda:{index}")
    return th.device("cpu")


def gpu_index(local_rank, local_world_size, device_count, share=None):
    """
    The GPU of a node-local rank: one GPU each. More ranks on the node than GPUs is an error unless sharing is
    asked for (share, default $GUIDED_DIFFUSION_SHARE_GPUS=1), then ranks take the GPUs round-robin.
    """
    if share is None:
        share = os.environ.get(launch_env.SHARE_GPUS_ENV, "").strip() not in ("", "0")
    if device_count < 1:
        raise UsageError("CUDA is available but reports no GPUs")
    if local_world_size > device_count and not share:
        # A UsageError: the scripts print it as one line and exit with status 2.
        raise UsageError(
            f"{local_world_size} ranks run on this node but it has {device_count} GPU(s) visible: start at most "
            f"{device_count} ranks per node, or set {launch_env.SHARE_GPUS_ENV}=1 to let ranks share GPUs"
        )
    return local_rank % device_count


def load_state_dict(path, **kwargs):
    """
    Load a checkpoint without every rank hitting the file system: rank 0 reads the bytes
    and broadcasts them. All ranks must call this together. kwargs go to torch.load.
    """
    comm = launch_env.comm()
    if comm.Get_rank() == 0:
        try:
            with bf.BlobFile(path, "rb") as f:
                data = f.read()
            header = ("ok", (len(data) + _CHUNK_SIZE - 1) // _CHUNK_SIZE)
        except FileNotFoundError:
            data = b""
            header = ("missing", 0)
        # Tell the other ranks first, so a missing file raises everywhere instead of hanging them.
        comm.bcast(header, root=0)
        for start in range(0, len(data), _CHUNK_SIZE):
            comm.bcast(data[start : start + _CHUNK_SIZE], root=0)
    else:
        header = comm.bcast(None, root=0)
        data = b"".join(comm.bcast(None, root=0) for _ in range(header[1]))
    if header[0] == "missing":
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    return th.load(io.BytesIO(data), **kwargs)


def sync_params(params):
    """
    Copy rank 0's values of the given tensors to all other ranks.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    for p in params:
        with th.no_grad():
            dist.broadcast(p, 0)


def _find_free_port():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind(("", 0))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        return s.getsockname()[1]
    finally:
        s.close()


launch_env.set_group_setup(setup_dist)

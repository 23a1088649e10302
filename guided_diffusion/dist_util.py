"""
Helpers for distributed training: MPI starts the processes, torch.distributed moves the tensors.

Works under `mpiexec -n N` and as a single plain process (mpi4py's COMM_WORLD then has size 1).
"""

import atexit
import io
import os
import socket

import blobfile as bf
import torch as th
import torch.distributed as dist
from mpi4py import MPI

# How many GPUs a node is assumed to have when mapping MPI ranks to devices.
GPUS_PER_NODE = 8

# Bytes per MPI broadcast when sharing a checkpoint; pickled messages above 2 GiB fail in MPI.
_CHUNK_SIZE = 2**30


def setup_dist():
    """
    Set up a torch.distributed process group spanning the MPI world.

    Calling it again once the group exists does nothing.
    """
    if dist.is_initialized():
        return
    comm = MPI.COMM_WORLD
    backend = "nccl" if th.cuda.is_available() else "gloo"

    if th.cuda.is_available():
        th.cuda.set_device(dev())

    hostnames = comm.allgather(socket.gethostname())
    single_host = len(set(hostnames)) == 1
    master_addr = None
    if comm.rank == 0:
        master_addr = _master_address(single_host)
    master_addr = comm.bcast(master_addr, root=0)
    port = comm.bcast(_find_free_port() if comm.rank == 0 else None, root=0)

    os.environ["MASTER_ADDR"] = master_addr
    os.environ["MASTER_PORT"] = str(port)
    os.environ["RANK"] = str(comm.rank)
    os.environ["WORLD_SIZE"] = str(comm.size)
    if backend == "gloo" and single_host and "GLOO_SOCKET_IFNAME" not in os.environ:
        # Gloo otherwise binds to whatever the hostname resolves to, which in containers
        # is often missing or unreachable; all ranks share this machine, so loopback works.
        os.environ["GLOO_SOCKET_IFNAME"] = _loopback_interface()

    dist.init_process_group(backend=backend, init_method="env://")
    # Tear the group down before MPI finalizes; a live gloo group at interpreter exit aborts
    # the process under mpiexec.
    atexit.register(_destroy_process_group)


def _destroy_process_group():
    if not dist.is_initialized():
        return
    # Every rank tears its group down together, and none exits before all have: a rank that exits first closes
    # its gloo sockets (rank 0 also the rendezvous store) under the others' background threads, which then abort
    # the process ("terminate called without an active exception", seen about once in ten two-rank runs).
    comm = MPI.COMM_WORLD
    comm.Barrier()
    dist.destroy_process_group()
    comm.Barrier()


def _master_address(single_host):
    if single_host:
        # Every rank runs here, so loopback always reaches rank 0.
        return "127.0.0.1"
    try:
        return socket.gethostbyname(socket.getfqdn())
    except OSError as exc:
        raise RuntimeError(
            f"cannot resolve the address of rank 0's host {socket.getfqdn()!r} "
            "for a multi-machine run; fix the host's name resolution"
        ) from exc


def _loopback_interface():
    for _, name in socket.if_nameindex():
        if name == "lo" or name.startswith("lo"):
            return name
    return "lo"


def dev():
    """
    The device this rank should use.
    """
    if th.cuda.is_available():
        index = MPI.COMM_WORLD.Get_rank() % GPUS_PER_NODE
        return th.device(f"cuda:{index % th.cuda.device_count()}")
    return th.device("cpu")


def load_state_dict(path, **kwargs):
    """
    Load a checkpoint without every rank hitting the file system: rank 0 reads the bytes
    and broadcasts them. All ranks must call this together. kwargs go to torch.load.
    """
    comm = MPI.COMM_WORLD
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

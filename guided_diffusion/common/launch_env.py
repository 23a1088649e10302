"""
Which launcher started this process, and this process's place in the run: one source of rank, world size and
node-local rank for dist_util, the logger and the run store.

Recognised, in this order:
- torchrun (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT set by the launcher);
- mpiexec (an MPI COMM_WORLD of more than one process; the node-local rank from an MPI.COMM_TYPE_SHARED split);
- SLURM's srun (SLURM_PROCID, SLURM_STEP_NUM_TASKS or SLURM_NTASKS, SLURM_LOCALID of a job step: SLURM_STEP_ID
  must be set, since a batch script itself also carries SLURM_PROCID=0 and the job's SLURM_NTASKS);
- otherwise a single process.

Collectives on Python objects (bcast, allgather, gather, Barrier) go through mpi4py under mpiexec, as in ADM, and
through a torch.distributed group (gloo serves CPU objects) under torchrun and srun, behind one interface: comm().
"""

import os
import re
import socket
from types import SimpleNamespace

import torch.distributed as dist

# Opt-in to run more ranks on a node than it has GPUs (ranks then share GPUs round-robin).
SHARE_GPUS_ENV = "GUIDED_DIFFUSION_SHARE_GPUS"

_INFO = None
_COMM = None
# dist_util.setup_dist, registered by dist_util when it is imported: this module sits below ADM's dist_util, which
# sets the torch.distributed group up that comm() needs under torchrun and srun.
_GROUP_SETUP = None


def set_group_setup(setup):
    """Register the function that sets up the torch.distributed group (dist_util.setup_dist)."""
    global _GROUP_SETUP
    _GROUP_SETUP = setup


def _env_int(env, name, default=None):
    value = env.get(name)
    if value is None or value.strip() == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise RuntimeError(f"${name} must be an integer, got {value!r}") from None


def _mpi_world():
    # Imported when needed: mpi4py is optional (torchrun, srun and single processes run without it), and importing
    # it initialises MPI.
    from mpi4py import MPI

    return MPI.COMM_WORLD


def slurm_tasks_on_node(tasks_per_node, node_id):
    """
    The number of tasks on node `node_id` from SLURM's compressed count list, e.g. "4(x2),3" (nodes 0 and 1 run 4
    tasks, node 2 runs 3).
    """
    counts = []
    for item in tasks_per_node.split(","):
        match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", item)
        if not match:
            raise RuntimeError(f"cannot read SLURM's tasks per node {tasks_per_node!r}")
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    if not 0 <= node_id < len(counts):
        raise RuntimeError(f"SLURM node id {node_id} is not in the tasks per node {tasks_per_node!r}")
    return counts[node_id]


def slurm_first_host(nodelist):
    """
    The first host name of SLURM's compressed host list, e.g. "gpu[07-09,12],cpu1" -> "gpu07".
    """
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not match:
        raise RuntimeError(f"cannot read SLURM's node list {nodelist!r}")
    prefix, ranges = match.group(1), match.group(2)
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def _torchrun(env):
    return "RANK" in env and "WORLD_SIZE" in env and ("LOCAL_RANK" in env or "TORCHELASTIC_RUN_ID" in env)


def _mpi_local_rank(world):
    """
    (node-local rank, ranks on this node) under MPI: the ranks sharing this node's memory (MPI.COMM_TYPE_SHARED).
    A collective: every rank calls it, at the same point (the first call of info()).
    """
    from mpi4py import MPI  # only under mpiexec (see _mpi_world)

    local = world.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        return local.Get_rank(), local.Get_size()
    finally:
        local.Free()


def detect(env=None, mpi_world=None):
    """
    The launch as a namespace: launcher ("torchrun", "mpiexec", "srun" or "none"), rank, world_size, local_rank,
    local_world_size (ranks on this node), and for torchrun and srun master_addr and master_port (None
    when the launcher did not set them).

    :param env: the environment (default os.environ); :param mpi_world: a callable returning MPI's COMM_WORLD
                (default mpi4py's), for tests.
    """
    env = os.environ if env is None else env
    if _torchrun(env):
        world = _env_int(env, "WORLD_SIZE")
        local_world = _env_int(env, "LOCAL_WORLD_SIZE", world)
        return SimpleNamespace(
            launcher="torchrun",
            rank=_env_int(env, "RANK"),
            world_size=world,
            local_rank=_env_int(env, "LOCAL_RANK", 0),
            local_world_size=local_world,
            master_addr=env.get("MASTER_ADDR"),
            master_port=_env_int(env, "MASTER_PORT"),
        )
    try:
        world = (mpi_world or _mpi_world)()
    except (ImportError, RuntimeError):
        # mpi4py missing or without a working MPI library: then no MPI launcher started this process.
        world = None
    if world is not None and world.Get_size() > 1:
        local_rank, local_world = _mpi_local_rank(world)
        return SimpleNamespace(
            launcher="mpiexec",
            rank=world.Get_rank(),
            world_size=world.Get_size(),
            local_rank=local_rank,
            local_world_size=local_world,
            master_addr=env.get("MASTER_ADDR"),
            master_port=_env_int(env, "MASTER_PORT"),
        )
    slurm_world = _env_int(env, "SLURM_STEP_NUM_TASKS", _env_int(env, "SLURM_NTASKS", 1))
    if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env and slurm_world > 1:
        world = slurm_world
        num_nodes = _env_int(env, "SLURM_STEP_NUM_NODES", _env_int(env, "SLURM_NNODES", 1))
        tasks_per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
        node_id = _env_int(env, "SLURM_NODEID", 0)
        local_world = slurm_tasks_on_node(tasks_per_node, node_id) if tasks_per_node else -(-world // num_nodes)
        master_addr = env.get("MASTER_ADDR")
        if master_addr is None and num_nodes == 1:
            master_addr = "127.0.0.1"
        if master_addr is None:
            nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
            if nodelist:
                master_addr = resolve_host(slurm_first_host(nodelist))
        master_port = _env_int(env, "MASTER_PORT")
        if master_port is None and "SLURM_JOB_ID" in env:
            # Every task derives the same port from the job id; concurrent jobs on a node get different ones.
            master_port = 20000 + _env_int(env, "SLURM_JOB_ID") % 20000
        return SimpleNamespace(
            launcher="srun",
            rank=_env_int(env, "SLURM_PROCID"),
            world_size=world,
            local_rank=_env_int(env, "SLURM_LOCALID", 0),
            local_world_size=local_world,
            master_addr=master_addr,
            master_port=master_port,
        )
    return SimpleNamespace(
        launcher="none", rank=0, world_size=1, local_rank=0, local_world_size=1, master_addr=None, master_port=None,
    )


def resolve_host(name):
    """
    An address other hosts can reach `name` at. A name resolving to loopback (Debian's /etc/hosts maps the host's
    own name to 127.0.1.1) is no use to other nodes: fall back to the address of the outgoing interface.
    """
    try:
        addr = socket.gethostbyname(name)
    except OSError as exc:
        raise RuntimeError(
            f"cannot resolve the address of rank 0's host {name!r} for a multi-machine run; "
            "set MASTER_ADDR or fix the host's name resolution"
        ) from exc
    if not addr.startswith("127."):
        return addr
    for family, _, _, _, sockaddr in socket.getaddrinfo(name, None, socket.AF_INET):
        if not sockaddr[0].startswith("127."):
            return sockaddr[0]
    raise RuntimeError(
        f"rank 0's host name {name!r} resolves only to loopback ({addr}), which other machines cannot reach; "
        "set MASTER_ADDR to an address of rank 0's host"
    )


def info():
    """
    This process's launch (see detect), found once.
    """
    global _INFO
    if _INFO is None:
        _INFO = detect()
    return _INFO


def rank():
    return info().rank


def world_size():
    return info().world_size


def rank_from_env(env=None):
    """
    This process's rank from the launchers' variables alone, without initialising MPI (the logger names its
    files with it before anything else starts): torchrun's RANK, MPI's PMI_RANK / OMPI_COMM_WORLD_RANK /
    PMIX_RANK, an srun step's SLURM_PROCID; 0 otherwise.
    """
    env = os.environ if env is None else env
    if _torchrun(env):
        return _env_int(env, "RANK", 0)
    for name in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK"):
        if name in env:
            return _env_int(env, name, 0)
    if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env:
        return _env_int(env, "SLURM_PROCID", 0)
    return 0


class TorchComm:
    """
    The part of mpi4py's communicator interface the code uses (rank, size, bcast, allgather, gather, allreduce of a
    sum, Barrier), over torch.distributed's default group, whose CPU side (gloo) carries the pickled objects.
    """

    def __init__(self, rank, size):
        self.rank = rank
        self.size = size

    def Get_rank(self):
        return self.rank

    def Get_size(self):
        return self.size

    def bcast(self, obj, root=0):
        box = [obj if self.rank == root else None]
        dist.broadcast_object_list(box, src=root)
        return box[0]

    def allgather(self, obj):
        out = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def gather(self, obj, root=0):
        out = self.allgather(obj)
        return out if self.rank == root else None

    def allreduce(self, value):
        return sum(self.allgather(value))

    def Barrier(self):
        self.allgather(None)

    barrier = Barrier


class SingleComm(TorchComm):
    """
    The communicator of one process where MPI is unavailable: every collective returns its own input.
    """

    def __init__(self):
        super().__init__(0, 1)

    def bcast(self, obj, root=0):
        return obj

    def allgather(self, obj):
        return [obj]


def comm():
    """
    The communicator of this run: MPI's COMM_WORLD under mpiexec (and for one process, as ADM), a TorchComm under
    torchrun and srun (setting up the torch.distributed group if needed).
    """
    global _COMM
    if _COMM is None:
        launch = info()
        if launch.launcher in ("torchrun", "srun"):
            if _GROUP_SETUP is None:
                raise RuntimeError(
                    f"{launch.launcher} ranks talk through torch.distributed: import guided_diffusion.dist_util, "
                    "which sets the group up"
                )
            _GROUP_SETUP()
            _COMM = TorchComm(launch.rank, launch.world_size)
        else:
            try:
                _COMM = _mpi_world()
            except (ImportError, RuntimeError):
                _COMM = SingleComm()
    return _COMM

"""Rank / world size / master address from whatever launched us: torchrun and the deepspeed launcher
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), mpirun (Open MPI's OMPI_COMM_WORLD_*, or any MPI through
mpi4py), srun (SLURM_*), or nothing (one process, on a free port unless MASTER_PORT is set). Set the torch-style variables ourselves before DeepSpeed looks,
so it never falls back to its own MPI discovery (which picks a non-loopback address from `hostname -I`).

Under mpirun without MASTER_ADDR, mpi4py (``pip install 'megadigpt[mpi]'``) broadcasts rank 0's host name and a
free port, and gives the local rank (the ranks sharing a node), so ``mpirun -np 64 --hostfile hosts python -m
megadigpt ...`` needs nothing else."""

import functools
import os
import re
import socket
from dataclasses import dataclass

from ..config import ConfigError

_MPI_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK")


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str


def first_slurm_host(nodelist: str) -> str:
    """First hostname of a SLURM nodelist such as ``gpu[003-005,010],login1``."""
    m = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if not m:
        return nodelist
    prefix, ranges = m.group(1), m.group(3)
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


@functools.lru_cache(maxsize=1)
def _mpi() -> DistEnv:
    """Every rank calls this once (cached): under mpi4py it is a collective."""
    e = os.environ
    try:
        from mpi4py import MPI
    except ImportError:
        MPI = None
    if MPI is None:
        if "OMPI_COMM_WORLD_RANK" not in e:
            raise ConfigError("launched by an MPI other than Open MPI: pip install mpi4py (megadigpt[mpi]) so the "
                              "ranks can find each other, or set RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR")
        size = int(e["OMPI_COMM_WORLD_SIZE"])
        if "MASTER_ADDR" not in e and int(e.get("OMPI_COMM_WORLD_LOCAL_SIZE", size)) != size:
            raise ConfigError("mpirun across nodes: pass the rendezvous host (-x MASTER_ADDR=<first host>), or pip "
                              "install mpi4py (megadigpt[mpi]) and megadigpt finds it")
        return DistEnv(int(e["OMPI_COMM_WORLD_RANK"]), size, int(e.get("OMPI_COMM_WORLD_LOCAL_RANK", 0)),
                       e.get("MASTER_ADDR", "127.0.0.1"), int(e.get("MASTER_PORT", 29500)), "mpi")
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    local_rank = node.Get_rank()
    node.Free()
    addr, port = e.get("MASTER_ADDR"), e.get("MASTER_PORT")
    if rank == 0:
        if not addr:
            addr = socket.gethostname()
        if not port:
            with socket.socket() as s:
                s.bind(("", 0))
                port = s.getsockname()[1]
    addr, port = comm.bcast((addr, port), root=0)
    return DistEnv(rank, size, local_rank, addr, int(port), "mpi")


def launched_by_mpirun(e) -> bool:
    """MPI rank variables, and not merely those ``srun --mpi=pmix|pmi2`` sets for its own tasks. mpirun inside an
    allocation starts its daemons with srun, so its ranks also carry SLURM step variables, which then describe the
    daemons: Open MPI's own variables, or an MPI world size other than the step's task count, tell them apart.
    Decided from variables every rank shares, so all ranks agree."""
    if not any(v in e for v in _MPI_RANK_VARS):
        return False
    if "SLURM_STEP_ID" not in e or "OMPI_COMM_WORLD_RANK" in e:
        return True
    size = e.get("PMI_SIZE") or e.get("MV2_COMM_WORLD_SIZE")
    return size is not None and size != e.get("SLURM_STEP_NUM_TASKS", e.get("SLURM_NTASKS"))


def discover() -> DistEnv:
    e = os.environ
    if "RANK" in e and "WORLD_SIZE" in e:
        return DistEnv(int(e["RANK"]), int(e["WORLD_SIZE"]), int(e.get("LOCAL_RANK", 0)),
                       e.get("MASTER_ADDR", "127.0.0.1"), int(e.get("MASTER_PORT", 29500)), "torch")
    if launched_by_mpirun(e):
        return _mpi()
    if "SLURM_PROCID" in e and "SLURM_STEP_ID" in e:  # inside srun (not merely inside an sbatch allocation)
        world = int(e.get("SLURM_STEP_NUM_TASKS", e.get("SLURM_NTASKS", 1)))
        addr = e.get("MASTER_ADDR") or first_slurm_host(e.get("SLURM_STEP_NODELIST", e.get("SLURM_NODELIST", "")))
        port = int(e.get("MASTER_PORT", 20000 + int(e.get("SLURM_JOB_ID", 0)) % 20000))
        return DistEnv(int(e["SLURM_PROCID"]), world, int(e.get("SLURM_LOCALID", 0)), addr or "127.0.0.1", port,
                       "slurm")
    return DistEnv(0, 1, 0, "127.0.0.1", int(e["MASTER_PORT"]) if "MASTER_PORT" in e else _free_port(), "none")


@functools.lru_cache(maxsize=1)
def _free_port() -> int:
    """A port the kernel says is free, for a run without a launcher (one process: its own rendezvous). A fixed
    default (29500) made two such runs on one machine collide (EADDRINUSE). Cached: every ``discover()`` of this
    process names the same port; the window until the store binds it is a few seconds at most."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


LAUNCHER_PID = os.getppid()  # at import (the CLI's first moments): a launcher that dies later is told apart


def set_parent_death_signal(sig: int) -> bool:
    """Linux ``prctl(PR_SET_PDEATHSIG, sig)``: the kernel sends ``sig`` to this process when the thread that forked
    it ends (0 clears it). False where unsupported."""
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl(1, int(sig), 0, 0, 0) == 0  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        return False


def follow_launcher(env: DistEnv) -> None:
    """Under torchrun or the deepspeed launcher (both fork their workers from their main thread), die with the
    launcher from the start: SIGHUP when it goes, whose default action ends a rank still starting up (stuck in a
    rendezvous, say); once training, ``megadigpt.train.runtime.SignalFlag`` turns it into checkpoint-and-exit.
    torchrun starts each worker in a session of its own, so nothing else would reach them."""
    import signal
    import sys

    if env.launcher == "torch" and sys.platform.startswith("linux") and os.getppid() == LAUNCHER_PID:
        set_parent_death_signal(signal.SIGHUP)


def rank_variables(env: DistEnv, device_index=None, environ=None) -> dict:
    """The torch-style variables for this rank. ``LOCAL_RANK`` is what DeepSpeed takes as this rank's device index
    (the process group's ``device_id``, the engine's ``set_device``, ``zero.Init``'s local device), so on a GPU it
    is the index of this rank's device among those the process sees (``device_index``), not its rank on the node:
    under ``--gpus-per-task=1`` or ``--gpu-bind`` each task sees one device, index 0, and local ranks 1+ would get
    "invalid device ordinal". DeepSpeed asserts ``LOCAL_RANK == OMPI_COMM_WORLD_LOCAL_RANK`` under Open MPI, so
    that one follows. megadigpt's own code keeps the node rank in :class:`DistEnv` and never reads ``LOCAL_RANK``."""
    environ = os.environ if environ is None else environ
    local = str(env.local_rank if device_index is None else device_index)
    out = dict(RANK=str(env.rank), WORLD_SIZE=str(env.world_size), LOCAL_RANK=local, MASTER_ADDR=env.master_addr,
               MASTER_PORT=str(env.master_port))
    if "OMPI_COMM_WORLD_LOCAL_RANK" in environ:
        out["OMPI_COMM_WORLD_LOCAL_RANK"] = local
    return out


def export(env: DistEnv, device_index=None) -> None:
    os.environ.update(rank_variables(env, device_index))

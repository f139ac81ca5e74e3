"""Rank / world size / master address from whatever launched us: torchrun and the deepspeed launcher
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), mpirun (OMPI_COMM_WORLD_*), srun (SLURM_*),
or nothing (one process). Set the torch-style variables ourselves before DeepSpeed looks, so it never falls back
to MPI discovery (which needs mpi4py and picks a non-loopback address)."""

import os
import re
from dataclasses import dataclass


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


def discover() -> DistEnv:
    e = os.environ
    if "RANK" in e and "WORLD_SIZE" in e:
        return DistEnv(int(e["RANK"]), int(e["WORLD_SIZE"]), int(e.get("LOCAL_RANK", 0)),
                       e.get("MASTER_ADDR", "127.0.0.1"), int(e.get("MASTER_PORT", 29500)), "torch")
    if "OMPI_COMM_WORLD_RANK" in e:
        return DistEnv(int(e["OMPI_COMM_WORLD_RANK"]), int(e["OMPI_COMM_WORLD_SIZE"]),
                       int(e.get("OMPI_COMM_WORLD_LOCAL_RANK", 0)), e.get("MASTER_ADDR", "127.0.0.1"),
                       int(e.get("MASTER_PORT", 29500)), "mpi")
    if "SLURM_PROCID" in e and "SLURM_STEP_ID" in e:  # inside srun (not merely inside an sbatch allocation)
        world = int(e.get("SLURM_STEP_NUM_TASKS", e.get("SLURM_NTASKS", 1)))
        addr = e.get("MASTER_ADDR") or first_slurm_host(e.get("SLURM_STEP_NODELIST", e.get("SLURM_NODELIST", "")))
        port = int(e.get("MASTER_PORT", 20000 + int(e.get("SLURM_JOB_ID", 0)) % 20000))
        return DistEnv(int(e["SLURM_PROCID"]), world, int(e.get("SLURM_LOCALID", 0)), addr or "127.0.0.1", port,
                       "slurm")
    return DistEnv(0, 1, 0, "127.0.0.1", int(e.get("MASTER_PORT", 29500)), "none")


def export(env: DistEnv) -> None:
    os.environ.update(RANK=str(env.rank), WORLD_SIZE=str(env.world_size), LOCAL_RANK=str(env.local_rank),
                      MASTER_ADDR=env.master_addr, MASTER_PORT=str(env.master_port))

"""Which device and how many CPU threads each rank takes (the launcher's view), and which optimizer a DeepSpeed
config demands: pure decisions, tested without a GPU, plus one real CPU-affinity-restricted process."""

import os
import shutil
import subprocess
import sys

import pytest

from megadigpt.config import ConfigError
from megadigpt.distributed.engine import cpu_threads, device_index, local_world_size
from megadigpt.train.optim import choose_optimizer, offloads_optimizer

from .conftest import REPO, subprocess_env


def test_device_index_wraps_when_each_task_sees_one_gpu():
    assert [device_index(r, 8) for r in range(8)] == list(range(8))  # one task per GPU, all GPUs visible
    assert [device_index(r, 1) for r in range(4)] == [0, 0, 0, 0]  # --gpus-per-task=1: each sees only its own
    assert [device_index(r, 2) for r in range(4)] == [0, 1, 0, 1]
    with pytest.raises(ConfigError, match="no CUDA device"):
        device_index(0, 0)


def test_local_world_size_from_every_launcher():
    assert local_world_size({"LOCAL_WORLD_SIZE": "4"}, 16) == 4  # torchrun
    assert local_world_size({"OMPI_COMM_WORLD_LOCAL_SIZE": "8"}, 16) == 8  # mpirun
    assert local_world_size({"SLURM_NTASKS_PER_NODE": "2"}, 16) == 2
    # srun without --ntasks-per-node: SLURM's compressed per-node list, this node's entry by SLURM_NODEID
    env = {"SLURM_TASKS_PER_NODE": "4(x2),3", "SLURM_NODEID": "2"}
    assert local_world_size(env, 11) == 3
    assert local_world_size({**env, "SLURM_NODEID": "1"}, 11) == 4
    assert local_world_size({"SLURM_STEP_TASKS_PER_NODE": "2(x3)", "SLURM_TASKS_PER_NODE": "8"}, 6) == 2
    assert local_world_size({}, 3) == 3  # no launcher variables: every rank on this node


def test_cpu_threads_from_the_affinity_mask():
    assert cpu_threads(64, {"SLURM_TASKS_PER_NODE": "8"}) == 8  # the node's CPUs shared by its ranks
    assert cpu_threads(10, {"SLURM_TASKS_PER_NODE": "8", "SLURM_CPU_BIND_TYPE": "mask_cpu:"}) == 10  # per-task mask
    assert cpu_threads(64, {"SLURM_TASKS_PER_NODE": "8", "SLURM_CPU_BIND_TYPE": "none"}) == 8
    assert cpu_threads(3, {"LOCAL_WORLD_SIZE": "8"}) == 1  # never 0


@pytest.mark.skipif(not shutil.which("taskset") or (os.cpu_count() or 1) < 2, reason="needs taskset and 2 CPUs")
def test_start_up_uses_the_affinity_not_the_machine():
    """A process bound to one CPU (as srun --cpu-bind does) gets one thread; ``os.cpu_count()`` sees them all."""
    code = ("import os, torch; from megadigpt.distributed.engine import pick_device; "
            "from megadigpt.distributed.env import discover; pick_device(discover(), 'cpu'); "
            "print(torch.get_num_threads(), os.cpu_count())")
    env = subprocess_env()
    for k in ("OMP_NUM_THREADS", "LOCAL_WORLD_SIZE", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    env.update(SLURM_CPU_BIND_TYPE="mask_cpu:", SLURM_TASKS_PER_NODE="1")
    out = subprocess.run(["taskset", "-c", "0", sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, cwd=str(REPO), timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    threads, cpus = map(int, out.stdout.split()[-2:])
    assert cpus >= 2 and threads == 1


def test_offloaded_optimizer_gets_deepspeeds_cpu_adam():
    from megadigpt.distributed.engine import DS_CONFIG_DIR
    import json

    offload = json.loads((DS_CONFIG_DIR / "zero3_offload.json").read_text())
    assert offloads_optimizer(offload) and choose_optimizer(offload, "cuda") == "cpu_adam"
    assert choose_optimizer({**offload, "zero_force_ds_cpu_optimizer": False}, "cuda") == "fused"
    nvme = {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "nvme"}}}
    assert choose_optimizer(nvme, "cuda") == "cpu_adam"
    params_only = {"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"},
                                         "offload_optimizer": {"device": "none"}}}
    assert choose_optimizer(params_only, "cuda") == "fused"
    assert choose_optimizer(json.loads((DS_CONFIG_DIR / "zero3.json").read_text()), "cpu") == "fused"
    assert choose_optimizer(None, "mps") == "torch"


def test_one_visible_gpu_per_task_reaches_deepspeed_as_device_0(monkeypatch):
    """A simulated SLURM step of 4 tasks on a node with ``--gpus-per-task=1``: each task sees one GPU (index 0) while
    its SLURM_LOCALID is 0..3. DeepSpeed takes its device from LOCAL_RANK (process group ``device_id``, the
    engine's ``set_device``, ``zero.Init``): it must read 0 on every task, or local ranks 1+ get "invalid device
    ordinal". Under Open MPI, DeepSpeed asserts LOCAL_RANK == OMPI_COMM_WORLD_LOCAL_RANK: that one follows."""
    from deepspeed.comm.utils import get_local_rank_from_launcher as deepspeed_local_rank

    from megadigpt.distributed import env as dist_env

    exported = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "OMPI_COMM_WORLD_RANK",
                "OMPI_COMM_WORLD_LOCAL_RANK", "PMI_RANK", "PMIX_RANK")
    for var in exported:  # recorded as they are now (export writes os.environ itself): all restored afterwards
        monkeypatch.setenv(var, "unset")

    def fresh_task():  # what each task's process starts with: no torch-style variables yet
        for var in exported:
            monkeypatch.delenv(var, raising=False)

    for task in range(4):
        fresh_task()
        monkeypatch.setenv("SLURM_PROCID", str(4 + task))  # node 2 of 2
        monkeypatch.setenv("SLURM_LOCALID", str(task))
        monkeypatch.setenv("SLURM_STEP_ID", "0")
        monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "8")
        monkeypatch.setenv("SLURM_STEP_NODELIST", "gpu[01-02]")
        monkeypatch.setenv("SLURM_JOB_ID", "1234")
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", str(task))  # what --gpus-per-task=1 leaves each task
        env = dist_env.discover()
        assert (env.rank, env.local_rank, env.world_size, env.launcher) == (4 + task, task, 8, "slurm")
        dev = device_index(env.local_rank, 1)  # the one device this task sees
        dist_env.export(env, dev)
        assert deepspeed_local_rank() == 0 and os.environ["RANK"] == str(4 + task)
    # every GPU visible (one task per GPU, no binding): the local rank is the device index, as before
    fresh_task()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    env = dist_env.discover()
    dist_env.export(env, device_index(env.local_rank, 4))
    assert deepspeed_local_rank() == 3
    # mpirun with one GPU per rank: Open MPI's local rank follows, so DeepSpeed's engine assertion holds
    assert dist_env.rank_variables(env, 0, {"OMPI_COMM_WORLD_LOCAL_RANK": "3"})["OMPI_COMM_WORLD_LOCAL_RANK"] == "0"
    assert "OMPI_COMM_WORLD_LOCAL_RANK" not in dist_env.rank_variables(env, 0, {})


def test_cuda_devices_always_carry_their_index():
    """A CUDA device named without an index resolves to the current one (DALI builds a CPU pipeline for
    ``device_id=None`` and ``feed_ndarray`` then writes host output into a CUDA pointer); and no index-less CUDA
    device is left in the package: every ``torch.device("cuda")`` goes through ``resolve_device``."""
    import re

    import torch

    from megadigpt.distributed.engine import resolve_device

    assert resolve_device("cpu") == torch.device("cpu") and resolve_device(torch.device("cpu")).index is None
    assert resolve_device(torch.device("cuda", 3)) == torch.device("cuda", 3)  # no CUDA call needed
    assert resolve_device("cuda", current_index=lambda: 2) == torch.device("cuda", 2)
    assert resolve_device(torch.device("cuda"), current_index=lambda: 5).index == 5
    # code, not prose: a call or keyword argument (docstrings quote the names between double backticks)
    indexless = re.compile(r"""(?<!`)torch\.device\(\s*["']cuda["']\s*\)|\.to\(\s*["']cuda["']\s*\)"""
                           r"""|\bdevice=["']cuda["']|(?<!`)\.cuda\(\s*\)""")
    found = [f"{p.relative_to(REPO)}:{i}" for p in sorted((REPO / "megadigpt").rglob("*.py"))
             for i, line in enumerate(p.read_text().splitlines(), 1)
             if indexless.search(line.split("#")[0])]
    assert not found, f"index-less CUDA devices: {found}"

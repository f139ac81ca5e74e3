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

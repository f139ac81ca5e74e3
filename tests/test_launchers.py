"""The same entry point under the deepspeed launcher (single node, and its multi-node runner with a hostfile),
torchrun across two "nodes" (two agents), and mpirun (with mpi4py finding the rendezvous): 2 ranks, ZeRO-2, two
steps, identical losses to a plain torchrun run. (srun: tests/test_slurm.py.)"""

import os
import shutil
import subprocess
import sys

import pytest

from .conftest import REPO, TINY, free_port, losses, require_shared, run_cli, subprocess_env


def _args(cifar_dir, run_dir):
    return ["pretrain", "--data", str(cifar_dir / "train-000000.tar"), "--run-dir", str(run_dir), *TINY,
            "train.global_batch=8", "train.micro_batch=4", "train.max_steps=2", "train.zero_stage=2"]


@pytest.fixture(scope="module")
def torchrun_losses(cifar_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("launch") / "torchrun"
    run_cli(_args(cifar_dir, run_dir), nproc=2)
    return losses(run_dir)


def _run(cmd, **env):
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=subprocess_env(**env), cwd=str(REPO))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]


def test_deepspeed_launcher(cifar_dir, torchrun_losses, tmp_path):
    ds = shutil.which("deepspeed") or os.path.join(os.path.dirname(sys.executable), "deepspeed")
    _run([ds, "--num_gpus", "2", "--master_port", str(free_port()), "--module", "megadigpt",
          *_args(cifar_dir, tmp_path / "ds")])
    got = losses(tmp_path / "ds")
    assert got.keys() == torchrun_losses.keys()
    for s in got:
        assert got[s] == pytest.approx(torchrun_losses[s], abs=1e-6)


def _same(run_dir, want):
    got = losses(run_dir)
    assert got.keys() == want.keys()
    for s in got:
        assert got[s] == pytest.approx(want[s], abs=1e-6)


def test_deepspeed_launcher_hostfile(cifar_dir, torchrun_losses, tmp_path):
    """The multi-node path of the deepspeed launcher: a hostfile, its openmpi runner (mpirun; pdsh needs ssh).
    DeepSpeed passes no rendezvous to mpirun's ranks: mpi4py finds it."""
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        if require_shared():
            pytest.fail("mpirun missing (CI installs openmpi-bin)")
        pytest.skip("mpirun not installed (apt-get install openmpi-bin)")
    hosts = tmp_path / "hostfile"
    hosts.write_text("localhost slots=2\n")
    ds = shutil.which("deepspeed") or os.path.join(os.path.dirname(sys.executable), "deepspeed")
    # one host: --force_multi takes the multi-node runner anyway; --no_ssh_check and --master_addr spare ssh
    p = subprocess.run([ds, "--hostfile", str(hosts), "--force_multi", "--no_ssh_check", "--launcher", "openmpi",
                        "--launcher_args", "--allow-run-as-root --oversubscribe --mca btl_tcp_if_include lo",
                        "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "--module", "megadigpt",
                        *_args(cifar_dir, tmp_path / "dsmn")], capture_output=True, text=True, timeout=600,
                       env=subprocess_env(), cwd=str(REPO), stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "cmd = mpirun -n 2 -hostfile" in p.stdout + p.stderr
    _same(tmp_path / "dsmn", torchrun_losses)


def test_torchrun_two_nodes(cifar_dir, torchrun_losses, tmp_path):
    """torchrun as on two nodes: two agents (one per "node"), c10d rendezvous, one worker each."""
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
           "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "megadigpt-test",
           "-m", "megadigpt", *_args(cifar_dir, tmp_path / "tr2")]
    agents = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=subprocess_env(), cwd=str(REPO)) for _ in range(2)]
    outs = [a.communicate(timeout=600)[0] for a in agents]
    assert [a.returncode for a in agents] == [0, 0], "\n".join(o[-3000:] for o in outs)
    _same(tmp_path / "tr2", torchrun_losses)


def test_mpirun(cifar_dir, torchrun_losses, tmp_path):
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        if require_shared():
            pytest.fail("mpirun missing (CI installs openmpi-bin)")
        pytest.skip("mpirun not installed (apt-get install openmpi-bin)")
    if require_shared():  # CI installs the [test] extra: the rendezvous must come from mpi4py, not be given
        import importlib

        importlib.import_module("mpi4py")
    env = subprocess_env()
    env.pop("MASTER_PORT")
    exports = [a for k in ("DS_ACCELERATOR", "OMP_NUM_THREADS", "GLOO_SOCKET_IFNAME", "PATH",
                           "PYTHONUNBUFFERED") for a in ("-x", k)]
    # --noprefix: mpirun called by its absolute path acts as --prefix /usr and puts /usr/bin first on the ranks'
    # PATH, so torch's JIT build of DeepSpeed's CPU shm op ran the system ninja instead of the environment's: the
    # other version's build log hashes differ, and the op was rebuilt (here, and again by the next run), 1-2 min each
    cmd = [mpirun, "--allow-run-as-root", "--oversubscribe", "--noprefix", "-np", "2", *exports, sys.executable,
           "-m", "megadigpt", *_args(cifar_dir, tmp_path / "mpi")]
    # no stdin: Open MPI forwards stdin to rank 0 and polls it, which slowed this run from ~10 s to ~90 s
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=str(REPO),
                       stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    got = losses(tmp_path / "mpi")
    for s in got:
        assert got[s] == pytest.approx(torchrun_losses[s], abs=1e-6)


def test_mpirun_told_apart_from_srun():
    """srun --mpi=pmix/pmi2 sets MPI rank variables for its own tasks (SLURM's variables are right there);
    mpirun inside an allocation starts its daemons with srun, so its ranks carry SLURM step variables that
    describe the daemons (the MPI variables are right)."""
    from megadigpt.distributed.env import launched_by_mpirun

    step = {"SLURM_PROCID": "1", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "4"}
    assert not launched_by_mpirun(step)
    assert not launched_by_mpirun(step | {"PMIX_RANK": "1"})  # srun --mpi=pmix
    assert not launched_by_mpirun(step | {"PMI_RANK": "1", "PMI_SIZE": "4"})  # srun --mpi=pmi2
    assert launched_by_mpirun(step | {"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "16"})  # Open MPI
    assert launched_by_mpirun(step | {"PMI_RANK": "5", "PMI_SIZE": "16"})  # MPICH's hydra, 2 nodes x 8
    assert launched_by_mpirun({"PMI_RANK": "0", "PMI_SIZE": "2"})  # mpirun outside SLURM

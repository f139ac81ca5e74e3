"""The same entry point under the deepspeed launcher and mpirun (torchrun and plain python are exercised by
test_deepspeed.py): 2 ranks, ZeRO-2, two steps, identical losses to a torchrun run."""

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


def test_mpirun(cifar_dir, torchrun_losses, tmp_path):
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        if require_shared():
            pytest.fail("mpirun missing (CI installs openmpi-bin)")
        pytest.skip("mpirun not installed (apt-get install openmpi-bin)")
    env = subprocess_env()
    exports = [a for k in ("DS_ACCELERATOR", "OMP_NUM_THREADS", "GLOO_SOCKET_IFNAME", "MASTER_PORT", "PATH",
                           "PYTHONUNBUFFERED") for a in ("-x", k)]
    cmd = [mpirun, "--allow-run-as-root", "--oversubscribe", "-np", "2", *exports, sys.executable, "-m",
           "megadigpt", *_args(cifar_dir, tmp_path / "mpi")]
    # no stdin: Open MPI forwards stdin to rank 0 and polls it, which slowed this run from ~10 s to ~90 s
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=str(REPO),
                       stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    got = losses(tmp_path / "mpi")
    for s in got:
        assert got[s] == pytest.approx(torchrun_losses[s], abs=1e-6)

"""Real DeepSpeed engines on gloo: ZeRO-3 on 2 ranks vs 1 rank, gradient accumulation, activation checkpointing,
and save -> kill -9 -> resume. Each run is the real CLI in fresh processes."""

import signal
import subprocess
import time
from pathlib import Path

import pytest

from .conftest import TINY, losses, megadigpt_cmd, run_cli, subprocess_env, REPO

STEPS = 6


def _args(cifar_dir, run_dir, *extra):
    return ["pretrain", "--data", str(cifar_dir / "train-000000.tar"), "--run-dir", str(run_dir), *TINY,
            "train.global_batch=8", f"train.max_steps={STEPS}", "train.zero_stage=3", *extra]


@pytest.fixture(scope="module")
def reference_runs(cifar_dir, tmp_path_factory):
    """1 rank x micro 8 and 2 ranks x micro 4 (ZeRO-3), the same global batch of 8."""
    base = tmp_path_factory.mktemp("ds")
    run_cli(_args(cifar_dir, base / "r1", "train.micro_batch=8"))
    run_cli(_args(cifar_dir, base / "r2", "train.micro_batch=4"), nproc=2)
    return base, losses(base / "r1"), losses(base / "r2")


def test_two_ranks_zero3_match_one_rank(reference_runs):
    _, one, two = reference_runs
    assert sorted(one) == sorted(two) == list(range(1, STEPS + 1))
    for step in range(1, 5):  # Adam amplifies reduction-order rounding later on; the first steps agree tightly
        for a, b in zip(one[step], two[step]):
            assert abs(a - b) < 2e-6, (step, one[step], two[step])
    assert one[STEPS][0] < one[1][0]  # and it learns


def test_gradient_accumulation_matches(reference_runs, cifar_dir, tmp_path):
    _, one, _ = reference_runs
    run_cli(_args(cifar_dir, tmp_path / "acc", "train.micro_batch=4"))  # 1 rank, 2 micro-batches per step
    acc = losses(tmp_path / "acc")
    for step in range(1, 5):
        for a, b in zip(one[step], acc[step]):
            assert abs(a - b) < 2e-6, (step, one[step], acc[step])


def test_activation_checkpointing_leaves_losses_unchanged(reference_runs, cifar_dir, tmp_path):
    _, _, two = reference_runs
    run_cli(_args(cifar_dir, tmp_path / "ac", "train.micro_batch=4", "train.activation_checkpointing=true"), nproc=2)
    ac = losses(tmp_path / "ac")
    for step in range(1, STEPS + 1):
        assert ac[step] == pytest.approx(two[step], abs=1e-7)


def test_kill_and_resume_reproduces_the_loss_sequence(reference_runs, cifar_dir, tmp_path):
    _, _, two = reference_runs
    run_dir = tmp_path / "killed"
    args = _args(cifar_dir, run_dir, "train.micro_batch=4", "train.ckpt_every=3")
    proc = subprocess.Popen(megadigpt_cmd(2) + args, env=subprocess_env(), cwd=str(REPO), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = run_dir / "checkpoints" / "latest"
    deadline = time.time() + 300
    while time.time() < deadline and not (latest.is_file() and latest.read_text().strip() == "step_00000003"):
        assert proc.poll() is None, "run ended before its first checkpoint"
        time.sleep(0.05)
    # kill -9 the whole job mid-run: the launcher and both ranks (torchrun puts workers in their own sessions,
    # so a process-group kill would miss them)
    import psutil

    tree = [psutil.Process(proc.pid)] + psutil.Process(proc.pid).children(recursive=True)
    for p in tree:
        p.send_signal(signal.SIGKILL)
    psutil.wait_procs(tree, timeout=30)
    proc.wait()
    first = losses(run_dir)
    assert 3 in first and STEPS not in first, "the kill must land between the checkpoint and the end"
    run_cli(args, nproc=2)  # same command: resumes from step 3 by itself
    resumed = losses(run_dir)
    events = [l for l in (run_dir / "metrics.jsonl").read_text().splitlines() if '"event": "resume"' in l]
    assert len(events) == 1 and '"step": 3' in events[0]
    for step in range(1, STEPS + 1):
        assert resumed[step] == pytest.approx(two[step], abs=1e-7), step
    # a finished run directory resumes to nothing and changes nothing
    run_cli(args, nproc=2)
    assert losses(run_dir) == resumed


@pytest.mark.parametrize("stage", [1, 3])
def test_bf16_engine_with_accumulation_tracks_fp32(reference_runs, cifar_dir, tmp_path, stage):
    """bf16 DeepSpeed engines (2 ranks, 4 micro-batches accumulated per step) accumulate and reduce gradients in
    fp32 and track the fp32 run of the same global batch: measured 5e-3 apart by step 4 (bf16 activations)."""
    import json

    _, one, _ = reference_runs
    run = tmp_path / f"bf16_z{stage}"
    run_cli(_args(cifar_dir, run, "train.micro_batch=1", "train.precision=bf16", f"train.zero_stage={stage}",
                  "train.max_steps=4"), nproc=2)
    start = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert start["precision"] == "bf16" and start["accum"] == 4 and start["grad_accum_dtype"] == "fp32"
    got = losses(run)
    for step in range(1, 5):
        for a, b in zip(one[step], got[step]):
            assert abs(a - b) < 2e-2, (step, one[step], got[step])
    assert got[1] != one[1]  # it really ran in bf16


def test_compiled_run_equals_eager(reference_runs, cifar_dir, tmp_path):
    """train.compile: every block (and the teacher) through torch.compile gives the eager run's losses; the first
    step's time (the cold compile) is logged."""
    import json

    _, one, _ = reference_runs
    run = tmp_path / "compiled"
    run_cli(_args(cifar_dir, run, "train.micro_batch=8", "train.compile=true", "train.max_steps=4"))
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    compiled = [e for e in events if e.get("event") == "compiled"]
    assert len(compiled) == 1 and compiled[0]["step"] == 1 and compiled[0]["first_step_s"] > 0
    got = losses(run)
    for step in range(1, 5):
        for a, b in zip(one[step], got[step]):
            assert abs(a - b) < 1e-5, (step, one[step], got[step])


def test_zero3_partitioned_build_matches_a_plain_build(reference_runs, cifar_dir, tmp_path):
    """ZeRO-3 builds the student partitioned (never whole on a rank); ZeRO-1 builds it plain. Same seed, same
    initial weights: the first losses agree to 1e-6. The start event says which build ran and its host peak."""
    import json

    base, _, two = reference_runs
    run_cli(_args(cifar_dir, tmp_path / "z1", "train.micro_batch=4", "train.zero_stage=1", "train.max_steps=3"),
            nproc=2)
    plain = losses(tmp_path / "z1")
    for step in range(1, 4):
        for a, b in zip(plain[step], two[step]):
            assert abs(a - b) < 1e-6, (step, plain[step], two[step])
    for run, want in ((base / "r2", True), (tmp_path / "z1", False)):
        start = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
        assert start["partitioned_build"] is want and start["host_build_peak_gib"] >= 0

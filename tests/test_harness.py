"""The run harness (``megadigpt.train.harness``): what it does the same way for every task, and the two behaviours
that changed on purpose when the three loops became one (issue 29):

* the per-micro-batch seeds are drawn from numpy's SeedSequence of (seed, step, micro-batch, rank): the former
  arithmetic gave different (micro-batch, rank) pairs the same seed from 8 ranks on;
* fine-tuning and segmentation now roll ``checkpoints/latest`` back after more than ``train.nan_tolerance``
  non-finite steps in a row, as pretraining did (before, their last checkpoint was left as it was, even one
  written during the streak);
* fine-tuning now checkpoints on the clock (``train.ckpt_every_minutes``), as pretraining and segmentation did.

Also: the epoch iteration (``epoch_batches``: a resume mid-epoch, the tail dropped, a loader that ends early), the
seeds, and the teardown on an exception (signal handlers restored, the lock released, the metrics sink closed).
Everything else the harness does is what the loops did, bit for bit: tests/test_same_losses.py."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from megadigpt.checkpoint import latest_tag

from .conftest import REPO, TINY, run_cli, subprocess_env

FT = ["--config", "cifar10_finetune", "data.num_workers=0", "train.progress=off", "train.log_every=1",
      "train.tensorboard=false", "data.loader=torch", "model.arch=vit_tiny", "model.embed_dim=64", "model.depth=2",
      "model.num_heads=2", "model.patch_size=4", "train.zero_stage=1", "train.global_batch=16",
      "train.micro_batch=16", "train.epochs=1"]  # 128 images: 8 steps in the epoch


def _events(run_dir, name):
    return [json.loads(l) for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
            if json.loads(l).get("event") == name]


def test_epoch_batches_resume_tail_and_early_end():
    from megadigpt.train.harness import epoch_batches

    made = []

    def loader(n):
        def make(epoch, skip):
            made.append((epoch, skip))
            return iter([(epoch, i) for i in range(skip, n)])
        return make

    # 2 steps an epoch of 2 micro-batches; 5 per epoch in the loader: the fifth (no full step) is dropped
    it = epoch_batches(loader(5), steps_per_epoch=2, accum=2, start_step=3)  # mid-epoch 1: skip 2 micro-batches
    got = [next(it) for _ in range(6)]
    assert got == [(1, 2), (1, 3), (2, 0), (2, 1), (2, 2), (2, 3)] and made == [(1, 2), (2, 0)]
    it = epoch_batches(loader(3), steps_per_epoch=2, accum=2, start_step=0)
    with pytest.raises(RuntimeError, match="epoch 0 loader ended early"):
        list(it)


def test_step_seeds_never_collide_and_seed_every_generator():
    """Deliberate change: the seeds were ``seed * 1_000_003 + step * 1009 + micro * 7 + rank`` in the transfer loops
    (without ``micro * 7`` in pretraining's), under which rank 7's first micro-batch drew the drop-path masks and
    mixup parameters of rank 0's second, and rank 1009 those of the next step. Now: no two (step, micro-batch,
    rank) of 50 steps x 4 micro-batches x 1024 ranks share a seed, and the same tuple gives the same draws."""
    import random

    import numpy as np
    import torch

    from megadigpt.train.harness import seed_everything, step_seed

    old = {(s * 1009 + m * 7 + r) % 2 ** 32 for s in range(50) for m in range(4) for r in range(1024)}
    assert len(old) < 50 * 4 * 1024  # (the former formula's collisions, the reason for the change)
    seeds = {step_seed(0, s, m, r) for s in range(50) for m in range(4) for r in range(1024)}
    assert len(seeds) == 50 * 4 * 1024 and all(0 <= x < 2 ** 64 for x in seeds)
    assert step_seed(1, 0, 0, 0) != step_seed(0, 0, 0, 0)

    def draws():
        return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]

    seed_everything(step_seed(0, 3, 1, 7))
    a = draws()
    seed_everything(step_seed(0, 3, 1, 6))
    b = draws()
    seed_everything(step_seed(0, 3, 1, 7))
    assert draws() == a and all(x != y for x, y in zip(a, b))


def test_finetune_rolls_back_after_repeated_nonfinite_steps(cifar_small, tmp_path):
    """Deliberate change: fine-tuning's divergence now rolls ``latest`` back to the last checkpoint before the
    streak (as pretraining's does), and says so."""
    run = tmp_path / "ft"
    p = run_cli(["finetune", "--run-dir", str(run), "--train", str(cifar_small / "train.jsonl"), "--val",
                 str(cifar_small / "val.jsonl"), *FT, "train.ckpt_every=1", "train.nan_tolerance=2"], check=False,
                MEGADIGPT_FAULTS="nan=3,nan=4,nan=5")
    assert p.returncode == 3, p.stderr[-3000:]
    assert "non-finite loss at steps 3..5" in p.stderr and "rolled back" in p.stderr
    assert latest_tag(run) == "step_00000002"  # the checkpoints written during the streak are not resumed
    assert _events(run, "rollback")[0]["to"] == "step_00000002"
    assert [e["step"] for e in _events(run, "nonfinite_loss")] == [3, 4, 5]


def test_finetune_checkpoints_on_the_clock(cifar_small, tmp_path):
    """Deliberate change: ``train.ckpt_every_minutes`` now reaches fine-tuning. With a clock that is always due,
    every step is checkpointed (before, a fine-tune of max_steps 4 in an 8-step epoch checkpointed at step 4 only:
    the rollback test above, ckpt_every=1 aside, and tests/test_finetune.py's runs show the epoch-only default)."""
    args = ["--train", str(cifar_small / "train.jsonl"), "--val", str(cifar_small / "val.jsonl"), *FT,
            "train.max_steps=4", "train.ckpt_keep=0"]
    run_cli(["finetune", "--run-dir", str(tmp_path / "clock"), *args, "train.ckpt_every_minutes=0.000001"])
    assert [e["step"] for e in _events(tmp_path / "clock", "checkpoint")] == [1, 2, 3, 4]


TEARDOWN = textwrap.dedent("""
    import json, signal, sys
    from megadigpt.config import load_config
    from megadigpt.train import runtime
    from megadigpt.train.pretrain import pretrain

    before = signal.getsignal(signal.SIGTERM)
    cfg = load_config("demo", sys.argv[2:])
    try:
        pretrain(cfg)
    except RuntimeError as e:
        error = str(e)
    else:
        error = None
    print(json.dumps({"error": error, "locks": list(runtime._held), "sigterm_restored":
                      signal.getsignal(signal.SIGTERM) is before, "relock": runtime.try_lock(sys.argv[1])}))
""")


def test_teardown_runs_when_a_step_raises(cifar_dir, tmp_path):
    """An exception inside the loop (an injected crash at step 2) still restores the signal handlers, closes the
    metrics sink (its records are on disk) and releases the run directory's lock, in the same process."""
    run = tmp_path / "crash"
    overrides = [*TINY, f"train.run_dir={run}", "data.source=" + str(cifar_dir / "train-000000.tar"),
                 "train.global_batch=4", "train.micro_batch=4", "train.max_steps=4", "train.zero_stage=0",
                 "train.device=cpu", "train.precision=fp32"]
    p = subprocess.run([sys.executable, "-c", TEARDOWN, str(run), *overrides], capture_output=True, text=True,
                       timeout=300, env=subprocess_env(MEGADIGPT_FAULTS="crash=2"), cwd=str(REPO))
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["error"] == "injected crash at step 2 (MEGADIGPT_FAULTS)"
    assert out["locks"] == [] and out["relock"] is None and out["sigterm_restored"]
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["event"] == "start" and any(r.get("step") == 1 and "gen_loss" in r for r in lines)


def test_segmentation_refuses_compile_instead_of_ignoring_it(tmp_path):
    """``train.compile`` is in the segmentation tree (the shared run section) but segmentation compiles nothing:
    one line, not a silently uncompiled run."""
    from megadigpt.config import ConfigError
    from megadigpt.segment_config import load_segment_config
    from megadigpt.train.segment import plan_segment

    cfg = load_segment_config("segment_composite", ["model.arch=vit_tiny", f"train.run_dir={tmp_path}",
                                                    "train.device=cpu", "train.compile=true"])
    with pytest.raises(ConfigError, match="train.compile is not supported by segmentation"):
        plan_segment(cfg, 1, need_data=False)

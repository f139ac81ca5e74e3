"""Records the per-step losses of the three training loops (``pretrain``, ``finetune``, ``segment``) for one config
and seed, in fp32, under ZeRO-1 and ZeRO-3, on 2 gloo ranks (CPU), at toy size: the reference that
``tests/test_same_losses.py`` compares a refactored tree with, bit for bit.

Run it ON THE COMMIT BEFORE A REFACTOR, in a clean worktree of that commit (so nobody's uncommitted edits enter the
recording), with this file (and tests/config_matrix_runner.py, which it reuses) in that worktree's tests/:

    git worktree add --detach /tmp/baseline HEAD
    cp tests/record_same_losses.py /tmp/baseline/tests/     # if the commit does not have it yet
    cd /tmp/baseline && MEGADIGPT_SHARED=/path/to/shared OMP_NUM_THREADS=1 \\
        /path/to/.venv/bin/python -m tests.record_same_losses --out /path/to/repo/tests/data/same_losses.json
    git worktree remove --force /tmp/baseline

The megadigpt imported is the one of the tree this file sits in (``PYTHONPATH`` is set to it, ahead of an editable
install of another checkout), and this is checked. ``--check FILE`` reruns the recorded argv and compares, as the
test does (a second recording on the same commit: the runs' determinism).

Six runs in one 2-rank process pair (``tests/config_matrix_runner.py``: the start-up is paid once), in this order:

* ``pretrain.zero1``, ``pretrain.zero3``: ``tests/conftest.py``'s TINY model (ViT 64 x 4, patch 4, 32 px, pixel
  targets) on 24 CIFAR-10 images, 4 optimizer steps of 8 images (2 per rank x 2 ranks x 2 accumulated), 3 steps an
  epoch (step 4 is in the second epoch); ``gen_loss`` and ``dis_loss`` of every step.
* ``finetune.zero1``, ``finetune.zero3``: ``cifar10_finetune`` (mixup/cutmix, RandAugment, erasing, drop path, layer
  decay) from ``pretrain.zero1``'s weights, same batch and steps, EMA 0.9; ``train_loss`` of every step, and the
  last evaluation's ``val_loss`` / ``val_ema_loss`` (8 validation images).
* ``segment.zero1``, ``segment.zero3``: ``segment_composite`` (UperNet 16 channels, aux FCN 8) from
  ``pretrain.zero1``'s weights on a composite set of 16 training / 3 validation 32 px images
  (``megadigpt.data.composite_seg``), same batch and steps (2 steps an epoch), EMA 0.9; ``train_loss`` of every
  step and the last evaluation's ``val_mIoU`` / ``val_ema_mIoU`` (sliding windows).

The file holds the argv (run paths as ``{ROOT}``), the values as Python floats (``repr``: exact in JSON), the
torch / deepspeed / Python versions and the commit, and a digest of the generated data (so a changed data tool is
told apart from a changed training loop)."""

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("MEGADIGPT_SHARED", REPO.parent / "shared"))
CIFAR = SHARED / "data" / "cifar10"
FASHION = Path("/usr/share/datasets/fashion-mnist")  # megadigpt.data.composite_seg.FASHION_DIR
WORLD = 2
ROOT = "{ROOT}"

# tests/conftest.py's TINY (copied, so the recorded argv does not move when TINY does)
TINY = [
    "model.arch=vit_tiny", "model.embed_dim=64", "model.depth=4", "model.num_heads=2", "model.img_size=32",
    "model.patch_size=4", "model.decoder_dim=32", "model.decoder_depth=1", "model.decoder_heads=2",
    "target.kind=pixels", "target.patch_size=4", "data.num_workers=0", "optim.lr=1e-3", "optim.warmup_steps=2",
    "train.log_every=1", "train.tensorboard=false", "train.progress=off",
]

# {run: (keys recorded at every step, keys recorded at the last step only)}
KEYS = {"pretrain": (("gen_loss", "dis_loss"), ()),
        "finetune": (("train_loss",), ("val_loss", "val_ema_loss")),
        "segment": (("train_loss",), ("val_mIoU", "val_ema_mIoU"))}
STEPS = 4


def common(zero: int) -> list:
    return ["train.device=cpu", "train.precision=fp32", f"train.zero_stage={zero}", "train.seed=0",
            f"train.max_steps={STEPS}", f"train.global_batch={2 * WORLD * 2}", "train.micro_batch=2",
            "train.log_every=1", "train.ckpt_every=1000", "train.tensorboard=false", "train.progress=off"]


def build_plan() -> list:
    """The six runs, paths under ``{ROOT}``: [{"name", "kind", "argv"}]."""
    plan = []
    init = f"{ROOT}/pretrain.zero1"
    for zero in (1, 3):
        plan.append({"name": f"pretrain.zero{zero}", "kind": "pretrain", "argv": [
            "pretrain", "--config", "demo", "--data", f"{ROOT}/train.jsonl", "--run-dir", f"{ROOT}/pretrain.zero{zero}",
            *TINY, *common(zero)]})
    for zero in (1, 3):
        plan.append({"name": f"finetune.zero{zero}", "kind": "finetune", "argv": [
            "finetune", "--config", "cifar10_finetune", "--init-from", init, "--train", f"{ROOT}/train.jsonl",
            "--val", f"{ROOT}/val.jsonl", "--run-dir", f"{ROOT}/finetune.zero{zero}", "data.num_workers=0",
            "data.loader=torch", "optim.warmup_steps=1", "finetune.ema_decay=0.9", *common(zero)]})
    for zero in (1, 3):
        plan.append({"name": f"segment.zero{zero}", "kind": "segment", "argv": [
            "segment", "--config", "segment_composite", "--init-from", init, "--train", f"{ROOT}/composite",
            "--val", f"{ROOT}/composite", "--run-dir", f"{ROOT}/segment.zero{zero}", "model.channels=16",
            "model.aux_channels=8", "data.num_workers=0", "optim.warmup_steps=1", f"segment.eval_every={STEPS}",
            "segment.eval_stride=22", "segment.eval_batch=4", "segment.ema_decay=0.9", *common(zero)]})
    return plan


def prepare(root: Path, cifar: Path = CIFAR) -> str:
    """The runs' data under ``root``: 24 training / 8 validation CIFAR-10 images as sample lists, and the composite
    segmentation set. -> a digest of what was written (the sample lists name the shards by path: the digest covers
    their entries without the folder)."""
    from megadigpt.data import composite_seg, find_samples
    from megadigpt.data.sources import write_sample_list

    root.mkdir(parents=True, exist_ok=True)
    write_sample_list(root / "train.jsonl", find_samples(str(cifar / "train-000000.tar"))[:24])
    write_sample_list(root / "val.jsonl", find_samples(str(cifar / "test-000000.tar"))[:8])
    composite_seg.build(root / "composite", cifar, n_train=16, n_val=3, size=32)
    h = hashlib.sha256()
    for p in sorted(x for x in root.rglob("*") if x.is_file()):
        data = p.read_bytes()
        if p.suffix == ".jsonl":
            for form in {str(cifar.resolve()), str(cifar)}:
                data = data.replace(form.encode(), b"{CIFAR}")
        h.update(str(p.relative_to(root)).encode() + b"\0" + hashlib.sha256(data).digest())
    return h.hexdigest()


def _env() -> dict:
    env = dict(os.environ)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        env.pop(k, None)
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p]),
               MEGADIGPT_FAULTS="")
    return env


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_plan(plan: list, root: Path, timeout: int = 900) -> dict:
    """Runs ``plan`` (argv under ``{ROOT}``) in one 2-rank process pair through tests/config_matrix_runner.py.
    -> {"results": the runner's {name: {exit, seconds, error}}, "stdout", "stderr", "seconds"}."""
    entries = [{"name": r["name"], "argv": [a.replace(ROOT, str(root)) for a in r["argv"]], "env": {}} for r in plan]
    (root / "plan.json").write_text(json.dumps(entries, indent=1))
    out = root / "results.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD), "--master_port",
           str(_free_port()), str(REPO / "tests" / "config_matrix_runner.py"), str(root / "plan.json"), str(out)]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env(), cwd=str(REPO))
    return {"results": json.loads(out.read_text()) if out.is_file() else {}, "stdout": proc.stdout,
            "stderr": proc.stderr, "seconds": round(time.monotonic() - t0, 1)}


def read_values(run_dir: Path, kind: str) -> dict:
    """{key: {step (str): value}} of the run's metrics.jsonl (training records, not events)."""
    every, last = KEYS[kind]
    out = {k: {} for k in every + last}
    if not (run_dir / "metrics.jsonl").is_file():
        return out
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "event" in r or "step" not in r:
            continue
        for k in every + last:
            if k in r:
                out[k][str(r["step"])] = r[k]
    for k in last:  # the last evaluation only
        if out[k]:
            s = max(out[k], key=int)
            out[k] = {s: out[k][s]}
    return out


def collect(plan: list, root: Path) -> dict:
    return {r["name"]: read_values(root / r["name"], r["kind"]) for r in plan}


def versions() -> dict:
    import deepspeed
    import torch

    return {"torch": torch.__version__, "deepspeed": deepspeed.__version__, "python": platform.python_version()}


def _commit() -> dict:
    def git(*a):
        return subprocess.run(["git", *a], capture_output=True, text=True, cwd=str(REPO)).stdout.strip()

    dirty = [ln for ln in git("status", "--porcelain", "--untracked-files=no").splitlines()]
    return {"commit": git("rev-parse", "HEAD"), "subject": git("log", "-1", "--format=%s"),
            "tracked_files_modified": dirty}


def record(root: Path) -> dict:
    import megadigpt

    where = Path(megadigpt.__file__).resolve()
    if REPO not in where.parents:
        raise SystemExit(f"megadigpt imported from {where}, not from {REPO}: run with PYTHONPATH={REPO}")
    digest = prepare(root)
    plan = build_plan()
    res = run_plan(plan, root)
    bad = {r["name"]: res["results"].get(r["name"]) for r in plan
           if (res["results"].get(r["name"]) or {}).get("exit") != 0}
    if bad:
        raise SystemExit(f"runs failed: {json.dumps(bad, indent=1)}\n{res['stdout'][-3000:]}\n{res['stderr'][-5000:]}")
    values = collect(plan, root)
    for r in plan:
        every, _ = KEYS[r["kind"]]
        for k in every:
            assert sorted(values[r["name"]][k], key=int) == [str(s) for s in range(1, STEPS + 1)], (r["name"], k)
    return {"about": "per-step losses of pretrain / finetune / segment (fp32, ZeRO-1 and ZeRO-3, 2 gloo ranks, CPU) "
                     "on the commit before a refactor; compared bit for bit by tests/test_same_losses.py; written by "
                     "python -m tests.record_same_losses",
            "recorded_on": _commit(), "versions": versions(), "world_size": WORLD,
            "env": {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}, "data_digest": digest,
            "runs": [{**r, "values": values[r["name"]]} for r in plan],
            "seconds": res["seconds"], "run_seconds": {k: v["seconds"] for k, v in res["results"].items()}}


def compare(want: dict, got: dict) -> list:
    """-> lines naming every (run, key, step) whose value differs (exact float comparison)."""
    diffs = []
    for run in want["runs"]:
        name = run["name"]
        for key, steps in run["values"].items():
            have = got.get(name, {}).get(key, {})
            for step in sorted(set(steps) | set(have), key=int):
                a, b = steps.get(step, "absent"), have.get(step, "absent")
                if not (type(a) is type(b) and (a == b or (a != a and b != b))):
                    diffs.append(f"{name} {key} step {step}: recorded {a!r}, now {b!r}")
    return diffs


def main(argv=None) -> int:
    import tempfile

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--out", help="write the recording here")
    g.add_argument("--check", help="rerun a recording's argv on this tree and compare")
    p.add_argument("--keep", help="run in this folder (kept) instead of a temporary one")
    a = p.parse_args(argv)
    if not (CIFAR / "train-000000.tar").is_file():
        raise SystemExit(f"CIFAR-10 shards not found at {CIFAR} (set MEGADIGPT_SHARED)")
    with tempfile.TemporaryDirectory(prefix="same_losses.") as tmp:
        root = Path(a.keep or tmp)
        if a.out:
            rec = record(root)
            Path(a.out).parent.mkdir(parents=True, exist_ok=True)
            Path(a.out).write_text(json.dumps(rec, indent=1) + "\n")
            n = sum(len(v) for r in rec["runs"] for v in r["values"].values())
            print(f"wrote {n} values of {len(rec['runs'])} runs to {a.out} ({rec['seconds']} s)")
            return 0
        want = json.loads(Path(a.check).read_text())
        digest = prepare(root)
        res = run_plan(want["runs"], root)
        diffs = compare(want, collect(want["runs"], root))
        print(f"data digest {'same' if digest == want['data_digest'] else 'DIFFERS'}; {res['seconds']} s")
        print("\n".join(diffs) or "all values identical")
        return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())

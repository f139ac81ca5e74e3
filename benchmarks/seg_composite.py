"""Segmentation evidence at the development machine's scale: a megadigpt-pretrained encoder against random
initialisation, the same UperNet recipe and budget, on the composite set of ``megadigpt.data.composite_seg``
(Fashion-MNIST items on CIFAR-10 photos, exact masks, 10 classes + background).

    python benchmarks/seg_composite.py --out runs/seg_evidence [--pretrained RUN] [--steps 150] ...

1. builds the composite set (``--train`` / ``--val`` images of ``--size`` px) unless it exists;
2. pretrains the encoder unless ``--pretrained`` names a run: ``megadigpt pretrain --config cifar10_pretrain`` on the
   CIFAR-10 training shards with ``--pretrain-overrides`` (default: per-patch normalised pixel targets, 120 steps:
   no teacher forward, what the 2 shared cores allow; the CIFAR-10 evidence runs are heavier);
3. trains ``segment_composite`` twice, from the pretrained encoder and from a random one of the same geometry,
   ``--steps`` iterations each (the two arms run at the same time: on a shared machine they see the same load),
   and evaluates both on the validation composites (sliding windows);
4. writes ``results.json`` and prints a markdown table.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run(cmd, log: Path) -> float:
    t0 = time.time()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=str(REPO))
    if proc.returncode:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}; see {log}")
    return time.time() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/seg_evidence")
    p.add_argument("--cifar", default=str(REPO.parent / "shared" / "data" / "cifar10"))
    p.add_argument("--pretrained", default=None, help="a megadigpt pretraining run (default: pretrain one here)")
    p.add_argument("--pretrain-overrides", default="target.kind=pixels target.layer=norm train.max_steps=120 "
                                                    "optim.warmup_steps=12 train.ckpt_every=120 data.loader=torch "
                                                    "data.num_workers=1 train.log_every=10")
    p.add_argument("--train", type=int, default=1000)
    p.add_argument("--val", type=int, default=200)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--seg-overrides", default="")
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    data = out / "composite"
    timings = {}
    if not (data / "classes.txt").is_file():
        from megadigpt.data.composite_seg import build

        t0 = time.time()
        build(data, a.cifar, a.train, a.val, a.size)
        timings["build_s"] = time.time() - t0
    pre = Path(a.pretrained) if a.pretrained else out / "pretrain"
    if not a.pretrained and not (pre / "checkpoints" / "latest").is_file():
        timings["pretrain_s"] = run([sys.executable, "-m", "megadigpt", "pretrain", "--config", "cifar10_pretrain",
                                     "--data", f"{a.cifar}/train-{{000000..000009}}.tar", "--run-dir", str(pre),
                                     "train.progress=off"] + a.pretrain_overrides.split(), out / "pretrain.log")
    common = ["--config", "segment_composite", "--train", str(data), "--val", str(data), f"model.crop_size={a.size}",
              f"data.scale=[{4 * a.size},{a.size}]", f"train.max_steps={a.steps}", f"segment.eval_every={a.steps}",
              f"segment.eval_stride={max(1, round(a.size * 2 / 3))}"] + a.seg_overrides.split()
    arms = {"pretrained": ["--init-from", str(pre)],
            "random": ["model.arch=vit_tiny", "model.depth=6", "model.patch_size=4"]}
    results, procs = {}, {}
    for name, extra in arms.items():
        log = open(out / f"{name}.log", "w")
        procs[name] = (subprocess.Popen([sys.executable, "-m", "megadigpt.train.segment", "--run-dir", str(out / name)]
                                        + common + extra, stdout=log, stderr=subprocess.STDOUT, cwd=str(REPO)),
                       time.time(), log)
    for name, (proc, t0, log) in procs.items():
        if proc.wait():
            raise SystemExit(f"the {name} arm failed ({proc.returncode}); see {out / (name + '.log')}")
        secs = time.time() - t0
        log.close()
        run_dir = out / name
        evals = sorted((run_dir / "eval").glob("step*.json"))
        res = json.loads(evals[-1].read_text())["result"]
        results[name] = {"mIoU": res["mIoU"], "mAcc": res["mAcc"], "aAcc": res["aAcc"], "IoU": res["IoU"],
                         "images": res["images"], "train_s": secs}
    record = {"date": time.strftime("%Y-%m-%d"), "machine": "2 CPU cores (shared), no GPU", "steps": a.steps,
              "train_images": a.train, "val_images": a.val, "size": a.size, "timings": timings, "results": results,
              "pretrain": str(pre), "pretrain_overrides": None if a.pretrained else a.pretrain_overrides}
    (out / "results.json").write_text(json.dumps(record, indent=1))
    print("| encoder init | mIoU | mAcc | aAcc | train s |\n|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['mIoU']:.2f} | {r['mAcc']:.2f} | {r['aAcc']:.2f} | {r['train_s']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

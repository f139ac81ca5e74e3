"""Segmentation evidence at the development machine's scale: a megadigpt-pretrained encoder against random
initialisation, the same UperNet recipe and budget, on the composite set of ``megadigpt.data.composite_seg``
(Fashion-MNIST items on CIFAR-10 photos, exact masks, 10 classes + background).

    python benchmarks/seg_composite.py --out runs/seg_evidence [--pretrained RUN] [--train 5000] [--steps 1500] ...

1. builds the composite set (``--train`` / ``--val`` images of ``--size`` px) unless it exists;
2. pretrains the encoder unless ``--pretrained`` names a run: ``megadigpt pretrain --config cifar10_pretrain``
   (EfficientNet-Lite0 teacher; ``--pretrain-steps`` x 64 images, ``--pretrain-threads`` torch threads, plus
   ``--pretrain-overrides``), by default (``--pretrain-on composite``) on ``--unlabeled`` composites built from the
   training splits with another seed than the labeled set (images only: no mask or label is read), or
   (``--pretrain-on cifar``) on the CIFAR-10 training shards;
3. trains ``segment_composite`` twice, from the pretrained encoder and from a random one of the same geometry,
   ``--steps`` iterations each, evaluated every ``--eval-every`` steps on the validation composites (sliding
   windows). The two arms run at the same time (on a shared machine they see the same load), each with
   ``OMP_NUM_THREADS=--threads`` (default 1): on the 2 shared cores two processes of 2 torch threads each ran a
   segmentation step 5x slower (4-8 s) than one thread per process (0.9 s);
4. writes ``results.json`` (every evaluation of both arms) and prints a markdown table.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run(cmd, log: Path, env=None) -> float:
    t0 = time.time()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=str(REPO), env=env)
    if proc.returncode:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}; see {log}")
    return time.time() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/seg_evidence")
    p.add_argument("--cifar", default=str(REPO.parent / "shared" / "data" / "cifar10"))
    p.add_argument("--pretrained", default=None, help="a megadigpt pretraining run (default: pretrain one here)")
    p.add_argument("--pretrain-on", choices=["composite", "cifar"], default="composite",
                   help="pretraining images: unlabeled composites from the training splits (--unlabeled of them, "
                        "another seed than the labeled set), or the CIFAR-10 training shards")
    p.add_argument("--unlabeled", type=int, default=20000)
    p.add_argument("--pretrain-steps", type=int, default=1200)
    p.add_argument("--pretrain-threads", type=int, default=2, help="OMP_NUM_THREADS of the pretraining (it runs alone)")
    p.add_argument("--pretrain-overrides", default="data.loader=torch data.num_workers=1 train.log_every=50 "
                                                   "optim.warmup_steps=60 train.ckpt_every=300")
    p.add_argument("--train", type=int, default=5000)
    p.add_argument("--val", type=int, default=500)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each process (pretraining, each arm)")
    p.add_argument("--seg-overrides", default="")
    a = p.parse_args(argv)
    for name in ("unlabeled", "pretrain_steps", "pretrain_threads", "train", "val", "size", "steps", "eval_every",
                 "threads"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    data = out / "composite"
    timings = {}
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads))
    if not (data / "classes.txt").is_file():
        from megadigpt.data.composite_seg import build

        t0 = time.time()
        build(data, a.cifar, a.train, a.val, a.size)
        timings["build_s"] = time.time() - t0
    pre = Path(a.pretrained) if a.pretrained else out / "pretrain"
    if not a.pretrained and not (pre / "checkpoints" / "latest").is_file():
        if a.pretrain_on == "composite":
            source = out / "unlabeled"
            if not (source / "classes.txt").is_file():
                from megadigpt.data.composite_seg import build

                t0 = time.time()
                build(source, a.cifar, a.unlabeled, 0, a.size, seed=1)
                timings["build_unlabeled_s"] = time.time() - t0
            source = str(source / "images" / "training")  # images only: no masks, no labels
        else:
            source = f"{a.cifar}/train-{{000000..000009}}.tar"
        penv = dict(env, OMP_NUM_THREADS=str(a.pretrain_threads), MKL_NUM_THREADS=str(a.pretrain_threads))
        timings["pretrain_s"] = run([sys.executable, "-m", "megadigpt", "pretrain", "--config", "cifar10_pretrain",
                                     "--data", source, "--run-dir", str(pre), "train.progress=off",
                                     f"train.max_steps={a.pretrain_steps}"] + a.pretrain_overrides.split(),
                                    out / "pretrain.log", penv)
    common = ["--config", "segment_composite", "--train", str(data), "--val", str(data), f"model.crop_size={a.size}",
              f"data.scale=[{4 * a.size},{a.size}]", f"train.max_steps={a.steps}", f"segment.eval_every={a.eval_every}",
              f"segment.eval_stride={max(1, round(a.size * 2 / 3))}"] + a.seg_overrides.split()
    arms = {"pretrained": ["--init-from", str(pre)],
            "random": ["model.arch=vit_tiny", "model.depth=6", "model.patch_size=4"]}
    results, procs = {}, {}
    for name, extra in arms.items():
        log = open(out / f"{name}.log", "w")
        procs[name] = (subprocess.Popen([sys.executable, "-m", "megadigpt.train.segment", "--run-dir", str(out / name)]
                                        + common + extra, stdout=log, stderr=subprocess.STDOUT, cwd=str(REPO),
                                        env=env),
                       time.time(), log)
    for name, (proc, t0, log) in procs.items():
        if proc.wait():
            raise SystemExit(f"the {name} arm failed ({proc.returncode}); see {out / (name + '.log')}")
        secs = time.time() - t0
        log.close()
        run_dir = out / name
        evals = sorted((run_dir / "eval").glob("step*.json"))
        res = json.loads(evals[-1].read_text())["result"]
        curve = {json.loads(e.read_text())["step"]: json.loads(e.read_text())["result"]["mIoU"] for e in evals}
        results[name] = {"mIoU": res["mIoU"], "mAcc": res["mAcc"], "aAcc": res["aAcc"], "IoU": res["IoU"],
                         "images": res["images"], "train_s": secs, "mIoU_by_step": curve}
    record = {"date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()} CPU cores, no GPU", "steps": a.steps,
              "load_avg_end": os.getloadavg(), "threads": a.threads,
              "train_images": a.train, "val_images": a.val, "size": a.size, "timings": timings, "results": results,
              "pretrain": str(pre), "pretrain_on": None if a.pretrained else a.pretrain_on,
              "pretrain_steps": None if a.pretrained else a.pretrain_steps,
              "pretrain_overrides": None if a.pretrained else a.pretrain_overrides}
    (out / "results.json").write_text(json.dumps(record, indent=1))
    print("| encoder init | mIoU | mAcc | aAcc | train s | per-class IoU |\n|---|---|---|---|---|---|")
    for name, r in results.items():
        ious = " ".join("-" if v is None else f"{v:.1f}" for v in r["IoU"])
        print(f"| {name} | {r['mIoU']:.2f} | {r['mAcc']:.2f} | {r['aAcc']:.2f} | {r['train_s']:.0f} | {ious} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

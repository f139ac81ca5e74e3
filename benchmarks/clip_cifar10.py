"""Evidence for ``megadigpt clip`` at this machine's scale: zero-shot CIFAR-10 and image-text retrieval, from a
megadigpt-pretrained image tower against a randomly initialised one under an equal budget.

No LAION and no OpenCLIP weights here, so CIFAR-10 is captioned: each image gets one of open_clip's 18
``SIMPLE_IMAGENET_TEMPLATES`` ("a photo of a {}.", "itap of a {}.", "a bad photo of the {}.", ...) filled with its
class name, the template drawn from (seed, image index). Both arms train the same text tower from random weights
(``clip_cifar10``: 2 layers, width 128, joint width 128) with the same steps, batch and lr; only the image tower's
start differs:

    pretrained   the CIFAR encoder of ``cifar10_pretrain`` (D-iGPT, 250 steps x 64 images; reused from
                 runs/cifar10_evidence/digpt/pretrain when that exists, else pretrained here first: ~9 min)
    random       the same geometry (ViT-Ti width, 6 blocks, patch 4, 32 px), randomly initialised

Data: 10,000 captioned training images (train-000000..000001), 1,000 held-out captioned pairs (test images
5,000..5,999) for retrieval, and the first 5,000 test images (test-000000) for zero-shot top-1, with class-name
prompts from the same 18 templates.

    python benchmarks/clip_cifar10.py [--out runs/clip_cifar10_evidence] [--epochs E] [--seeds 0,1]

Each seed (``train.seed``: the text tower's and projection's start, a random image tower's, the data order and
augmentation) trains both arms; the table has a row per arm and seed, then each arm's median and range.

Every stage is a plain ``megadigpt`` command (printed as it runs) and is skipped when its result exists. Prints a
markdown table (also written to <out>/results.md).
"""

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CIFAR = REPO.parent / "shared" / "data" / "cifar10"
ENCODER = ["model.arch=vit_tiny", "model.depth=6", "model.patch_size=4"]  # cifar10_pretrain's geometry


def run(cmd, log: Path) -> float:
    print("$", " ".join(shlex.quote(c) for c in cmd), flush=True)
    t0 = time.time()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}); see {log}")
    return time.time() - t0


def last_eval(run_dir: Path) -> dict:
    recs = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if "zeroshot_top1" in r and "event" not in r][-1]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/clip_cifar10_evidence")
    ap.add_argument("--data", default=str(CIFAR))
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--seeds", default="0", help="comma-separated train.seed values; each trains both arms")
    args = ap.parse_args()
    out = (REPO / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = Path(args.data)
    py = [sys.executable, "-m", "megadigpt"]

    # ---- captioned pairs
    pairs = out / "pairs"
    if not (pairs / "train-000000.tar").is_file():
        from open_clip.zero_shot_metadata import SIMPLE_IMAGENET_TEMPLATES

        from megadigpt.data.captions import caption_labelled

        caption_labelled(str(data / "train-{000000..000001}.tar"), pairs, SIMPLE_IMAGENET_TEMPLATES, seed=0,
                         name="train")
        caption_labelled(str(data / "test-000001.tar"), pairs, SIMPLE_IMAGENET_TEMPLATES, seed=1, limit=1000,
                         name="val")

    # ---- the pretrained encoder
    pre = REPO / "runs" / "cifar10_evidence" / "digpt" / "pretrain"
    times = {}
    if not (pre / "checkpoints" / "latest").is_file():
        pre = out / "pretrain"
        if not (pre / "checkpoints" / "latest").is_file():
            times["pretrain"] = run(py + ["pretrain", "--config", "cifar10_pretrain", "--data",
                                          str(data / "train-{000000..000009}.tar"), "--run-dir", str(pre),
                                          "train.progress=off"], out / "pretrain.log")

    # ---- the two arms, equal budget
    common = ["--config", "clip_cifar10", "--train", str(pairs / "train-000000.tar"), "--val",
              str(pairs / "val-000000.tar"), "--zeroshot", str(data / "test-000000.tar"), f"train.epochs={args.epochs}",
              "train.progress=off"]
    arms = {"pretrained": ["--init-from", str(pre)], "random": ENCODER}
    rows = []
    for seed in [int(x) for x in args.seeds.split(",")]:
        for arm, extra in arms.items():
            name = arm if seed == 0 else f"{arm}.seed{seed}"
            run_dir = out / name
            if not (run_dir / "last" / "model.safetensors").is_file():
                times[name] = run(py + ["clip", "--run-dir", str(run_dir), *common, *extra, f"train.seed={seed}"],
                                  out / f"{name}.log")
            r = last_eval(run_dir)
            rows.append((arm, seed, r, r["step"], times.get(name)))

    lines = ["| image tower | seed | zero-shot top-1 | top-5 | i2t R@1 | R@5 | R@10 | t2i R@1 | R@5 | R@10 | "
             "steps x batch | train time |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for arm, seed, r, steps, secs in rows:
        lines.append(f"| {arm} | {seed} | {r['zeroshot_top1']:.2f} | {r['zeroshot_top5']:.2f} | {r['val_i2t_r1']:.1f} | "
                     f"{r['val_i2t_r5']:.1f} | {r['val_i2t_r10']:.1f} | {r['val_t2i_r1']:.1f} | {r['val_t2i_r5']:.1f} | "
                     f"{r['val_t2i_r10']:.1f} | {steps} x 128 | "
                     f"{'%.1f min' % (secs / 60) if secs else 'earlier run'} |")
    lines += ["", "| image tower | seeds | zero-shot top-1, median [min-max] |", "|---|---|---|"]
    for arm in arms:
        top1 = [r["zeroshot_top1"] for a, _, r, _, _ in rows if a == arm]
        lines.append(f"| {arm} | {len(top1)} | {statistics.median(top1):.2f} [{min(top1):.2f}-{max(top1):.2f}] |")
    table = "\n".join(lines)
    print(table)
    (out / "results.md").write_text(table + "\n\nzero-shot: the first 5,000 CIFAR-10 test images, 10 class "
                                    "names x 18 templates; retrieval: 1,000 held-out captioned test pairs (chance "
                                    "R@1 0.1%, R@10 1%); zero-shot chance 10%.\n")


if __name__ == "__main__":
    main()

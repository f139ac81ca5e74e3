"""Evidence on real data: does D-iGPT pretraining help, and which of its parts matter? CIFAR-10, CPU-sized.

Pretrains the same small ViT seven ways (250 steps x 64 images each), then fine-tunes and linear-probes each
under one equal budget:

    digpt          Gen + Dis decoders, EfficientNet-Lite0 teacher tokens, cosine loss (the method)
    kmeans_tokens  Gen + Dis, the same teacher tokens as 1,024 k-means ids, cross-entropy (DiGIT's target family;
                   config digit_cifar10, tokenizer fit first)
    palette        Gen + Dis, every pixel as one of iGPT's 512 k-means colours, cross-entropy (config
                   igpt_cifar10, tokenizer fit first)
    pixels         Gen + Dis decoders, raw (per-patch normalised) pixel patches as the target, cosine loss
    dis_only       the discriminative decoder alone
    distill        plain feature distillation: full attention, no decoder
    random         no pretraining (random initialisation)

    python benchmarks/cifar10_evidence.py [--out runs/cifar10_evidence] [--only digpt,random] [--stage all]

Every stage is a plain ``megadigpt`` command (printed as it runs) and is skipped when its result exists, so a
killed run continues where it stopped. Prints a markdown table (also written to <out>/results.md).
"""

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CIFAR = REPO.parent / "shared" / "data" / "cifar10"
VARIANTS = {  # name: (pretraining config, overrides, tokenizer fit arguments); None: no pretraining
    "digpt": ("cifar10_pretrain", [], None),
    "kmeans_tokens": ("digit_cifar10", [], ["--k", "1024", "--images", "10000", "--tokens-per-image", "16"]),
    "palette": ("igpt_cifar10", [], ["--k", "512", "--images", "10000", "--tokens-per-image", "64"]),
    "pixels": ("cifar10_pretrain", ["target.kind=pixels"], None),
    "dis_only": ("cifar10_pretrain", ["model.objective=dis_only"], None),
    "distill": ("cifar10_pretrain", ["model.objective=distill"], None),
    "random": None,
}


def run(cmd, log: Path) -> float:
    print("$", " ".join(shlex.quote(c) for c in cmd), flush=True)
    t0 = time.time()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}); see {log}")
    return time.time() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/cifar10_evidence")
    ap.add_argument("--only", default=",".join(VARIANTS))
    ap.add_argument("--stage", default="all", choices=["all", "pretrain", "finetune", "probe", "table"])
    ap.add_argument("--data", default=str(CIFAR))
    args = ap.parse_args()
    out = (REPO / args.out).resolve()
    train = f"{args.data}/train-{{000000..000009}}.tar"
    ft_train = f"{args.data}/train-{{000000..000001}}.tar"  # 10,000 labelled images for the fine-tune budget
    test = f"{args.data}/test-000000.tar"  # 5,000 test images (1,000 per class in the whole set; shuffled)
    mg = [sys.executable, "-m", "megadigpt"]
    rows = []
    for name in args.only.split(","):
        vdir = out / name
        vdir.mkdir(parents=True, exist_ok=True)
        timing = json.loads((vdir / "timing.json").read_text()) if (vdir / "timing.json").is_file() else {}
        variant = VARIANTS[name]
        init = ["model.arch=vit_tiny", "model.depth=6", "model.patch_size=4"]  # random: cifar10_pretrain's ViT
        if variant is not None:
            config, overrides, fit = variant
            pre = vdir / "pretrain"
            if fit is not None:  # discrete targets: the codebook first, from the same training images
                tok = vdir / "tokenizer.pt"
                overrides = overrides + [f"target.tokenizer={tok}"]
                if args.stage in ("all", "pretrain") and not tok.is_file():
                    timing["tokenizer_s"] = run(mg + ["tokenizer", "fit", "--config", config, "--data", train,
                                                      "--out", str(tok)] + fit + overrides[:-1],
                                                vdir / "tokenizer.log")
            if args.stage in ("all", "pretrain") and not (pre / "checkpoints" / "latest").is_file():
                timing["pretrain_s"] = run(mg + ["pretrain", "--config", config, "--data", train,
                                                 "--run-dir", str(pre)] + overrides, vdir / "pretrain.log")
            init = ["--init-from", str(pre)]
        if args.stage in ("all", "finetune") and not (vdir / "finetune" / "last" / "config.json").is_file():
            timing["finetune_s"] = run(mg + ["finetune", "--config", "cifar10_finetune", "--train", ft_train,
                                             "--val", test, "--run-dir", str(vdir / "finetune")] + init,
                                       vdir / "finetune.log")
        if args.stage in ("all", "probe") and not (vdir / "probe" / "results.json").is_file():
            src = [str(vdir / "pretrain")] if variant is not None else ["--random-init"] + init
            timing["probe_s"] = run(mg + ["probe", "--config", "cifar10_finetune"] + src +
                                    ["--train", ft_train, "--val", test, "--out", str(vdir / "probe"),
                                     "--knn-layers", "all"], vdir / "probe.log")
        (vdir / "timing.json").write_text(json.dumps(timing))
        rows.append((name, vdir, timing))
    table(rows, out)


def table(rows, out: Path):
    lines = ["| pretraining | fine-tune top-1 | linear probe top-1 (best layer) | k-NN top-1 (last layer) | "
             "pretrain / fine-tune / probe time |", "|---|---|---|---|---|"]
    for name, vdir, timing in rows:
        ft = _read(vdir / "finetune" / "last" / "config.json", lambda d: d["megadigpt"]["metrics"]["best_top1"])
        pr = _read(vdir / "probe" / "results.json", lambda d: f"{d['best']['top1']:.2f} (block {d['best']['layer']})")
        knn = _read(vdir / "probe" / "results.json", lambda d: f"{d['knn'][-1]['top1']:.2f}")
        secs = " / ".join(f"{timing[k] / 60:.1f} min" if k in timing else "-" for k in
                          ("pretrain_s", "finetune_s", "probe_s"))
        if "tokenizer_s" in timing:
            secs += f" (+ {timing['tokenizer_s'] / 60:.1f} min tokenizer fit)"
        lines.append(f"| {name} | {ft if isinstance(ft, str) else f'{ft:.2f}'} | {pr} | {knn} | {secs} |")
    text = "\n".join(lines)
    print(text)
    if out.is_dir():
        (out / "results.md").write_text(text + "\n")


def _read(path: Path, get):
    try:
        return get(json.loads(path.read_text()))
    except (OSError, KeyError, ValueError, TypeError, IndexError):
        return "-"


if __name__ == "__main__":
    main()

"""Input throughput of the pretraining pipelines: images/s per CPU core, DALI (CPU) vs the torch path, on the
CIFAR-10 shards (32 px JPEGs) and on larger JPEGs (~500x375, re-encoded demo photos), both emitting the
224 px student view and a 224 px teacher view. On a CUDA machine it adds DALI's GPU (mixed) decode.

    python benchmarks/data_throughput.py [--cifar ../shared/data/cifar10] [--batches 20] [--batch 64]

Prints a markdown table (and JSON with --json).
"""

import argparse
import io
import json
import os
import platform
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def large_jpeg_shard(path: Path, n: int = 256):
    from megadigpt.data import find_samples
    from megadigpt.data.pretrain_loader import decode_rgb

    photos = [decode_rgb(s.read()) for s in find_samples("demo")]
    rng = np.random.default_rng(0)
    with tarfile.open(path, "w") as tf:
        for i in range(n):
            img = photos[i % len(photos)]
            w, h = img.size
            s = rng.uniform(0.5, 1.0)
            box = (0, 0, int(w * s), int(h * s))
            im = img.crop(box).resize((500, 375), Image.BICUBIC)
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=90)
            info = tarfile.TarInfo(f"{i:06d}.jpg")
            info.size = len(buf.getvalue())
            tf.addfile(info, io.BytesIO(buf.getvalue()))


def measure(kind, samples, sizes, batch, batches, workers, device):
    from megadigpt.data import PretrainStream, build_pretrain_loader

    stream = PretrainStream(samples, sizes, 4, seed=0)
    loader = build_pretrain_loader(stream, batch, batch, 0, 1, 0, batches + 2, workers, kind, device)
    it = iter(loader)
    for _ in range(2):  # warm-up: workers / pipeline start
        next(it)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    n = 0
    for b in it:
        n += b["views"][0].shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def main():
    from megadigpt.data import find_samples
    from megadigpt.data.dali_loader import dali_available

    ap = argparse.ArgumentParser()
    ap.add_argument("--cifar", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"))
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        large = Path(tmp) / "large.tar"
        large_jpeg_shard(large)
        datasets = {"large JPEG 500x375": find_samples(str(large))}
        cifar = Path(args.cifar) / "train-000000.tar"
        if cifar.is_file():
            datasets["CIFAR-10 32x32"] = find_samples(str(cifar))
        cpu = torch.device("cpu")
        for name, samples in datasets.items():
            for kind in (["torch", "dali"] if dali_available() else ["torch"]):
                for workers in (1, 2):
                    ips = measure(kind, samples, [224], args.batch, args.batches, workers, cpu)
                    rows.append({"data": name, "loader": f"{kind} (CPU)", "cores": workers, "images_per_s": ips,
                                 "per_core": ips / workers})
            if torch.cuda.is_available() and dali_available():
                gpu = torch.device("cuda", 0)
                ips = measure("dali", samples, [224], args.batch, args.batches, os.cpu_count() or 4, gpu)
                rows.append({"data": name, "loader": "dali (GPU mixed)", "cores": os.cpu_count(),
                             "images_per_s": ips, "per_core": None})
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or platform.machine()
    print(f"# input throughput, {time.strftime('%Y-%m-%d')}, {dev}, {os.cpu_count()} cores, "
          f"batch {args.batch}, 224 px student view\n")
    print("| data | loader | cores | images/s | images/s per core |\n|---|---|---|---|---|")
    for r in rows:
        pc = f"{r['per_core']:.0f}" if r["per_core"] else "-"
        print(f"| {r['data']} | {r['loader']} | {r['cores']} | {r['images_per_s']:.0f} | {pc} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

"""Attention backends on the segment mask: forward + backward time per call, interleaved (A B C A B C ...), so that
a shared machine's noise hits every contender alike. Prints one markdown table: median ms and the spread
(interquartile range) per backend, and the median of the per-round ratio to ``sdpa``.

    python benchmarks/attention_backends.py [--device cpu|cuda] [--dtype fp32|bf16] [--rounds 30]
        [--shapes vit_base/16,vit_large/14] [--batch 32] [--segment-grid 2] [--threads 1]

Shapes are the encoder's self-attention at 224 px (heads and head width of the named size; 148 tokens for patch
16, 193 for patch 14, 2x2 segments) unless --img-size says otherwise.
"""

import argparse
import statistics
import time

import torch

from megadigpt.model.attention import AttentionMask, masked_attention
from megadigpt.model.masks import SegmentLayout
from megadigpt.model.vit import VIT_SIZES


def _call(q, k, v, mask, backend, grad):
    out = masked_attention(q, k, v, mask, backend)
    torch.autograd.backward(out, grad)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--shapes", default="vit_base/16,vit_large/14")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--segment-grid", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--backends", default="eager,sdpa,prefix")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[a.dtype]
    backends = a.backends.split(",")
    sync = torch.cuda.synchronize if a.device == "cuda" else (lambda: None)
    print(f"# attention fwd+bwd, {a.device} {a.dtype}, batch {a.batch}, {a.threads} thread(s), {a.rounds} "
          f"interleaved rounds; ms per call: median [IQR]; ratio = sdpa time / backend time, median over rounds")
    print("| shape | tokens | " + " | ".join(f"{b} ms" for b in backends) + " | " +
          " | ".join(f"sdpa/{b}" for b in backends if b != "sdpa") + " |")
    print("|---|---|" + "---|" * (2 * len(backends) - 1))
    for item in a.shapes.split(","):
        arch, _, patch = item.partition("/")
        size = VIT_SIZES[arch]
        lay = SegmentLayout(a.img_size // int(patch or 16), a.segment_grid)
        mask = AttentionMask(lay.mask()).to(a.device)
        h, d = size.num_heads, size.embed_dim // size.num_heads
        q, k, v = (torch.randn(a.batch, h, lay.seq_len, d, device=a.device, dtype=dtype, requires_grad=True)
                   for _ in range(3))
        grad = torch.randn(a.batch, h, lay.seq_len, d, device=a.device, dtype=dtype)
        times = {b: [] for b in backends}
        for b in backends:  # warm-up
            _call(q, k, v, mask, b, grad)
        for _ in range(a.rounds):
            for b in backends:
                sync()
                t0 = time.perf_counter()
                _call(q, k, v, mask, b, grad)
                sync()
                times[b].append(time.perf_counter() - t0)
        cells = []
        for b in backends:
            qs = statistics.quantiles([t * 1e3 for t in times[b]], n=4, method="inclusive")
            cells.append(f"{statistics.median(times[b]) * 1e3:.2f} [{qs[0]:.2f}-{qs[2]:.2f}]")
        ratios = [f"{statistics.median([s / t for s, t in zip(times['sdpa'], times[b])]):.2f}"
                  for b in backends if b != "sdpa"] if "sdpa" in backends else []
        print(f"| {item} | {lay.seq_len} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")


if __name__ == "__main__":
    main()

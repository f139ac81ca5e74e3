"""Data pipeline at scale: how the sample index behaves at 1M / 10M / 36M entries.

    nice python benchmarks/data_scale.py [--sizes 1M,10M,36M] [--lookups 1000000] [--ranks 4] [--cifar DIR]
                                         [--sections write,scan,open,merge,throughput] [--tmp /tmp]

Sections (each a function in SECTIONS; add one by writing ``def section_x(args, ctx) -> rows`` and registering it):
- write: writing an index folder from numpy arrays (synthetic samples over sparse placeholder shards of 10k);
- scan: scanning real tar shards (the CIFAR-10 shards, 5000 images each) with ``data index``, per 1k shards;
- open: in a fresh subprocess per size: the time from the process start to a usable index (imports included) and
  for ``open_index`` alone (files checked, every shard stat'ed for freshness), then resident memory right after
  opening and after ``--lookups`` random lookups (RSS, PSS, USS from psutil ``memory_full_info``; "index" = RSS
  after the lookups minus RSS just before opening, in the same process), and the same with ``--ranks`` processes
  sharing one index at once (ranks on a node);
- merge: ``data merge`` of the largest size into a new index folder: time and peak RSS (in a subprocess);
- throughput: images/s from 4 local CIFAR-10 shards (indexed mode; stream mode over the files) against the same
  shards streamed over HTTP from a real server on 127.0.0.1, torch and DALI paths, rounds interleaved.

Synthetic data goes to a temporary folder under ``--tmp`` and is deleted at the end. The last line is
``index 36M: <MiB> MiB per rank, <s> s to open`` (the largest size run): the "index" figure of the open section
(resident memory the index adds to one rank) and the ``open_index`` time.
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

CHILD = r"""
import json, os, sys, time
t0 = float(sys.argv[1]); folder = sys.argv[2]; lookups = int(sys.argv[3]); barrier = sys.argv[4]; ranks = int(sys.argv[5])
import numpy as np, psutil
from megadigpt.data.index import open_index
p = psutil.Process()
n = int(np.load(os.path.join(folder, "size.npy"), mmap_mode="r").shape[0])
r = np.random.default_rng(os.getpid()).integers(0, n, lookups)  # allocated before the baseline is read
def mem():
    m = p.memory_full_info()
    return {"rss": m.rss / 2**20, "pss": m.pss / 2**20, "uss": m.uss / 2**20}
before = mem()
t = time.time()
idx = open_index(folder)
open_s = time.time() - t
idx[len(idx) // 2]
usable_s = time.time() - t0
after_open = mem()
t = time.time()
for i in r:
    idx[int(i)]
per_lookup_us = (time.time() - t) / max(1, lookups) * 1e6
labels = int(np.asarray(idx.labels).max())  # a vectorised read of a whole column, then released
idx.release()
after = mem()
if barrier != "-":  # all ranks hold the index at once when PSS is read
    open(os.path.join(barrier, str(os.getpid())), "w").close()
    while len(os.listdir(barrier)) < ranks:
        time.sleep(0.05)
    after = mem()
    time.sleep(0.5)
print(json.dumps({"n": len(idx), "open_s": open_s, "usable_s": usable_s, "before": before, "after_open": after_open,
                  "after": after, "us_per_lookup": per_lookup_us, "index_mib": after["rss"] - before["rss"]}))
"""


def parse_size(s: str) -> int:
    s = s.strip().upper()
    mult = {"K": 10 ** 3, "M": 10 ** 6, "G": 10 ** 9}.get(s[-1:], 1)
    return int(float(s[:-1] if s[-1:] in "KMG" else s) * mult)


def label(n: int) -> str:
    return f"{n // 10 ** 6}M" if n % 10 ** 6 == 0 else f"{n / 10 ** 6:g}M"


def run_child(folder, lookups, barrier="-", ranks=1):
    cmd = [sys.executable, "-c", CHILD, repr(time.time()), str(folder), str(lookups), barrier, str(ranks)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=str(REPO),
                            env={**os.environ, "PYTHONPATH": str(REPO)})


def section_write(args, ctx):
    from megadigpt.data.index import write_synthetic

    rows = []
    for n in ctx["sizes"]:
        t = time.time()
        write_synthetic(ctx["tmp"] / f"idx{n}", n)
        dt = time.time() - t
        size = sum(f.stat().st_size for f in (ctx["tmp"] / f"idx{n}").iterdir()) / 2 ** 20
        ctx.setdefault("folders", {})[n] = ctx["tmp"] / f"idx{n}"
        rows.append((f"write index {label(n)} (from arrays)", f"{dt:.1f} s", f"{size:.0f} MiB on disk"))
    return rows


def section_scan(args, ctx):
    from megadigpt.data.tools import index_shards

    shards = sorted(Path(args.cifar).glob("*.tar")) if args.cifar else []
    if not shards:
        return [("scan real shards", "skipped", f"no shards in {args.cifar}")]
    rows = []
    for workers in (1, 2):
        t = time.time()
        r = index_shards([str(s) for s in shards], ctx["tmp"] / f"scan{workers}", workers=workers, progress=False)
        dt = time.time() - t
        rows.append((f"scan {len(shards)} real shards ({r['samples'] // len(shards)} img each), {workers} proc",
                     f"{dt:.1f} s", f"{dt / len(shards) * 1000 / 60:.1f} min per 1k shards"))
    return rows


def section_open(args, ctx):
    rows = []
    for n in ctx["sizes"]:
        folder = ctx.get("folders", {}).get(n)
        if folder is None:
            from megadigpt.data.index import write_synthetic

            folder = write_synthetic(ctx["tmp"] / f"idx{n}", n)
            ctx.setdefault("folders", {})[n] = folder
        r = json.loads(run_child(folder, args.lookups).communicate()[0].splitlines()[-1])
        ctx.setdefault("open", {})[n] = r
        b, o, a = r["before"], r["after_open"], r["after"]
        rows.append((f"open {label(n)}: start to usable / open_index", f"{r['usable_s']:.2f} s / {r['open_s']:.2f} s",
                     f"{r['us_per_lookup']:.1f} us per random lookup"))
        rows.append((f"RSS {label(n)}: before open / after open / after {args.lookups // 1000}k lookups",
                     f"{b['rss']:.0f} / {o['rss']:.0f} / {a['rss']:.0f} MiB", f"index adds {r['index_mib']:.1f} MiB"))
        rows.append((f"PSS / USS {label(n)} after the lookups, 1 process", f"{a['pss']:.0f} / {a['uss']:.0f} MiB", ""))
        if args.ranks > 1:
            barrier = tempfile.mkdtemp(dir=ctx["tmp"])
            procs = [run_child(folder, args.lookups, barrier, args.ranks) for _ in range(args.ranks)]
            rs = [json.loads(p.communicate()[0].splitlines()[-1]) for p in procs]
            rows.append((f"{args.ranks} ranks sharing {label(n)}: RSS / PSS / USS per rank (max)",
                         f"{max(x['after']['rss'] for x in rs):.0f} / {max(x['after']['pss'] for x in rs):.0f} / "
                         f"{max(x['after']['uss'] for x in rs):.0f} MiB",
                         f"index adds {max(x['index_mib'] for x in rs):.1f} MiB per rank"))
    return rows


MERGE_CHILD = r"""
import json, resource, sys, time
from megadigpt.data.tools import merge
t = time.time()
m = merge(sys.argv[1], sys.argv[2], progress=False)
print(json.dumps({"s": time.time() - t, "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "total": m["total"]}))
"""


def section_merge(args, ctx):
    n = max(ctx["sizes"])
    folder = ctx.get("folders", {}).get(n)
    if folder is None:
        from megadigpt.data.index import write_synthetic

        folder = write_synthetic(ctx["tmp"] / f"idx{n}", n)
        ctx.setdefault("folders", {})[n] = folder
    small = min(ctx["sizes"])
    spec = ctx["tmp"] / "merge.yaml"
    spec.write_text(f"sources:\n  - {{name: big, source: {folder}, weight: 3, expected_count: {n}}}\n"
                    f"  - {{name: small, source: {ctx['folders'][small]}, weight: 1}}\ntotal: {n}\n")
    base = json.loads(subprocess.run([sys.executable, "-c", "import json, resource, megadigpt.data.tools; print("
                                      "json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))"],
                                     capture_output=True, text=True, cwd=str(REPO)).stdout)
    p = subprocess.run([sys.executable, "-c", MERGE_CHILD, str(spec), str(ctx["tmp"] / "merged")],
                       capture_output=True, text=True, cwd=str(REPO))
    if p.returncode:
        return [("merge", "failed", p.stderr.strip().splitlines()[-1][:100])]
    r = json.loads(p.stdout.splitlines()[-1])
    return [(f"merge {label(n)} + {label(small)} (weights 3:1) -> {label(r['total'])} index", f"{r['s']:.1f} s",
             f"peak RSS {r['peak_mib']:.0f} MiB (imports alone {base:.0f} MiB)")]


def _indexed_throughput(shards, kind, batches, micro, workers, size):
    """Images/s of indexed mode's loader (PretrainStream over the index) on local shards, one rank."""
    import torch

    from megadigpt.data import PretrainStream, build_pretrain_loader, find_samples

    stream = PretrainStream(find_samples(shards), [size], 4, 0)
    loader = build_pretrain_loader(stream, micro, micro, 0, 1, 0, batches + 1, workers, kind, torch.device("cpu"))
    n, t0 = 0, None
    for i, b in enumerate(loader):
        if i == 0:
            t0 = time.perf_counter()  # after the workers started and the first batch arrived
            continue
        n += len(b["valid"])
    return n / (time.perf_counter() - t0)


def section_throughput(args, ctx):
    """images/s: local shards (indexed mode, and stream mode over the files) vs the same shards streamed over HTTP
    from a real server on 127.0.0.1 (tests/http_server.py), torch and DALI paths; --rounds rounds interleaved, the
    median and the range. One rank, --workers DataLoader workers (or DALI threads), one --image-size view."""
    import statistics

    from megadigpt.data.streaming import measure_stream_throughput
    from tests.http_server import ShardServer

    shards = sorted(Path(args.cifar).glob("train-*.tar"))[:4] if args.cifar else []
    if not shards:
        return [("throughput", "skipped", f"no shards in {args.cifar}")]
    kinds = ["torch"]
    try:
        import nvidia.dali  # noqa: F401

        kinds.append("dali")
    except ImportError:
        pass
    got = {}
    with ShardServer(shards[0].parent) as srv:
        urls = [srv.url(s.name) for s in shards]
        cases = [(src, kind) for kind in kinds for src in ("local, indexed", "local, stream", "HTTP, stream")]
        for _ in range(args.rounds):
            for src, kind in cases:
                if src == "local, indexed":
                    ips = _indexed_throughput([str(s) for s in shards], kind, args.batches, 64, args.workers,
                                              args.image_size)
                else:
                    ips = measure_stream_throughput(urls if src.startswith("HTTP") else [str(s) for s in shards],
                                                    batches=args.batches, kind=kind, micro_batch=64,
                                                    num_workers=args.workers, image_size=args.image_size,
                                                    shuffle_buffer=256)["images_per_s"]
                got.setdefault((src, kind), []).append(ips)
    rows = []
    for (src, kind), v in got.items():
        rows.append((f"images/s {src}, {kind} ({len(shards)} CIFAR shards, {args.image_size} px, {args.workers} workers)",
                     f"{statistics.median(v):.0f} img/s", f"range {min(v):.0f}-{max(v):.0f} over {len(v)} rounds"))
    return rows


SECTIONS = {"write": section_write, "scan": section_scan, "open": section_open, "merge": section_merge,
            "throughput": section_throughput}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1M,10M,36M", help="synthetic index sizes, e.g. 1M,10M,36M or 200k")
    ap.add_argument("--lookups", type=int, default=1_000_000, help="random lookups per rank in the open section")
    ap.add_argument("--ranks", type=int, default=4, help="processes sharing one index at once")
    ap.add_argument("--cifar", default=str(REPO.parent / "shared" / "data" / "cifar10"), help="real shards to scan")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"some of {','.join(SECTIONS)}")
    ap.add_argument("--tmp", default=tempfile.gettempdir(), help="where the synthetic data goes (deleted after)")
    ap.add_argument("--rounds", type=int, default=3, help="throughput: interleaved rounds per case")
    ap.add_argument("--batches", type=int, default=20, help="throughput: batches of 64 per measurement")
    ap.add_argument("--workers", type=int, default=2, help="throughput: DataLoader workers / DALI threads")
    ap.add_argument("--image-size", type=int, default=224, help="throughput: the view's size")
    args = ap.parse_args(argv)
    sizes = sorted(parse_size(s) for s in args.sizes.split(",") if s.strip())
    tmp = Path(tempfile.mkdtemp(prefix="megadigpt_data_scale_", dir=args.tmp))
    ctx = {"sizes": sizes, "tmp": tmp}
    print(f"# data_scale {time.strftime('%Y-%m-%d %H:%M')} on {platform.node()}: {os.cpu_count()} cores, "
          f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2 ** 30:.0f} GiB, {platform.platform()}")
    print("| what | time / memory | note |\n|---|---|---|")
    try:
        for name in args.sections.split(","):
            for row in SECTIONS[name.strip()](args, ctx):
                print("| " + " | ".join(row) + " |", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if "open" in ctx:
        n = max(ctx["open"])
        r = ctx["open"][n]
        print(f"index {label(n)}: {r['index_mib']:.1f} MiB per rank, {r['open_s']:.2f} s to open")
    return 0


if __name__ == "__main__":
    sys.exit(main())

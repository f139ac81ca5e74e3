"""Peak host memory per rank while the student is built: plain (every rank builds the whole fp32 model) against
partitioned (ZeRO-3: deepspeed.zero.Init + step-wise initialisation, megadigpt.distributed.partitioned).

    python benchmarks/build_memory.py [--models vit_huge/14,vit_giant/14] [--ranks 2]

Each rank builds each model both ways in fresh processes (so one build's pages do not count for the next) and
reports the rise of its resident-set high-water mark (VmHWM) over the build; rank 0 prints the table. The teacher,
the engine and the optimizer are left out: this is the build alone (decoder width 1024, teacher width 1024,
patch grid at 224 px).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, os, sys, time, torch, deepspeed
from megadigpt.config import ModelConfig
from megadigpt.model import build_model
from megadigpt.distributed.partitioned import build_partitioned, host_peak_bytes, reset_host_peak
deepspeed.init_distributed("gloo", auto_mpi_discovery=False)
arch, patch, how = sys.argv[1], int(sys.argv[2]), sys.argv[3]
m = ModelConfig(arch=arch, patch_size=patch, img_size=224)
ds = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
build = lambda **kw: build_model(m, 1024, 16, **kw)
reset_host_peak()
before = host_peak_bytes()
t0 = time.perf_counter()
torch.manual_seed(0)
model = build_partitioned(build, ds) if how == "partitioned" else build()
secs = time.perf_counter() - t0
peak = host_peak_bytes() - before
params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
out = [None] * torch.distributed.get_world_size()
torch.distributed.all_gather_object(out, peak)
if torch.distributed.get_rank() == 0:
    print("RESULT " + json.dumps({"arch": arch, "patch": patch, "how": how, "params": params, "seconds": secs,
                                  "peak_gib_per_rank": [p / 2 ** 30 for p in out]}), flush=True)
"""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="vit_huge/14,vit_giant/14")
    ap.add_argument("--ranks", type=int, default=2)
    a = ap.parse_args(argv)
    rows = []
    child = Path(tempfile.mkdtemp()) / "build_child.py"
    child.write_text(CHILD)
    for item in a.models.split(","):
        arch, _, patch = item.partition("/")
        for how in ("plain", "partitioned"):
            env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
                   "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
            proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(a.ranks),
                                   "--master_port", str(29000 + os.getpid() % 1000), str(child), arch,
                                   patch or "16", how], capture_output=True, text=True, env=env)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                print(proc.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"{item} {how} failed")
            rows.append(json.loads(line[7:]))
    print(f"# student build, {a.ranks} ranks, host peak per rank (VmHWM rise), {time.strftime('%Y-%m-%d')}")
    print("| model | params | plain GiB/rank | partitioned GiB/rank | plain s | partitioned s |")
    print("|---|---|---|---|---|---|")
    for i in range(0, len(rows), 2):
        p, z = rows[i], rows[i + 1]
        print(f"| {p['arch']}/{p['patch']} | {p['params'] / 1e9:.2f}B | {max(p['peak_gib_per_rank']):.2f} | "
              f"{max(z['peak_gib_per_rank']):.2f} | {p['seconds']:.0f} | {z['seconds']:.0f} |")


if __name__ == "__main__":
    main()

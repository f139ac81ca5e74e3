"""Throughput, FLOPs and MFU, and the metric sinks: metrics.jsonl, TensorBoard, a progress bar.

FLOPs are counted, not estimated: ``torch.utils.flop_counter`` over one image through the student (on the meta
device, so nothing is computed) and through the teacher. Model FLOPs per image = 3 x student forward (forward +
backward, whether or not activations are recomputed) [+ 1 x teacher forward for the total]. MFU divides achieved
FLOP/s by the device's peak: the dense bf16 tensor-core peak for known GPUs, ``train.peak_tflops`` if given, or on
a CPU a measured fp32 matmul rate (labelled as measured).
"""

import json
import sys
import time
from pathlib import Path
from typing import Optional

import torch

GPU_PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "V100": 125.0}


def count_flops(fn, *args) -> Optional[float]:
    from torch.utils.flop_counter import FlopCounterMode

    try:
        with FlopCounterMode(display=False) as counter:
            fn(*args)
        return float(counter.get_total_flops())
    except Exception:  # noqa: BLE001 - a teacher with ops the counter cannot see: no MFU, not a failed run
        return None


def peak_tflops(device: torch.device, override: Optional[float]):
    """(TFLOP/s per device, how it was obtained)."""
    if override:
        return override, "config"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, v in GPU_PEAK_BF16_TFLOPS.items():
            if key in name:
                return v, f"{key} bf16 dense"
        return None, "unknown GPU"
    a = torch.randn(1024, 1024)
    a @ a
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < 0.3:
        a @ a
        n += 1
    return 2 * 1024 ** 3 * n / (time.perf_counter() - t0) / 1e12, "measured CPU fp32 matmul"


class MetricsSink:
    """Rank 0 writes; other ranks hold a no-op sink."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, progress: str, total_steps: int,
                 start_step: int):
        self.enabled = enabled
        self.jsonl = self.tb = self.bar = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        if progress == "on" or (progress == "auto" and sys.stderr.isatty()):
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def event(self, **kw):
        if self.enabled:
            self.jsonl.write(json.dumps({"time": time.time(), **kw}) + "\n")

    def log(self, step: int, metrics: dict):
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and v is not None:
                    self.tb.add_scalar(f"train/{k}", v, step)
        if self.bar is not None:
            self.bar.set_postfix({k: f"{metrics[m]:.4g}" for k, m in (("gen", "gen_loss"), ("dis", "dis_loss"),
                                                                       ("ips", "images_per_s"))
                                  if metrics.get(m) is not None})
        else:
            keys = ("gen_loss", "dis_loss", "train_loss", "lr", "grad_norm", "images_per_s", "mfu_total", "knn_top1",
                    "val_top1", "val_top5", "val_ema_top1")
            print(f"step {step}: " + " ".join(f"{k}={metrics[k]:.4g}" for k in keys if metrics.get(k) is not None),
                  flush=True)

    def advance(self, n: int = 1):
        if self.bar is not None:
            self.bar.update(n)

    def close(self):
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        self.jsonl.close()


def read_metrics(path) -> dict:
    """{step: last record of that step} from a metrics.jsonl (a resumed run re-logs the steps it redid)."""
    out = {}
    for line in Path(path).read_text().splitlines():
        rec = json.loads(line)
        if "step" in rec and "gen_loss" in rec:
            out[rec["step"]] = rec
    return out

"""Throughput, FLOPs and MFU, and the metric sinks: metrics.jsonl, TensorBoard, Weights & Biases, a progress bar
(or, without a terminal, one line per log step with the time, step/total and ETA: what a SLURM log shows).

FLOPs are counted, not estimated: ``torch.utils.flop_counter`` over one image through the student and through the
teacher, both built on the meta device (nothing is computed). On the meta device ``F.scaled_dot_product_attention``
runs its math decomposition, whose matmuls the counter sees, and ``nn.MultiheadAttention`` (OpenCLIP) takes its
slow path; on a real CPU or GPU in eval/no_grad the MHA fast path (``_native_multi_head_attention``) and CPU's
fused SDPA kernel are invisible to the counter, so counting on real tensors leaves out attention (and, for MHA, the
q/k/v and output projections). Model FLOPs per image = 3 x student forward (forward + backward, whether or not
activations are recomputed) [+ 1 x teacher forward for the total].

MFU divides achieved FLOP/s by the device's peak: ``train.peak_tflops`` if given; for known GPUs the dense (no
sparsity) 16-bit tensor-core peak of NVIDIA's datasheet (:func:`gpu_peak`): bf16 where the GPU has bf16 tensor
cores, fp16 on V100 and T4, which have none (MFU there is against the fp16 peak, the fastest the matmuls can run;
precision ``auto`` trains in fp16 on them). MFU is always against the 16-bit peak, also for an fp32 run (the
usual convention: it says how far the run is from the hardware, not from its own dtype). On a CPU: a measured
fp32 matmul rate (labelled as measured).
"""

import json
import re
import secrets
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from ..safe_fs import check_no_links, open_append, read_regular, shorten, write_atomic
from ..sizing import count_flops  # noqa: F401 - re-exported (train/pretrain.py, perf/bench.py, tests)

# Dense 16-bit tensor-core peaks (TFLOP/s per GPU, without 2:4 sparsity) from NVIDIA's datasheets. Matched in
# this order against torch.cuda.get_device_name(), case-insensitively, every word of a key present: the specific
# variants first (an H100 PCIe is not an H100 SXM; "A100" must not match "A10").
GPU_PEAKS = (
    # (words in the device name, label, 16-bit dtype of the peak, TFLOP/s)
    (("H100", "PCIe"), "H100 PCIe", "bf16", 756.0),
    (("H100", "NVL"), "H100 NVL", "bf16", 835.0),
    (("H200", "NVL"), "H200 NVL", "bf16", 835.0),
    (("GH200",), "GH200", "bf16", 989.0),
    (("H200",), "H200 SXM", "bf16", 989.0),
    (("H100",), "H100 SXM", "bf16", 989.0),  # "NVIDIA H100 80GB HBM3"
    (("H800",), "H800 SXM", "bf16", 989.0),
    (("A100",), "A100", "bf16", 312.0),  # SXM and PCIe alike
    (("A800",), "A800", "bf16", 312.0),
    (("L40S",), "L40S", "bf16", 362.0),
    (("L40",), "L40", "bf16", 181.0),
    (("L4",), "L4", "bf16", 121.0),
    (("A10G",), "A10G", "bf16", 70.0),
    (("A10",), "A10", "bf16", 125.0),
    (("V100", "PCIe"), "V100 PCIe", "fp16", 112.0),  # Volta: no bf16 at all
    (("V100S",), "V100S", "fp16", 130.0),
    (("V100",), "V100 SXM2", "fp16", 125.0),
    (("T4",), "T4", "fp16", 65.0),
)


def gpu_peak(name: str):
    """(TFLOP/s, label, dtype) of the dense 16-bit tensor-core peak for a CUDA device name, or None if unknown."""
    import re

    words = set(re.split(r"[^0-9A-Z]+", name.upper()))
    for keys, label, dtype, tflops in GPU_PEAKS:
        if all(k.upper() in words for k in keys):
            return tflops, label, dtype
    return None


def teacher_flops(cfg, classes: Optional[int] = None) -> Optional[float]:
    """Forward FLOPs per image of the configured teacher, counted on its meta-device twin (random, unallocated
    weights: the same architecture) so that attention is in the count; 0 for the pixel target."""
    from ..sizing import meta_teacher

    teacher, spec = meta_teacher(cfg.target, cfg.model, classes)
    if cfg.target.kind == "pixels" and not spec.classes:
        return 0.0
    return count_flops(teacher, torch.zeros(1, 3, spec.image_size, spec.image_size, device="meta"))


def peak_tflops(device: torch.device, override: Optional[float]):
    """(TFLOP/s per device, how it was obtained)."""
    if override:
        return override, "config"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        hit = gpu_peak(name)
        if hit:
            return hit[0], f"{hit[1]} {hit[2]} dense (datasheet)"
        return None, f"unknown GPU {name!r}: set train.peak_tflops"
    a = torch.randn(1024, 1024)
    a @ a
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < 0.3:
        a @ a
        n += 1
    return 2 * 1024 ** 3 * n / (time.perf_counter() - t0) / 1e12, "measured CPU fp32 matmul"


class MetricsSink:
    """Rank 0 writes; other ranks hold a no-op sink.

    ``wandb``: None, or the W&B run's settings (``project``, ``mode`` online|offline, ``name``, ``config``). The run
    id is kept in ``<run_dir>/wandb_id.txt``, so a resumed run continues the same W&B run (``resume="allow"``)."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, progress: str, total_steps: int,
                 start_step: int, wandb: Optional[dict] = None):
        self.enabled = enabled
        self.jsonl = self.tb = self.bar = self.wb = None
        self.total, self.start_step = total_steps, start_step
        self.t0 = time.monotonic()
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        # never appended through a planted link; a line torn by kill -9 is ended first, so the next record is whole
        self.jsonl = open_append(run_dir / "metrics.jsonl", root=run_dir, what="metrics log")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            check_no_links(run_dir / "tensorboard", run_dir, "TensorBoard folder")
            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        if wandb is not None:
            self.wb = start_wandb(run_dir, **wandb)
        if progress == "on" or (progress == "auto" and sys.stderr.isatty()):
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def event(self, **kw):
        if self.enabled:
            self.jsonl.write(json.dumps({"time": time.time(), **kw}) + "\n")

    def eta(self, step: int) -> str:
        """Time left at the rate of the steps this process ran (``?`` before the first)."""
        done = step - self.start_step
        if done <= 0:
            return "?"
        left = (time.monotonic() - self.t0) / done * max(0, self.total - step)
        return format_duration(left)

    def log(self, step: int, metrics: dict):
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, "time": round(time.time(), 3), **metrics}) + "\n")
        numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.tb is not None:
            for k, v in numbers.items():
                self.tb.add_scalar(f"train/{k}", v, step)
        if self.wb is not None:
            self.wb.log(numbers, step=step)
        if self.bar is not None:
            self.bar.set_postfix({k: f"{metrics[m]:.4g}" for k, m in (("gen", "gen_loss"), ("dis", "dis_loss"),
                                                                       ("ips", "images_per_s"))
                                  if metrics.get(m) is not None})
        else:
            keys = ("gen_loss", "dis_loss", "train_loss", "lr", "grad_norm", "images_per_s", "mfu_total", "knn_top1",
                    "val_top1", "val_top5", "val_ema_top1")
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            pct = f" ({100 * step / self.total:.0f}%)" if self.total else ""
            print(f"{stamp} step {step}/{self.total}{pct} eta {self.eta(step)} " +
                  " ".join(f"{k}={metrics[k]:.4g}" for k in keys if metrics.get(k) is not None), flush=True)

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
        if self.wb is not None:
            self.wb.finish()
        self.jsonl.close()


def format_duration(seconds: float) -> str:
    s = int(round(seconds))
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return (f"{d}d" if d else "") + f"{h}:{m:02d}:{s:02d}"


def wandb_settings(cfg) -> dict:
    """The W&B run of a config: ``train.wandb_project``, ``train.wandb_mode``, the resolved config as its config."""
    return {"project": cfg.train.wandb_project, "mode": cfg.train.wandb_mode, "config": cfg.to_dict()}


def start_wandb(run_dir: Path, project: str = "megadigpt", mode: str = "online", name: Optional[str] = None,
                config: Optional[dict] = None, entity: Optional[str] = None):
    """A W&B run for this run directory (the real library; ``mode="offline"`` writes under ``<run_dir>/wandb``
    for ``wandb sync`` later). The id is kept in the run directory: a resume continues the same W&B run."""
    try:
        import wandb
    except ImportError:
        from ..config import ConfigError

        raise ConfigError("train.wandb needs the wandb package (pip install wandb, or megadigpt[wandb])") from None
    id_file = Path(run_dir) / "wandb_id.txt"
    check_no_links(Path(run_dir) / "wandb", run_dir, "W&B folder")
    raw = read_regular(id_file, limit=4096, root=run_dir, what="W&B run id file")
    run_id = raw.decode(errors="replace").strip() if raw else None
    if run_id and not re.fullmatch(r"[a-z0-9]{1,64}", run_id):
        from ..config import ConfigError

        raise ConfigError(f"{id_file} holds {shorten(run_id)}, not a W&B run id (lowercase letters and digits); "
                          f"remove the file to start a new W&B run")
    if not run_id:
        run_id = secrets.token_hex(4)  # W&B ids: 8 lowercase letters or digits
        write_atomic(id_file, run_id + "\n", root=run_dir, what="W&B run id file")
    return wandb.init(project=project, entity=entity, name=name or Path(run_dir).resolve().name, id=run_id,
                      resume="allow", dir=str(run_dir), mode=mode, config=config or {},
                      settings=wandb.Settings(silent=True, console="off"))


def read_metrics(path) -> dict:
    """{step: last record of that step} from a metrics.jsonl (a resumed run re-logs the steps it redid)."""
    out = {}
    for line in Path(path).read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:  # a line torn by kill -9 (the resumed run starts its records on a fresh line)
            continue
        if isinstance(rec, dict) and "step" in rec and "gen_loss" in rec:
            out[rec["step"]] = rec
    return out

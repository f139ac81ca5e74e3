"""``megadigpt bench``: throughput, where the step time goes, peak memory and MFU, for a grid of configurations,
each in fresh processes, next to a reference-style baseline measured in the same run.

A case is one point of model x teacher x ZeRO stage x activation checkpointing x attention backend x
micro-batch (x precision, torch.compile, data path). Each case runs ``--ranks`` processes (gloo on CPU, NCCL on
GPUs) through the task that ``megadigpt pretrain`` (or ``segment``) runs: the task builds the model and its
optimizer (:class:`megadigpt.train.pretrain.PretrainTask`: the teacher outside the engine, the student partitioned
under ZeRO-3, ``train.compile``'s ``apply_compile``; the DeepSpeed engine from ``ds_configs/``), and the timed step
is the task's own ``inputs``, ``targets``, ``loss`` and ``after_step`` around the engine's backward and step (the
harness's per-step bookkeeping is not timed), for ``--warmup`` untimed and ``--steps`` timed optimizer steps. The warm-up counts applied steps only:
fp16's dynamic loss scale starts at 2^16 and DeepSpeed skips the update of every step that overflows while it
lowers the scale, so the warm-up goes on until ``--warmup`` steps were really applied; a row records the skipped
steps of its warm-up and of its timed passes (``skipped_warmup_steps``, ``skipped_timed_steps``). Every case
(and round) runs in fresh processes: the teacher, the student and the engine are built once per process, for
that case alone, so nothing (a teacher, a compiled graph, allocator state) carries over from one case to another.

Timing (rank 0):
    images/s     over the timed steps, without synchronisation between phases (on a GPU: a separate pass);
    breakdown    the same steps again with the device synchronised at each phase boundary: data (next batch,
                 copy, normalise), teacher forward, student forward (incl. the loss), student backward, optimizer
                 step; their sum is the synchronised step time;
    comm         a separate pass: a few more steps with DeepSpeed's communication logger, which times every
                 collective and serialises it: the collectives' time per step with nothing overlapping them (not
                 a share of the step time above; it can exceed it).
Rounds: every case runs once per round, round after round (A B A B ...); a row is the low-median round, with the
spread of images/s and the median (and spread) of the per-round ratio to the baseline that ran in the same round.
A CPU's peak rate is measured once per sweep, so MFU columns compare.
Memory: the peak over the timed steps, above the process's footprint before the student was built (GPU:
``max_memory_allocated``; CPU: the resident-set high-water mark, reset through ``/proc/self/clear_refs``); the
planner's prediction for the same case (``perf.memory``) is printed beside it.
MFU: model FLOPs per image (counted by ``torch.utils.flop_counter``: 2 per multiply-add, attention at its dense
L x L size) x images/s per device / the device's peak. Student: 3 x student forward (forward + backward; an
activation-checkpointing recompute is not model FLOPs); total: + 1 x teacher forward.

The baseline is the reference implementation's way of training: eager attention with the dense additive mask,
AdamW without fused or multi-tensor kernels, no ZeRO sharding (stage 0, data parallel), fp16 with loss scaling on
GPUs (DeepSpeed refuses fp16 on CPU, where the baseline is fp32); ``vs baseline`` is a case's images/s over the
baseline's for the same model, teacher, micro-batch and data path.

Segmentation: with a ``megadigpt segment`` config as ``--config`` (one with a ``segment:`` section, e.g.
``segment_ade20k_vitb16``) a case is the segmentation step instead (``_segment_job``): the Segmentor (ViT encoder
+ neck + UperNet + auxiliary FCN, ``train.segment``'s builder and parameter groups) in the engine at the crop
(``--img-size``, default the config's ``model.crop_size``), a fixed synthetic batch of crops and masks on the
device, decode + auxiliary cross-entropy, BatchNorm statistics averaged over the ranks where there is no
SyncBatchNorm, as ``megadigpt segment`` does; no teacher (its phase is 0), the planned memory is
``perf.segment_memory``'s. Its baseline: eager attention (timm's unfused path), torch's AdamW loop, ZeRO 0,
fp16 on GPUs / fp32 on CPU.
"""

import itertools
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import List, Optional

from ..config import ConfigError

PHASES = ("data", "teacher", "forward", "backward", "optimizer")


@dataclass(frozen=True)
class Case:
    arch: str = "vit_base"
    patch: int = 16
    img_size: int = 224
    teacher: str = "efficientnet_lite0"  # efficientnet_lite0 | pixels | open_clip:<arch> (random) | timm:<name>
    zero: int = 1
    ckpt: bool = False
    attention: str = "sdpa"
    micro_batch: int = 32
    precision: str = "auto"
    compile: bool = False
    data: str = "synthetic"  # synthetic (uint8 on the device) | torch | dali (loaders on --data-source)
    baseline: bool = False
    offload: bool = False
    task: str = "pretrain"  # pretrain | segment | clip (``megadigpt segment``'s / ``clip``'s step; their --config)

    @property
    def label(self) -> str:
        if self.baseline:
            return "baseline"
        return (f"z{self.zero}{' ckpt' if self.ckpt else ''} {self.attention}"
                f"{' compile' if self.compile else ''}{' offload' if self.offload else ''}")

    def group(self):
        """Cases compared with the same baseline."""
        return (self.arch, self.patch, self.img_size, self.teacher, self.micro_batch, self.data, self.task)


def as_baseline(c: Case, device_type: str) -> Case:
    return replace(c, zero=0, ckpt=False, attention="eager", compile=False, offload=False, baseline=True,
                   precision="fp16" if device_type == "cuda" else "fp32")


def _teacher_overrides(spec: str) -> List[str]:
    kind, _, name = spec.partition(":")
    if kind == "open_clip":
        return ["target.kind=open_clip", f"target.model={name or 'ViT-H-14'}", "target.weights=null",
                "target.random_weights=true"]
    if kind == "timm":
        if not name:
            raise ConfigError("teacher timm:<model name>")
        return ["target.kind=timm", f"target.model={name}", "target.weights=null", "target.random_weights=true"]
    if kind in ("efficientnet_lite0", "pixels"):
        return [f"target.kind={kind}"]
    raise ConfigError(f"unknown teacher {spec!r}: efficientnet_lite0 | pixels | open_clip:<arch> | timm:<name>")


def case_config(case: Case, base: Optional[str], overrides: List[str], world: int, run_dir: str,
                data_source: Optional[str]):
    from ..config import load_config

    ov = list(overrides) + _teacher_overrides(case.teacher) + [
        f"model.arch={case.arch}", f"model.patch_size={case.patch}", f"model.img_size={case.img_size}",
        f"model.attention={case.attention}", "model.taps=null", f"train.zero_stage={case.zero}",
        f"train.activation_checkpointing={str(case.ckpt).lower()}", f"train.micro_batch={case.micro_batch}",
        f"train.global_batch={case.micro_batch * world}", f"train.precision={case.precision}",
        f"train.compile={str(case.compile).lower()}", f"train.run_dir={run_dir}", "train.max_steps=1000000",
        "train.tensorboard=false", "train.progress=off"]
    if case.data != "synthetic":
        if not data_source:
            raise ConfigError(f"data path {case.data!r} needs --data-source (shards or an image folder)")
        ov += [f"data.source={data_source}", f"data.loader={case.data}"]
    return load_config(base, ov)


# ============================================================================ memory probes


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _hwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


class MemoryProbe:
    """Allocated bytes: on a GPU torch's allocator statistics; on a CPU the same quantity counted by
    :class:`perf.memory.LiveBytes` (every tensor storage created since ``start``, at its full size, touched or
    not, as the CUDA allocator counts it), active from before the student is built through the warm-up steps.
    The CPU's resident set is recorded beside it (it also holds what glibc keeps after frees)."""

    def __init__(self, device):
        import torch

        from .memory import LiveBytes

        self.cuda = device.type == "cuda"
        self.torch = torch
        self.tracker = None if self.cuda else LiveBytes()

    def start(self):
        if self.cuda:
            self.torch.cuda.synchronize()
            self.base = self.torch.cuda.memory_allocated()
            self.torch.cuda.reset_peak_memory_stats()
        else:
            self.base = 0
            self.rss0 = _rss()
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
            self.tracker.__enter__()

    def now(self) -> int:
        return (self.torch.cuda.memory_allocated() if self.cuda else self.tracker.live) - self.base

    def stop(self):
        """(peak allocated, resident-set peak or None), both above the footprint at ``start``."""
        if self.cuda:
            self.torch.cuda.synchronize()
            return self.torch.cuda.max_memory_allocated() - self.base, None
        self.tracker.__exit__(None, None, None)
        return self.tracker.peak, _hwm() - self.rss0


# ============================================================================ one case (every rank)


class _Job:
    """What one case's timing loop needs from the model it measures (``_pretrain_job``, ``_segment_job``): the
    device, the memory probe (started before the model was built), ``step(times)`` (one optimizer step, phases
    timed into ``times`` when given), ``applied()`` (whether the last step's update was applied: DeepSpeed's
    ``was_step_applied``, False for an fp16 overflow it skipped), the FLOP and parameter counts
    (``perf.memory.ModelSizes``), the planner's row for the case (or None), the precision and the teacher's
    dtype."""

    def __init__(self, cfg, device, mem, step, sizes, planned, precision, teacher_dtype, applied):
        self.cfg, self.device, self.mem, self.step, self.sizes = cfg, device, mem, step, sizes
        self.planned, self.precision, self.teacher_dtype, self.applied = planned, precision, teacher_dtype, applied


# fp16 from a 2^16 loss scale: DeepSpeed skips every step that overflows and, from the second one on (its
# hysteresis, 2), halves the scale at each, so the first applied step comes after at most ~17 skipped ones (down
# to a scale of 1); a hundred means the scale will not settle (non-finite losses, not an fp16 range problem)
MAX_SKIPPED_WARMUP = 100


def warm_up(step, applied, steps: int, max_skipped: int = MAX_SKIPPED_WARMUP) -> int:
    """Run ``step()`` until ``steps`` (at least one) of them were applied (``applied()`` after each); returns how
    many were skipped. A skipped step (an fp16 overflow while the loss scale comes down from 2^16) does no
    optimizer work and is cheaper: counted as warm-up, the timed window could start before the scale settled and
    time those instead of training steps. Raises RuntimeError after ``max_skipped`` skipped steps."""
    done = skipped = 0
    while done < max(1, steps):
        step()
        if applied():
            done += 1
            continue
        skipped += 1
        if skipped >= max_skipped:
            raise RuntimeError(f"{skipped} optimizer steps skipped in the warm-up (fp16 overflow?) and only {done} "
                               f"applied: the loss scale did not settle")
    return skipped


def _timer(device, times):
    """``mark(name, t0)``: with ``times``, synchronise, add the time since ``t0`` to ``times[name]``, return now."""
    import torch

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def mark(name, t0):
        if times is not None:
            sync()
            t1 = time.perf_counter()
            times[name] += t1 - t0
            return t1
        return t0
    return mark


def _task_run(task, env, device):
    """The harness's :class:`~megadigpt.train.harness.Run` of a benchmark case (nothing resumed, no run files)."""
    from ..train.common import torch_dtype
    from ..train.harness import Run

    cfg = task.cfg
    return Run(cfg, env, task.plan, Path(cfg.train.run_dir), env.rank == 0, None, device=device,
               compute_dtype=torch_dtype(task.plan.precision))


def _task_step(task, engine, device, it):
    """One optimizer step of ``task`` as the harness runs it (its ``inputs``, ``targets``, ``loss`` and
    ``after_step``, the engine's backward and step), phases timed into ``times`` when given. Not the harness's
    non-finite agreement: DeepSpeed's own step (its fp16 overflow skip) is what the warm-up counts."""

    def step(times=None):
        mark = _timer(device, times)
        t = time.perf_counter()
        x = task.inputs(next(it))
        t = mark("data", t)
        targets = task.targets(x)
        t = mark("teacher", t)
        loss = task.loss(x, targets)[0]
        t = mark("forward", t)
        engine.backward(loss)
        t = mark("backward", t)
        engine.step()
        task.after_step(engine.was_step_applied())
        mark("optimizer", t)
        return loss
    return step


def _pretrain_job(case: Case, base, overrides, env, run_dir, data_source, total_steps: int) -> _Job:
    """The pretraining step, as ``megadigpt pretrain`` runs it: :class:`~megadigpt.train.pretrain.PretrainTask`
    builds the teacher, the student (partitioned under ZeRO-3, checkpointed and compiled as the config says) and
    its optimizer; the timed step is the task's."""
    import torch

    from ..distributed import engine as ds_engine
    from ..train.optim import param_groups
    from ..train.pretrain import PretrainTask
    from . import memory

    cfg = case_config(case, base, overrides, env.world_size, run_dir, data_source)
    task = PretrainTask(cfg)
    task.plan = plan = task.plan_run(env)
    if case.offload and plan.device_type != "cuda":
        raise ConfigError("CPU offload is measured on GPUs only")
    device = ds_engine.start_processes(env, plan.device_type)
    run = _task_run(task, env, device)
    mem = MemoryProbe(device)
    m = cfg.model
    task.build_teacher(run)
    spec = task.spec
    sizes = memory.model_sizes(cfg)
    mem.start()
    model, ds_config = task.build(run)
    if case.offload:
        ds_config["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if case.baseline and not case.offload:  # the reference: torch's per-parameter loop
        optimizer = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay), lr=1e-4,
                                      betas=tuple(cfg.optim.betas), foreach=False)
    else:  # what pretraining builds (fused where the device has the kernel; DeepSpeed's CPU Adam when offloaded)
        optimizer = task.build_optimizer(run, model, ds_config)
    run.engine = engine = ds_engine.initialize(model, optimizer, ds_config)
    task.attach(run)

    # ---------------------------------------------------------------- inputs
    B = case.micro_batch
    S = m.segment_grid ** 2
    if case.data == "synthetic":
        g = torch.Generator().manual_seed(env.rank)
        fixed = [torch.randint(0, 256, (B, 3, s, s), dtype=torch.uint8, generator=g).to(device) for s in task.sizes]

        def batches():
            while True:
                yield {"views": fixed, "order": torch.stack([torch.randperm(S) for _ in range(B)]),
                       "valid": torch.ones(B, dtype=torch.bool)}
    else:
        from ..data import PretrainStream, build_pretrain_loader, find_samples

        stream = PretrainStream(find_samples(cfg.data.source), [m.img_size, spec.image_size], S, 0,
                                cfg.data.crop_scale, cfg.data.crop_ratio, cfg.data.interpolation, cfg.data.hflip)
        loader = build_pretrain_loader(stream, B * env.world_size, B, env.rank, env.world_size, 0, total_steps,
                                       cfg.data.num_workers, plan.loader, device)

        def batches():
            return iter(loader)
    engine.train()
    step = _task_step(task, engine, device, batches())
    planned = memory.plan_one(cfg, env.world_size, 1e9, case.zero, case.ckpt, case.offload, B, plan.precision,
                              plan.teacher_dtype, reserve_gib=0.0) if case.zero in (1, 2, 3) else None
    return _Job(cfg, device, mem, step, sizes, planned, plan.precision, plan.teacher_dtype, engine.was_step_applied)


def segment_case_config(case: Case, base: Optional[str], overrides: List[str], world: int, run_dir: str):
    """The ``megadigpt segment`` config of a segmentation case: the crop is the case's image size."""
    from ..segment_config import load_segment_config

    return load_segment_config(base, list(overrides) + [
        f"model.arch={case.arch}", f"model.patch_size={case.patch}", f"model.crop_size={case.img_size}",
        f"train.zero_stage={case.zero}", f"train.activation_checkpointing={str(case.ckpt).lower()}",
        f"train.micro_batch={case.micro_batch}", f"train.global_batch={case.micro_batch * world}",
        f"train.precision={case.precision}", f"train.run_dir={run_dir}", "train.tensorboard=false",
        "train.progress=off", "segment.eval_mode=whole"])  # (no evaluation is measured: no window check)


def check_synthetic_case(case: Case, device_type: Optional[str], step: str, attention: str) -> None:
    """The grid's dimensions a step measured on synthetic inputs with its library's attention does not take."""
    if case.data != "synthetic":
        raise ConfigError(f"{step} is measured on synthetic inputs only (--data {case.data})")
    if case.compile or case.attention not in ("sdpa", "eager"):
        raise ConfigError(f"{step} is measured with {attention} (sdpa, or eager for the baseline) and without "
                          f"torch.compile")
    if case.offload and (device_type or "cuda") != "cuda":
        raise ConfigError("CPU offload is measured on GPUs only")


def check_segment_case(case: Case, base, overrides, world: int, run_dir: str, device_type: Optional[str] = None):
    """``plan_segment``'s checks of a segmentation case (synthetic inputs: no data folders) and the grid's
    dimensions that do not apply to it. -> (config, plan)."""
    from ..train.segment import plan_segment

    check_synthetic_case(case, device_type, "the segmentation step", "timm's attention")
    cfg = segment_case_config(case, base, overrides, world, run_dir)
    return cfg, plan_segment(cfg, world, device_type=device_type, need_data=False)


def _synthetic_images(cfg, n: int, size: int, device, g):
    """``n`` random images, normalised with the config's mean and std as the loaders give them."""
    import torch

    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g).to(device)
    mean = torch.tensor(cfg.data.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(cfg.data.std, device=device).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


def _timm_task_engine(task, run, case: Case, blocks_of, baseline_params):
    """The engine of a task whose encoder is timm's ViT (segmentation, image-text), as the task builds it; the
    baseline case: timm's attention without the fused kernel (``blocks_of(model)``'s) and torch's per-parameter
    AdamW over ``baseline_params(model)``."""
    import torch

    from ..distributed import engine as ds_engine

    model, ds_config = task.build(run)
    if case.attention == "eager":  # the baseline: timm's attention without the fused kernel
        for blk in blocks_of(model):
            blk.attn.fused_attn = False
    if case.offload:
        ds_config["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if case.baseline and not case.offload:  # the reference: torch's per-parameter loop
        optimizer = torch.optim.AdamW(baseline_params(model), lr=1e-4, betas=tuple(task.cfg.optim.betas),
                                      foreach=False)
    else:  # what the task builds
        optimizer = task.build_optimizer(run, model, ds_config)
    run.engine = engine = ds_engine.initialize(model, optimizer, ds_config)
    task.attach(run)
    return engine


def _segment_job(case: Case, base, overrides, env, run_dir) -> _Job:
    """The segmentation step, as ``megadigpt segment`` runs it: :class:`~megadigpt.train.segment.SegmentTask`
    builds the Segmentor (ViT + neck + UperNet + auxiliary FCN) and its optimizer; the timed step is the task's
    (decode + aux cross-entropy, BatchNorm statistics averaged over the ranks where there is no SyncBatchNorm).
    Inputs: a fixed synthetic batch of normalised crops and masks on the device."""
    import torch

    from ..distributed import engine as ds_engine
    from ..train.metrics import count_flops
    from ..train.segment import SegmentTask, build_segmentor
    from . import memory, segment_memory

    cfg, plan = check_segment_case(case, base, overrides, env.world_size, run_dir)
    task = SegmentTask(cfg)
    task.plan = plan
    device = ds_engine.start_processes(env, plan.device_type)
    run = _task_run(task, env, device)
    mem = MemoryProbe(device)
    m = cfg.model
    task.resolve()  # a fresh encoder of the case's arch: no weights
    with torch.device("meta"):  # per-image training-forward FLOPs (both heads), on the meta device (attention
        meta = build_segmentor(task.args, cfg).train()  # counted), over 2 images: BatchNorm's 1x1 pool refuses 1
        fwd = count_flops(meta, torch.empty(2, 3, m.crop_size, m.crop_size))
        fwd = fwd / 2 if fwd is not None else None
    n_meta = sum(p.numel() for p in meta.parameters() if p.requires_grad)
    sizes = memory.ModelSizes(n_meta, 0, 0, fwd, 0.0)
    mem.start()
    from ..model.segmentation import segment_param_groups

    engine = _timm_task_engine(task, run, case, lambda model: model.backbone.blocks, lambda model: segment_param_groups(
        model, cfg.optim.weight_decay, cfg.optim.layer_decay))

    B, c = case.micro_batch, m.crop_size
    g = torch.Generator().manual_seed(env.rank)
    images = _synthetic_images(cfg, B, c, device, g)
    masks = torch.randint(0, m.num_classes, (B, c, c), dtype=torch.uint8, generator=g).to(device)
    masks[:, : c // 8] = 255  # some ignored pixels, as real masks have
    batch = {"image": images, "mask": masks, "valid": torch.ones(B, dtype=torch.bool, device=device)}
    engine.train()
    step = _task_step(task, engine, device, itertools.repeat(batch))
    planned = segment_memory.plan_one(cfg, env.world_size, 1e9, case.zero, case.ckpt, case.offload, B,
                                      plan.precision, reserve_gib=0.0) if case.zero in (1, 2, 3) else None
    return _Job(cfg, device, mem, step, sizes, planned, plan.precision, None, engine.was_step_applied)


def clip_case_config(case: Case, base: Optional[str], overrides: List[str], world: int, run_dir: str):
    """The ``megadigpt clip`` config of an image-text case: the image tower at the case's size, the config's text
    tower with random weights (the step's speed and memory do not depend on them)."""
    from ..clip_config import load_clip_config

    return load_clip_config(base, list(overrides) + [
        f"model.arch={case.arch}", f"model.patch_size={case.patch}", f"model.img_size={case.img_size}",
        f"train.zero_stage={case.zero}", f"train.activation_checkpointing={str(case.ckpt).lower()}",
        f"train.micro_batch={case.micro_batch}", f"train.global_batch={case.micro_batch * world}",
        f"train.precision={case.precision}", f"train.run_dir={run_dir}", "train.tensorboard=false",
        "train.progress=off", "text.weights=null", "text.random_weights=true"])


def check_clip_case(case: Case, base, overrides, world: int, run_dir: str, device_type: Optional[str] = None):
    """``plan_clip``'s checks of an image-text case (synthetic inputs: no data) and the grid's dimensions that do
    not apply to it. -> (config, plan)."""
    from ..train.clip import plan_clip

    check_synthetic_case(case, device_type, "the image-text step", "timm's and open_clip's attention")
    cfg = clip_case_config(case, base, overrides, world, run_dir)
    return cfg, plan_clip(cfg, world, device_type=device_type, need_data=False)


def _clip_job(case: Case, base, overrides, env, run_dir) -> _Job:
    """The image-text step, as ``megadigpt clip`` runs it: :class:`~megadigpt.train.clip.ClipTask` builds both
    towers (open_clip's CLIP with megadigpt's image tower) and their optimizer (layer decay over the image tower,
    the text tower's lr scale); the timed step is the task's (both towers, OpenCLIP's loss over the features
    gathered from every rank). Inputs: a fixed synthetic batch of normalised images and random token ids."""
    import torch

    from ..distributed import engine as ds_engine
    from ..sizing import count_flops
    from ..train.clip import ClipTask, build_clip, freeze_towers, open_clip_config
    from ..train.transfer import resolve_model
    from . import clip_memory, memory

    cfg, plan = check_clip_case(case, base, overrides, env.world_size, run_dir)
    task = ClipTask(cfg)
    task.plan = plan
    task.weights, (task.geom, _) = None, resolve_model(cfg)  # a fresh image tower of the case's arch
    task.oc = open_clip_config(cfg)
    device = ds_engine.start_processes(env, plan.device_type)
    run = _task_run(task, env, device)
    mem = MemoryProbe(device)
    ctx = task.oc["text_cfg"]["context_length"]
    s = cfg.model.img_size
    with torch.device("meta"):  # per-pair training-forward FLOPs of both towers, on the meta device
        meta, _ = build_clip(cfg, task.geom, device="meta")
        fwd = count_flops(meta, torch.empty(1, 3, s, s), torch.zeros(1, ctx, dtype=torch.long))
    freeze_towers(meta, cfg.clip)
    sizes = memory.ModelSizes(sum(p.numel() for p in meta.parameters() if p.requires_grad), 0, 0, fwd, 0.0)
    mem.start()
    engine = _timm_task_engine(task, run, case, lambda model: model.visual.blocks,
                               lambda model: [p for p in model.parameters() if p.requires_grad])
    B = case.micro_batch
    g = torch.Generator().manual_seed(env.rank)
    batch = {"image": _synthetic_images(cfg, B, s, device, g),
             "text": torch.randint(1, 1000, (B, ctx), generator=g).to(device),
             "valid": torch.ones(B, dtype=torch.bool, device=device)}
    engine.train()
    step = _task_step(task, engine, device, itertools.repeat(batch))
    planned = clip_memory.plan_one(cfg, env.world_size, 1e9, case.zero, case.ckpt, case.offload, B, plan.precision,
                                   reserve_gib=0.0) if case.zero in (1, 2, 3) else None
    return _Job(cfg, device, mem, step, sizes, planned, plan.precision, None, engine.was_step_applied)


def run_case(case: Case, base: Optional[str], overrides: List[str], steps: int, warmup: int,
             data_source: Optional[str], comm_steps: int = 2) -> dict:
    import torch
    import torch.distributed as dist

    from ..distributed import env as dist_env
    from ..train.metrics import peak_tflops
    from . import memory

    env = dist_env.discover()
    run_dir = tempfile.mkdtemp(prefix="megadigpt-bench-")
    if case.task == "segment":
        job = _segment_job(case, base, overrides, env, run_dir)
    elif case.task == "clip":
        job = _clip_job(case, base, overrides, env, run_dir)
    else:
        # the loader's batches: room for the warm-up's skipped steps too (see warm_up)
        job = _pretrain_job(case, base, overrides, env, run_dir, data_source,
                            warmup + MAX_SKIPPED_WARMUP + 2 * steps + comm_steps + 1)
    device, mem, sizes, cfg = job.device, job.mem, job.sizes, job.cfg
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    B = case.micro_batch

    # DeepSpeed agrees on an fp16 overflow across the ranks: every rank warms up for the same number of steps
    skipped_warmup = warm_up(job.step, job.applied, warmup)
    skipped_timed = 0

    def step(times=None):  # after the warm-up: counts the steps that were skipped all the same
        nonlocal skipped_timed
        loss = job.step(times)
        skipped_timed += not job.applied()
        return loss
    sync()
    steady_bytes = mem.now()  # model states after a step (Adam's moments exist from the first one)
    for _ in range(1 if device.type == "cpu" else 0):
        step()  # one more steady-state step inside the CPU's counter (the GPU's counts the timed steps too)
    if device.type == "cpu":
        peak_bytes, rss_bytes = mem.stop()
    dist.barrier()
    # images/s: plain steps (on a CPU every op is synchronous, so the synchronised pass below measures the same)
    plain_s = None
    if device.type == "cuda":
        t0 = time.perf_counter()
        for _ in range(steps):
            loss = step()
        sync()
        plain_s = (time.perf_counter() - t0) / steps
    times = dict.fromkeys(PHASES, 0.0)
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step(times)
    sync()
    synced_s = (time.perf_counter() - t0) / steps
    device_used = None
    if device.type == "cuda":
        peak_bytes, rss_bytes = mem.stop()
        free, total_mem = torch.cuda.mem_get_info(device)  # what the allocator's figure leaves out (context, NCCL)
        device_used = (total_mem - free) / memory.GiB
    loss_value = float(loss.detach().float().item())

    comm = {}
    if env.world_size > 1 and comm_steps > 0:
        import deepspeed.comm as ds_comm

        logger = ds_comm.comms_logger
        logger.enabled, logger.prof_all, logger.verbose = True, True, False
        logger.comms_dict.clear()
        for _ in range(comm_steps):
            step()
        sync()
        logger.enabled = False
        for name, by_size in logger.comms_dict.items():
            comm[name] = sum(sum(v[1]) for v in by_size.values()) / 1000.0 / comm_steps  # ms -> s per step
    # every rank's peak: the planner is per rank
    peaks = [None] * env.world_size
    dist.all_gather_object(peaks, (peak_bytes, steady_bytes, rss_bytes or 0))
    step_s = plain_s or synced_s
    ips = B * env.world_size / step_s
    peak_tf, peak_src = peak_tflops(device, cfg.train.peak_tflops)
    mfu = {}
    if peak_tf and sizes.student_fwd_flops:
        per_dev = ips / env.world_size
        mfu["mfu_student"] = per_dev * 3 * sizes.student_fwd_flops / (peak_tf * 1e12)
        if sizes.teacher_fwd_flops is not None:
            mfu["mfu_total"] = per_dev * (3 * sizes.student_fwd_flops + sizes.teacher_fwd_flops) / (peak_tf * 1e12)
    planned = job.planned
    res = {
        "status": "ok", "world_size": env.world_size, "device": _device_name(device),
        "precision": job.precision, "teacher_dtype": job.teacher_dtype, "loader": case.data,
        "images_per_s": ips, "step_s": step_s, "synced_step_s": synced_s,
        "phases_s": {k: v / steps for k, v in times.items()}, "comm_s": sum(comm.values()), "comm_ops_s": comm,
        "peak_gib": max(p[0] for p in peaks) / memory.GiB, "states_gib": max(p[1] for p in peaks) / memory.GiB,
        "rss_peak_gib": (max(p[2] for p in peaks) / memory.GiB) if rss_bytes is not None else None,
        "device_used_gib": device_used, "peak_tflops": peak_tf, "peak_tflops_source": peak_src,
        "flops_student_fwd": sizes.student_fwd_flops, "flops_teacher_fwd": sizes.teacher_fwd_flops,
        "student_params": sizes.student_params, "teacher_params": sizes.teacher_params, "loss": loss_value, **mfu,
        "skipped_warmup_steps": skipped_warmup, "skipped_timed_steps": skipped_timed,
    }
    if planned is not None:
        # what the measurement sees: everything above the footprint before the student, without the teacher's
        # weights (built before) -- states and the larger of activations and the step's fp32 gradients
        res["planned_gib"] = planned.total_gib - planned.teacher_gib
        res["planned_states_gib"] = (planned.params_gib + planned.grads_gib + planned.optimizer_gib +
                                     planned.buffers_gib)
        res["planned_activations_gib"] = planned.activations_gib
        res["measured_over_planned"] = res["peak_gib"] / res["planned_gib"]
    dist.barrier()
    dist.destroy_process_group()
    return res


def _device_name(device) -> str:
    if device.type == "cuda":
        import torch

        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {name} ({os.cpu_count()} cores)"


def worker_main(argv) -> int:
    """``python -m megadigpt.perf.bench --worker <job.json> <result.json>``: one rank of one case."""
    job = json.loads(Path(argv[0]).read_text())
    out = Path(argv[1])
    try:
        res = run_case(Case(**job["case"]), job["base"], job["overrides"], job["steps"], job["warmup"],
                       job["data_source"], job.get("comm_steps", 2))
    except Exception as e:  # noqa: BLE001 - recorded in the table; the sweep goes on
        import torch

        oom = isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()
        res = {"status": "oom" if oom else "error", "error": f"{type(e).__name__}: {e}"[:2000]}
        if os.environ.get("RANK", "0") == "0":
            out.write_text(json.dumps(res))
        raise
    if os.environ.get("RANK", "0") == "0":
        out.write_text(json.dumps(res))
    return 0


# ============================================================================ the sweep (parent process)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_case(case: Case, ranks: int, base, overrides, steps, warmup, data_source, timeout: float,
                workdir: Path, comm_steps: int = 2) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    job = workdir / "job.json"
    result = workdir / "result.json"
    job.write_text(json.dumps({"case": asdict(case), "base": base, "overrides": overrides, "steps": steps,
                               "warmup": warmup, "data_source": data_source, "comm_steps": comm_steps}))
    port = _free_port()
    procs = []
    cores = os.cpu_count() or 1
    for r in range(ranks):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMI_", "PMIX_", "SLURM_"))}
        env.update(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(ranks), LOCAL_WORLD_SIZE=str(ranks),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        env.setdefault("OMP_NUM_THREADS", str(max(1, cores // ranks)))
        log = open(workdir / f"rank{r}.log", "w")
        procs.append((subprocess.Popen([sys.executable, "-m", "megadigpt.perf.bench", "--worker", str(job),
                                        str(result)], env=env, stdout=log, stderr=subprocess.STDOUT), log))
    deadline = time.monotonic() + timeout
    timed_out = False
    for p, log in procs:
        try:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
    for p, log in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
        log.close()
    if result.is_file():
        res = json.loads(result.read_text())
    else:
        tail = (workdir / "rank0.log").read_text()[-1500:] if (workdir / "rank0.log").is_file() else ""
        res = {"status": "timeout" if timed_out else "error",
               "error": ("timed out after %.0f s" % timeout) if timed_out else tail}
    if res.get("status") == "ok" and any(p.returncode for p, _ in procs):
        res = {"status": "error", "error": f"exit codes {[p.returncode for p, _ in procs]}; see {workdir}"}
    return res


def expand_grid(models, teachers, zeros, ckpts, attentions, micro_batches, precisions, compiles, datas,
                img_size=224) -> List[Case]:
    cases = []
    for (arch, patch), teacher, mb, data in itertools.product(models, teachers, micro_batches, datas):
        for zero, ck, attn, prec, comp in itertools.product(zeros, ckpts, attentions, precisions, compiles):
            cases.append(Case(arch, patch, img_size, teacher, zero, ck, attn, mb, prec, comp, data))
    return cases


def with_baselines(cases: List[Case], device_type: str) -> List[Case]:
    out, seen = [], set()
    for c in cases:
        if c.group() not in seen:
            seen.add(c.group())
            out.append(as_baseline(c, device_type))
        out.append(c)
    return out


_GROUP = ("arch", "patch", "img_size", "teacher", "micro_batch", "data", "task")


def aggregate(case: Case, results: List[dict]) -> dict:
    """One row from a case's rounds: the low-median round's measurement (images/s, step time, breakdown, memory
    stay consistent with one another), with every round's images/s and their spread beside it."""
    bad = [x for x in results if x.get("status") != "ok"]
    if bad:
        return {**bad[0], "rounds_images_per_s": [x.get("images_per_s") for x in results]}
    ips = [x["images_per_s"] for x in results]
    mid = results[ips.index(statistics.median_low(ips))]
    return {**mid, "rounds_images_per_s": ips, "images_per_s_spread": [min(ips), max(ips)]}


def attach_speedups(rows: List[dict]):
    """``vs_baseline``: the median over rounds of the case's images/s over its baseline's in the same round (the
    two ran back to back), with the spread of those ratios."""
    base = {tuple(r["case"][k] for k in _GROUP): r["result"]["rounds_images_per_s"] for r in rows
            if r["case"]["baseline"] and r["result"]["status"] == "ok"}
    for r in rows:
        key = tuple(r["case"][k] for k in _GROUP)
        x = r["result"]
        if x["status"] == "ok" and key in base:
            ratios = [a / b for a, b in zip(x["rounds_images_per_s"], base[key])]
            x["vs_baseline"], x["vs_baseline_spread"] = statistics.median(ratios), [min(ratios), max(ratios)]


def _f(v, fmt):
    return "–" if v is None else format(v, fmt)


def _spread(pair, fmt) -> str:
    return "" if not pair or pair[0] == pair[1] else f" [{format(pair[0], fmt)}-{format(pair[1], fmt)}]"


def markdown(rows: List[dict]) -> str:
    # GPU runs: what the device had in use (torch.cuda.mem_get_info: + CUDA context, NCCL, allocator cache) beside
    # torch's peak; the difference is what ``megadigpt plan --reserve`` stands for
    used = any(r["result"].get("device_used_gib") is not None for r in rows)
    head = ("| model | teacher | case | precision | data | micro-batch | img/s [min-max] | step ms | data | "
            "teacher fwd | student fwd | student bwd | optimizer | comm (separate pass) | peak GiB | "
            + ("device used GiB | " if used else "") +
            "planned GiB | measured/planned | MFU student | MFU total | vs baseline [min-max] |")
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        c, x = r["case"], r["result"]
        seg = c.get("task") in ("segment", "clip")
        name = ({"segment": "seg:", "clip": "clip:"}.get(c.get("task"), "") + f"{c['arch']}/{c['patch']}" +
                (f"@{c['img_size']}" if c["img_size"] != 224 or seg else ""))
        label = Case(**c).label
        if x["status"] != "ok":
            out.append(f"| {name} | {c['teacher']} | {label} | {c['precision']} | {c['data']} | {c['micro_batch']} | "
                       f"{x['status']} |" + " |" * (head.count("|") - 8))
            continue
        ph = x["phases_s"]
        ms = lambda s: _f(None if s is None else 1000 * s, ".0f")  # noqa: E731
        out.append(
            f"| {name} | {c['teacher']} | {label} | {x['precision']} | {c['data']} | {c['micro_batch']} | "
            f"{x['images_per_s']:.1f}{_spread(x.get('images_per_s_spread'), '.1f')} | {ms(x['step_s'])} | " +
            " | ".join(ms(ph[p]) for p in PHASES) +
            f" | {ms(x['comm_s']) if x['world_size'] > 1 else '–'} | {x['peak_gib']:.2f} | "
            + (f"{_f(x.get('device_used_gib'), '.2f')} | " if used else "") +
            f"{_f(x.get('planned_gib'), '.2f')} | {_f(x.get('measured_over_planned'), '.2f')} | "
            f"{_f(x.get('mfu_student'), '.1%')} | {_f(x.get('mfu_total'), '.1%')} | "
            f"{_f(x.get('vs_baseline'), '.2f')}{'x' if x.get('vs_baseline') else ''}"
            f"{_spread(x.get('vs_baseline_spread'), '.2f')} |")
    return "\n".join(out)


def plot(rows: List[dict], path: Path) -> bool:
    """Stacked bars of the step-time breakdown, one per case, annotated with images/s. False without
    matplotlib (``pip install 'megadigpt[bench]'``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ok = [r for r in rows if r["result"]["status"] == "ok"]
    if not ok:
        return False
    labels = [f"{r['case']['arch']}/{r['case']['patch']} {r['case']['teacher']} mb{r['case']['micro_batch']}\n"
              f"{Case(**r['case']).label}" for r in ok]
    fig, ax = plt.subplots(figsize=(9, 0.55 * len(ok) + 1.5))
    left = [0.0] * len(ok)
    for p in PHASES:
        w = [1000 * r["result"]["phases_s"][p] for r in ok]
        ax.barh(range(len(ok)), w, left=left, label=p)
        left = [a + b for a, b in zip(left, w)]
    for i, r in enumerate(ok):
        ax.text(left[i], i, f"  {r['result']['images_per_s']:.1f} img/s", va="center", fontsize=8)
    ax.set_yticks(range(len(ok)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("synchronised step time (ms)")
    ax.set_xlim(0, max(left) * 1.3)
    ax.legend(loc="lower right", fontsize=7)
    ax.set_title(f"megadigpt bench: {ok[0]['result']['device']}, {ok[0]['result']['world_size']} rank(s)",
                 fontsize=9)
    fig.tight_layout()
    tmp = Path(path).with_name(f".{Path(path).name}.tmp{os.getpid()}")  # replaced atomically
    try:
        fig.savefig(tmp, dpi=120, format="png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if tmp.exists():
            tmp.unlink()
    from ..checkpoint.convert import record_outputs

    record_outputs(Path(path).parent, [Path(path).name], "bench")
    return True


def as_task(cases: List[Case], base: Optional[str], overrides=()) -> List[Case]:
    """The cases for ``base``'s task: a segmentation config (``megadigpt segment``'s, it has a ``segment:``
    section) measures the segmentation step (no teacher; the image size, default the config's crop, is the crop);
    any other the pretraining step (default image size 224)."""
    from .clip_memory import is_clip_config
    from .segment_memory import is_segment_config

    if is_clip_config(base):
        from ..clip_config import load_clip_config

        size = load_clip_config(base, list(overrides)).model.img_size
        return [replace(c, task="clip", teacher="none", img_size=c.img_size or size) for c in cases]
    if not is_segment_config(base):
        return [replace(c, img_size=c.img_size or 224) for c in cases]
    from ..segment_config import load_segment_config

    crop = load_segment_config(base, list(overrides)).model.crop_size
    return [replace(c, task="segment", teacher="none", img_size=c.img_size or crop) for c in cases]


OUTPUT_FILES = ("bench.json", "bench.md", "bench.png")  # what --out receives, beside case<i>/round<r>/ logs


def run_bench(cases: List[Case], ranks: int, out: Path, base=None, overrides=(), steps=5, warmup=2,
              data_source=None, timeout=1800.0, baseline=True, comm_steps=2, echo=print, rounds: int = 3,
              deadline: Optional[float] = None) -> dict:
    """Every case (baselines included) runs once per round, in the same order, round after round (A B C A B C
    ...), so that a shared machine's slow phases hit all of them; rows report the median round and the spread.
    On a CPU the peak matmul rate is measured once, here, for the whole sweep (MFU columns compare).
    ``deadline`` (``time.monotonic()``): a time budget; a round that would start after it is not run, and cases
    not reached in the first round are recorded as skipped."""
    import torch

    from ..train.common import resolve_device_type
    from ..train.pretrain import plan_run

    device_type = resolve_device_type("auto")
    cases = as_task(cases, base, overrides)
    with tempfile.TemporaryDirectory() as tmp:  # every case is checked before the first one runs
        for c in cases:
            if c.task == "segment":
                check_segment_case(c, base, list(overrides), ranks, tmp, device_type)
                continue
            if c.task == "clip":
                check_clip_case(c, base, list(overrides), ranks, tmp, device_type)
                continue
            if c.offload and device_type != "cuda":
                raise ConfigError("CPU offload is measured on GPUs only")
            plan_run(case_config(c, base, list(overrides), ranks, tmp, data_source), ranks)
    if baseline:
        cases = with_baselines(cases, device_type)
    if device_type == "cuda" and ranks > torch.cuda.device_count():
        raise ConfigError(f"--ranks {ranks} but {torch.cuda.device_count()} GPUs are visible")
    out.mkdir(parents=True, exist_ok=True)
    from ..checkpoint.convert import record_outputs

    record_outputs(out, [], "bench")  # the folder is a bench's (a later bench may write here without --force)
    overrides = list(overrides)
    peak_note = None
    if device_type == "cpu" and not any(o.startswith("train.peak_tflops=") for o in overrides):
        from ..train.metrics import peak_tflops

        peak, _ = peak_tflops(torch.device("cpu"), None)
        overrides.append(f"train.peak_tflops={peak}")
        peak_note = f"measured CPU fp32 matmul, once for the sweep ({peak:.3f} TFLOP/s)"
    results = [[] for _ in cases]
    schedule = []
    for r in range(rounds):
        if r > 0 and deadline is not None and time.monotonic() > deadline:
            echo(f"time budget spent: {r} of {rounds} rounds")
            break
        for i, c in enumerate(cases):
            if deadline is not None and time.monotonic() > deadline:
                if r == 0:
                    results[i].append({"status": "skipped", "error": "time budget spent before this case"})
                continue
            echo(f"[round {r + 1}/{rounds}, {i + 1}/{len(cases)}] {c.arch}/{c.patch} {c.teacher} mb{c.micro_batch} "
                 f"{c.data}: {c.label}")
            res = launch_case(c, ranks, base, overrides, steps, warmup, data_source, timeout,
                              out / f"case{i:03d}" / f"round{r}", comm_steps)
            if peak_note and res.get("status") == "ok":
                res["peak_tflops_source"] = peak_note
            results[i].append(res)
            schedule.append([r, i])
            if res["status"] == "ok":
                echo(f"    {res['images_per_s']:.2f} img/s, peak {res['peak_gib']:.2f} GiB")
            else:
                echo(f"    {res['status']}: {res.get('error', '')[-300:]}")
    rows = [{"case": asdict(c), "result": aggregate(c, res)} for c, res in zip(cases, results)]
    attach_speedups(rows)
    report = {"date": time.strftime("%Y-%m-%d"), "host": socket.gethostname(), "ranks": ranks, "steps": steps,
              "warmup": warmup, "rounds": rounds, "schedule": schedule, "torch": torch.__version__, "rows": rows}
    try:
        import deepspeed

        report["deepspeed"] = deepspeed.__version__
    except ImportError:
        pass
    from ..checkpoint.convert import write_output  # atomic, recorded as megadigpt's (the CLI checks --out)

    write_output(out / "bench.json", json.dumps(report, indent=1), "bench")
    table = markdown(rows)
    write_output(out / "bench.md", table + "\n", "bench")
    report["plot"] = str(out / "bench.png") if plot(rows, out / "bench.png") else None
    return report


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "--worker":
        sys.exit(worker_main(sys.argv[2:]))
    sys.exit("usage: megadigpt bench ... (this module's own entry is for its worker processes)")

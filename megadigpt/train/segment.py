"""Semantic segmentation transfer under DeepSpeed: UperNet on the ViT encoder, ADE20K's protocol (MAE/BEiT).

    validate (cheap) -> image+mask pairs -> pretrained encoder weights (any source fine-tuning reads)
    -> process group -> Segmentor (position embedding interpolated to the encoder grid) -> layer-wise lr decay
    -> DeepSpeed engine (ZeRO 0-3) -> resume -> iterations of (mmseg's ADE20K augmentation, CE + 0.4 aux CE,
    warm-up + poly) -> evaluation every ``segment.eval_every`` steps (sliding window or whole image; mIoU from one
    confusion matrix over all ranks) -> checkpoint -> ``best/`` and ``last/`` (plus ``*_ema``)

``megadigpt segment --config segment_ade20k_vitb16 --init-from RUN --train ADE --val ADE`` (until the CLI has the
command: ``python -m megadigpt.train.segment ...``, the same arguments). Kill it at any point and run the same
command to resume: the data order and every augmentation are functions of (seed, epoch, image), the step's dropout
and drop path of (seed, step, micro-batch, rank), so a resumed run reproduces the uninterrupted one.

What is fine-tuning's and imported from it (not copied): the weight loading and fitting (``load_encoder_weights``,
``fit_to_classifier``), geometry resolution (``resolve_model``), layer ids, AdamW / DeepSpeed CPU Adam choice,
DeepSpeed config and micro-step (non-finite steps skipped on every rank), checkpoints (``megadigpt.checkpoint``),
EMA and fp32-master exports (``distributed.sharded``), SIGTERM/SIGUSR1 handling (exit 75), the metrics sink and
the bad-sample log. Under ZeRO-3 the model is built whole on each rank and partitioned when the engine starts
(not built partitioned as fine-tuning's classifier: the segmentation models of the paper, B and L, fit a rank).

BatchNorm (neck and heads): SyncBatchNorm on CUDA with several ranks, as BEiT/MAE; elsewhere (gloo on CPU,
where torch has no SyncBatchNorm) each rank's running statistics are averaged over the ranks after every step, so
every rank evaluates, saves and exports the same network.
"""

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from ..commands import Parser, add_segment_parser, overrides_of, run  # overrides_of: re-exported
from ..config import ConfigError, dump_config
from ..safe_fs import announce_commands, pipe_commands, remove_entry, write_atomic
from ..distributed import env as dist_env
from ..segment_config import SegmentRunConfig, load_segment_config

if TYPE_CHECKING:  # the model module imports torch; the planner does not need it
    from ..model.segmentation import SegmentorArgs


@dataclass
class SegmentPlan:
    world_size: int
    accum: int
    device_type: str
    precision: str
    lr: float
    sync_bn: bool


def lr_at(step: int, o, peak: float, warmup: float, total: int) -> float:
    """The lr of optimizer step ``step`` (0-based). poly: mmseg's PolyLR over the whole run, ``(peak - min_lr) *
    (1 - step / total) ** power + min_lr``, times the linear warm-up factor ``1 - (1 - step / warmup) * (1 -
    warmup_ratio)`` during the warm-up (mmcv's ``warmup='linear'``); cosine: fine-tuning's."""
    if o.schedule == "cosine":
        from .optim import lr_at as cosine

        return cosine(step, peak, warmup, total, o.min_lr)
    base = (peak - o.min_lr) * (1 - min(step, total) / max(total, 1)) ** o.poly_power + o.min_lr
    if step < warmup:
        return base * (1 - (1 - step / warmup) * (1 - o.warmup_ratio))
    return base


def _sync_bn_possible(device_type: str, world: int) -> bool:
    return device_type == "cuda" and world > 1


def plan_segment(cfg: SegmentRunConfig, world_size: Optional[int] = None, need_train: bool = True,
                 device_type: Optional[str] = None, init_from_pending: bool = False,
                 need_data: bool = True) -> SegmentPlan:
    """Every check that needs no weights, no decoding and no process group: fine-tuning's
    (``finetune.check_transfer``) with the segmentation's own geometry, data layout and per-rank batch.
    ``need_data=False``: no data sources (``megadigpt bench``'s synthetic batches)."""
    from ..data.segmentation import check_pairs_source
    from .finetune import check_transfer

    m, d, t, s = cfg.model, cfg.data, cfg.train, cfg.segment
    if m.patch_size and m.crop_size < m.patch_size:
        raise ConfigError(f"model.crop_size {m.crop_size} is smaller than model.patch_size {m.patch_size}")
    if len(d.scale) != 2:
        raise ConfigError(f"data.scale must be [long, short], got {list(d.scale)}")
    if s.eval_mode == "slide" and s.eval_stride > m.crop_size:
        raise ConfigError(f"segment.eval_stride {s.eval_stride} is larger than model.crop_size {m.crop_size}: "
                          f"windows would leave gaps")

    def per_rank(device_type, world):
        if t.micro_batch < 2 and not _sync_bn_possible(device_type, world) and need_train:
            raise ConfigError(f"train.micro_batch {t.micro_batch}: BatchNorm on UperNet's 1x1 pooled level needs >= "
                              f"2 images per rank (SyncBatchNorm, CUDA with several ranks, counts the whole batch)")

    def check_data(source, which):
        from ..data.sources import _resolve_paths

        # a source not on this machine raises, or, previewing (submit --dry-run), is noted as a warning: "missing"
        if _resolve_paths(source)[0] != "missing":
            check_pairs_source(source, d.train_split if which == "train" else d.val_split)

    c = check_transfer(cfg, world_size, device_type, init_from_pending, need_train, check_data if need_data else None,
                       "image+mask pairs: an ADE20K root, images/+masks/, or shards", "image+mask pairs for evaluation",
                       fresh="encoder", per_rank=per_rank)
    return SegmentPlan(c.world_size, c.accum, c.device_type, c.precision, c.lr,
                       _sync_bn_possible(c.device_type, c.world_size))


def segmentor_args(cfg: SegmentRunConfig, geom) -> "SegmentorArgs":
    from ..model.segmentation import SegmentorArgs, default_feature_blocks

    m = cfg.model
    if m.feature_blocks:
        if len(m.feature_blocks) != 4:
            raise ConfigError(f"model.feature_blocks needs 4 blocks (one per pyramid level), got {m.feature_blocks}")
        bad = [b for b in m.feature_blocks if not 1 <= b <= geom.depth]
        if bad:
            raise ConfigError(f"model.feature_blocks {bad} outside 1..{geom.depth} (the encoder's depth)")
        blocks = tuple(b - 1 for b in m.feature_blocks)
    else:
        blocks = tuple(default_feature_blocks(geom.depth))
    return SegmentorArgs(geom.embed_dim, geom.depth, geom.num_heads, geom.mlp_ratio, geom.patch_size, m.crop_size,
                         m.num_classes, blocks, m.channels, m.aux_channels, dropout=m.dropout)


def build_segmentor(args, cfg: SegmentRunConfig, checkpointing: bool = False):
    import torch

    from ..model.segmentation import Segmentor

    model = Segmentor(args, cfg.model.drop_path, aux=cfg.model.aux_weight > 0, checkpointing=checkpointing)
    for head in (model.decode_head, model.auxiliary_head):  # mmseg's conv_seg init: normal(0, 0.01), bias 0
        if head is not None:
            torch.nn.init.normal_(head.conv_seg.weight, std=cfg.segment.head_init_std)
            torch.nn.init.zeros_(head.conv_seg.bias)
    return model


# ============================================================================ evaluation


def _forward_logits(module, x, dtype):
    out = module(x.to(dtype))
    return (out[0] if isinstance(out, tuple) else out).float()


def infer_whole(module, image, dtype):
    """Logits (K, H, W) of one normalised (3, H, W) image in one forward, at the image's size."""
    import torch.nn.functional as F

    out = _forward_logits(module, image[None], dtype)
    return F.interpolate(out, size=image.shape[-2:], mode="bilinear", align_corners=False)[0]


def slide_batches(image, crop: int, stride: int, batch: int):
    """-> (windows, list of (stacked windows (n, 3, crop, crop), their boxes)). A window smaller than the crop
    (an image side below the crop) is padded with 0 (normalised) to the crop, the model's trained input."""
    import torch
    import torch.nn.functional as F

    from ..data.segmentation import slide_windows

    H, W = image.shape[-2:]
    boxes = slide_windows(H, W, crop, stride)
    out = []
    for i in range(0, len(boxes), batch):
        chunk = boxes[i:i + batch]
        xs = [F.pad(image[:, y1:y2, x1:x2], (0, crop - (x2 - x1), 0, crop - (y2 - y1))) for y1, y2, x1, x2 in chunk]
        out.append((torch.stack(xs), chunk))
    return out


def infer_slide(module, image, dtype, crop: int, stride: int, batch: int, extra_calls: int = 0):
    """mmseg's ``slide_inference``: the mean of the windows' logits (each at the window's size) where they
    overlap. ``extra_calls``: blank forwards after the image (ZeRO-3 lockstep with ranks that have more)."""
    import torch
    import torch.nn.functional as F

    H, W = image.shape[-2:]
    acc, cnt = None, torch.zeros(1, H, W, device=image.device)
    for xs, boxes in slide_batches(image, crop, stride, batch):
        out = F.interpolate(_forward_logits(module, xs, dtype), size=(crop, crop), mode="bilinear",
                            align_corners=False)
        if acc is None:
            acc = torch.zeros(out.shape[1], H, W, device=image.device)
        for o, (y1, y2, x1, x2) in zip(out, boxes):
            acc[:, y1:y2, x1:x2] += o[:, :y2 - y1, :x2 - x1]
            cnt[:, y1:y2, x1:x2] += 1
    for _ in range(extra_calls):
        _forward_logits(module, torch.zeros(batch, 3, crop, crop, device=image.device), dtype)
    return acc / cnt


def evaluate(module, pairs, cfg: SegmentRunConfig, args, device, dtype, rank: int, world: int,
             lockstep: bool = False, class_names=None):
    """mIoU / per-class IoU / pixel accuracy over ``pairs``, every image once across the ranks. ``lockstep``
    (ZeRO-3): every rank runs the same number of forwards (blank ones where it has fewer images or windows),
    because each forward gathers parameters collectively. Returns the metrics (identical on every rank)."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from ..data.segmentation import eval_indices, eval_loader, num_windows
    from .seg_metrics import all_reduce_confusion, confusion, metrics_from_confusion

    d, s = cfg.data, cfg.segment
    K, crop = args.num_classes, args.crop_size
    conf = torch.zeros(K, K, dtype=torch.int64, device=device)
    counts = torch.zeros(2, dtype=torch.int64, device=device)  # images counted, bad images
    was_training = module.training
    module.eval()
    mine = eval_indices(len(pairs), rank, world)
    rounds = math.ceil(len(pairs) / world)
    loader = iter(eval_loader(pairs, rank, world, tuple(d.scale), d.mean, d.std, d.reduce_zero_label,
                              num_workers=min(d.num_workers, 2)))
    with torch.no_grad():
        for r in range(rounds):
            item = next(loader) if r < len(mine) else None
            ok = item is not None and item["valid"]
            if item is not None and not item["valid"]:
                counts[1] += 1
            calls = 0
            if ok and s.eval_mode == "slide":
                h, w = item["image"].shape[-2:]
                calls = math.ceil(num_windows(h, w, crop, s.eval_stride) / s.eval_batch)
            elif ok:
                calls = 1
            extra = 0
            if lockstep and world > 1:
                most = torch.tensor([calls], device=device)
                dist.all_reduce(most, op=dist.ReduceOp.MAX)
                extra = int(most.item()) - calls
            if not ok:
                for _ in range(extra):
                    x = torch.zeros(s.eval_batch if s.eval_mode == "slide" else 1, 3, crop, crop, device=device)
                    _forward_logits(module, x, dtype)
                continue
            image = item["image"].to(device)
            if s.eval_mode == "slide":
                logits = infer_slide(module, image, dtype, crop, s.eval_stride, s.eval_batch, extra)
            else:
                logits = infer_whole(module, image, dtype)
                for _ in range(extra):
                    _forward_logits(module, torch.zeros(1, 3, crop, crop, device=device), dtype)
            mask = item["mask"].to(device)
            logits = F.interpolate(logits[None], size=mask.shape, mode="bilinear", align_corners=False)[0]
            conf += confusion(logits.argmax(0), mask, K)
            counts[0] += 1
    all_reduce_confusion(conf)
    if dist.is_available() and dist.is_initialized() and world > 1:
        dist.all_reduce(counts)
    module.train(was_training)
    res = metrics_from_confusion(conf, class_names)
    res["images"], res["bad_images"] = int(counts[0].item()), int(counts[1].item())
    return res


# ============================================================================ exports


def export_segmentor(state, model_args: dict, out_dir: Path, metrics: dict, mean, std, class_names=None) -> Path:
    """``model.safetensors`` (the Segmentor's state: ``backbone.*`` in timm's ViT names, ``neck.*``,
    ``decode_head.*``, ``auxiliary_head.*``) + ``config.json`` (``model_args`` rebuild it:
    ``Segmentor(SegmentorArgs(**model_args))``), written beside ``out_dir`` and renamed into place."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    remove_entry(tmp)  # a planted link is unlinked, never followed
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"))
    cfg = {"task": "semantic_segmentation", "architecture": "megadigpt_vit_upernet", "model_args": model_args,
           "preprocessing": {"mean": list(mean), "std": list(std)}, "class_names": class_names,
           "megadigpt": {"metrics": metrics}}
    (tmp / "config.json").write_text(json.dumps(cfg, indent=1))
    old = out_dir.with_name(out_dir.name + ".old")
    remove_entry(old)
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    remove_entry(old)
    return out_dir


def load_export(folder):
    """A ``best/`` or ``last/`` folder -> the Segmentor (eval mode) with its weights."""
    from safetensors.torch import load_file

    from ..model.segmentation import Segmentor, SegmentorArgs

    folder = Path(folder)
    cfg = json.loads((folder / "config.json").read_text())
    a = dict(cfg["model_args"])
    a["feature_blocks"] = tuple(a["feature_blocks"])
    model = Segmentor(SegmentorArgs(**a), aux=any(k.startswith("auxiliary_head.") for k in
                                                  load_file(str(folder / "model.safetensors"))))
    model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=True)
    return model.eval()


# ============================================================================ the run


def segment(cfg: SegmentRunConfig) -> dict:
    env = dist_env.discover()
    plan = plan_segment(cfg, env.world_size)

    from ..checkpoint.convert import load_encoder_weights
    from ..data.segmentation import SegAugment, find_pairs
    from .finetune import resolve_model

    m, d, t, o, s = cfg.model, cfg.data, cfg.train, cfg.optim, cfg.segment
    run_dir = Path(t.run_dir)
    # pipe: sources run shell commands: said once, before the first one runs, and recorded in the start event
    commands = announce_commands(pipe_commands(*vars(d).values()), env.rank == 0)
    train_pairs, train_problems = find_pairs(d.train, d.train_split, d.mask_ext)
    val_pairs, val_problems = find_pairs(d.val, d.val_split, d.mask_ext)
    weights, info = load_encoder_weights(t.init_from) if t.init_from else (None, {})
    geom, _ = resolve_model(cfg, weights, info)
    args = segmentor_args(cfg, geom)
    from ..checkpoint import latest_tag

    if latest_tag(run_dir):  # resuming: the checkpoint must be this network
        import copy

        from ..config import check_resume_config

        now = copy.deepcopy(cfg)
        for k in ("embed_dim", "depth", "num_heads", "mlp_ratio", "patch_size"):
            setattr(now.model, k, getattr(geom, k))
        now.model.feature_blocks = [b + 1 for b in args.feature_blocks]
        check_resume_config(run_dir, now)

    import numpy as np
    import torch
    import torch.distributed as dist

    from .. import checkpoint as ckpt
    from ..checkpoint import ds_checkpoint as ckpt_files
    from ..data.segmentation import train_loader
    from ..distributed import engine as ds_engine
    from ..distributed.sharded import LocalEMA, full_state_dict
    from ..model.segmentation import (average_bn_buffers, load_backbone, segment_param_groups, segmentation_loss,
                                      sync_batchnorm)
    from ..testing import active as fault_active
    from ..testing import fault
    from .metrics import MetricsSink, wandb_settings
    from .optim import build_optimizer
    from .common import torch_dtype
    from .runtime import Checkpointed, SignalFlag, TrainingDiverged

    world = env.world_size
    steps_per_epoch = (len(train_pairs) // world) // t.micro_batch // plan.accum
    if steps_per_epoch < 1:
        raise ConfigError(f"{len(train_pairs)} training pairs make no full step of train.global_batch "
                          f"{t.global_batch} on {world} ranks")
    total_steps = t.max_steps if t.max_steps is not None else max(1, int(round(t.epochs * steps_per_epoch)))
    warmup = o.warmup_steps if o.warmup_steps is not None else o.warmup_epochs * steps_per_epoch
    warmup = min(warmup, total_steps)
    schedule = {"total_steps": total_steps, "warmup_steps": round(float(warmup), 6), "peak_lr": plan.lr,
                "min_lr": o.min_lr}
    schedule_changes = ckpt.check_schedule(run_dir, schedule, t.allow_schedule_change)
    done = ckpt.finished_step(run_dir, total_steps)
    if done is not None:
        if env.rank == 0:
            print(f"megadigpt: {run_dir} is already finished: step {done} of {total_steps} (its exports are in "
                  f"{run_dir / 'last'}); nothing to do", flush=True)
        return {"steps": done, "history": [], "run_dir": str(run_dir), "best": {}, "finished": True}

    # ---------------------------------------------------------------- processes, model
    device = ds_engine.start_processes(env, plan.device_type)
    signals = SignalFlag()
    rank0 = env.rank == 0
    from .runtime import hold_run_dir, release

    hold_run_dir(run_dir, rank0)
    import copy

    resolved = copy.deepcopy(cfg)
    resolved.model.num_heads = geom.num_heads
    resolved.model.feature_blocks = [b + 1 for b in args.feature_blocks]
    if rank0:
        write_atomic(run_dir / "config.yaml", dump_config(resolved), root=run_dir, what="run config")

    torch.manual_seed(t.seed)  # identical initial neck and heads on every rank
    model = build_segmentor(args, cfg, checkpointing=t.activation_checkpointing)
    load_report = load_backbone(model, weights) if weights is not None else None
    del weights
    model = sync_batchnorm(model, plan.device_type, world)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    ds_config = ds_engine.build_ds_config(cfg, world, plan.precision, params=n_params)
    groups = segment_param_groups(model, o.weight_decay, o.layer_decay)
    optimizer = build_optimizer(model, o, plan.lr, plan.device_type, groups, ds_config=ds_config)

    engine, tag, marker, universal = ckpt.start_engine(model, optimizer, ds_config, run_dir, t, world, rank0)
    module = engine.module
    ema = LocalEMA(module, s.ema_decay) if s.ema_decay > 0 else None

    def ema_file(tag_name):
        return ckpt.checkpoint_dir(run_dir) / tag_name / f"ema_rank{env.rank:05d}_of_{world:05d}.pt"

    ema_note = None
    if ema is not None and tag:
        shard = ema_file(tag)
        if not (shard.is_file() and ema.load(shard)):
            ema_note = "EMA restarted from the resumed weights (saved with another world size or missing)"
    compute_dtype = torch_dtype(plan.precision)
    start_step = int(marker["step"]) if tag else 0
    best = dict(marker.get("best", {})) if tag else {}
    aug = SegAugment(args.crop_size, tuple(d.scale), tuple(d.ratio_range), d.cat_max_ratio, d.hflip, d.photometric)
    model_args = args.to_dict()

    sink = MetricsSink(run_dir, rank0, t.tensorboard, t.progress, total_steps, start_step,
                       wandb=wandb_settings(cfg) if t.wandb else None)
    if schedule_changes and tag:
        sink.event(event="schedule_change", step=start_step, changes=schedule_changes, schedule=schedule)
    from ..data.bad_samples import BadSampleLog

    bad_log = BadSampleLog(run_dir, [p.image for p in train_pairs], env.rank, start_step,
                           train_problems + val_problems, device)
    sink.event(event="resume" if tag else "start", step=start_step, world_size=world, **ds_engine.where(),
               train_images=len(train_pairs), val_images=len(val_pairs), pipe_commands=commands, num_classes=args.num_classes,
               total_steps=total_steps, steps_per_epoch=steps_per_epoch, accum=plan.accum,
               precision=plan.precision, sync_bn=plan.sync_bn, init_from=t.init_from, load=load_report,
               model_args=model_args, ema_note=ema_note)

    def run_eval(use_ema: bool):
        def go():
            return evaluate(module, val_pairs, cfg, args, device, compute_dtype, env.rank, world,
                            lockstep=t.zero_stage == 3)

        if use_ema:
            with ema.swapped_in():
                return go()
        return go()

    def export(which: str, metrics: dict, with_ema: bool):
        state = full_state_dict(module, rank0, ema if with_ema else None)
        if rank0:  # (BatchNorm's running statistics are in it: full_state_dict adds the persistent buffers)
            export_segmentor(state, model_args, run_dir / which, metrics, d.mean, d.std)

    def checkpoint_now(step):
        bad_log.flush()
        client = {"step": step, "global_batch": t.global_batch, "seed": t.seed, "world_size": world,
                  "epoch": step / steps_per_epoch}
        tag_name = ckpt_files.tag_for(step)
        if ema is not None:
            ema_file(tag_name).parent.mkdir(parents=True, exist_ok=True)
            ema.save(ema_file(tag_name))
        client["best"] = best
        client["schedule"] = schedule
        client["nonfinite_steps"] = skipped
        ckpt.save(engine, run_dir, step, client, keep=t.ckpt_keep, is_rank0=rank0,
                  extra_files=[ema_file(tag_name)] if ema is not None else ())
        sink.event(event="checkpoint", step=step)

    def summary(r):
        return {"mIoU": r["mIoU"], "mAcc": r["mAcc"], "aAcc": r["aAcc"]}

    # ---------------------------------------------------------------- loop
    step = start_step
    outcome, msg, agreed = "done", "", None
    acc = torch.zeros(5, dtype=torch.float64, device=device)  # loss, decode, aux (weighted sums), images, bad
    step_acc = torch.zeros(4, dtype=torch.float64, device=device)
    nonfinite = torch.zeros(1, device=device)
    streak, skipped = 0, int((marker or {}).get("nonfinite_steps", 0))
    t_last, steps_since = time.perf_counter(), 0
    t_ckpt = time.monotonic()
    history = []
    engine.train()
    average_bn = world > 1 and not plan.sync_bn
    while step < total_steps and outcome == "done":
        epoch = step // steps_per_epoch
        first = (step % steps_per_epoch) * plan.accum
        loader = train_loader(train_pairs, env.rank, world, epoch, t.seed, t.micro_batch, aug, d.mean, d.std,
                              d.reduce_zero_label, d.num_workers, skip_batches=first,
                              pin_memory=device.type == "cuda")
        micro = 0
        for b, batch in enumerate(loader):
            if first + b >= steps_per_epoch * plan.accum:
                break
            if micro == 0:
                lr = lr_at(step, o, plan.lr, warmup, total_steps)
                ds_engine.set_lr(engine, lr)
            rng_seed = (t.seed * 1_000_003 + step * 1009 + micro * 7 + env.rank) % (2 ** 32)
            torch.manual_seed(rng_seed)  # drop path, dropout: stateless per (step, micro, rank)
            np.random.seed(rng_seed)
            x = ds_engine.to_device(batch["image"], device)
            y = ds_engine.to_device(batch["mask"], device).long()
            valid = ds_engine.to_device(batch["valid"], device).float()
            bad_log.add(batch, step + 1)
            out, aux = engine(x.to(compute_dtype))
            loss, main, aux_loss = segmentation_loss(out, aux, y, m.aux_weight, weight=valid)
            if fault_active("nan", step + 1, env.rank, micro):
                loss = loss * float("nan")
            nv = valid.sum().double()
            step_acc += torch.stack([loss.detach().double() * nv, main.detach().double() * nv,
                                     (aux_loss.detach().double() if aux_loss is not None else
                                      torch.zeros((), dtype=torch.float64, device=device)) * nv, nv])
            acc[4] += (1 - valid).sum().double()
            # every rank runs every backward; whether the step's update is applied, any rank's signal and rank 0's
            # clock are agreed once, at its end: one all-reduce and one host wait, behind the queued step
            last = micro + 1 == plan.accum
            flags = ()
            if last:
                fault("term", step + 1, env.rank)
                fault("crash", step + 1, env.rank)
                due = t.ckpt_every_minutes > 0 and time.monotonic() - t_ckpt > 60 * t.ckpt_every_minutes
                flags = (float(signals.code), float(rank0 and due))
            end = ds_engine.micro_step(engine, loss, nonfinite, last=last, flags=flags)
            micro += 1
            if micro < plan.accum:
                continue
            micro = 0
            applied = end.applied
            signal_code, save_due = end.flags
            if applied:
                acc[:4] += step_acc
            step_acc.zero_()
            if average_bn:
                average_bn_buffers(module)
            step += 1
            steps_since += 1
            sink.advance()
            if ema is not None and applied:
                ema.update()
            if not applied:
                skipped += 1
                streak += 1
                sink.event(event="nonfinite_loss", step=step, skipped_steps=skipped)
                if streak > t.nan_tolerance:
                    outcome = "diverged"
                    msg = (f"non-finite loss for {streak} steps up to step {step}; the last checkpoint "
                           f"({ckpt.latest_tag(run_dir)}) is untouched: lower the lr, then run the same command")
                    break
            else:
                streak = 0
            if step % t.log_every == 0 or step == total_steps:
                dist.all_reduce(acc)
                bad_log.flush()
                elapsed = time.perf_counter() - t_last
                n = acc[3].item()
                rec = {"train_loss": acc[0].item() / n if n else None,
                       "decode_loss": acc[1].item() / n if n else None,
                       "aux_loss": acc[2].item() / n if n and m.aux_weight > 0 else None, "lr": lr,
                       "grad_norm": ds_engine.grad_norm(engine), "bad_samples": int(acc[4].item()),
                       "nonfinite_steps": skipped, "epoch": step / steps_per_epoch,
                       "images_per_s": steps_since * t.global_batch / elapsed, "step_time_s": elapsed / steps_since}
                sink.log(step, rec)
                history.append((step, rec))
                acc.zero_()
                t_last, steps_since = time.perf_counter(), 0
            eval_now = step % s.eval_every == 0 or step == total_steps
            if eval_now:
                rec = {"epoch": step / steps_per_epoch}
                res = run_eval(False)
                rec.update({f"val_{k}": v for k, v in summary(res).items()})
                res_ema = None
                if ema is not None:
                    res_ema = run_eval(True)
                    rec.update({f"val_ema_{k}": v for k, v in summary(res_ema).items()})
                rec["val_images"] = res["images"]
                sink.log(step, rec)
                history.append((step, rec))
                if rank0:
                    (run_dir / "eval").mkdir(exist_ok=True)
                    write_atomic(run_dir / "eval" / f"step{step:08d}.json", json.dumps(
                        {"step": step, "result": res, "ema": res_ema}, indent=1), root=run_dir, what="eval record")
                for which, r, use_ema in (("best", res, False),) + ((("best_ema", res_ema, True),)
                                                                     if ema is not None else ()):
                    if r["mIoU"] > best.get(which, {}).get("mIoU", -1.0):
                        best[which] = {**summary(r), "step": step}
                        export(which, {**summary(r), "IoU": r["IoU"], "step": step}, use_ema)
                        sink.event(event=f"new_{which}", step=step, mIoU=r["mIoU"])
                export("last", {**summary(res), "IoU": res["IoU"], "step": step,
                                "best_mIoU": best["best"]["mIoU"]}, False)
                if ema is not None:
                    export("last_ema", {**summary(res_ema), "IoU": res_ema["IoU"], "step": step,
                                        "best_mIoU": best["best_ema"]["mIoU"]}, True)
            if eval_now or step % t.ckpt_every == 0 or signal_code > 0 or save_due > 0:
                checkpoint_now(step)
                t_ckpt = time.monotonic()
            if signal_code > 0 and step < total_steps:
                outcome = "signal"
                agreed = SignalFlag.name_of(signal_code)
                sink.event(event="signal", step=step, signal=agreed)
                break
            if step >= total_steps:
                break
        if outcome == "done" and step < total_steps and step % steps_per_epoch:
            raise RuntimeError(f"the epoch {epoch} loader ended early at step {step}")
    signals.restore()
    if outcome != "signal":
        sink.event(event=outcome, step=step)
    sink.close()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    release(run_dir)
    if outcome == "diverged":
        raise TrainingDiverged(msg)
    if outcome == "signal":
        raise Checkpointed(step, agreed)
    return {"steps": step, "history": history, "run_dir": str(run_dir), "best": best}


# ============================================================================ command line


def cli_main(args) -> int:
    """``megadigpt segment``: train, evaluate, export; prints the best mIoU."""
    res = segment(load_segment_config(args.config, overrides_of(args)))
    if dist_env.discover().rank == 0 and res.get("best"):
        b = res["best"]["best"]
        print(f"best mIoU {b['mIoU']:.2f} (step {b['step']}); exports in {res['run_dir']}/best and /last")
    return 0


def add_parser(sub) -> argparse.ArgumentParser:
    """``megadigpt segment``'s subparser (megadigpt/commands.py), running :func:`cli_main`."""
    sg = add_segment_parser(sub)
    sg.set_defaults(fn=cli_main)
    return sg


def main(argv=None) -> int:
    """``python -m megadigpt.train.segment ...``: the command with the CLI's error handling and exit codes
    (0 done, 2 bad input, 3 diverged, 75 checkpointed on a signal)."""
    parser = Parser(prog="megadigpt")
    sub = parser.add_subparsers(dest="command")
    add_parser(sub)
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "segment":
        argv = ["segment"] + argv
    return run(parser, argv)  # the CLI's parsing, errors and exit codes, with this command's parser


if __name__ == "__main__":
    sys.exit(main())

"""Classification fine-tuning under DeepSpeed (spec §7): ImageNet-21K intermediate and ImageNet-1K stages.

    validate (cheap) -> labels and classes -> pretrained encoder weights (timm layout) -> process group
    -> timm ViT (avg-pool + fc_norm head), position embeddings interpolated -> layer-wise lr decay groups
    -> DeepSpeed engine (ZeRO 0-3) -> resume -> epochs of (mixup/cutmix, random erasing, label smoothing, EMA)
    -> per-epoch checkpoint + evaluation -> ``best/`` and ``last/`` as timm folders (plus ``*_ema``)

``megadigpt finetune --config <yaml> [section.key=value ...]``; kill it at any point and run the same command to
resume (the data order is a function of (seed, epoch), so a resumed run sees the same batches).
"""

import functools
import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from ..config import ConfigError, FinetuneRunConfig, dump_config
from ..safe_fs import announce_commands, pipe_commands, remove_entry, write_atomic
from ..distributed import env as dist_env


@dataclass
class FinetunePlan:
    world_size: int
    accum: int
    device_type: str
    precision: str
    lr: float
    loader: str


@dataclass
class TransferChecks:
    """What :func:`check_transfer` found: the run's world size, gradient accumulation, device, precision, lr."""

    world_size: int
    accum: int
    device_type: str
    precision: str
    lr: float


def check_transfer(cfg, world_size: Optional[int], device_type: Optional[str], init_from_pending: bool,
                   need_train: bool, check_data: Optional[Callable], train_what: str, val_what: str, fresh: str = "model",
                   per_rank: Optional[Callable] = None) -> TransferChecks:
    """The checks every transfer run makes before it reads weights or starts a process group (fine-tuning's
    ``plan_finetune``, segmentation's ``train.segment.plan_segment``): the encoder's source (``train.init_from``,
    or an ``arch`` for a fresh ``fresh``), the data (``check_data(source, "train" | "val")``; ``train_what`` /
    ``val_what`` say what is expected), the batch over the world size, then ``per_rank(device_type, world)`` (the
    task's own checks of the per-rank batch), the DeepSpeed template, the length, the precision, the run
    directory. ``device_type`` and ``init_from_pending``: as in ``plan_run``."""
    from ..data import remote
    from ..distributed.engine import template_path
    from .common import auto_precision, resolve_device_type

    m, d, t, o = cfg.model, cfg.data, cfg.train, cfg.optim
    if m.arch == "auto" and not t.init_from:
        raise ConfigError(f"model.arch=auto takes the geometry from train.init_from; set one of them "
                          f"(model.arch=vit_base for a randomly initialised {fresh})")
    if t.init_from and not init_from_pending and not Path(t.init_from).exists():
        from ..config import missing_path

        missing_path(f"train.init_from not found: {t.init_from}")  # raises, unless previewing (submit --dry-run)
        init_from_pending = True
    if t.init_from and not init_from_pending:
        from ..config import check_weights_file

        check_weights_file(t.init_from, "train.init_from")
    remote.configure_from(d)  # before any source is read: cache, timeouts, deadlines, byte caps
    if check_data is not None:  # (None: a benchmark's synthetic inputs)
        if need_train:
            if not d.train:
                raise ConfigError(f"data.train is not set ({train_what})")
            check_data(d.train, "train")
        if not d.val:
            raise ConfigError(f"data.val is not set ({val_what})")
        check_data(d.val, "val")
    if device_type is None:  # here, not planned for compute nodes (megadigpt submit: their compiler, not ours)
        from ..distributed.parallelize import check_host_compiler

        check_host_compiler(resolve_device_type(t.device), t.compile, "sdpa")  # Triton's C compiler: one line
    device_type = device_type or resolve_device_type(t.device)
    world = world_size if world_size is not None else dist_env.discover().world_size
    if t.global_batch % (t.micro_batch * world):  # (ranges: checked by load_config)
        raise ConfigError(f"train.global_batch {t.global_batch} is not divisible by train.micro_batch "
                          f"{t.micro_batch} x world size {world}")
    if per_rank is not None:
        per_rank(device_type, world)
    template_path(t.zero_stage, t.ds_config)
    if t.max_steps is None and t.epochs <= 0:
        raise ConfigError("set train.epochs > 0 or train.max_steps")
    precision = t.precision if t.precision != "auto" else auto_precision(device_type)
    if precision == "fp16" and device_type == "cpu":
        raise ConfigError("train.precision=fp16 is refused by DeepSpeed on CPU; use fp32 or bf16")
    try:
        Path(t.run_dir).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create train.run_dir {t.run_dir}: {e.strerror}")
    lr = o.lr if o.lr is not None else o.blr * t.global_batch / 256
    return TransferChecks(world, t.global_batch // (t.micro_batch * world), device_type, precision, lr)


def plan_finetune(cfg: FinetuneRunConfig, world_size: Optional[int] = None, need_train: bool = True,
                  device_type: Optional[str] = None, init_from_pending: bool = False) -> FinetunePlan:
    """Every check that needs no weights, no decoding and no process group (``device_type`` and
    ``init_from_pending``: as in ``plan_run``)."""
    from ..data import check_source
    from .common import resolve_loader

    m, d, t, f = cfg.model, cfg.data, cfg.train, cfg.finetune
    if m.patch_size and m.img_size % m.patch_size:
        raise ConfigError(f"model.img_size {m.img_size} is not divisible by model.patch_size {m.patch_size}")
    loader = resolve_loader(d.loader)

    def per_rank(device_type, world):
        if (f.mixup > 0 or f.cutmix > 0) and t.micro_batch % 2:
            raise ConfigError(f"mixup/cutmix pair each batch with its reverse: train.micro_batch {t.micro_batch} "
                              f"must be even (or set finetune.mixup=0 finetune.cutmix=0)")

    c = check_transfer(cfg, world_size, device_type, init_from_pending, need_train, lambda src, _: check_source(src),
                       "labelled training images: shards with .cls, class folders", "labelled evaluation images",
                       per_rank=per_rank)
    return FinetunePlan(c.world_size, c.accum, c.device_type, c.precision, c.lr, loader)


# ============================================================================ model and weights


def resolve_model(cfg: FinetuneRunConfig, weights=None, info=None):
    """-> (EncoderGeometry, weights' img_size or None). The weights decide the trunk; the config may only agree."""
    from ..checkpoint.convert import geometry_of
    from ..model.classifier import EncoderGeometry
    from ..model.vit import VIT_SIZES

    m = cfg.model
    if weights is None:
        base = VIT_SIZES[m.arch]
        return EncoderGeometry(m.embed_dim or base.embed_dim, m.depth or base.depth, m.num_heads or base.num_heads,
                               m.mlp_ratio or base.mlp_ratio, m.patch_size or 16), None
    geom, img = geometry_of(weights, m.num_heads or (info or {}).get("num_heads"))
    want = {}
    if m.arch != "auto":
        base = VIT_SIZES[m.arch]
        want.update(embed_dim=base.embed_dim, depth=base.depth, mlp_ratio=base.mlp_ratio)
    for k in ("embed_dim", "depth", "mlp_ratio", "patch_size"):
        if getattr(m, k) is not None:
            want[k] = getattr(m, k)
    for k, v in want.items():
        if abs(getattr(geom, k) - v) > 1e-6:
            raise ConfigError(f"train.init_from {cfg.train.init_from} has {k}={getattr(geom, k):g}, the config asks "
                              f"for {v:g} (model.arch={m.arch}); use model.arch=auto")
    return geom, img


def __getattr__(name):
    """``fit_to_classifier`` moved to :mod:`megadigpt.model.classifier` (model code must not import training code);
    still importable from here, without loading torch when this module is imported."""
    if name == "fit_to_classifier":
        from ..model.classifier import fit_to_classifier

        return fit_to_classifier
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load_into_classifier(model, weights, head_init_std: float) -> dict:
    """Pretrained trunk (and a matching head, when it fits) into the timm model; returns what was done."""
    import torch

    from ..model.classifier import fit_to_classifier

    sd, report = fit_to_classifier(model, weights)
    model.load_state_dict(sd, strict=False)
    if "head.weight" in report["fresh"]:
        torch.nn.init.trunc_normal_(model.head.weight, std=head_init_std)
        torch.nn.init.zeros_(model.head.bias)
    return report


def build_and_load(build, weights, head_init_std: float, ds_config: Optional[dict] = None):
    """The classifier with its initial weights: built whole (``ds_config`` None), or partitioned under ZeRO-3
    (``build_partitioned``: timm's init one module at a time; the pretrained weights copied in module by module
    from rank 0's copy), with the same values for the same seed either way. -> (model, load report or None)."""
    import torch

    if ds_config is None:
        model = build()
        report = load_into_classifier(model, weights, head_init_std) if weights is not None else None
        if weights is None:
            torch.nn.init.trunc_normal_(model.head.weight, std=head_init_std)
        return model, report

    import deepspeed
    import torch.distributed as dist

    from ..distributed.partitioned import _init_in_fp32, build_partitioned, load_partitioned
    from ..model.classifier import fit_to_classifier

    model = build_partitioned(build, ds_config)
    report = None
    if weights is not None:
        sd, report = fit_to_classifier(model, weights)  # on every rank: the same verdict, no collective
        fresh = [p for n, p in model.named_parameters() if n in report["fresh"]]
        with deepspeed.zero.GatheredParameters(fresh):  # the small fresh head / norms keep their initial values
            if dist.get_rank() == 0:
                sd.update({n: p.detach().clone() for n, p in model.named_parameters() if n in report["fresh"]})
        load_partitioned(model, lambda: sd, "train.init_from")
    head = [model.head.weight] + ([model.head.bias] if report is not None else [])
    if report is None or "head.weight" in report["fresh"]:  # drawn in fp32 as the plain build draws them
        def init_head():
            torch.nn.init.trunc_normal_(model.head.weight, std=head_init_std)
            if report is not None:
                torch.nn.init.zeros_(model.head.bias)

        with deepspeed.zero.GatheredParameters(head, modifier_rank=0):
            _init_in_fp32(head, init_head)
    return model, report


# ============================================================================ exports


def export_classifier(state, model_args: dict, out_dir: Path, label_names=None, metrics=None, mean=None, std=None,
                      crop_pct=None, interpolation=None, run_config=None) -> Path:
    """A timm folder (``model.safetensors`` + ``config.json`` + the ``README.md`` card) written beside ``out_dir``
    and renamed into place, so a kill never leaves a half-written ``best/``. Loads with
    ``timm.create_model("local-dir:<out_dir>", pretrained=True)``; its ``pretrained_cfg`` is what the run trained
    and evaluated with: ``mean``/``std``/``crop_pct`` (arguments, else the run's ``config.yaml`` - by default the
    one in ``out_dir``'s parent, the run directory -, else the defaults), the input size, and the fine-tuning
    loaders' interpolation (bicubic, :mod:`megadigpt.data.classification`). The card also records the fine-tuning
    recipe and the pretraining it started from (see :mod:`megadigpt.checkpoint.convert`)."""
    from ..checkpoint.convert import finetune_record, read_run_config, write_timm_folder
    from ..config import FinetuneDataConfig

    out_dir = Path(out_dir)
    if run_config is None:
        run_config = read_run_config(out_dir.parent)
    data, dflt = (run_config or {}).get("data") or {}, FinetuneDataConfig()
    size = model_args["img_size"]
    pre = {"input_size": [3, size, size],
           "interpolation": str(interpolation or data.get("interpolation", "bicubic")),
           "mean": [float(v) for v in (mean or data.get("mean") or dflt.mean)],
           "std": [float(v) for v in (std or data.get("std") or dflt.std)],
           "crop_pct": float(crop_pct or data.get("crop_pct") or dflt.crop_pct), "crop_mode": "center"}
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    remove_entry(tmp)  # a planted link is unlinked, never followed
    tmp.mkdir(parents=True)
    args = {k: v for k, v in model_args.items() if k != "drop_path_rate"}
    write_timm_folder(tmp, {k: v.contiguous() for k, v in state.items()}, args, pre,
                      finetune_record(run_config, metrics), label_names)
    old = out_dir.with_name(out_dir.name + ".old")
    remove_entry(old)
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    remove_entry(old)
    return out_dir


# ============================================================================ evaluation


def evaluate(model, loader, num_batches: int, micro_batch: int, device, dtype, img_size: int):
    """Top-1/top-5/loss over a rank's shard; every rank runs ``num_batches`` forwards (padding with blank,
    invalid batches) so that ZeRO-3's parameter gathering stays in step. Returns summed counts (all ranks)."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    sums = torch.zeros(4, dtype=torch.float64, device=device)  # correct1, correct5, loss sum, count
    was_training = model.training
    model.eval()
    it = iter(loader)
    with torch.no_grad():
        for _ in range(num_batches):
            batch = next(it, None)
            if batch is None:
                x = torch.zeros(micro_batch, 3, img_size, img_size, device=device)
                y = torch.zeros(micro_batch, dtype=torch.long, device=device)
                valid = torch.zeros(micro_batch, dtype=torch.bool, device=device)
            else:
                x, y, valid = (batch["image"].to(device), batch["label"].to(device), batch["valid"].to(device))
            logits = model(x.to(dtype)).float()
            k = min(5, logits.shape[1])
            top = logits.topk(k, dim=1).indices
            hit = top == y[:, None]
            v = valid.double()
            sums += torch.stack([(hit[:, 0].double() * v).sum(), (hit.any(1).double() * v).sum(),
                                 (F.cross_entropy(logits, y, reduction="none").double() * v).sum(), v.sum()])
    if dist.is_initialized():
        dist.all_reduce(sums)
    model.train(was_training)
    n = max(sums[3].item(), 1.0)
    return {"top1": 100 * sums[0].item() / n, "top5": 100 * sums[1].item() / n, "loss": sums[2].item() / n,
            "images": int(sums[3].item())}


def eval_batches(n_items: int, world: int, micro_batch: int) -> int:
    return math.ceil(math.ceil(n_items / world) / micro_batch)


# ============================================================================ the run


def check_labels(samples, what: str, num_classes: Optional[int] = None) -> int:
    """Every sample labelled, every label below ``num_classes``; returns ``num_classes`` or 1 + the largest label.
    Vectorised over a SampleIndex's label column (no per-sample objects); a plain sequence of Samples works too."""
    import numpy as np

    labels = getattr(samples, "labels", None)
    labels = np.asarray(labels) if labels is not None else np.array([s.label for s in samples], dtype=np.int64)
    if len(labels) == 0:
        raise ConfigError(f"{what}: no images")
    bad, top = int((labels < 0).sum()), int(labels.max())
    release = getattr(samples, "release", None)
    if release is not None:
        release()  # the pages of the label column just read do not stay resident in this rank
    if bad:
        raise ConfigError(f"{what}: {bad} of {len(labels)} images have no label (shards need .cls members, folders "
                          f"class subfolders)")
    if num_classes is not None and top >= num_classes:
        raise ConfigError(f"{what}: label {top} does not fit model.num_classes={num_classes}")
    return num_classes or top + 1


def finetune(cfg: FinetuneRunConfig) -> dict:
    env = dist_env.discover()
    plan = plan_finetune(cfg, env.world_size)

    from ..checkpoint.convert import load_encoder_weights

    m, d, t, f, o = cfg.model, cfg.data, cfg.train, cfg.finetune, cfg.optim
    run_dir = Path(t.run_dir)
    # pipe: sources run shell commands: said once, before the first one runs, and recorded in the start event
    commands = announce_commands(pipe_commands(*vars(d).values()), env.rank == 0)
    from ..data.sources import scan_source

    (train_samples, train_problems), (val_samples, val_problems) = scan_source(d.train), scan_source(d.val)
    num_classes = check_labels(train_samples, "data.train", m.num_classes)
    check_labels(val_samples, "data.val", num_classes)
    from ..data.sources import check_class_names

    names = check_class_names(d.train, d.val)  # compared by name: one line where train and val classes differ
    if names is not None and m.num_classes is None and num_classes > len(names):
        raise ConfigError(f"data.train: label {num_classes - 1}, but the source names only {len(names)} classes")
    if names is not None and len(names) != num_classes:
        names = None
    weights, info = load_encoder_weights(t.init_from) if t.init_from else (None, {})
    geom, _ = resolve_model(cfg, weights, info)
    if m.img_size % geom.patch_size:
        raise ConfigError(f"model.img_size {m.img_size} is not divisible by the patch size {geom.patch_size}")
    from ..checkpoint import latest_tag

    if latest_tag(run_dir):  # resuming: the checkpoint must be this network (else DeepSpeed's size mismatch)
        import copy

        from ..config import check_resume_config

        now = copy.deepcopy(cfg)
        for k in ("embed_dim", "depth", "num_heads", "mlp_ratio", "patch_size"):
            setattr(now.model, k, getattr(geom, k))
        now.model.num_classes = num_classes
        check_resume_config(run_dir, now)

    import numpy as np
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from .. import checkpoint as ckpt
    from ..checkpoint import ds_checkpoint as ckpt_files
    from ..data.classification import build_classification_loader
    from ..distributed import engine as ds_engine
    from ..distributed.sharded import LocalEMA, full_state_dict
    from ..model.classifier import build_classifier, param_groups_lrd
    from ..testing import active as fault_active
    from ..testing import fault
    from .metrics import MetricsSink, wandb_settings
    from .optim import build_optimizer, lr_at
    from .common import torch_dtype
    from .runtime import Checkpointed, SignalFlag, TrainingDiverged

    world = env.world_size
    per_rank = len(train_samples) // world
    batches_per_epoch = per_rank // t.micro_batch
    steps_per_epoch = batches_per_epoch // plan.accum
    if steps_per_epoch < 1:
        raise ConfigError(f"{len(train_samples)} training images make no full step of train.global_batch "
                          f"{t.global_batch} on {world} ranks")
    total_steps = t.max_steps if t.max_steps is not None else max(1, int(round(t.epochs * steps_per_epoch)))
    warmup = o.warmup_steps if o.warmup_steps is not None else o.warmup_epochs * steps_per_epoch
    warmup = min(warmup, total_steps)
    schedule = {"total_steps": total_steps, "warmup_steps": round(float(warmup), 6), "peak_lr": plan.lr,
                "min_lr": o.min_lr}
    schedule_changes = ckpt.check_schedule(run_dir, schedule, t.allow_schedule_change)  # before anything heavy
    done = ckpt.finished_step(run_dir, total_steps)
    if done is not None and env.rank == 0:
        print(f"megadigpt: {run_dir} is already finished: step {done} of {total_steps} (its exports are in "
              f"{run_dir / 'last'}); nothing to do", flush=True)
    if done is not None:
        return {"steps": done, "history": [], "run_dir": str(run_dir), "best": {}, "finished": True}

    # ---------------------------------------------------------------- processes, model
    device = ds_engine.start_processes(env, plan.device_type)
    signals = SignalFlag()  # from here on a signal means: checkpoint after the first step that completes
    rank0 = env.rank == 0
    from .runtime import hold_run_dir, release

    hold_run_dir(run_dir, rank0)  # one run per directory: a second one stops here, on every rank
    import copy

    resolved = copy.deepcopy(cfg)
    resolved.model.num_heads, resolved.model.num_classes = geom.num_heads, num_classes
    if rank0:
        write_atomic(run_dir / "config.yaml", dump_config(resolved), root=run_dir, what="run config")
        if names:
            write_atomic(run_dir / "label_names.json", json.dumps(names), root=run_dir, what="class names")

    with torch.device("meta"):  # the classifier's parameter count, for DeepSpeed's "auto" bucket sizes
        n_params = sum(p.numel() for p in build_classifier(geom, m.img_size, num_classes,
                                                            m.global_pool).parameters())
    ds_config = ds_engine.build_ds_config(cfg, world, plan.precision, params=n_params)
    torch.manual_seed(t.seed)  # identical initial head on every rank
    # under ZeRO-3 built partitioned: no rank ever holds the whole classifier (ViT-g/e)
    model, load_report = build_and_load(
        functools.partial(build_classifier, geom, m.img_size, num_classes, m.global_pool, m.drop_path), weights,
        f.head_init_std, ds_config if t.zero_stage == 3 else None)
    model_args = geom.model_args(m.img_size, num_classes, m.global_pool)
    del weights
    if t.activation_checkpointing:
        model.set_grad_checkpointing(True)
    if t.compile:  # after activation checkpointing, before the engine shards (torchtitan's order)
        from ..distributed.parallelize import apply_compile

        apply_compile(model)
    groups = param_groups_lrd(model, o.weight_decay, o.layer_decay, geom.depth)
    optimizer = build_optimizer(model, o, plan.lr, plan.device_type, groups, ds_config=ds_config)

    engine, tag, marker, universal = ckpt.start_engine(model, optimizer, ds_config, run_dir, t, world, rank0)
    module = engine.module
    ema = LocalEMA(module, f.ema_decay) if f.ema_decay > 0 else None

    def ema_file(tag_name):  # this rank's slices (ZeRO-3) or the whole EMA (ZeRO 0-2)
        return ckpt.checkpoint_dir(run_dir) / tag_name / f"ema_rank{env.rank:05d}_of_{world:05d}.pt"

    ema_note = None
    if ema is not None and tag:
        shard = ema_file(tag)
        if not (shard.is_file() and ema.load(shard)):
            ema_note = "EMA restarted from the resumed weights (saved with another world size or missing)"
    compute_dtype = torch_dtype(plan.precision)
    start_step = int(marker["step"]) if tag else 0
    best = dict(marker.get("best", {})) if tag else {}

    # ---------------------------------------------------------------- regularisation ops (timm's, on the device)
    from timm.data import Mixup
    from timm.data.random_erasing import RandomErasing

    mixup = (Mixup(mixup_alpha=f.mixup, cutmix_alpha=f.cutmix, prob=f.mixup_prob, switch_prob=f.mixup_switch_prob,
                   mode="batch", label_smoothing=f.smoothing, num_classes=num_classes)
             if f.mixup > 0 or f.cutmix > 0 else None)
    erase = RandomErasing(f.reprob, mode=f.remode, max_count=1, device=str(device)) if f.reprob > 0 else None

    sink = MetricsSink(run_dir, rank0, t.tensorboard, t.progress, total_steps, start_step,
                       wandb=wandb_settings(cfg) if t.wandb else None)
    if schedule_changes and tag:
        sink.event(event="schedule_change", step=start_step, changes=schedule_changes, schedule=schedule)
    from ..data.bad_samples import BadSampleLog

    bad_log = BadSampleLog(run_dir, train_samples, env.rank, start_step, train_problems + val_problems, device)
    sink.event(event="resume" if tag else "start", step=start_step, world_size=world, **ds_engine.where(),
               train_images=len(train_samples), pipe_commands=commands,
               val_images=len(val_samples), num_classes=num_classes, total_steps=total_steps,
               steps_per_epoch=steps_per_epoch, accum=plan.accum, precision=plan.precision, loader=plan.loader,
               init_from=t.init_from, load=load_report, model_args=model_args, ema_note=ema_note)
    val_batches = eval_batches(len(val_samples), world, t.micro_batch)

    def val_loader():
        return build_classification_loader(val_samples, False, m.img_size, t.micro_batch, env.rank, world,
                                           kind=plan.loader, device=device, num_workers=d.num_workers,
                                           mean=d.mean, std=d.std, crop_pct=d.crop_pct)

    def export(which: str, metrics: dict, with_ema: bool):
        state = full_state_dict(module, rank0, ema if with_ema else None)  # fp32 masters / EMA, not bf16 params
        if rank0:
            export_classifier(state, model_args, run_dir / which, names, metrics, d.mean, d.std, d.crop_pct)

    def checkpoint_now(step):
        bad_log.flush()  # before the checkpoint: the records of the steps it covers are on disk
        client = {"step": step, "global_batch": t.global_batch, "seed": t.seed, "world_size": world,
                  "epoch": step / steps_per_epoch}
        tag_name = ckpt_files.tag_for(step)
        if ema is not None:  # inside the tag folder before the completeness marker
            ema_file(tag_name).parent.mkdir(parents=True, exist_ok=True)
            ema.save(ema_file(tag_name))
        client["best"] = best  # the best-so-far record lives in the marker: a resumed run keeps tracking it
        client["schedule"] = schedule  # what a resume compares its own schedule with (check_schedule)
        client["nonfinite_steps"] = skipped
        ckpt.save(engine, run_dir, step, client, keep=t.ckpt_keep, is_rank0=rank0,
                  extra_files=[ema_file(tag_name)] if ema is not None else ())
        sink.event(event="checkpoint", step=step)

    # ---------------------------------------------------------------- loop
    step = start_step
    outcome, msg = "done", ""
    acc = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, valid count, bad count
    step_acc = torch.zeros(2, dtype=torch.float64, device=device)  # this step's: counted if it is applied
    nonfinite = torch.zeros(1, device=device)  # this step's non-finite losses, agreed on at its end
    streak, skipped = 0, int((marker or {}).get("nonfinite_steps", 0))
    t_last, steps_since = time.perf_counter(), 0
    history = []
    engine.train()
    loop_start = time.perf_counter()
    while step < total_steps and outcome == "done":
        epoch = step // steps_per_epoch
        first = (step % steps_per_epoch) * plan.accum
        loader = build_classification_loader(train_samples, True, m.img_size, t.micro_batch, env.rank, world,
                                             epoch=epoch, seed=t.seed, kind=plan.loader, device=device,
                                             num_workers=d.num_workers, mean=d.mean, std=d.std, crop_pct=d.crop_pct,
                                             auto_augment=d.auto_augment, scale=d.crop_scale, skip_batches=first)
        micro, step_failed = 0, False
        for b, batch in enumerate(loader):
            if first + b >= steps_per_epoch * plan.accum:
                break  # the tail that makes no full step
            if micro == 0:
                lr = lr_at(step, plan.lr, warmup, total_steps, o.min_lr)
                ds_engine.set_lr(engine, lr)
            rng_seed = (t.seed * 1_000_003 + step * 1009 + micro * 7 + env.rank) % (2 ** 32)
            torch.manual_seed(rng_seed)  # drop path, erasing: stateless per (step, micro, rank)
            np.random.seed(rng_seed)  # timm's Mixup draws lam and boxes from numpy
            random.seed(rng_seed)  # and RandomErasing from Python's
            x = batch["image"].to(device, non_blocking=True)
            y = batch["label"].to(device, non_blocking=True)
            valid = ds_engine.to_device(batch["valid"], device).float()
            bad_log.add(batch, step + 1)
            if erase is not None:
                x = erase(x)
            if mixup is not None:
                x, target = mixup(x, y)
            else:
                target = None
            logits = engine(x.to(compute_dtype)).float()
            if target is not None:
                per_sample = torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1)
            else:
                per_sample = F.cross_entropy(logits, y, label_smoothing=f.smoothing, reduction="none")
            loss = (per_sample * valid).sum() / valid.sum().clamp(min=1.0)
            if fault_active("nan", step + 1, env.rank, micro):
                loss = loss * float("nan")
            step_acc += torch.stack([loss.detach().double() * valid.sum(), valid.sum().double()])
            acc[2] += (1 - valid).sum().double()
            # every rank runs every backward; whether the step's update is applied, and any rank's signal, are
            # agreed once, at its end: one all-reduce and one host wait, behind the queued optimizer step
            last = micro + 1 == plan.accum
            flags = ()
            if last:
                fault("term", step + 1, env.rank)
                flags = (float(signals.code),)
            end = ds_engine.micro_step(engine, loss, nonfinite, last=last, flags=flags)
            micro += 1
            if micro < plan.accum:
                continue
            micro = 0
            step_failed = not end.applied
            (signal_code,) = end.flags
            if end.applied:  # a skipped step's micro-batches count in no loss
                acc[:2] += step_acc
            step_acc.zero_()
            step += 1
            steps_since += 1
            sink.advance()
            if t.compile and step == start_step + 1:  # the first step compiles every block: its time is the cold compile
                sink.event(event="compiled", step=step, first_step_s=round(time.perf_counter() - loop_start, 3))
            if ema is not None and not step_failed:
                ema.update()
            if step_failed:
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
                rec = {"train_loss": (acc[0] / acc[1]).item() if acc[1] > 0 else None, "lr": lr,
                       "grad_norm": ds_engine.grad_norm(engine), "bad_samples": int(acc[2].item()),
                       "nonfinite_steps": skipped, "epoch": step / steps_per_epoch,
                       "images_per_s": steps_since * t.global_batch / elapsed, "step_time_s": elapsed / steps_since}
                sink.log(step, rec)
                history.append((step, rec))
                acc.zero_()
                t_last, steps_since = time.perf_counter(), 0
            epoch_end = step % steps_per_epoch == 0 or step == total_steps
            if signal_code > 0 and not epoch_end:
                checkpoint_now(step)
                outcome = "signal"
                agreed = SignalFlag.name_of(signal_code)
                sink.event(event="signal", step=step, signal=agreed)
                break
            if step % t.ckpt_every == 0 and not epoch_end:
                checkpoint_now(step)
            if epoch_end:
                ep = math.ceil(step / steps_per_epoch)
                if ep % f.eval_every == 0 or step == total_steps:
                    rec = {"epoch": step / steps_per_epoch}
                    res = evaluate(module, val_loader(), val_batches, t.micro_batch, device, compute_dtype, m.img_size)
                    rec.update({f"val_{k}": v for k, v in res.items()})
                    if ema is not None:
                        with ema.swapped_in():
                            res_ema = evaluate(module, val_loader(), val_batches, t.micro_batch, device,
                                               compute_dtype, m.img_size)
                        rec.update({f"val_ema_{k}": v for k, v in res_ema.items()})
                    sink.log(step, rec)
                    history.append((step, rec))
                    for which, r, use_ema in (("best", res, False),) + ((("best_ema", res_ema, True),)
                                                                         if ema is not None else ()):
                        if r["top1"] > best.get(which, {}).get("top1", -1.0):
                            best[which] = {"top1": r["top1"], "top5": r["top5"], "step": step}
                            export(which, {"top1": r["top1"], "top5": r["top5"], "step": step,
                                           "epoch": step / steps_per_epoch, "best_top1": r["top1"]}, use_ema)
                            sink.event(event=f"new_{which}", step=step, top1=r["top1"])
                    export("last", {"top1": res["top1"], "top5": res["top5"], "step": step,
                                    "epoch": step / steps_per_epoch, "best_top1": best["best"]["top1"]}, False)
                    if ema is not None:
                        export("last_ema", {"top1": res_ema["top1"], "top5": res_ema["top5"], "step": step,
                                            "best_top1": best["best_ema"]["top1"]}, True)
                checkpoint_now(step)
                if signal_code > 0 and step < total_steps:
                    outcome = "signal"
                    agreed = SignalFlag.name_of(signal_code)
                    sink.event(event="signal", step=step, signal=agreed)
                    break
                if step >= total_steps:
                    break
        if hasattr(loader, "close"):
            loader.close()
        if outcome == "done" and step < total_steps and step % steps_per_epoch:
            raise RuntimeError(f"the epoch {epoch} loader ended early at step {step}")
    signals.restore()
    if outcome != "signal":  # the signal event, with its name, is already written
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


"""Classification fine-tuning (spec §7: the ImageNet-21K intermediate and ImageNet-1K stages): the task the run
harness (:mod:`megadigpt.train.harness`) runs for ``megadigpt finetune``; what it shares with segmentation is in
:mod:`megadigpt.train.transfer`.

    validate (cheap) -> labels and classes -> pretrained encoder weights (timm layout) -> process group
    -> timm ViT (avg-pool + fc_norm head), position embeddings interpolated -> layer-wise lr decay groups
    -> DeepSpeed engine (ZeRO 0-3) -> resume -> epochs of (mixup/cutmix, random erasing, label smoothing, EMA)
    -> per-epoch checkpoint + evaluation -> ``best/`` and ``last/`` as timm folders (plus ``*_ema``)

``megadigpt finetune --config <yaml> [section.key=value ...]``; kill it at any point and run the same command to
resume (the data order is a function of (seed, epoch), so a resumed run sees the same batches).
"""

import copy
import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..config import ConfigError, FinetuneRunConfig
from ..safe_fs import write_atomic
from . import harness
from .harness import Run, Schedule, epoch_batches
from .transfer import TransferTask, check_transfer, publish_folder, resolve_model
# re-exported: probe, evaluate, tests and older callers import these here
from .transfer import TransferChecks, check_labels, eval_batches  # noqa: F401


@dataclass
class FinetunePlan:
    world_size: int
    accum: int
    device_type: str
    precision: str
    lr: float
    loader: str


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

    from ..distributed.partitioned import init_in_fp32, build_partitioned, load_partitioned
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
            init_in_fp32(head, init_head)
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
    args = {k: v for k, v in model_args.items() if k != "drop_path_rate"}
    return publish_folder(out_dir, lambda tmp: write_timm_folder(
        tmp, {k: v.contiguous() for k, v in state.items()}, args, pre, finetune_record(run_config, metrics),
        label_names))


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


# ============================================================================ the run


class FinetuneTask(TransferTask):
    """Classification fine-tuning: timm's ViT (avg-pool + fc_norm head) from the pretrained encoder, layer-wise lr
    decay, epochs of mixup/cutmix, random erasing and label smoothing; evaluated (and the EMA too) every
    ``finetune.eval_every`` epochs, exported as timm folders (``best/``, ``last/``, ``*_ema``)."""

    name = "fine-tuning"
    metric = "top1"

    # ---------------------------------------------------------------- before anything heavy
    def plan_run(self, env):
        return plan_finetune(self.cfg, env.world_size)

    def prepare(self, env) -> Schedule:
        from ..checkpoint.convert import load_encoder_weights
        from ..data.sources import check_class_names, scan_source

        cfg = self.cfg
        m, d, t = cfg.model, cfg.data, cfg.train
        (self.train_samples, train_problems), (self.val_samples, val_problems) = scan_source(d.train), \
            scan_source(d.val)
        self.problems = train_problems + val_problems
        self.num_classes = num_classes = check_labels(self.train_samples, "data.train", m.num_classes)
        check_labels(self.val_samples, "data.val", num_classes)
        names = check_class_names(d.train, d.val)  # compared by name: one line where train and val classes differ
        if names is not None and m.num_classes is None and num_classes > len(names):
            raise ConfigError(f"data.train: label {num_classes - 1}, but the source names only {len(names)} classes")
        self.names = names if names is not None and len(names) == num_classes else None
        self.weights, info = load_encoder_weights(t.init_from) if t.init_from else (None, {})
        self.geom, _ = resolve_model(cfg, self.weights, info)
        if m.img_size % self.geom.patch_size:
            raise ConfigError(f"model.img_size {m.img_size} is not divisible by the patch size "
                              f"{self.geom.patch_size}")
        return self.epoch_schedule(len(self.train_samples), env.world_size, "training images")

    def resume_config(self):  # the checkpoint must be this network (else DeepSpeed's size mismatch)
        return self.geometry_config(self.geom, num_classes=self.num_classes)

    def run_config(self):
        resolved = copy.deepcopy(self.cfg)
        resolved.model.num_heads, resolved.model.num_classes = self.geom.num_heads, self.num_classes
        return resolved

    # ---------------------------------------------------------------- start-up
    def started(self, run: Run):
        if run.rank0 and self.names:
            write_atomic(run.run_dir / "label_names.json", json.dumps(self.names), root=run.run_dir,
                         what="class names")

    def build(self, run: Run):
        import torch

        from ..distributed import engine as ds_engine
        from ..model.classifier import build_classifier

        cfg, plan, geom = self.cfg, self.plan, self.geom
        m, t, f = cfg.model, cfg.train, cfg.finetune
        with torch.device("meta"):  # the classifier's parameter count, for DeepSpeed's "auto" bucket sizes
            n_params = sum(p.numel() for p in build_classifier(geom, m.img_size, self.num_classes,
                                                                m.global_pool).parameters())
        ds_config = ds_engine.build_ds_config(cfg, run.world, plan.precision, params=n_params)
        torch.manual_seed(t.seed)  # identical initial head on every rank
        # under ZeRO-3 built partitioned: no rank ever holds the whole classifier (ViT-g/e)
        model, self.load_report = build_and_load(
            functools.partial(build_classifier, geom, m.img_size, self.num_classes, m.global_pool, m.drop_path),
            self.weights, f.head_init_std, ds_config if t.zero_stage == 3 else None)
        self.model_args = geom.model_args(m.img_size, self.num_classes, m.global_pool)
        self.weights = None
        if t.activation_checkpointing:
            model.set_grad_checkpointing(True)
        if t.compile:  # after activation checkpointing, before the engine shards (torchtitan's order)
            from ..distributed.parallelize import apply_compile

            apply_compile(model)
        return model, ds_config

    def build_optimizer(self, run: Run, model, ds_config):
        from ..model.classifier import param_groups_lrd
        from .optim import build_optimizer

        o = self.cfg.optim
        groups = param_groups_lrd(model, o.weight_decay, o.layer_decay, self.geom.depth)
        return build_optimizer(model, o, self.plan.lr, self.plan.device_type, groups, ds_config=ds_config)

    def attach(self, run: Run):
        from timm.data import Mixup
        from timm.data.random_erasing import RandomErasing

        f = self.cfg.finetune
        self.run, self.engine, self.device = run, run.engine, run.device
        # regularisation ops: timm's, on the device
        self.mixup = (Mixup(mixup_alpha=f.mixup, cutmix_alpha=f.cutmix, prob=f.mixup_prob,
                            switch_prob=f.mixup_switch_prob, mode="batch", label_smoothing=f.smoothing,
                            num_classes=self.num_classes) if f.mixup > 0 or f.cutmix > 0 else None)
        self.erase = (RandomErasing(f.reprob, mode=f.remode, max_count=1, device=str(run.device))
                      if f.reprob > 0 else None)

    def resumed(self, run: Run):
        self.resume_ema(run, self.cfg.finetune.ema_decay)
        self.val_batches = eval_batches(len(self.val_samples), run.world, self.cfg.train.micro_batch)

    def bad_sample_source(self):
        return self.train_samples, self.problems

    def start_fields(self, run: Run) -> dict:
        return dict(train_images=len(self.train_samples), val_images=len(self.val_samples),
                    num_classes=self.num_classes, steps_per_epoch=self.steps_per_epoch, loader=self.plan.loader,
                    init_from=self.cfg.train.init_from, load=self.load_report, model_args=self.model_args,
                    ema_note=self.ema_note)

    # ---------------------------------------------------------------- the step
    def batches(self, run: Run):
        from ..data.classification import build_classification_loader

        m, d, t = self.cfg.model, self.cfg.data, self.cfg.train

        def loader(epoch, skip):
            return build_classification_loader(self.train_samples, True, m.img_size, t.micro_batch, run.env.rank,
                                               run.world, epoch=epoch, seed=t.seed, kind=self.plan.loader,
                                               device=run.device, num_workers=d.num_workers, mean=d.mean, std=d.std,
                                               crop_pct=d.crop_pct, auto_augment=d.auto_augment, scale=d.crop_scale,
                                               skip_batches=skip)

        return epoch_batches(loader, self.steps_per_epoch, self.plan.accum, run.start_step)

    def lr_at(self, step: int) -> float:
        from .optim import lr_at

        return lr_at(step, self.plan.lr, self.warmup, self.total, self.cfg.optim.min_lr)

    def inputs(self, batch):
        from ..distributed import engine as ds_engine

        x = batch["image"].to(self.device, non_blocking=True)
        y = batch["label"].to(self.device, non_blocking=True)
        valid = ds_engine.to_device(batch["valid"], self.device).float()
        if self.erase is not None:
            x = self.erase(x)
        target = None
        if self.mixup is not None:
            x, target = self.mixup(x, y)
        return x, y, target, valid

    def loss(self, inputs, targets):
        import torch
        import torch.nn.functional as F

        x, y, target, valid = inputs
        logits = self.engine(x.to(self.run.compute_dtype)).float()
        if target is not None:
            per_sample = torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1)
        else:
            per_sample = F.cross_entropy(logits, y, label_smoothing=self.cfg.finetune.smoothing, reduction="none")
        loss = (per_sample * valid).sum() / valid.sum().clamp(min=1.0)
        return loss, torch.stack([loss.detach().double() * valid.sum(), valid.sum().double()]), valid

    def log_fields(self, sums) -> dict:
        return {"train_loss": (sums[0] / sums[1]).item() if sums[1] > 0 else None}

    # ---------------------------------------------------------------- evaluation, exports
    def epoch_end(self, step: int) -> bool:
        return step % self.steps_per_epoch == 0 or step == self.total

    def checkpoint_due(self, step: int) -> bool:
        return self.epoch_end(step)  # fine-tuning checkpoints every epoch

    def evaluate_due(self, step: int) -> bool:
        return self.epoch_end(step) and (math.ceil(step / self.steps_per_epoch) % self.cfg.finetune.eval_every == 0
                                         or step == self.total)

    def evaluate(self, run: Run, step: int):
        from ..data.classification import build_classification_loader

        m, d, t = self.cfg.model, self.cfg.data, self.cfg.train

        def go():
            val = build_classification_loader(self.val_samples, False, m.img_size, t.micro_batch, run.env.rank,
                                               run.world, kind=self.plan.loader, device=run.device,
                                               num_workers=d.num_workers, mean=d.mean, std=d.std, crop_pct=d.crop_pct)
            return evaluate(run.engine.module, val, self.val_batches, t.micro_batch, run.device, run.compute_dtype,
                            m.img_size)

        epoch = run.epoch(step)
        rec = {"epoch": epoch}
        res = go()
        rec.update({f"val_{k}": v for k, v in res.items()})
        res_ema = None
        if self.ema is not None:
            res_ema = self.with_ema(go)
            rec.update({f"val_ema_{k}": v for k, v in res_ema.items()})
        run.sink.log(step, rec)
        run.history.append((step, rec))

        def export(which, r, use_ema, **more):
            state = self.export_state(run, use_ema)
            if run.rank0:
                metrics = {"top1": r["top1"], "top5": r["top5"], "step": step, **more}
                export_classifier(state, self.model_args, run.run_dir / which, self.names, metrics, d.mean, d.std,
                                  d.crop_pct)

        self.keep_best(run, step, [("best", res)] + ([("best_ema", res_ema)] if res_ema is not None else []),
                       lambda which, r, use_ema: export(which, r, use_ema, epoch=epoch, best_top1=r["top1"]))
        export("last", res, False, epoch=epoch, best_top1=self.best["best"]["top1"])
        if res_ema is not None:
            export("last_ema", res_ema, True, best_top1=self.best["best_ema"]["top1"])

    def best_record(self, res, step: int) -> dict:
        return {"top1": res["top1"], "top5": res["top5"], "step": step}


def finetune(cfg: FinetuneRunConfig) -> dict:
    """Run (or resume) classification fine-tuning; returns a summary with the best results."""
    return harness.run(FinetuneTask(cfg))

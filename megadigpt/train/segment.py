"""Semantic segmentation transfer: UperNet on the ViT encoder, ADE20K's protocol (MAE/BEiT); the task the run
harness (:mod:`megadigpt.train.harness`) runs for ``megadigpt segment``.

    validate (cheap) -> image+mask pairs -> pretrained encoder weights (any source fine-tuning reads)
    -> process group -> Segmentor (position embedding interpolated to the encoder grid) -> layer-wise lr decay
    -> DeepSpeed engine (ZeRO 0-3) -> resume -> iterations of (mmseg's ADE20K augmentation, CE + 0.4 aux CE,
    warm-up + poly) -> evaluation every ``segment.eval_every`` steps (sliding window or whole image; mIoU from one
    confusion matrix over all ranks) -> checkpoint -> ``best/`` and ``last/`` (plus ``*_ema``)

``megadigpt segment --config segment_ade20k_vitb16 --init-from RUN --train ADE --val ADE`` (until the CLI has the
command: ``python -m megadigpt.train.segment ...``, the same arguments). Kill it at any point and run the same
command to resume: the data order and every augmentation are functions of (seed, epoch, image), the step's dropout
and drop path of (seed, step, micro-batch, rank), so a resumed run reproduces the uninterrupted one.

What is shared and not copied: the loop, checkpoints, signals (exit 75), the non-finite policy, the metrics sink
and the bad-sample log are the harness's; the checks before anything heavy (``check_transfer``), the geometry
(``resolve_model``), the EMA, the best-so-far record and the exports' atomic folders are
:mod:`megadigpt.train.transfer`'s; weight loading and fitting (``load_encoder_weights``, ``fit_to_classifier``),
layer ids, the optimizer choice are the checkpoint, model and optim modules'. Under ZeRO-3 the model is built whole on each rank and partitioned when the engine starts
(not built partitioned as fine-tuning's classifier: the segmentation models of the paper, B and L, fit a rank).

BatchNorm (neck and heads): SyncBatchNorm on CUDA with several ranks, as BEiT/MAE; elsewhere (gloo on CPU,
where torch has no SyncBatchNorm) each rank's running statistics are averaged over the ranks after every step, so
every rank evaluates, saves and exports the same network.
"""

import argparse
import copy
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from ..commands import Parser, add_segment_parser, overrides_of, run  # overrides_of: re-exported
from ..config import ConfigError
from ..safe_fs import write_atomic
from . import harness
from .harness import Run, Schedule, epoch_batches
from .transfer import TransferTask, check_transfer, publish_folder, resolve_model
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
    (``transfer.check_transfer``) with the segmentation's own geometry, data layout and per-rank batch.
    ``need_data=False``: no data sources (``megadigpt bench``'s synthetic batches)."""
    from ..data.segmentation import check_pairs_source

    m, d, t, s = cfg.model, cfg.data, cfg.train, cfg.segment
    if m.patch_size and m.crop_size < m.patch_size:
        raise ConfigError(f"model.crop_size {m.crop_size} is smaller than model.patch_size {m.patch_size}")
    if len(d.scale) != 2:
        raise ConfigError(f"data.scale must be [long, short], got {list(d.scale)}")
    if t.compile:
        raise ConfigError("train.compile is not supported by segmentation (the Segmentor's neck and heads are not "
                          "compiled blocks); set train.compile=false")
    if s.eval_mode == "slide" and s.eval_stride > m.crop_size:
        raise ConfigError(f"segment.eval_stride {s.eval_stride} is larger than model.crop_size {m.crop_size}: "
                          f"windows would leave gaps")

    def per_rank(device_type, world):
        if t.micro_batch < 2 and not _sync_bn_possible(device_type, world) and need_train:
            raise ConfigError(f"train.micro_batch {t.micro_batch}: BatchNorm on UperNet's 1x1 pooled level needs >= "
                              f"2 images per rank (SyncBatchNorm, CUDA with several ranks, counts the whole batch)")

    def check_data(source, which):
        from ..data.sources import resolve_paths

        # a source not on this machine raises, or, previewing (submit --dry-run), is noted as a warning: "missing"
        if resolve_paths(source)[0] != "missing":
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

    cfg = {"task": "semantic_segmentation", "architecture": "megadigpt_vit_upernet", "model_args": model_args,
           "preprocessing": {"mean": list(mean), "std": list(std)}, "class_names": class_names,
           "megadigpt": {"metrics": metrics}}

    def write(tmp):
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps(cfg, indent=1))

    return publish_folder(out_dir, write)


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


class SegmentTask(TransferTask):
    """Semantic segmentation: the Segmentor (ViT + neck + UperNet + auxiliary FCN) from the pretrained encoder,
    mmseg's ADE20K augmentation, CE + weighted auxiliary CE, warm-up + poly; evaluated (and the EMA too) every
    ``segment.eval_every`` steps, checkpointed at each evaluation, exported to ``best/`` and ``last/``."""

    name = "segmentation"
    metric = "mIoU"

    # ---------------------------------------------------------------- before anything heavy
    def plan_run(self, env):
        return plan_segment(self.cfg, env.world_size)

    def prepare(self, env) -> Schedule:
        from ..checkpoint.convert import load_encoder_weights
        from ..data.segmentation import find_pairs

        cfg = self.cfg
        d, t = cfg.data, cfg.train
        self.train_pairs, train_problems = find_pairs(d.train, d.train_split, d.mask_ext)
        self.val_pairs, val_problems = find_pairs(d.val, d.val_split, d.mask_ext)
        self.problems = train_problems + val_problems
        self.resolve(*(load_encoder_weights(t.init_from) if t.init_from else (None, {})))
        return self.epoch_schedule(len(self.train_pairs), env.world_size, "training pairs")

    def resolve(self, weights=None, info=None):
        """The encoder's geometry from its weights (or the config's arch) and the Segmentor's arguments."""
        self.weights = weights
        self.geom, _ = resolve_model(self.cfg, weights, info or {})
        self.args = segmentor_args(self.cfg, self.geom)

    def resume_config(self):  # the checkpoint must be this network
        return self.geometry_config(self.geom, feature_blocks=[b + 1 for b in self.args.feature_blocks])

    def run_config(self):
        resolved = copy.deepcopy(self.cfg)
        resolved.model.num_heads = self.geom.num_heads
        resolved.model.feature_blocks = [b + 1 for b in self.args.feature_blocks]
        return resolved

    # ---------------------------------------------------------------- start-up
    def build(self, run: Run):
        import torch

        from ..distributed import engine as ds_engine
        from ..model.segmentation import load_backbone, sync_batchnorm

        cfg, plan, t = self.cfg, self.plan, self.cfg.train
        torch.manual_seed(t.seed)  # identical initial neck and heads on every rank
        model = build_segmentor(self.args, cfg, checkpointing=t.activation_checkpointing)
        self.load_report = load_backbone(model, self.weights) if self.weights is not None else None
        self.weights = None
        model = sync_batchnorm(model, plan.device_type, run.world)
        n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        ds_config = ds_engine.build_ds_config(cfg, run.world, plan.precision, params=n_params)
        return model, ds_config

    def build_optimizer(self, run: Run, model, ds_config):
        from ..model.segmentation import segment_param_groups
        from .optim import build_optimizer

        o = self.cfg.optim
        groups = segment_param_groups(model, o.weight_decay, o.layer_decay)
        return build_optimizer(model, o, self.plan.lr, self.plan.device_type, groups, ds_config=ds_config)

    def attach(self, run: Run):
        self.run, self.engine, self.device = run, run.engine, run.device
        self.average_bn = run.world > 1 and not self.plan.sync_bn  # (no SyncBatchNorm: gloo, or one GPU per rank)

    def resumed(self, run: Run):
        from ..data.segmentation import SegAugment

        d = self.cfg.data
        self.resume_ema(run, self.cfg.segment.ema_decay)
        self.aug = SegAugment(self.args.crop_size, tuple(d.scale), tuple(d.ratio_range), d.cat_max_ratio, d.hflip,
                              d.photometric)
        self.model_args = self.args.to_dict()

    def bad_sample_source(self):
        return [p.image for p in self.train_pairs], self.problems

    def start_fields(self, run: Run) -> dict:
        return dict(train_images=len(self.train_pairs), val_images=len(self.val_pairs),
                    num_classes=self.args.num_classes, steps_per_epoch=self.steps_per_epoch,
                    sync_bn=self.plan.sync_bn, init_from=self.cfg.train.init_from, load=self.load_report,
                    model_args=self.model_args, ema_note=self.ema_note)

    # ---------------------------------------------------------------- the step
    def batches(self, run: Run):
        from ..data.segmentation import train_loader

        d, t = self.cfg.data, self.cfg.train

        def loader(epoch, skip):
            return train_loader(self.train_pairs, run.env.rank, run.world, epoch, t.seed, t.micro_batch, self.aug,
                                d.mean, d.std, d.reduce_zero_label, d.num_workers, skip_batches=skip,
                                pin_memory=run.device.type == "cuda")

        return epoch_batches(loader, self.steps_per_epoch, self.plan.accum, run.start_step)

    def lr_at(self, step: int) -> float:
        return lr_at(step, self.cfg.optim, self.plan.lr, self.warmup, self.total)

    def inputs(self, batch):
        from ..distributed import engine as ds_engine

        return (ds_engine.to_device(batch["image"], self.device), ds_engine.to_device(batch["mask"], self.device).long(),
                ds_engine.to_device(batch["valid"], self.device).float())

    def loss(self, inputs, targets):
        import torch

        from ..model.segmentation import segmentation_loss

        x, y, valid = inputs
        out, aux = self.engine(x.to(self.run.compute_dtype))
        loss, main, aux_loss = segmentation_loss(out, aux, y, self.cfg.model.aux_weight, weight=valid)
        nv = valid.sum().double()
        stats = torch.stack([loss.detach().double() * nv, main.detach().double() * nv,
                             (aux_loss.detach().double() if aux_loss is not None else
                              torch.zeros((), dtype=torch.float64, device=self.device)) * nv, nv])
        return loss, stats, valid

    def after_step(self, applied: bool):
        if self.average_bn:  # no SyncBatchNorm (gloo): every rank keeps the ranks' mean statistics
            from ..model.segmentation import average_bn_buffers

            average_bn_buffers(self.engine.module)
        super().after_step(applied)

    def log_fields(self, sums) -> dict:
        n = sums[3].item()
        return {"train_loss": sums[0].item() / n if n else None, "decode_loss": sums[1].item() / n if n else None,
                "aux_loss": sums[2].item() / n if n and self.cfg.model.aux_weight > 0 else None}

    # ---------------------------------------------------------------- evaluation, exports
    def evaluate_due(self, step: int) -> bool:
        return step % self.cfg.segment.eval_every == 0 or step == self.total

    def checkpoint_due(self, step: int) -> bool:
        return self.evaluate_due(step)  # checkpointed at every evaluation

    def evaluate(self, run: Run, step: int):
        d = self.cfg.data

        def go():
            return evaluate(run.engine.module, self.val_pairs, self.cfg, self.args, run.device, run.compute_dtype,
                            run.env.rank, run.world, lockstep=self.cfg.train.zero_stage == 3)

        rec = {"epoch": run.epoch(step)}
        res = go()
        rec.update({f"val_{k}": v for k, v in summary(res).items()})
        res_ema = None
        if self.ema is not None:
            res_ema = self.with_ema(go)
            rec.update({f"val_ema_{k}": v for k, v in summary(res_ema).items()})
        rec["val_images"] = res["images"]
        run.sink.log(step, rec)
        run.history.append((step, rec))
        if run.rank0:
            (run.run_dir / "eval").mkdir(exist_ok=True)
            write_atomic(run.run_dir / "eval" / f"step{step:08d}.json", json.dumps(
                {"step": step, "result": res, "ema": res_ema}, indent=1), root=run.run_dir, what="eval record")

        def export(which, r, use_ema, **more):
            state = self.export_state(run, use_ema)
            if run.rank0:  # (BatchNorm's running statistics are in it: full_state_dict adds the persistent buffers)
                export_segmentor(state, self.model_args, run.run_dir / which,
                                 {**summary(r), "IoU": r["IoU"], "step": step, **more}, d.mean, d.std)

        self.keep_best(run, step, [("best", res)] + ([("best_ema", res_ema)] if res_ema is not None else []),
                       export)
        export("last", res, False, best_mIoU=self.best["best"]["mIoU"])
        if res_ema is not None:
            export("last_ema", res_ema, True, best_mIoU=self.best["best_ema"]["mIoU"])

    def best_record(self, res, step: int) -> dict:
        return {**summary(res), "step": step}


def summary(r) -> dict:
    """The headline numbers of an evaluation result."""
    return {"mIoU": r["mIoU"], "mAcc": r["mAcc"], "aAcc": r["aAcc"]}


def segment(cfg: SegmentRunConfig) -> dict:
    """Run (or resume) segmentation training; returns a summary with the best results."""
    return harness.run(SegmentTask(cfg))


# ============================================================================ command line


def cli_main(args) -> int:
    """``megadigpt segment``: train, evaluate, export (the closing line, with the best mIoU, is the harness's)."""
    segment(load_segment_config(args.config, overrides_of(args)))
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

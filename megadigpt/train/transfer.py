"""What the transfer tasks share (fine-tuning: :mod:`megadigpt.train.finetune`, segmentation:
:mod:`megadigpt.train.segment`; probing and evaluation read some of it): the checks before anything heavy
(:func:`check_transfer`), the encoder geometry a run resolves from its weights (:func:`resolve_model`), label
checks, the exported folders written beside and renamed into place (:func:`publish_folder`), and
:class:`TransferTask`, the part of a harness task both transfer jobs have: a parameter EMA saved in each
checkpoint, the best-so-far record kept in the markers, exports of the fp32 masters (or the EMA) to ``best/``,
``last/``, ``best_ema/``, ``last_ema/``, and the resumed config checked against the weights' geometry."""

import copy
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from ..config import ConfigError
from ..distributed import env as dist_env
from ..safe_fs import remove_entry
from .harness import Run, Schedule, Task

GEOMETRY = ("embed_dim", "depth", "num_heads", "mlp_ratio", "patch_size")


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


def resolve_model(cfg, weights=None, info=None):
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


def eval_batches(n_items: int, world: int, micro_batch: int) -> int:
    return math.ceil(math.ceil(n_items / world) / micro_batch)


def publish_folder(out_dir: Path, write: Callable[[Path], None]) -> Path:
    """``write(tmp)`` fills a fresh folder beside ``out_dir``, which is then renamed into place (the previous one
    kept as ``.old`` until the rename is done), so a kill never leaves a half-written export. Links planted at the
    temporary names are unlinked, never followed."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    remove_entry(tmp)
    tmp.mkdir(parents=True)
    write(tmp)
    old = out_dir.with_name(out_dir.name + ".old")
    remove_entry(old)
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    remove_entry(old)
    return out_dir


class TransferTask(Task):
    """A harness task that fine-tunes a pretrained encoder (classification, segmentation): subclasses set
    ``ema_decay``, ``metric`` (the key ``best`` is chosen by: ``top1``, ``mIoU``) and supply the model, the data,
    the loss and ``evaluate``; this class keeps the EMA, the best-so-far record and the exports."""

    metric = "top1"
    loss_key = "train_loss"

    @property
    def val_metric(self):
        """``metric`` as evaluate() logs it (the progress bar's and the summary line's validation number):
        ``val_<metric>``, or the key itself where it has its own evaluation prefix (``zeroshot_top1``)."""
        if not self.metric:
            return None
        return self.metric if self.metric.startswith(("val_", "zeroshot_")) else f"val_{self.metric}"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.best, self.ema, self.ema_note = {}, None, None

    def epoch_schedule(self, n_items: int, world: int, what: str) -> Schedule:
        """Steps an epoch (whole steps of this rank's share of ``n_items``), the run's length (``train.max_steps``,
        else ``train.epochs``) and the warm-up (``optim.warmup_steps``, else ``optim.warmup_epochs``)."""
        t, o = self.cfg.train, self.cfg.optim
        steps_per_epoch = (n_items // world) // t.micro_batch // self.plan.accum
        if steps_per_epoch < 1:
            raise ConfigError(f"{n_items} {what} make no full step of train.global_batch {t.global_batch} on "
                              f"{world} ranks")
        total = t.max_steps if t.max_steps is not None else max(1, int(round(t.epochs * steps_per_epoch)))
        warmup = o.warmup_steps if o.warmup_steps is not None else o.warmup_epochs * steps_per_epoch
        self.steps_per_epoch, self.total, self.warmup = steps_per_epoch, total, min(warmup, total)
        return Schedule(total, steps_per_epoch, self.warmup, warmup)

    def geometry_config(self, geom, **resolved):
        """A copy of the config with the weights' geometry (and ``resolved`` model keys) filled in."""
        now = copy.deepcopy(self.cfg)
        for k in GEOMETRY:
            setattr(now.model, k, getattr(geom, k))
        for k, v in resolved.items():
            setattr(now.model, k, v)
        return now

    def finished_line(self, run_dir, done, total):
        return (f"{run_dir} is already finished: step {done} of {total} (its exports are in {run_dir / 'last'}); "
                f"nothing to do")

    def ema_file(self, run: Run, tag_dir: Path) -> Path:
        """This rank's EMA in a tag folder: its slices (ZeRO-3) or the whole EMA (ZeRO 0-2)."""
        return Path(tag_dir) / f"ema_rank{run.env.rank:05d}_of_{run.world:05d}.pt"

    def resume_ema(self, run: Run, decay: float):
        """The parameter EMA (``decay`` 0: none), restored from the resumed checkpoint where it fits; the
        best-so-far record from its marker."""
        from .. import checkpoint as ckpt
        from ..distributed.sharded import LocalEMA

        self.ema = LocalEMA(run.engine.module, decay) if decay > 0 else None
        if self.ema is not None and run.tag:
            shard = self.ema_file(run, ckpt.checkpoint_dir(run.run_dir) / run.tag)
            if not (shard.is_file() and self.ema.load(shard)):
                self.ema_note = "EMA restarted from the resumed weights (saved with another world size or missing)"
        self.best = dict(run.marker.get("best", {})) if run.tag else {}

    def after_step(self, applied: bool):
        if self.ema is not None and applied:
            self.ema.update()

    def client_state(self, run: Run) -> dict:
        return {"best": self.best}  # the best-so-far record lives in the marker: a resumed run keeps tracking it

    def checkpoint_files(self, run: Run, tag_dir: Path) -> list:
        if self.ema is None:
            return []
        path = self.ema_file(run, tag_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.ema.save(path)
        return [path]

    def export_state(self, run: Run, with_ema: bool):
        """The fp32 masters (or the EMA), whole on rank 0 (None elsewhere): not the bf16 parameters."""
        from ..distributed.sharded import full_state_dict

        return full_state_dict(run.engine.module, run.rank0, self.ema if with_ema else None)

    def with_ema(self, fn):
        """``fn()`` with the EMA's weights swapped in."""
        with self.ema.swapped_in():
            return fn()

    def keep_best(self, run: Run, step: int, results, export):
        """``results``: [(which, result)] for ``best`` (and ``best_ema``); a result better in ``metric`` than the
        record is exported (``export(which, result, use_ema)``) and recorded."""
        for which, res in results:
            if res[self.metric] > self.best.get(which, {}).get(self.metric, -1.0):
                self.best[which] = self.best_record(res, step)
                export(which, res, which.endswith("_ema"))
                run.sink.event(event=f"new_{which}", step=step, **{self.metric: res[self.metric]})

    def best_record(self, res, step: int) -> dict:
        return {self.metric: res[self.metric], "step": step}

    def summary(self) -> dict:
        return {"best": self.best}

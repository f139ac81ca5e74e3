"""D-iGPT pretraining: the task the run harness (:mod:`megadigpt.train.harness`) runs for ``megadigpt pretrain``.

    plan_run (cheap, before anything heavy) -> the data listing (or the stream's shards) -> [harness: resume
    state, processes, lock] -> teacher (frozen, outside the engine) -> student (plain PyTorch; partitioned
    under ZeRO-3) -> activation checkpointing, compile -> [harness: DeepSpeed engine, resume] -> data loader
    -> per micro-batch: two views -> teacher features -> generative + discriminative losses

Run it with ``megadigpt pretrain --config <yaml> [section.key=value ...]`` under plain python, torchrun, the
deepspeed launcher, mpirun or srun.
"""

import functools
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

from ..config import Config, ConfigError
from ..distributed import env as dist_env
from . import harness
from .common import auto_precision, normalizer, resolve_device_type, resolve_loader, torch_dtype
from .harness import Run, Schedule, Task

# ============================================================================ validation (no torch work here)


@dataclass
class Plan:
    world_size: int
    accum: int
    device_type: str
    precision: str
    teacher_dtype: str
    target: object  # TargetSpec
    lr: float
    loader: str  # dali | torch
    mode: str = "indexed"  # indexed (random access, exact resume) | stream (sequential shard reads)
    urls: tuple = ()  # stream mode: the shard list
    epoch_size: Optional[int] = None  # stream mode: samples per epoch (manifest.json, data.epoch_size; else unknown)


def plan_run(cfg: Config, world_size: Optional[int] = None, device_type: Optional[str] = None,
             init_from_pending: bool = False) -> Plan:
    """Every check that needs no model, no data decoding and no process group. Raises ConfigError.
    ``megadigpt submit`` plans for the compute nodes (``device_type``) and for a ``train.init_from`` that an
    earlier stage of its chain will write (``init_from_pending``)."""
    from ..targets import describe_target
    from ..data import check_source
    from ..distributed.engine import template_path

    m, t = cfg.model, cfg.train  # value ranges (positive sizes, choices, fractions) were checked by load_config
    size = m.resolved_size()
    if m.img_size % m.patch_size:
        raise ConfigError(f"model.img_size {m.img_size} is not divisible by model.patch_size {m.patch_size}")
    grid = m.img_size // m.patch_size
    if m.segment_grid < 2 or grid % m.segment_grid:
        raise ConfigError(f"the {grid}x{grid} patch grid cannot be cut into {m.segment_grid}x{m.segment_grid} "
                          f"segments (model.segment_grid must be >= 2 and divide {grid})")
    for name, width, heads in (("model", size.embed_dim, size.num_heads), ("model.decoder", m.decoder_dim,
                                                                          m.decoder_heads)):
        if width % heads:
            raise ConfigError(f"{name} width {width} is not divisible by its {heads} heads")
        if width % 4:
            raise ConfigError(f"{name} width {width} must be divisible by 4 (2-D sin-cos position embedding)")
    taps = m.resolved_taps()
    if not taps or not all(1 <= x <= size.depth for x in taps):
        raise ConfigError(f"model.taps {taps} must be blocks in 1..{size.depth}")
    planning_elsewhere = device_type is not None  # megadigpt submit: the compute nodes' compiler, not ours
    device_type = device_type or resolve_device_type(t.device)
    if m.attention == "flex" and device_type != "cuda":
        raise ConfigError("model.attention=flex trains only on CUDA (FlexAttention has no CPU backward); "
                          "use model.attention=sdpa on CPU")
    if not planning_elsewhere:
        from ..distributed.parallelize import check_host_compiler

        check_host_compiler(device_type, t.compile, m.attention)  # Triton's C compiler: one line, not a traceback

    spec = describe_target(cfg.target, m)
    if spec.grid % m.segment_grid:
        raise ConfigError(f"the teacher's {spec.grid}x{spec.grid} token grid (target image {spec.image_size}) cannot "
                          f"be cut into {m.segment_grid}x{m.segment_grid} segments like the student's {grid}x{grid}")

    from ..data import remote, streaming

    remote.configure_from(cfg.data)  # before any source is read: cache, timeouts, deadlines, byte caps
    world = world_size if world_size is not None else dist_env.discover().world_size
    mode = streaming.resolve_mode(cfg.data.mode, cfg.data.source)
    urls, n_epoch = (), None
    if mode == "stream":  # nothing is downloaded: the shard count, the epoch size and one shard that opens
        urls = tuple(streaming.stream_urls(cfg.data.source))
        streaming.check_slots(len(urls), world, cfg.data.num_workers)
        o = cfg.optim  # the epoch size is needed only to count epochs: a run of max_steps with a warm-up in steps
        n_epoch = streaming.epoch_size(urls, cfg.data.epoch_size, "train.epochs" if t.max_steps is None else
                                       "optim.warmup_epochs" if o.warmup_steps is None and o.warmup_epochs else None)
        streaming.probe_shards(urls)
    else:
        check_source(cfg.data.source)
    loader = resolve_loader(cfg.data.loader)

    if t.global_batch % (t.micro_batch * world):
        raise ConfigError(f"train.global_batch {t.global_batch} is not divisible by train.micro_batch "
                          f"{t.micro_batch} x world size {world}")
    template_path(t.zero_stage, t.ds_config)

    precision = t.precision
    if precision == "auto":
        precision = auto_precision(device_type)
    if precision == "fp16" and device_type == "cpu":
        raise ConfigError("train.precision=fp16 is refused by DeepSpeed on CPU; use fp32 or bf16")
    teacher_dtype = cfg.target.dtype
    if teacher_dtype == "auto":
        teacher_dtype = auto_precision(device_type)
    if t.max_steps is None and t.epochs <= 0:
        raise ConfigError("set train.epochs > 0 or train.max_steps")
    if t.probe_every > 0:
        if not (t.probe_train and t.probe_val):
            raise ConfigError("train.probe_every needs train.probe_train and train.probe_val (labelled images)")
        check_source(t.probe_train)
        check_source(t.probe_val)
    if t.init_from and not init_from_pending and not Path(t.init_from).exists():
        from ..config import missing_path

        missing_path(f"train.init_from not found: {t.init_from}")  # raises, unless previewing (submit --dry-run)
        init_from_pending = True
    if t.init_from and not init_from_pending:
        from ..config import check_weights_file

        check_weights_file(t.init_from, "train.init_from")
    try:
        Path(t.run_dir).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create train.run_dir {t.run_dir}: {e.strerror}")
    lr = cfg.optim.lr if cfg.optim.lr is not None else cfg.optim.blr * t.global_batch / 256
    return Plan(world, t.global_batch // (t.micro_batch * world), device_type, precision, teacher_dtype, spec, lr,
                loader, mode, urls, n_epoch)


# ============================================================================ the run


def init_weights(model, path, partitioned: bool = False):
    """Load weights (strict) from a megadigpt file, a DeepSpeed checkpoint or a reference D-iGPT checkpoint. A
    partitioned (ZeRO-3) model: read on rank 0 only and copied in module by module."""
    from ..checkpoint.convert import load_any

    if partitioned:
        from ..distributed.partitioned import load_partitioned

        load_partitioned(model, lambda: load_any(path), f"train.init_from {path}")
        return
    sd = load_any(path)
    own = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    persistent = model.state_dict()
    missing = sorted(set(persistent) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    wrong = sorted(k for k in sd if k in persistent and sd[k].shape != persistent[k].shape)
    if missing or unexpected or wrong:
        raise ConfigError(f"train.init_from {path} does not fit this model: missing {missing[:3]}, unexpected "
                          f"{unexpected[:3]}, wrong shape {wrong[:3]}")
    model.load_state_dict({k: v for k, v in sd.items() if k in persistent}, strict=True)


def _teacher_record(cfg: Config, marker: Optional[dict], rank0: bool) -> Optional[dict]:
    """The teacher weights' identity (path or tag, size, sha256: hashed on rank 0 only) for the start event and
    the checkpoint markers; a resumed run (``marker``: its checkpoint's) must use the same teacher (every rank
    learns rank 0's verdict)."""
    import torch.distributed as dist

    from ..targets.weights import identity, resume_mismatch

    problem, teacher_id = [None], None
    if rank0:
        try:  # never raised on rank 0 alone: the other ranks wait for the verdict in the broadcast
            teacher_id = identity(cfg.target)
            problem[0] = resume_mismatch((marker or {}).get("teacher") if marker else None, teacher_id)
        except ConfigError as e:
            problem[0] = str(e)
    dist.broadcast_object_list(problem, src=0)
    if problem[0]:
        raise ConfigError(problem[0])
    return teacher_id


class PretrainTask(Task):
    """D-iGPT pretraining: the frozen teacher outside the engine, the student (encoder + generative and
    discriminative decoders) in it; batches of two views (student, teacher) and a segment order per image; the
    loss is the sum of the two decoders' feature losses over the valid samples."""

    name = "pretraining"

    @property
    def val_metric(self):
        return "knn_top1" if self.cfg.train.probe_every > 0 else None  # the k-NN monitor's

    # ---------------------------------------------------------------- before anything heavy
    def plan_run(self, env):
        return plan_run(self.cfg, env.world_size)

    def pipe_sources(self):
        return (*vars(self.cfg.data).values(), self.cfg.train.probe_train, self.cfg.train.probe_val)

    def prepare(self, env) -> Schedule:
        from ..data import streaming
        from ..data.sources import scan_source

        cfg, plan, t = self.cfg, self.plan, self.cfg.train
        self.stream_mode = self.counts_shards = plan.mode == "stream"
        if self.stream_mode:  # read as it trains: no listing
            self.samples, self.index_problems = [], []
            self.stream_id = streaming.run_identity(plan.urls, env.world_size, cfg.data.num_workers, t.seed,
                                                    cfg.data.shuffle_buffer)
        else:
            self.samples, self.index_problems = scan_source(cfg.data.source)  # I/O only (tar headers)
        if cfg.target.tokenizer:  # discrete targets: a resumed run must keep its codebook
            from ..tokenizer import load_codebook

            self.tokenizer = load_codebook(cfg.target.tokenizer).fingerprint()
        if t.probe_every > 0:
            from ..data import find_samples
            from ..data.sources import check_class_names
            from .transfer import check_labels

            self.probe_sets = (find_samples(t.probe_train), find_samples(t.probe_val))
            self.probe_classes = check_labels(self.probe_sets[0], "train.probe_train")
            check_labels(self.probe_sets[1], "train.probe_val", self.probe_classes)
            check_class_names(t.probe_train, t.probe_val, "train.probe_train", "train.probe_val")
        self.n = plan.epoch_size if self.stream_mode else len(self.samples)  # None: a stream of unknown size
        steps_per_epoch = self.n / t.global_batch if self.n is not None else None  # (then no epoch counter)
        o = cfg.optim
        if self.n is None and (t.max_steps is None or (o.warmup_steps is None and o.warmup_epochs)):
            raise ConfigError("the epoch size of this stream is unknown: give train.max_steps and optim.warmup_steps "
                              "(or data.epoch_size)")
        total = t.max_steps if t.max_steps is not None else max(1, int(t.epochs * self.n // t.global_batch))
        warmup = o.warmup_steps if o.warmup_steps is not None else o.warmup_epochs * (steps_per_epoch or 0)
        self.total, self.warmup = total, min(warmup, total)
        return Schedule(total, steps_per_epoch, self.warmup, warmup)

    def check_resume(self, resume):
        from ..data import streaming

        # the read positions fit only the same readers over the same shards
        streaming.check_resume_mode(resume.get("stream"), self.stream_id if self.stream_mode else None)

    def finished_line(self, run_dir, done, total):
        return (f"{run_dir} is already finished: step {done} of {total}; nothing to do (export it with "
                f"`megadigpt convert {run_dir} --to timm --out <dir>`)")

    # ---------------------------------------------------------------- start-up
    def started(self, run: Run):
        self.teacher_id = _teacher_record(self.cfg, run.resume.marker, run.rank0)

    def build_teacher(self, run: Run):
        """The teacher, frozen, outside the engine (its host peak measured for the start event)."""
        import torch

        from ..distributed.partitioned import host_peak_bytes, reset_host_peak
        from ..targets import build_target

        torch.manual_seed(self.cfg.train.seed)
        reset_host_peak()  # the teacher build's own host peak, for the start event (plan: teacher build host GiB)
        before = host_peak_bytes()
        self.teacher = build_target(self.cfg.target, self.cfg.model, device=run.device,
                                    dtype=torch_dtype(self.plan.teacher_dtype))
        self.teacher_host_gib = ((host_peak_bytes() or 0) - (before or 0)) / 2 ** 30
        self.spec = self.teacher.spec
        return self.teacher

    def build(self, run: Run):
        import torch

        from ..distributed import engine as ds_engine
        from ..distributed.parallelize import apply_activation_checkpointing, apply_compile
        from ..distributed.partitioned import build_partitioned, host_peak_bytes, reset_host_peak
        from ..model import build_model
        from ..targets import example_targets
        from .metrics import count_flops, teacher_flops

        cfg, plan, t, m = self.cfg, self.plan, self.cfg.train, self.cfg.model
        if getattr(self, "teacher", None) is None:
            self.build_teacher(run)
        spec = self.spec
        ds_config = ds_engine.build_ds_config(cfg, run.world, plan.precision)
        self.partitioned = t.zero_stage == 3  # built in pieces: no rank ever holds the whole student
        reset_host_peak()
        host_before = host_peak_bytes()
        torch.manual_seed(t.seed)  # identical initial weights on every rank, for every world size, partitioned or not
        build = functools.partial(build_model, m, spec.dim, spec.grid, spec.classes)
        model = build_partitioned(build, ds_config) if self.partitioned else build()
        if t.init_from:
            init_weights(model, t.init_from, self.partitioned)
        self.host_build_gib = ((host_peak_bytes() or 0) - (host_before or 0)) / 2 ** 30
        with torch.device("meta"):  # FLOPs of the dense-mask attention whatever the backend: MFU compares across
            meta_model = build_model(replace(m, attention="sdpa"), spec.dim, spec.grid, spec.classes)
        x_meta = torch.zeros(1, 3, m.img_size, m.img_size, device="meta")
        self.student_fwd = count_flops(meta_model, x_meta, *example_targets(spec, 1, "meta"),
                                       torch.arange(m.segment_grid ** 2, device="meta")[None])
        del meta_model
        self.teacher_fwd = teacher_flops(cfg)  # on meta: on real tensors the teacher's fused attention is not counted
        if t.activation_checkpointing:
            apply_activation_checkpointing(model)
        if t.compile:  # after activation checkpointing, before the engine shards (torchtitan's order)
            apply_compile(model, self.teacher, ds_config["zero_optimization"]["stage"])  # ZeRO-3: whole-block graphs
        return model, ds_config

    def build_optimizer(self, run: Run, model, ds_config):
        from .optim import build_optimizer

        return build_optimizer(model, self.cfg.optim, self.plan.lr, self.plan.device_type, ds_config=ds_config)

    def attach(self, run: Run):
        m, spec, d = self.cfg.model, self.spec, self.cfg.data
        self.engine, self.device, self.compute_dtype, self.world = run.engine, run.device, run.compute_dtype, run.world
        self.sizes = sorted({m.img_size, spec.image_size})  # the views a batch holds (the loaders' order)
        self.norm_student = normalizer(d.mean, d.std, run.compute_dtype, run.device)
        self.norm_teacher = normalizer(spec.mean, spec.std, torch_dtype(self.plan.teacher_dtype), run.device)

    def resumed(self, run: Run):
        from .. import checkpoint as ckpt
        from ..data import PretrainStream, build_pretrain_loader, streaming
        from .metrics import peak_tflops

        cfg, plan, t, m, env, device = self.cfg, self.plan, self.cfg.train, self.cfg.model, run.env, run.device
        spec, tag, start_step = self.spec, run.tag, run.start_step
        self.stream_loader = None
        if self.stream_mode:
            state = streaming.read_state(ckpt.checkpoint_dir(run.run_dir) / tag, env.rank) if tag else None
            if tag and state is None:
                raise ConfigError(f"checkpoint {tag} holds no stream read positions for rank {env.rank} "
                                  f"({streaming.STATE_FILE.format(rank=env.rank)})")
            dataset = streaming.StreamDataset(plan.urls, [m.img_size, spec.image_size], m.segment_grid ** 2, t.seed,
                                              env.rank, env.world_size, cfg.data.num_workers,
                                              cfg.data.shuffle_buffer, cfg.data.crop_scale, cfg.data.crop_ratio,
                                              cfg.data.interpolation, cfg.data.hflip,
                                              start=streaming.start_cursors(state), encoded=plan.loader == "dali")
            self.loader = self.stream_loader = streaming.StreamLoader(
                dataset, t.micro_batch, (self.total - start_step) * plan.accum, cfg.data.num_workers)
            if plan.loader == "dali":
                from ..data.dali_loader import DaliStreamLoader

                self.loader = DaliStreamLoader(self.stream_loader, device, num_threads=max(1, cfg.data.num_workers))
            sizes = dataset.sizes
        else:
            stream = PretrainStream(self.samples, [m.img_size, spec.image_size], m.segment_grid ** 2, t.seed,
                                    cfg.data.crop_scale, cfg.data.crop_ratio, cfg.data.interpolation, cfg.data.hflip)
            self.loader = build_pretrain_loader(stream, t.global_batch, t.micro_batch, env.rank, env.world_size,
                                                start_step, self.total, cfg.data.num_workers, plan.loader, device)
            sizes = stream.sizes
        if list(sizes) != self.sizes:
            raise RuntimeError(f"the loader's views {list(sizes)} are not the step's {self.sizes}")
        self.peak, self.peak_src = peak_tflops(device, t.peak_tflops)

    def bad_sample_source(self):
        return self.samples, self.index_problems

    def start_fields(self, run: Run) -> dict:
        plan, ds_config = self.plan, run.ds_config
        return dict(images=self.n, data_mode=plan.mode, device=str(run.device), loader=plan.loader,
                    flops_student_fwd=self.student_fwd, flops_teacher_fwd=self.teacher_fwd, peak_tflops=self.peak,
                    peak_tflops_source=self.peak_src,
                    grad_accum_dtype=ds_config.get("data_types", {}).get("grad_accum_dtype", plan.precision),
                    partitioned_build=self.partitioned, host_build_peak_gib=round(self.host_build_gib, 4),
                    teacher_host_peak_gib=round(self.teacher_host_gib, 4),
                    teacher_param_bytes=sum(p.nbytes for p in self.teacher.parameters()), teacher=self.teacher_id)

    # ---------------------------------------------------------------- the step
    def batches(self, run: Run):
        return iter(self.loader)

    def lr_at(self, step: int) -> float:
        from .optim import lr_at

        o = self.cfg.optim
        return lr_at(step, self.plan.lr, self.warmup, self.total, o.min_lr)

    def inputs(self, batch):
        from ..distributed import engine as ds_engine

        views = {s: v.to(self.device, non_blocking=True) for s, v in zip(self.sizes, batch["views"])}
        return {"student": self.norm_student(views[self.cfg.model.img_size]),
                "teacher": self.norm_teacher(views[self.spec.image_size]),
                "order": ds_engine.to_device(batch["order"], self.device),
                "valid": ds_engine.to_device(batch["valid"], self.device).float()}

    def targets(self, inputs):
        import torch

        from ..targets import student_targets

        with torch.no_grad():
            tokens, cls = self.teacher(inputs["teacher"])
        return student_targets(tokens, cls, self.compute_dtype)

    def loss(self, inputs, targets):
        import torch

        tokens, cls = targets
        valid = inputs["valid"]
        gen_per_sample, dis_per_sample = self.engine(inputs["student"], tokens, cls, inputs["order"])
        n_valid = valid.sum().clamp(min=1.0)
        gen = (gen_per_sample * valid).sum() / n_valid
        dis = (dis_per_sample * valid).sum() / n_valid
        stats = torch.stack([gen.detach().double() * valid.sum(), dis.detach().double() * valid.sum(),
                             valid.sum().double()])
        return gen + dis, stats, valid

    def log_fields(self, sums) -> dict:
        if sums[2] > 0:
            gen_l, dis_l = (sums[0] / sums[2]).item(), (sums[1] / sums[2]).item()
        else:  # every step since the last line was skipped (non-finite) or every sample was bad
            gen_l = dis_l = None
        return {"gen_loss": gen_l, "dis_loss": dis_l, "loss": None if gen_l is None else gen_l + dis_l}

    def log_extra(self, rec, images_per_s):
        if hasattr(self.loader, "failed_batches"):
            rec["dali_fallback_batches"] = self.loader.failed_batches
        if self.student_fwd and self.peak:
            achieved = images_per_s / self.world * 3 * self.student_fwd
            rec["mfu_student"] = achieved / (self.peak * 1e12)
            if self.teacher_fwd:
                rec["mfu_total"] = (achieved + images_per_s / self.world * self.teacher_fwd) / (self.peak * 1e12)

    def evaluate_due(self, step: int) -> bool:
        every = self.cfg.train.probe_every
        return every > 0 and (step % every == 0 or step == self.total)

    def evaluate(self, run: Run, step: int):
        from .probe import knn_monitor

        cfg = self.cfg
        run.sink.log(step, knn_monitor(self.engine.module.encoder, *self.probe_sets, self.probe_classes,
                                       cfg.model.img_size, cfg.train.micro_batch, self.device, self.compute_dtype,
                                       cfg.data.mean, cfg.data.std, num_workers=cfg.data.num_workers))

    def client_state(self, run: Run) -> dict:
        state = {"teacher": self.teacher_id}
        if self.stream_mode:
            state["stream"] = self.stream_id
        return state

    def checkpoint_files(self, run: Run, tag_dir):
        if self.stream_loader is None:
            return []
        from ..data import streaming

        return [streaming.write_state(tag_dir, self.stream_loader)]  # each rank's read positions, as of the
        # batches this checkpoint covers


def pretrain(cfg: Config) -> dict:
    """Run (or resume) pretraining; returns a summary of the run."""
    return harness.run(PretrainTask(cfg))

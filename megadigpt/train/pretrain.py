"""D-iGPT pretraining under DeepSpeed.

    validate (cheap, before anything heavy) -> process group -> teacher (frozen, outside the engine)
    -> student (plain PyTorch) -> activation checkpointing -> DeepSpeed engine -> resume -> loop -> checkpoints

Run it with ``megadigpt pretrain --config <yaml> [section.key=value ...]`` under plain python, torchrun, the
deepspeed launcher, mpirun or srun.
"""

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..config import Config, ConfigError, dump_config
from ..distributed import env as dist_env

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


def _device_type(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is visible")
    if requested not in ("cpu", "cuda"):
        raise ConfigError(f"train.device must be auto, cpu or cuda, got {requested!r}")
    return requested


def resolve_loader(name: str) -> str:
    from ..data.dali_loader import dali_available

    if name == "auto":
        return "dali" if dali_available() else "torch"
    if name == "dali" and not dali_available():
        raise ConfigError("data.loader=dali but NVIDIA DALI is not installed (pip install 'megadigpt[dali]')")
    if name not in ("dali", "torch"):
        raise ConfigError(f"data.loader must be auto, dali or torch, got {name!r}")
    return name


def plan_run(cfg: Config, world_size: Optional[int] = None, device_type: Optional[str] = None,
             init_from_pending: bool = False) -> Plan:
    """Every check that needs no model, no data decoding and no process group. Raises ConfigError.
    ``megadigpt submit`` plans for the compute nodes (``device_type``) and for a ``train.init_from`` that an
    earlier stage of its chain will write (``init_from_pending``)."""
    from ..model.vit import VIT_SIZES
    from ..model.attention import BACKENDS
    from ..targets import describe_target
    from ..data import check_source
    from ..distributed.engine import template_path

    m, t = cfg.model, cfg.train
    if m.arch not in VIT_SIZES:
        from ..config import _suggest

        raise ConfigError(f"unknown model.arch {m.arch!r}{_suggest(m.arch, VIT_SIZES)}; choose from "
                          f"{', '.join(VIT_SIZES)}")
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
    from ..model.digpt import OBJECTIVES

    if m.objective not in OBJECTIVES:
        raise ConfigError(f"model.objective must be one of {', '.join(OBJECTIVES)}, got {m.objective!r}")
    if m.attention not in BACKENDS:
        raise ConfigError(f"model.attention must be one of {', '.join(BACKENDS)}, got {m.attention!r}")
    device_type = device_type or _device_type(t.device)
    if m.attention == "flex" and device_type != "cuda":
        raise ConfigError("model.attention=flex trains only on CUDA (FlexAttention has no CPU backward); "
                          "use model.attention=sdpa on CPU")

    spec = describe_target(cfg.target, m)
    if spec.grid % m.segment_grid:
        raise ConfigError(f"the teacher's {spec.grid}x{spec.grid} token grid (target image {spec.image_size}) cannot "
                          f"be cut into {m.segment_grid}x{m.segment_grid} segments like the student's {grid}x{grid}")

    check_source(cfg.data.source)
    loader = resolve_loader(cfg.data.loader)

    world = world_size if world_size is not None else dist_env.discover().world_size
    if t.micro_batch < 1 or t.global_batch < 1:
        raise ConfigError("train.micro_batch and train.global_batch must be positive")
    if t.global_batch % (t.micro_batch * world):
        raise ConfigError(f"train.global_batch {t.global_batch} is not divisible by train.micro_batch "
                          f"{t.micro_batch} x world size {world}")
    if t.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"train.zero_stage must be 0, 1, 2 or 3, got {t.zero_stage}")
    template_path(t.zero_stage, t.ds_config)

    precision = t.precision
    if precision == "auto":
        precision = "bf16" if device_type == "cuda" else "fp32"
    if precision not in ("fp32", "bf16", "fp16"):
        raise ConfigError(f"train.precision must be auto, fp32, bf16 or fp16, got {precision!r}")
    if precision == "fp16" and device_type == "cpu":
        raise ConfigError("train.precision=fp16 is refused by DeepSpeed on CPU; use fp32 or bf16")
    teacher_dtype = cfg.target.dtype
    if teacher_dtype == "auto":
        teacher_dtype = "bf16" if device_type == "cuda" else "fp32"
    if teacher_dtype not in ("fp32", "bf16", "fp16"):
        raise ConfigError(f"target.dtype must be auto, fp32, bf16 or fp16, got {teacher_dtype!r}")
    if t.max_steps is None and t.epochs <= 0:
        raise ConfigError("set train.epochs > 0 or train.max_steps")
    if t.ckpt_every < 1 or t.log_every < 1:
        raise ConfigError("train.ckpt_every and train.log_every must be >= 1")
    if t.ckpt_keep < 0 or t.ckpt_every_minutes < 0 or t.nan_tolerance < 0:
        raise ConfigError("train.ckpt_keep, train.ckpt_every_minutes and train.nan_tolerance must be >= 0")
    if t.probe_every < 0:
        raise ConfigError("train.probe_every must be >= 0")
    if t.probe_every > 0:
        if not (t.probe_train and t.probe_val):
            raise ConfigError("train.probe_every needs train.probe_train and train.probe_val (labelled images)")
        check_source(t.probe_train)
        check_source(t.probe_val)
    if t.init_from and not init_from_pending and not Path(t.init_from).exists():
        raise ConfigError(f"train.init_from not found: {t.init_from}")
    lo, hi = cfg.data.crop_scale
    if not 0 < lo <= hi <= 1:
        raise ConfigError(f"data.crop_scale must satisfy 0 < lo <= hi <= 1, got {cfg.data.crop_scale}")
    try:
        Path(t.run_dir).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create train.run_dir {t.run_dir}: {e.strerror}")
    lr = cfg.optim.lr if cfg.optim.lr is not None else cfg.optim.blr * t.global_batch / 256
    return Plan(world, t.global_batch // (t.micro_batch * world), device_type, precision, teacher_dtype, spec, lr,
                loader)


# ============================================================================ the run


def repair_universal_load(engine, groups):
    """Two defects of DeepSpeed's ZeRO-3 universal-checkpoint loader (deepspeed 0.19), measured here:
    it copies param group 0's hyperparameters into every group (taking weight decay off our decay group, as
    group 0 is the no-decay one), and it gives every group's Adam state the same ``step`` tensor object, which
    torch's AdamW then increments once per group per step (wrong bias correction from the first update on)."""
    import torch

    for g, own in zip(engine.optimizer.param_groups, groups):
        g.update(own)
    inner = getattr(engine.optimizer, "optimizer", None)
    for state in (inner.state.values() if inner is not None else []):
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def init_weights(model, path):
    """Load weights (strict) from a megadigpt file, a DeepSpeed checkpoint or a reference D-iGPT checkpoint."""
    from ..checkpoint.convert import load_any

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


class TrainingDiverged(RuntimeError):
    """Repeated non-finite losses: the run directory was rolled back to the last good checkpoint."""

    exit_code = 3


class Checkpointed(RuntimeError):
    """Stopped by SIGTERM/SIGUSR1 after a checkpoint; rerunning (or requeueing) the same command resumes.
    ``signal`` is the one the ranks agreed on (SIGUSR1 if any rank got it: SLURM's warning, which asks for a
    requeue; SIGTERM alone means stop)."""

    exit_code = 75  # EX_TEMPFAIL

    def __init__(self, step: int, signal: str):
        super().__init__(f"checkpointed at step {step} on {signal}; run the same command to resume")
        self.step, self.signal = step, signal


class SignalFlag:
    """SIGTERM and SIGUSR1 (SLURM's warning before the time limit or preemption) ask for checkpoint-and-exit.
    ``code`` is 0 (none), 1 (SIGTERM) or 2 (SIGUSR1): reduce it with MAX across ranks, name it with ``name_of``."""

    NAMES = {1: "SIGTERM", 2: "SIGUSR1"}

    def __init__(self):
        import signal

        self.code = 0
        self._old = {}
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass

    @property
    def raised(self) -> bool:
        return self.code > 0

    @classmethod
    def name_of(cls, code) -> str:
        return cls.NAMES.get(int(code), "none")

    def _handle(self, signum, frame):
        import signal

        self.code = max(self.code, 2 if signum == signal.SIGUSR1 else 1)

    def restore(self):
        import signal

        for sig, old in self._old.items():
            signal.signal(sig, old)


def _dtype(name):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def _normalizer(mean, std, dtype, device):
    """uint8 (B, 3, H, W) -> normalised ``dtype``; the constants live on the device once, not per step."""
    import torch

    m = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=device).view(1, 3, 1, 1)
    return lambda x_uint8: ((x_uint8.float() / 255.0 - m) / s).to(dtype)


def pretrain(cfg: Config) -> dict:
    """Run (or resume) pretraining; returns a summary of the run."""
    env = dist_env.discover()
    plan = plan_run(cfg, env.world_size)  # everything cheap is checked before anything heavy starts

    import torch
    import torch.distributed as dist

    from .. import checkpoint as ckpt
    from ..testing import active as fault_active
    from ..testing import fault
    from ..data import PretrainStream, build_pretrain_loader, find_samples
    from ..distributed import engine as ds_engine
    from ..distributed.parallelize import apply_activation_checkpointing
    from ..model import build_model
    from ..targets import build_target, example_targets, student_targets
    from .metrics import MetricsSink, count_flops, peak_tflops
    from .optim import build_optimizer, lr_at

    t, m = cfg.train, cfg.model
    run_dir = Path(t.run_dir)
    samples = find_samples(cfg.data.source)  # I/O only (tar headers): still before the heavy part
    tokenizer = None
    if cfg.target.tokenizer:  # discrete targets: a resumed run must keep its codebook
        from ..tokenizer import load_codebook

        tokenizer = load_codebook(cfg.target.tokenizer).fingerprint()
    ckpt.check_resumable(run_dir, t, tokenizer)
    if t.probe_every > 0:
        from .finetune import check_labels

        probe_sets = (find_samples(t.probe_train), find_samples(t.probe_val))
        probe_classes = check_labels(probe_sets[0], "train.probe_train")
        check_labels(probe_sets[1], "train.probe_val", probe_classes)
    n = len(samples)
    steps_per_epoch = n / t.global_batch
    total_steps = t.max_steps if t.max_steps is not None else max(1, int(t.epochs * n // t.global_batch))
    warmup = cfg.optim.warmup_steps if cfg.optim.warmup_steps is not None else cfg.optim.warmup_epochs * steps_per_epoch
    warmup = min(warmup, total_steps)

    # ---------------------------------------------------------------- processes and devices
    device = ds_engine.start_processes(env, plan.device_type)
    signals = SignalFlag()  # from here on a signal means: checkpoint after the first step that completes
    rank0 = env.rank == 0
    if rank0:
        (run_dir / "config.yaml").write_text(dump_config(cfg))

    # ---------------------------------------------------------------- teacher: frozen, outside the engine
    torch.manual_seed(t.seed)
    teacher = build_target(cfg.target, m, device=device, dtype=_dtype(plan.teacher_dtype))
    spec = teacher.spec

    # ---------------------------------------------------------------- student
    torch.manual_seed(t.seed)  # identical initial weights on every rank and for every world size
    model = build_model(m, spec.dim, spec.grid, spec.classes)
    if t.init_from:
        init_weights(model, t.init_from)
    with torch.device("meta"):
        meta_model = build_model(m, spec.dim, spec.grid, spec.classes)
    x_meta = torch.zeros(1, 3, m.img_size, m.img_size, device="meta")
    student_fwd = count_flops(meta_model, x_meta, *example_targets(spec, 1, "meta"),
                              torch.arange(m.segment_grid ** 2, device="meta")[None])
    del meta_model
    teacher_fwd = count_flops(teacher, torch.zeros(1, 3, spec.image_size, spec.image_size, device=device,
                                                   dtype=_dtype(plan.teacher_dtype)))
    if t.activation_checkpointing:
        apply_activation_checkpointing(model)
    optimizer = build_optimizer(model, cfg.optim, plan.lr, plan.device_type)
    ds_config = ds_engine.build_ds_config(cfg, env.world_size, plan.precision)

    # ---------------------------------------------------------------- what to resume from (before the engine)
    tag, marker, universal = ckpt.resume_point(run_dir, t, env.world_size, rank0, tokenizer)
    if universal:  # a different number of ranks: DeepSpeed's universal checkpoint keeps the optimizer state
        ds_config["checkpoint"] = {"load_universal": True}
    engine = ds_engine.initialize(model, optimizer, ds_config)
    compute_dtype = _dtype(plan.precision)
    groups = [{k: v for k, v in g.items() if k in ("weight_decay", "betas", "eps")}
              for g in engine.optimizer.param_groups]
    if tag:
        ckpt.load(engine, run_dir, tag, universal)
    if universal:
        repair_universal_load(engine, groups)
    start_step = int(marker["step"]) if tag else 0

    # ---------------------------------------------------------------- data
    stream = PretrainStream(samples, [m.img_size, spec.image_size], m.segment_grid ** 2, t.seed,
                            cfg.data.crop_scale, cfg.data.crop_ratio, cfg.data.interpolation, cfg.data.hflip)
    loader = build_pretrain_loader(stream, t.global_batch, t.micro_batch, env.rank, env.world_size, start_step,
                                   total_steps, cfg.data.num_workers, plan.loader, device)
    sizes = stream.sizes

    peak, peak_src = peak_tflops(device, t.peak_tflops)
    sink = MetricsSink(run_dir, rank0, t.tensorboard, t.progress, total_steps, start_step)
    sink.event(event="resume" if tag else "start", step=start_step, world_size=env.world_size, **ds_engine.where(),
               images=n,
               total_steps=total_steps, accum=plan.accum, precision=plan.precision, device=str(device),
               loader=plan.loader,
               flops_student_fwd=student_fwd, flops_teacher_fwd=teacher_fwd, peak_tflops=peak,
               peak_tflops_source=peak_src, checkpoint=tag, universal=universal)

    # ---------------------------------------------------------------- loop
    step, micro = start_step, 0
    acc = torch.zeros(4, dtype=torch.float64, device=device)  # gen sum, dis sum, valid count, bad count
    bad_total = int((marker or {}).get("bad_samples", 0))
    skipped_total = int((marker or {}).get("nonfinite_steps", 0))
    streak_start, step_failed, last_save = None, False, time.monotonic()
    t_last, steps_since = time.perf_counter(), 0
    history = []
    outcome = "done"

    def checkpoint_now():
        nonlocal last_save
        ckpt.save(engine, run_dir, step, {"step": step, "global_batch": t.global_batch, "seed": t.seed,
                                          "world_size": env.world_size, "bad_samples": bad_total,
                                          "nonfinite_steps": skipped_total, "tokenizer": tokenizer},
                  keep=t.ckpt_keep, is_rank0=rank0)
        last_save = time.monotonic()
        sink.event(event="checkpoint", step=step)

    norm_student = _normalizer(cfg.data.mean, cfg.data.std, compute_dtype, device)
    norm_teacher = _normalizer(spec.mean, spec.std, _dtype(plan.teacher_dtype), device)
    engine.train()
    for batch in loader:
        if micro == 0:
            torch.manual_seed(t.seed * 1_000_003 + step * 1009 + env.rank)  # drop-path etc.: stateless per step
            lr = lr_at(step, plan.lr, warmup, total_steps, cfg.optim.min_lr)
            ds_engine.set_lr(engine, lr)
            step_failed = False
        views = {s: v.to(device, non_blocking=True) for s, v in zip(sizes, batch["views"])}
        student_in = norm_student(views[m.img_size])
        teacher_in = norm_teacher(views[spec.image_size])
        with torch.no_grad():
            tokens, cls = teacher(teacher_in)
        tokens, cls = student_targets(tokens, cls, compute_dtype)
        valid = batch["valid"].to(device).float()
        gen_per_sample, dis_per_sample = engine(student_in, tokens, cls, batch["order"].to(device))
        n_valid = valid.sum().clamp(min=1.0)
        gen = (gen_per_sample * valid).sum() / n_valid
        dis = (dis_per_sample * valid).sum() / n_valid
        if fault_active("nan", step + 1, env.rank):
            gen = gen * float("nan")
        if ds_engine.backward_if_finite(engine, gen + dis, plan.accum):
            acc += torch.stack([gen.detach().double() * valid.sum(), dis.detach().double() * valid.sum(),
                                valid.sum().double(), (1 - valid).sum().double()])
        else:
            step_failed = True
        micro += 1
        if micro < plan.accum:
            continue
        micro = 0
        step += 1
        steps_since += 1
        sink.advance()
        if step_failed:
            skipped_total += 1
            streak_start = streak_start or step
            sink.event(event="nonfinite_loss", step=step, skipped_steps=skipped_total)
            if step - streak_start + 1 > t.nan_tolerance:
                good = [g for g in ckpt.complete_tags(run_dir) if int(g[5:]) < streak_start]
                if rank0 and good:
                    ckpt.set_latest(run_dir, good[-1])
                sink.event(event="rollback", step=step, to=good[-1] if good else None)
                outcome = "diverged"
                msg = (f"non-finite loss at steps {streak_start}..{step}; "
                       + (f"rolled back {run_dir}/checkpoints/latest to {good[-1]}" if good
                          else "no checkpoint precedes the failures") + "; lower the lr or check the data, then "
                       "run the same command to resume")
                break
        else:
            streak_start = None
        if step % t.log_every == 0 or step == total_steps:
            dist.all_reduce(acc)
            if acc[2] > 0:
                gen_l, dis_l = (acc[0] / acc[2]).item(), (acc[1] / acc[2]).item()
            else:  # every step since the last line was skipped (non-finite) or every sample was bad
                gen_l = dis_l = None
            bad_total += int(acc[3].item())
            elapsed = time.perf_counter() - t_last
            ips = steps_since * t.global_batch / elapsed
            rec = {"gen_loss": gen_l, "dis_loss": dis_l, "loss": None if gen_l is None else gen_l + dis_l, "lr": lr,
                   "grad_norm": ds_engine.grad_norm(engine), "images_per_s": ips, "bad_samples": bad_total,
                   "nonfinite_steps": skipped_total, "epoch": step / steps_per_epoch,
                   "step_time_s": elapsed / steps_since}
            if hasattr(loader, "failed_batches"):
                rec["dali_fallback_batches"] = loader.failed_batches
            if student_fwd and peak:
                achieved = ips / env.world_size * 3 * student_fwd
                rec["mfu_student"] = achieved / (peak * 1e12)
                if teacher_fwd:
                    rec["mfu_total"] = (achieved + ips / env.world_size * teacher_fwd) / (peak * 1e12)
            sink.log(step, rec)
            history.append((step, rec))
            acc.zero_()
            t_last, steps_since = time.perf_counter(), 0
        fault("sleep", step, env.rank)
        fault("crash", step, env.rank)
        # rank 0's clock and any rank's signal decide for everyone
        flags = torch.tensor([float(signals.code), float(rank0 and t.ckpt_every_minutes > 0 and
                                                           time.monotonic() - last_save >= 60 * t.ckpt_every_minutes)],
                             device=device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        if step % t.ckpt_every == 0 or step == total_steps or flags.any():
            checkpoint_now()
        if t.probe_every > 0 and (step % t.probe_every == 0 or step == total_steps):
            from .probe import knn_monitor

            sink.log(step, knn_monitor(engine.module.encoder, *probe_sets, probe_classes, m.img_size, t.micro_batch,
                                       device, compute_dtype, cfg.data.mean, cfg.data.std))
        if flags[0] > 0 and step < total_steps:
            outcome = "signal"
            agreed = SignalFlag.name_of(flags[0])
            sink.event(event="signal", step=step, signal=agreed)
            break
    signals.restore()
    sink.event(event=outcome, step=step)
    sink.close()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    if outcome == "diverged":
        raise TrainingDiverged(msg)
    if outcome == "signal":
        raise Checkpointed(step, agreed)
    return {"steps": step, "history": history, "run_dir": str(run_dir)}

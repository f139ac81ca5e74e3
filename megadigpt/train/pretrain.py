"""D-iGPT pretraining under DeepSpeed.

    validate (cheap, before anything heavy) -> process group -> teacher (frozen, outside the engine)
    -> student (plain PyTorch) -> activation checkpointing -> DeepSpeed engine -> resume -> loop -> checkpoints

Run it with ``megadigpt pretrain --config <yaml> [section.key=value ...]`` under plain python, torchrun, the
deepspeed launcher, mpirun or srun.
"""

import functools
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

from ..config import Config, ConfigError, dump_config
from ..safe_fs import announce_commands, pipe_commands, write_atomic
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
    mode: str = "indexed"  # indexed (random access, exact resume) | stream (sequential shard reads)
    urls: tuple = ()  # stream mode: the shard list
    epoch_size: Optional[int] = None  # stream mode: samples per epoch (manifest.json or data.epoch_size)


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
        n_epoch = streaming.epoch_size(urls, cfg.data.epoch_size)
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


# re-exported: cli, tests and launch/slurm import these here
from .common import auto_precision, resolve_device_type, resolve_loader, torch_dtype  # noqa: E402, F401
from .runtime import Checkpointed, SignalFlag, TrainingDiverged  # noqa: E402, F401


def _normalizer(mean, std, dtype, device):
    """uint8 (B, 3, H, W) -> normalised ``dtype``; the constants live on the device once, not per step."""
    import torch

    m = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=device).view(1, 3, 1, 1)
    return lambda x_uint8: ((x_uint8.float() / 255.0 - m) / s).to(dtype)


def _teacher_record(cfg: Config, run_dir: Path, rank0: bool) -> Optional[dict]:
    """The teacher weights' identity (path or tag, size, sha256: hashed on rank 0 only) for the start event and
    the checkpoint markers; a resumed run must use the same teacher (every rank learns rank 0's verdict)."""
    import torch.distributed as dist

    from .. import checkpoint as ckpt
    from ..targets.weights import identity, resume_mismatch

    problem, teacher_id = [None], None
    if rank0:
        try:  # never raised on rank 0 alone: the other ranks wait for the verdict in the broadcast
            teacher_id = identity(cfg.target)
            tag = ckpt.latest_tag(run_dir)
            problem[0] = resume_mismatch((ckpt.read_marker(run_dir, tag) or {}).get("teacher") if tag else None,
                                         teacher_id)
        except ConfigError as e:
            problem[0] = str(e)
    dist.broadcast_object_list(problem, src=0)
    if problem[0]:
        raise ConfigError(problem[0])
    return teacher_id


def pretrain(cfg: Config) -> dict:
    """Run (or resume) pretraining; returns a summary of the run."""
    env = dist_env.discover()
    plan = plan_run(cfg, env.world_size)  # everything cheap is checked before anything heavy starts

    import torch
    import torch.distributed as dist

    from .. import checkpoint as ckpt
    from ..config import check_resume_config
    from ..testing import active as fault_active
    from ..testing import fault
    from ..data import PretrainStream, build_pretrain_loader, find_samples
    from ..data.bad_samples import BadSampleLog
    from ..data import streaming
    from ..data.sources import scan_source
    from ..testing import record_trained
    from ..distributed import engine as ds_engine
    from ..distributed.parallelize import apply_activation_checkpointing, apply_compile
    from ..distributed.partitioned import build_partitioned, host_peak_bytes, reset_host_peak
    from ..model import build_model
    from ..targets import build_target, example_targets, student_targets
    from .metrics import MetricsSink, count_flops, peak_tflops, teacher_flops, wandb_settings
    from .optim import build_optimizer, lr_at
    from .runtime import hold_run_dir, release

    t, m = cfg.train, cfg.model
    run_dir = Path(t.run_dir)
    # pipe: sources run shell commands: said once, before the first one runs, and recorded in the start event
    commands = announce_commands(pipe_commands(*vars(cfg.data).values(), t.probe_train, t.probe_val), env.rank == 0)
    stream_mode = plan.mode == "stream"
    if stream_mode:  # read as it trains: no listing
        samples, index_problems = [], []
        stream_id = streaming.run_identity(plan.urls, env.world_size, cfg.data.num_workers, t.seed,
                                           cfg.data.shuffle_buffer)
    else:
        samples, index_problems = scan_source(cfg.data.source)  # I/O only (tar headers): still before the heavy part
    tokenizer = None
    if cfg.target.tokenizer:  # discrete targets: a resumed run must keep its codebook
        from ..tokenizer import load_codebook

        tokenizer = load_codebook(cfg.target.tokenizer).fingerprint()
    ckpt.check_resumable(run_dir, t, tokenizer)
    if ckpt.latest_tag(run_dir):  # a checkpoint of another network: one line now, not DeepSpeed's traceback later
        check_resume_config(run_dir, cfg)
        saved_stream = (ckpt.read_marker(run_dir, ckpt.latest_tag(run_dir)) or {}).get("stream")
        if stream_mode:  # the read positions fit only the same readers over the same shards
            streaming.check_resume_state(saved_stream, stream_id)
        elif saved_stream is not None:
            raise ConfigError("the latest checkpoint was written in data.mode=stream; resuming it in indexed mode "
                              "would change the data order: use data.mode=stream or a new train.run_dir")
    if t.probe_every > 0:
        from .finetune import check_labels

        probe_sets = (find_samples(t.probe_train), find_samples(t.probe_val))
        probe_classes = check_labels(probe_sets[0], "train.probe_train")
        check_labels(probe_sets[1], "train.probe_val", probe_classes)
        from ..data.sources import check_class_names

        check_class_names(t.probe_train, t.probe_val, "train.probe_train", "train.probe_val")
    n = plan.epoch_size if stream_mode else len(samples)
    steps_per_epoch = n / t.global_batch
    total_steps = t.max_steps if t.max_steps is not None else max(1, int(t.epochs * n // t.global_batch))
    warmup = cfg.optim.warmup_steps if cfg.optim.warmup_steps is not None else cfg.optim.warmup_epochs * steps_per_epoch
    warmup = min(warmup, total_steps)
    schedule = {"total_steps": total_steps, "warmup_steps": round(float(warmup), 6), "peak_lr": plan.lr,
                "min_lr": cfg.optim.min_lr}
    schedule_changes = ckpt.check_schedule(run_dir, schedule, t.allow_schedule_change)  # before anything heavy
    done = ckpt.finished_step(run_dir, total_steps)
    if done is not None:  # rerunning a finished run: say so now, not after the engine and the teacher are built
        if env.rank == 0:
            print(f"megadigpt: {run_dir} is already finished: step {done} of {total_steps}; nothing to do "
                  f"(export it with `megadigpt convert {run_dir} --to timm --out <dir>`)", flush=True)
        return {"steps": done, "history": [], "run_dir": str(run_dir), "finished": True}

    # ---------------------------------------------------------------- processes and devices
    device = ds_engine.start_processes(env, plan.device_type)
    signals = SignalFlag()  # from here on a signal means: checkpoint after the first step that completes
    rank0 = env.rank == 0
    hold_run_dir(run_dir, rank0)  # one run per directory: a second one stops here, on every rank
    teacher_id = _teacher_record(cfg, run_dir, rank0)
    if rank0:
        write_atomic(run_dir / "config.yaml", dump_config(cfg), root=run_dir, what="run config")

    # ---------------------------------------------------------------- teacher: frozen, outside the engine
    torch.manual_seed(t.seed)
    reset_host_peak()  # the teacher build's own host peak, for the start event (plan: teacher build host GiB)
    teacher_host_before = host_peak_bytes()
    teacher = build_target(cfg.target, m, device=device, dtype=torch_dtype(plan.teacher_dtype))
    teacher_host_gib = ((host_peak_bytes() or 0) - (teacher_host_before or 0)) / 2 ** 30
    spec = teacher.spec

    # ---------------------------------------------------------------- student
    ds_config = ds_engine.build_ds_config(cfg, env.world_size, plan.precision)
    partitioned = t.zero_stage == 3  # built in pieces: no rank ever holds the whole student
    reset_host_peak()
    host_before = host_peak_bytes()
    torch.manual_seed(t.seed)  # identical initial weights on every rank, for every world size, partitioned or not
    build = functools.partial(build_model, m, spec.dim, spec.grid, spec.classes)
    model = build_partitioned(build, ds_config) if partitioned else build()
    if t.init_from:
        init_weights(model, t.init_from, partitioned)
    host_build_gib = ((host_peak_bytes() or 0) - (host_before or 0)) / 2 ** 30
    with torch.device("meta"):  # FLOPs of the dense-mask attention whatever the backend: MFU compares across them
        meta_model = build_model(replace(m, attention="sdpa"), spec.dim, spec.grid, spec.classes)
    x_meta = torch.zeros(1, 3, m.img_size, m.img_size, device="meta")
    student_fwd = count_flops(meta_model, x_meta, *example_targets(spec, 1, "meta"),
                              torch.arange(m.segment_grid ** 2, device="meta")[None])
    del meta_model
    teacher_fwd = teacher_flops(cfg)  # on meta: on real tensors the teacher's fused attention is not counted
    if t.activation_checkpointing:
        apply_activation_checkpointing(model)
    if t.compile:  # after activation checkpointing, before the engine shards (torchtitan's order)
        apply_compile(model, teacher, ds_config["zero_optimization"]["stage"])  # ZeRO-3: whole-block graphs
    optimizer = build_optimizer(model, cfg.optim, plan.lr, plan.device_type, ds_config=ds_config)

    # ---------------------------------------------------------------- what to resume from (before the engine)
    # (a different number of ranks: DeepSpeed's universal checkpoint keeps the optimizer state)
    engine, tag, marker, universal = ckpt.start_engine(model, optimizer, ds_config, run_dir, t, env.world_size,
                                                       rank0, tokenizer)
    compute_dtype = torch_dtype(plan.precision)
    start_step = int(marker["step"]) if tag else 0

    # ---------------------------------------------------------------- data
    stream_loader = None
    if stream_mode:
        state = streaming.read_state(ckpt.checkpoint_dir(run_dir) / tag, env.rank) if tag else None
        if tag and state is None:
            raise ConfigError(f"checkpoint {tag} holds no stream read positions for rank {env.rank} "
                              f"({streaming.STATE_FILE.format(rank=env.rank)})")
        dataset = streaming.StreamDataset(plan.urls, [m.img_size, spec.image_size], m.segment_grid ** 2, t.seed,
                                          env.rank, env.world_size, cfg.data.num_workers, cfg.data.shuffle_buffer,
                                          cfg.data.crop_scale, cfg.data.crop_ratio, cfg.data.interpolation,
                                          cfg.data.hflip, start=streaming.start_cursors(state),
                                          encoded=plan.loader == "dali")
        loader = stream_loader = streaming.StreamLoader(dataset, t.micro_batch, (total_steps - start_step) * plan.accum,
                                                        cfg.data.num_workers)
        if plan.loader == "dali":
            from ..data.dali_loader import DaliStreamLoader

            loader = DaliStreamLoader(stream_loader, device, num_threads=max(1, cfg.data.num_workers))
        sizes = dataset.sizes
    else:
        stream = PretrainStream(samples, [m.img_size, spec.image_size], m.segment_grid ** 2, t.seed,
                                cfg.data.crop_scale, cfg.data.crop_ratio, cfg.data.interpolation, cfg.data.hflip)
        loader = build_pretrain_loader(stream, t.global_batch, t.micro_batch, env.rank, env.world_size, start_step,
                                       total_steps, cfg.data.num_workers, plan.loader, device)
        sizes = stream.sizes

    peak, peak_src = peak_tflops(device, t.peak_tflops)
    sink = MetricsSink(run_dir, rank0, t.tensorboard, t.progress, total_steps, start_step,
                       wandb=wandb_settings(cfg) if t.wandb else None)
    if schedule_changes and tag:
        sink.event(event="schedule_change", step=start_step, changes=schedule_changes, schedule=schedule)
    bad_log = BadSampleLog(run_dir, samples, env.rank, start_step, index_problems, device)  # bad_samples.jsonl
    sink.event(event="resume" if tag else "start", step=start_step, world_size=env.world_size, **ds_engine.where(),
               images=n, data_mode=plan.mode, pipe_commands=commands,
               total_steps=total_steps, accum=plan.accum, precision=plan.precision, device=str(device),
               loader=plan.loader,
               flops_student_fwd=student_fwd, flops_teacher_fwd=teacher_fwd, peak_tflops=peak,
               peak_tflops_source=peak_src, grad_accum_dtype=ds_config.get("data_types", {}).get(
                   "grad_accum_dtype", plan.precision), partitioned_build=partitioned,
               host_build_peak_gib=round(host_build_gib, 4), teacher_host_peak_gib=round(teacher_host_gib, 4),
               teacher_param_bytes=sum(p.nbytes for p in teacher.parameters()), checkpoint=tag, universal=universal,
               teacher=teacher_id)

    # ---------------------------------------------------------------- loop
    step, micro = start_step, 0
    acc = torch.zeros(5, dtype=torch.float64, device=device)  # gen sum, dis sum, valid count, bad count, bad shards
    step_acc = torch.zeros(3, dtype=torch.float64, device=device)  # this step's: counted if it is applied
    nonfinite = torch.zeros(1, device=device)  # this step's non-finite losses, agreed on at its end
    bad_total = int((marker or {}).get("bad_samples", 0))
    skipped_total = int((marker or {}).get("nonfinite_steps", 0))
    shards_total = int((marker or {}).get("skipped_shards", 0))  # stream mode: shards skipped after their retries
    streak_start, step_failed, last_save = None, False, time.monotonic()
    t_last, steps_since = time.perf_counter(), 0
    history = []
    outcome = "done"

    def checkpoint_now():
        nonlocal last_save
        bad_log.flush()  # before the checkpoint: the records of the steps it covers are on disk
        state = {"step": step, "global_batch": t.global_batch, "seed": t.seed, "world_size": env.world_size,
                 "bad_samples": bad_total, "nonfinite_steps": skipped_total, "tokenizer": tokenizer,
                 "teacher": teacher_id, "schedule": schedule}
        extra = ()
        if stream_loader is not None:  # each rank's read positions, as of the batches this checkpoint covers
            state["stream"], state["skipped_shards"] = stream_id, shards_total
            extra = [streaming.write_state(ckpt.checkpoint_dir(run_dir) / ckpt.ds_checkpoint.tag_for(step),
                                           stream_loader)]
        ckpt.save(engine, run_dir, step, state, keep=t.ckpt_keep, is_rank0=rank0, extra_files=extra)
        last_save = time.monotonic()
        sink.event(event="checkpoint", step=step)

    norm_student = _normalizer(cfg.data.mean, cfg.data.std, compute_dtype, device)
    norm_teacher = _normalizer(spec.mean, spec.std, torch_dtype(plan.teacher_dtype), device)
    engine.train()
    loop_start = time.perf_counter()
    for batch in loader:
        if micro == 0:
            torch.manual_seed(t.seed * 1_000_003 + step * 1009 + env.rank)  # drop-path etc.: stateless per step
            lr = lr_at(step, plan.lr, warmup, total_steps, cfg.optim.min_lr)
            ds_engine.set_lr(engine, lr)
        views = {s: v.to(device, non_blocking=True) for s, v in zip(sizes, batch["views"])}
        student_in = norm_student(views[m.img_size])
        teacher_in = norm_teacher(views[spec.image_size])
        with torch.no_grad():
            tokens, cls = teacher(teacher_in)
        tokens, cls = student_targets(tokens, cls, compute_dtype)
        valid = ds_engine.to_device(batch["valid"], device).float()
        bad_log.add(batch, step + 1)
        record_trained(batch, step + 1, env.rank)
        gen_per_sample, dis_per_sample = engine(student_in, tokens, cls, ds_engine.to_device(batch["order"], device))
        n_valid = valid.sum().clamp(min=1.0)
        gen = (gen_per_sample * valid).sum() / n_valid
        dis = (dis_per_sample * valid).sum() / n_valid
        if fault_active("nan", step + 1, env.rank, micro):
            gen = gen * float("nan")
        step_acc += torch.stack([gen.detach().double() * valid.sum(), dis.detach().double() * valid.sum(),
                                 valid.sum().double()])
        acc[3] += (1 - valid).sum().double()
        if batch.get("shard_problems"):
            acc[4] += len(batch["shard_problems"])
        # every rank runs every backward; whether the step's update is applied, and the signal and clock flags
        # (any rank's signal and rank 0's clock decide for everyone), are agreed once, at its end: one all-reduce
        # and one host wait, behind the queued optimizer step
        last = micro + 1 == plan.accum
        flags = ()
        if last:
            fault("sleep", step + 1, env.rank)
            fault("term", step + 1, env.rank)
            fault("crash", step + 1, env.rank)
            flags = (float(signals.code), float(rank0 and t.ckpt_every_minutes > 0 and
                                                time.monotonic() - last_save >= 60 * t.ckpt_every_minutes))
        end = ds_engine.micro_step(engine, gen + dis, nonfinite, last=last, flags=flags)
        micro += 1
        if micro < plan.accum:
            continue
        micro = 0
        step_failed = not end.applied
        signal_code, save_due = end.flags
        if end.applied:  # a skipped step's micro-batches count in no loss
            acc[:3] += step_acc
        step_acc.zero_()
        step += 1
        steps_since += 1
        sink.advance()
        if t.compile and step == start_step + 1:  # the first step compiles every block: its time is the cold compile
            sink.event(event="compiled", step=step, first_step_s=round(time.perf_counter() - loop_start, 3))
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
            bad_log.flush()
            if acc[2] > 0:
                gen_l, dis_l = (acc[0] / acc[2]).item(), (acc[1] / acc[2]).item()
            else:  # every step since the last line was skipped (non-finite) or every sample was bad
                gen_l = dis_l = None
            bad_total += int(acc[3].item())
            shards_total += int(acc[4].item())
            elapsed = time.perf_counter() - t_last
            ips = steps_since * t.global_batch / elapsed
            rec = {"gen_loss": gen_l, "dis_loss": dis_l, "loss": None if gen_l is None else gen_l + dis_l, "lr": lr,
                   "grad_norm": ds_engine.grad_norm(engine), "images_per_s": ips, "bad_samples": bad_total,
                   "nonfinite_steps": skipped_total, "epoch": step / steps_per_epoch,
                   "step_time_s": elapsed / steps_since}
            if stream_mode:
                rec["skipped_shards"] = shards_total
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
        if step % t.ckpt_every == 0 or step == total_steps or signal_code > 0 or save_due > 0:
            checkpoint_now()
        if t.probe_every > 0 and (step % t.probe_every == 0 or step == total_steps):
            from .probe import knn_monitor

            sink.log(step, knn_monitor(engine.module.encoder, *probe_sets, probe_classes, m.img_size, t.micro_batch,
                                       device, compute_dtype, cfg.data.mean, cfg.data.std,
                                       num_workers=cfg.data.num_workers))
        if signal_code > 0 and step < total_steps:
            outcome = "signal"
            agreed = SignalFlag.name_of(signal_code)
            sink.event(event="signal", step=step, signal=agreed)
            break
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
    return {"steps": step, "history": history, "run_dir": str(run_dir)}

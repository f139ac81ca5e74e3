"""The run harness: one training loop for every task. It owns a run; a :class:`Task` supplies only what is its own.

    harness                                         task (pretraining, fine-tuning, segmentation, ...)
    -------------------------------------------     ------------------------------------------------------------
    launcher environment, cheap checks              plan(env): the task's checks (no torch work, no weights)
    pipe: commands said once                        pipe_sources(): the sources that may run shell commands
                                                    prepare(env): scan data, read weights -> steps, warm-up
    resume state: tag and marker read once
      (batch, seed, tokenizer, config, schedule)    resume_config(), check_resume(state)
    finished? -> one line, nothing started          finished_line(done, total)
    processes and devices, signals, the lock
                                                    started(run): checks that need the process group, run files
    config.yaml (atomic)                            run_config()
                                                    build(run) -> model, DeepSpeed config; build_optimizer(...)
    the engine, resumed from the verified tag
                                                    attach(run): what the step needs (engine, normalisers)
                                                    resumed(run): EMA, best-so-far, data loaders
    metrics sink, bad_samples.jsonl, start event    start_fields(), bad_sample_source()
    per micro-batch: lr (micro 0), seeds,           batches(run) -> inputs(batch) -> targets(inputs)
      fault hooks, micro-step (non-finite verdict,    -> loss(inputs, targets) -> (loss, statistics, valid)
      signal and clock agreed at the step's end)
    per step: non-finite policy (skip, streak,      after_step(applied): EMA, BatchNorm statistics
      rollback), metrics line,                      log_fields(sums), log_extra(rec, images_per_s)
      evaluation when due,                          evaluate_due(step), evaluate(run, step)
      checkpoint (steps, minutes, signal, end),     checkpoint_due(step), client_state(), checkpoint_files(tag_dir)
      stop on a signal
    teardown on every exit path                     summary()

What the harness decides the same way for every task:

- **Seeds**: before each micro-batch torch's, numpy's and Python's generators are seeded with 64 bits drawn
  from numpy's ``SeedSequence([seed, step, micro, rank])`` (:func:`step_seed`): drop path, dropout, mixup, erasing
  are functions of (seed, step, micro-batch, rank), so a resumed run reproduces the uninterrupted one, and no two
  (step, micro-batch, rank) share a seed (the loops' former ``seed * 1_000_003 + step * 1009 + micro * 7 + rank``
  gave rank 7's first micro-batch the seed of rank 0's second, and rank 1009 the seed of the next step).
- **Non-finite losses**: a step whose loss is non-finite on any rank is skipped on every rank
  (:func:`megadigpt.distributed.engine.micro_step`); more than ``train.nan_tolerance`` in a row roll
  ``checkpoints/latest`` back to the last checkpoint before the streak and stop with :class:`TrainingDiverged`
  (exit 3).
- **Checkpoints**: every ``train.ckpt_every`` steps, every ``train.ckpt_every_minutes`` (rank 0's clock, agreed
  at the step's end), on SIGTERM / SIGUSR1 / the launcher's end (any rank's signal), at the end, and where the
  task asks (fine-tuning: each epoch; segmentation: each evaluation). A signal ends the run with
  :class:`Checkpointed` (exit 75) after that checkpoint.
- **Fault hooks** (tests only, :mod:`megadigpt.testing`): ``nan`` (the loss of a step/rank/micro-batch), ``sleep``,
  ``term`` and ``crash`` (at a step's end), the same for every task.
- **Teardown**: the signal handlers restored, the metrics sink closed and the run-directory lock released on
  every exit path, exceptions included; the process group is left (with a barrier) only after a clean end (a
  failing rank's peers may sit in a collective).

Written here, not taken from a trainer library (Lightning, Accelerate, HF Trainer, torchtitan): those own the
model wrapping, the precision and the checkpoint format that megadigpt keeps in its own, tested modules (DeepSpeed
engines, :mod:`megadigpt.checkpoint`); the loop itself is what is shared. The shape is torchtitan's ``Trainer``
with a task overriding only the step, and lingua's / big_vision's library owning checkpoints, metrics and signals.
"""

import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, List, Optional

from ..config import dump_config
from ..distributed import env as dist_env
from ..safe_fs import announce_commands, pipe_commands, write_atomic
from .runtime import Checkpointed, SignalFlag, TrainingDiverged


@dataclass
class Schedule:
    """What :meth:`Task.prepare` resolves: the run's length in optimizer steps, an epoch's (a float where the
    epoch is counted in images, pretraining; None where it is unknown) and the warm-up (at most the run's length;
    ``warmup_requested``: the configured warm-up before that clamp, said once where it was longer)."""

    total_steps: int
    steps_per_epoch: Optional[float]
    warmup: float
    warmup_requested: Optional[float] = None


@dataclass
class Run:
    """The state the harness shares with its task: set as the run starts (``device`` after the processes,
    ``engine``, ``tag``, ``marker``, ``start_step`` after the engine, ``sink`` after the start event)."""

    cfg: Any
    env: Any
    plan: Any
    run_dir: Path
    rank0: bool
    schedule: Schedule
    resume: Any = None  # checkpoint.ResumeState: tag and marker read once before anything heavy
    device: Any = None
    engine: Any = None
    tag: Optional[str] = None
    marker: Optional[dict] = None
    universal: bool = False
    start_step: int = 0
    step: int = 0
    ds_config: Optional[dict] = None
    compute_dtype: Any = None
    sink: Any = None
    history: List[tuple] = field(default_factory=list)
    wandb: Optional[dict] = None  # the W&B run's settings (metrics.wandb_preflight), None: no W&B
    start_notes: dict = field(default_factory=dict)  # fields the harness adds to the start event (warm-up clamped)

    @property
    def world(self) -> int:
        return self.env.world_size

    def epoch(self, step: Optional[int] = None) -> Optional[float]:
        """Epochs done at ``step`` (None where the epoch's size is unknown: a stream without one)."""
        if not self.schedule.steps_per_epoch:
            return None
        return (self.step if step is None else step) / self.schedule.steps_per_epoch


class Task:
    """What one job supplies to the harness (see the module docstring for when each is called). Subclasses set
    ``name`` (said in messages) and override what is their own; the defaults do nothing."""

    name = "task"
    loss_key = "loss"  # the metrics.jsonl key of the training loss: the progress bar, the summary line, HParams
    tokenizer: Optional[str] = None  # a discrete target's codebook fingerprint (pretraining), kept in the markers
    counts_shards = False  # the loader skips whole shards (stream mode): counted in the metrics and the markers

    def __init__(self, cfg):
        self.cfg = cfg
        self.plan = None

    # ---------------------------------------------------------------- before anything heavy
    def plan_run(self, env):
        """Every check that needs no weights, no decoding and no process group -> the plan (``.lr``,
        ``.accum``, ``.device_type``, ``.precision``)."""
        raise NotImplementedError

    def pipe_sources(self) -> tuple:
        """Config values that may be ``pipe:`` sources (their shell commands are said before any runs)."""
        return tuple(vars(self.cfg.data).values())

    def prepare(self, env) -> Schedule:
        """Read what the run needs before the resume checks (data listings, weights, labels) -> the schedule."""
        raise NotImplementedError

    def run_config(self):
        """The config written to ``config.yaml`` (resolved where the task resolves values from the weights)."""
        return self.cfg

    def resume_config(self):
        """The config a resumed run's ``config.yaml`` must agree with (:func:`megadigpt.config.check_resume_config`)."""
        return self.run_config()

    def check_resume(self, resume):
        """The task's own checks of the checkpoint it would resume (``resume``: checkpoint.ResumeState)."""

    def finished_line(self, run_dir: Path, done: int, total: int) -> str:
        return f"{run_dir} is already finished: step {done} of {total}; nothing to do"

    # ---------------------------------------------------------------- start-up
    def started(self, run: Run):
        """The process group is up and the run directory locked: checks every rank must agree on, run files."""

    def build(self, run: Run):
        """-> (model, DeepSpeed config): the model as plain PyTorch, with its initial weights."""
        raise NotImplementedError

    def build_optimizer(self, run: Run, model, ds_config: dict):
        raise NotImplementedError

    def attach(self, run: Run):
        """The engine exists (``run.engine``): keep what the step needs. ``megadigpt bench`` calls it too, then
        times :meth:`inputs`, :meth:`targets`, :meth:`loss`, the engine's backward and step, :meth:`after_step`."""

    def resumed(self, run: Run):
        """The engine exists (``run.engine``; ``run.tag`` / ``run.marker``: the checkpoint it resumed, or None):
        restore the task's own state and build its data."""

    def bad_sample_source(self):
        """-> (samples the loader's batch keys index, the listing's problems) for ``bad_samples.jsonl``."""
        return [], []

    def start_fields(self, run: Run) -> dict:
        return {}

    # ---------------------------------------------------------------- the step
    def batches(self, run: Run) -> Iterator[dict]:
        """The micro-batches from ``run.start_step`` on, ``plan.accum`` per optimizer step."""
        raise NotImplementedError

    def lr_at(self, step: int) -> float:
        raise NotImplementedError

    def inputs(self, batch: dict):
        """The batch on the device, as the model takes it (augmentations that run on the device included)."""
        raise NotImplementedError

    def targets(self, inputs):
        """What the loss compares with that the batch does not hold (pretraining: the teacher's features)."""
        return None

    def loss(self, inputs, targets):
        """-> (the micro-batch's loss, its statistics as a float64 vector of weighted sums whose last entry is the
        weight (valid samples), the valid-sample mask as floats)."""
        raise NotImplementedError

    def after_step(self, applied: bool):
        """After each optimizer step, applied (finite) or skipped: EMA, BatchNorm statistics."""

    def log_fields(self, sums) -> dict:
        """The metrics line's loss fields from the summed statistics (all ranks, since the last line)."""
        return {}

    def log_extra(self, rec: dict, images_per_s: float):
        """Fields added after the harness's own (throughput, MFU, loader counters)."""

    def evaluate_due(self, step: int) -> bool:
        return False

    def evaluate(self, run: Run, step: int):
        """Evaluate (and export) at ``step``: log with ``run.sink``, keep records in ``run.history``."""

    def checkpoint_due(self, step: int) -> bool:
        """Checkpoints the task asks for beyond the harness's (steps, minutes, signals, the end)."""
        return False

    def client_state(self, run: Run) -> dict:
        """The task's fields of the checkpoint marker (restored from ``run.marker`` in :meth:`resumed`)."""
        return {}

    def checkpoint_files(self, run: Run, tag_dir: Path) -> list:
        """Files the task writes into the tag folder before the marker (the marker lists and checks them)."""
        return []

    def summary(self) -> dict:
        return {}

    @property
    def val_metric(self) -> Optional[str]:
        """The metrics.jsonl key of the run's validation number (fine-tuning ``val_top1``, segmentation
        ``val_mIoU``, pretraining with the k-NN monitor ``knn_top1``; None: none): on the progress bar, in the
        summary line and as an HParams metric."""
        return None

    def best_value(self) -> Optional[tuple]:
        """(best :attr:`val_metric`, its step) over the whole run, where the task keeps that record across resumes
        (the transfer tasks' best-so-far); None: the summary line says the best this process logged."""
        best = (self.summary().get("best") or {}).get("best") or {}
        key = (self.val_metric or "").removeprefix("val_")  # (the best-so-far record's own key)
        return (best[key], best.get("step")) if key in best else None


def epoch_batches(make_loader, steps_per_epoch: int, accum: int, start_step: int) -> Iterator[dict]:
    """Micro-batches over epochs from ``start_step`` on: ``make_loader(epoch, skip)`` builds an epoch's loader that
    skips the first ``skip`` micro-batches (a resume mid-epoch); the tail that makes no full step is dropped; a
    loader that ends early is an error (RuntimeError). Each loader is closed when its epoch ends or the consumer
    stops."""
    epoch, first = start_step // steps_per_epoch, (start_step % steps_per_epoch) * accum
    while True:
        loader, want, n = make_loader(epoch, first), steps_per_epoch * accum - first, 0
        try:
            for batch in loader:
                if n >= want:
                    break  # the tail that makes no full step
                yield batch
                n += 1
        finally:
            if hasattr(loader, "close"):
                loader.close()
        if n < want:
            raise RuntimeError(f"the epoch {epoch} loader ended early ({n} of {want} micro-batches)")
        epoch, first = epoch + 1, 0


def step_seed(seed: int, step: int, micro: int, rank: int) -> int:
    """A 64-bit seed for one micro-batch of one rank: numpy's SeedSequence hashes the four numbers, so distinct
    tuples collide only by chance (about n^2 / 2^65 for n tuples), for any number of ranks and micro-batches."""
    import numpy as np

    lo, hi = np.random.SeedSequence([seed, step, micro, rank]).generate_state(2)  # (train.seed: 0 .. 2^32-1)
    return int(lo) | int(hi) << 32


def seed_everything(seed: int):
    """torch's (CPU and every device), numpy's legacy global and Python's generators, from one 64-bit seed."""
    import numpy as np
    import torch

    torch.manual_seed(seed)  # drop path, dropout, erasing
    np.random.seed([seed & 0xFFFFFFFF, seed >> 32])  # timm's Mixup draws from numpy's global generator
    random.seed(seed)  # RandomErasing from Python's


def run(task: Task) -> dict:
    """Run (or resume) ``task`` to its end; returns ``{"steps", "history", "run_dir"}`` and the task's summary.
    Raises ConfigError (bad input, before anything heavy where it can be told), :class:`Checkpointed` (a signal:
    checkpointed, run the same command to resume) or :class:`TrainingDiverged`."""
    from .. import checkpoint as ckpt
    from ..config import check_resume_config

    from .metrics import wandb_preflight

    t_start = time.monotonic()
    cfg, env = task.cfg, dist_env.discover()
    t = cfg.train
    task.plan = plan = task.plan_run(env)  # everything cheap is checked before anything heavy starts
    wandb = wandb_preflight(cfg)  # an online W&B run without credentials: one line now, not after the engine
    run_dir = Path(t.run_dir)
    rank0 = env.rank == 0
    # pipe: sources run shell commands: said once, before the first one runs, and recorded in the start event
    commands = announce_commands(pipe_commands(*task.pipe_sources()), rank0)
    sched = task.prepare(env)
    resume = ckpt.ResumeState.read(run_dir)  # the tag and its marker, read once: every question below asks them
    resume.check(t, task.tokenizer)
    if resume.tag:  # a checkpoint of another network: one line now, not DeepSpeed's traceback later
        check_resume_config(run_dir, task.resume_config())
        task.check_resume(resume)
    schedule = {"total_steps": sched.total_steps, "warmup_steps": round(float(sched.warmup), 6),
                "peak_lr": plan.lr, "min_lr": cfg.optim.min_lr}
    schedule_changes = resume.schedule_changes(schedule, t.allow_schedule_change)
    done = resume.finished(sched.total_steps)
    if done is not None:  # rerunning a finished run: said now, not after the engine and the data are built
        if rank0:
            print(f"megadigpt: {task.finished_line(run_dir, done, sched.total_steps)}", flush=True)
        return {"steps": done, "history": [], "run_dir": str(run_dir), "finished": True, **task.summary()}

    notes = {}  # (said once training starts, in _loop: a refused run says only why it was refused)
    if sched.warmup_requested is not None and sched.warmup_requested > sched.total_steps:
        notes["warmup_clamped_from"] = round(float(sched.warmup_requested), 6)

    from ..distributed import engine as ds_engine
    from .common import torch_dtype
    from .runtime import hold_run_dir, release

    r = Run(cfg, env, plan, run_dir, rank0, sched, resume, wandb=wandb, start_notes=notes)
    r.device = ds_engine.start_processes(env, plan.device_type)
    signals = SignalFlag()  # from here on a signal means: checkpoint after the first step that completes
    locked = clean = False
    try:
        hold_run_dir(run_dir, rank0)  # one run per directory: a second one stops here, on every rank
        locked = True
        task.started(r)
        if rank0:
            write_atomic(run_dir / "config.yaml", dump_config(task.run_config()), root=run_dir, what="run config")
        model, ds_config = task.build(r)
        optimizer = task.build_optimizer(r, model, ds_config)
        r.ds_config = ds_config
        # what to resume from: the newest tag that verifies (checksums); another world size: a universal checkpoint
        r.engine, r.tag, r.marker, r.universal = ckpt.start_engine(model, optimizer, ds_config, run_dir, t,
                                                                   env.world_size, rank0, task.tokenizer,
                                                                   checked=True)
        r.start_step = r.step = int(r.marker["step"]) if r.tag else 0
        r.compute_dtype = torch_dtype(plan.precision)
        task.attach(r)
        task.resumed(r)
        outcome, detail = _loop(task, r, signals, schedule, schedule_changes, commands)
        clean = True
    finally:
        signals.restore()
        if r.sink is not None:
            r.sink.close(failed=not clean)
        if clean:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.barrier()
                dist.destroy_process_group()
        if locked:
            release(run_dir)
    if outcome == "diverged":
        raise TrainingDiverged(detail)
    if outcome == "signal":
        raise Checkpointed(r.step, detail)
    if rank0:  # a clean end (a signal or a divergence ends with its own line: where it stopped, how to go on)
        from .metrics import summary_line

        best = task.best_value() or r.sink.best_val  # the task's record over resumes, else this process's
        print("megadigpt: " + summary_line(task.name, r.step, sched.total_steps, r.history, task.loss_key,
                                           task.val_metric, best, time.monotonic() - t_start, run_dir), flush=True)
    return {"steps": r.step, "history": r.history, "run_dir": str(run_dir), **task.summary()}


def _loop(task: Task, r: Run, signals: SignalFlag, schedule: dict, schedule_changes: list, commands) -> tuple:
    """The steps, from ``r.start_step`` to the end, a signal or a divergence -> (outcome, detail)."""
    import torch
    import torch.distributed as dist

    from .. import checkpoint as ckpt
    from ..data.bad_samples import BadSampleLog
    from ..distributed import engine as ds_engine
    from ..testing import active as fault_active
    from ..testing import fault, record_trained
    from .metrics import MetricsSink

    cfg, env, plan, device, engine = r.cfg, r.env, r.plan, r.device, r.engine
    t, run_dir, rank0 = cfg.train, r.run_dir, r.rank0
    total, start_step = r.schedule.total_steps, r.start_step
    r.sink = sink = MetricsSink(run_dir, rank0, t.tensorboard, t.progress, total, start_step, wandb=r.wandb,
                                config=task.run_config().to_dict() if rank0 else None, loss_key=task.loss_key,
                                val_metric=task.val_metric)
    if schedule_changes and r.tag:
        sink.event(event="schedule_change", step=start_step, changes=schedule_changes, schedule=schedule)
    samples, problems = task.bad_sample_source()
    bad_log = BadSampleLog(run_dir, samples, env.rank, start_step, problems, device)  # bad_samples.jsonl
    sink.event(event="resume" if r.tag else "start", step=start_step, world_size=env.world_size,
               **ds_engine.where(), pipe_commands=commands, total_steps=total, accum=plan.accum,
               precision=plan.precision, checkpoint=r.tag, universal=r.universal, schedule=schedule,
               wandb=({k: v for k, v in r.wandb.items() if k in ("mode", "project", "entity", "group", "name")}
                      if r.wandb else None), **r.start_notes, **task.start_fields(r))
    if rank0 and "warmup_clamped_from" in r.start_notes:  # the lr rises over the whole run, never decays: said
        print(f"megadigpt: warning: the warm-up ({r.start_notes['warmup_clamped_from']:g} steps) is longer than the "
              f"run ({total} steps); it is clamped to the run: the lr rises for the whole run and never decays "
              f"(shorten optim.warmup_steps / optim.warmup_epochs)", file=sys.stderr, flush=True)

    marker = r.marker or {}
    bad_total = int(marker.get("bad_samples", 0))
    skipped_total = int(marker.get("nonfinite_steps", 0))
    shards_total = int(marker.get("skipped_shards", 0))  # stream mode: shards skipped after their retries
    acc = stats = None  # the task's statistics (+ bad samples, bad shards) since the last line; this step's
    nonfinite = torch.zeros(1, device=device)  # this step's non-finite losses, agreed on at its end
    step, micro, lr = start_step, 0, None
    streak_start, last_save = None, time.monotonic()
    t_last, steps_since = time.perf_counter(), 0

    def checkpoint_now():
        nonlocal last_save
        bad_log.flush()  # before the checkpoint: the records of the steps it covers are on disk
        state = {"step": step, "global_batch": t.global_batch, "seed": t.seed, "world_size": env.world_size,
                 "epoch": r.epoch(step), "bad_samples": bad_total, "nonfinite_steps": skipped_total,
                 "tokenizer": task.tokenizer, "schedule": schedule, **task.client_state(r)}
        if task.counts_shards:
            state["skipped_shards"] = shards_total
        tag_dir = ckpt.checkpoint_dir(run_dir) / ckpt.ds_checkpoint.tag_for(step)
        extra = task.checkpoint_files(r, tag_dir)  # inside the tag folder before the completeness marker
        ckpt.save(engine, run_dir, step, state, keep=t.ckpt_keep, is_rank0=rank0, extra_files=extra)
        last_save = time.monotonic()
        sink.event(event="checkpoint", step=step)

    engine.train()
    batches = task.batches(r)
    loop_start = time.perf_counter()
    try:
        for batch in batches:
            if micro == 0:
                lr = task.lr_at(step)
                ds_engine.set_lr(engine, lr)
            seed_everything(step_seed(t.seed, step, micro, env.rank))  # stateless per (step, micro-batch, rank)
            bad_log.add(batch, step + 1)
            record_trained(batch, step + 1, env.rank)
            inputs = task.inputs(batch)
            loss, mine, valid = task.loss(inputs, task.targets(inputs))
            if fault_active("nan", step + 1, env.rank, micro):
                loss = loss * float("nan")
            if acc is None:
                stats = torch.zeros(len(mine), dtype=torch.float64, device=device)
                acc = torch.zeros(len(mine) + 2, dtype=torch.float64, device=device)
            stats += mine
            acc[-2] += (1 - valid).sum().double()
            if batch.get("shard_problems"):
                acc[-1] += len(batch["shard_problems"])
            # every rank runs every backward; whether the step's update is applied, and the signal and clock flags
            # (any rank's signal and rank 0's clock decide for everyone), are agreed once, at its end: one
            # all-reduce and one host wait, behind the queued optimizer step
            last = micro + 1 == plan.accum
            flags = ()
            if last:
                fault("sleep", step + 1, env.rank)
                fault("term", step + 1, env.rank)
                fault("crash", step + 1, env.rank)
                flags = (float(signals.code), float(rank0 and t.ckpt_every_minutes > 0 and
                                                    time.monotonic() - last_save >= 60 * t.ckpt_every_minutes))
            end = ds_engine.micro_step(engine, loss, nonfinite, last=last, flags=flags)
            micro += 1
            if micro < plan.accum:
                continue
            micro = 0
            signal_code, save_due = end.flags
            if end.applied:  # a skipped step's micro-batches count in no loss
                acc[:-2] += stats
            stats.zero_()
            task.after_step(end.applied)
            step += 1
            r.step = step
            steps_since += 1
            sink.advance()
            if t.compile and step == start_step + 1:  # the first step compiles every block: the cold compile
                sink.event(event="compiled", step=step, first_step_s=round(time.perf_counter() - loop_start, 3))
            if not end.applied:
                skipped_total += 1
                streak_start = streak_start or step
                sink.event(event="nonfinite_loss", step=step, skipped_steps=skipped_total)
                if step - streak_start + 1 > t.nan_tolerance:
                    return "diverged", _roll_back(r, streak_start, step)
            else:
                streak_start = None
            if step % t.log_every == 0 or step == total:
                dist.all_reduce(acc)
                bad_log.flush()
                bad_total += int(acc[-2].item())
                shards_total += int(acc[-1].item())
                elapsed = time.perf_counter() - t_last
                ips = steps_since * t.global_batch / elapsed
                rec = {**task.log_fields(acc[:-2]), "lr": lr, "grad_norm": ds_engine.grad_norm(engine),
                       "images_per_s": ips, "bad_samples": bad_total, "nonfinite_steps": skipped_total,
                       "epoch": r.epoch(step), "step_time_s": elapsed / steps_since, **_memory(device)}
                task.log_extra(rec, ips)
                if task.counts_shards:
                    rec["skipped_shards"] = shards_total
                sink.log(step, rec)
                r.history.append((step, rec))
                acc.zero_()
                t_last, steps_since = time.perf_counter(), 0
            if task.evaluate_due(step):
                task.evaluate(r, step)
            if (step % t.ckpt_every == 0 or step == total or signal_code > 0 or save_due > 0
                    or task.checkpoint_due(step)):
                checkpoint_now()
            if signal_code > 0 and step < total:
                agreed = SignalFlag.name_of(signal_code)
                sink.event(event="signal", step=step, signal=agreed)
                return "signal", agreed
            if step >= total:
                break
    finally:
        if hasattr(batches, "close"):
            batches.close()
    sink.event(event="done", step=step)
    return "done", None


def _memory(device) -> dict:
    """This rank's peak memory so far, in GiB: the host's resident set (``getrusage``: the process's high-water
    mark) and, on a GPU, the allocator's peak (``max_memory_allocated``): what ``megadigpt report`` plots."""
    import resource

    out = {"host_peak_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 4)}  # KiB (Linux)
    if getattr(device, "type", None) == "cuda":
        import torch

        out["device_peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 4)
    return out


def _roll_back(r: Run, streak_start: int, step: int) -> str:
    """More than ``train.nan_tolerance`` non-finite steps in a row: ``checkpoints/latest`` goes back to the last
    checkpoint before the streak (a checkpoint written during it holds weights the failing steps led to). Returns
    the message of :class:`TrainingDiverged`."""
    from .. import checkpoint as ckpt

    good = [g for g in ckpt.complete_tags(r.run_dir) if int(g[5:]) < streak_start]
    if r.rank0 and good:
        ckpt.set_latest(r.run_dir, good[-1])
    r.sink.event(event="rollback", step=step, to=good[-1] if good else None)
    r.sink.event(event="diverged", step=step)
    return (f"non-finite loss at steps {streak_start}..{step}; "
            + (f"rolled back {r.run_dir}/checkpoints/latest to {good[-1]}" if good
               else "no checkpoint precedes the failures")
            + "; lower the lr or check the data, then run the same command to resume")

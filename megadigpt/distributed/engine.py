"""The DeepSpeed engine: config from a JSON template in ds_configs/, process group, initialize."""

import contextlib
import json
import math
import os
import warnings
from pathlib import Path
from typing import NamedTuple, Optional, Sequence, Tuple

import torch

from ..config import ConfigError

_PKG = Path(__file__).resolve().parent.parent
# setup.py installs the top-level ds_configs/ as megadigpt/ds_configs; a source checkout has it beside the package
DS_CONFIG_DIR = next((d for d in (_PKG / "ds_configs", _PKG.parent / "ds_configs") if d.is_dir()), _PKG / "ds_configs")


def template_path(zero_stage: int, path: Optional[str] = None) -> Path:
    p = Path(path) if path else DS_CONFIG_DIR / f"zero{zero_stage}.json"
    if not p.is_file():
        raise ConfigError(f"DeepSpeed config template not found: {p}")
    try:  # parsed here too, so that plan_run refuses a damaged template before anything heavy
        ok = isinstance(json.loads(p.read_bytes().decode("utf-8")), dict)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"DeepSpeed config template {p} is not valid JSON: {(str(e).splitlines() or [''])[0]}")
    if not ok:
        raise ConfigError(f"DeepSpeed config template {p} is not a JSON object")
    return p


BUCKET_KEYS = ("reduce_bucket_size", "allgather_bucket_size", "stage3_prefetch_bucket_size")
BUCKET_FRACTION, BUCKET_MIN, BUCKET_MAX = 8, 2 ** 20, 50_000_000


def bucket_elements(params: int) -> int:
    """An "auto" ZeRO bucket (elements): an eighth of the trainable parameters, rounded up to 2^20 and between
    2^20 and 5e7. A bucket as large as the model (DeepSpeed's 5e8 default exceeds a whole ViT-L) leaves
    ``overlap_comm`` nothing to overlap and is allocated in full however small the model; ~8 buckets per step
    let the reduction of one run under the backward of the next; 2^20 keeps tiny models' collectives from being
    latency-bound, and 5e7 (100 MB in bf16, what ds_configs/zero3.json shipped) already saturates NCCL's
    bandwidth while keeping ViT-g/e's buckets (ZeRO-3's lives for good, in fp32) small."""
    b = -(-max(1, params) // BUCKET_FRACTION)
    return int(min(BUCKET_MAX, max(BUCKET_MIN, -(-b // BUCKET_MIN) * BUCKET_MIN)))


def fill_buckets(ds: dict, params: int) -> dict:
    """Replace "auto" bucket sizes in ``ds["zero_optimization"]`` by :func:`bucket_elements` of ``params``
    (trainable parameters); explicit values win. The planner resolves a template through this too."""
    z = ds.get("zero_optimization", {})
    if any(z.get(k) == "auto" for k in BUCKET_KEYS):
        for k in BUCKET_KEYS:
            if z.get(k) == "auto":
                z[k] = bucket_elements(params)
    return ds


def build_ds_config(cfg, world_size: int, precision: str, params: Optional[int] = None) -> dict:
    """Fill a template with the run's batch geometry, precision and clipping; keys the template sets explicitly
    (other than "auto") win, so a user's JSON can tune buckets, offload, etc. "auto" bucket sizes follow the
    student's trainable parameter count ``params`` (None: counted on the meta device; see
    :func:`bucket_elements`)."""
    t = cfg.train
    try:
        ds = json.loads(template_path(t.zero_stage, t.ds_config).read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"DeepSpeed config template is not valid JSON: {e}")
    accum = t.global_batch // (t.micro_batch * world_size)
    fill = {
        "train_batch_size": t.global_batch,
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": cfg.optim.grad_clip,
    }
    for k, v in fill.items():
        if ds.get(k, "auto") == "auto":
            ds[k] = v
        elif ds[k] != v:
            raise ConfigError(f"DeepSpeed template sets {k}={ds[k]} but the megadigpt config implies {v}")
    ds.setdefault("zero_optimization", {})
    if ds["zero_optimization"].get("stage", "auto") == "auto":
        ds["zero_optimization"]["stage"] = t.zero_stage
    ds["bf16"] = {"enabled": precision == "bf16"}
    ds["fp16"] = {"enabled": precision == "fp16", **({"initial_scale_power": 16} if precision == "fp16" else {})}
    if precision != "fp32" and ds["zero_optimization"]["stage"] > 0:
        # accumulate and reduce gradients in fp32, not in the 16-bit model dtype (DeepSpeed's default): with
        # accumulation over many micro-batches bf16's 8-bit mantissa loses the small contributions. ZeRO-0 has no
        # fp32 accumulation in DeepSpeed (it refuses the mix): there the gradients stay in the model dtype.
        ds.setdefault("data_types", {}).setdefault("grad_accum_dtype", "fp32")
        ds.setdefault("communication_data_type", "fp32")
    z = ds["zero_optimization"]
    if params is None and any(z.get(k) == "auto" for k in BUCKET_KEYS):
        from ..sizing import student_params

        params = student_params(cfg)
    fill_buckets(ds, params)
    ds.setdefault("steps_per_print", 10 ** 9)  # megadigpt logs itself
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def device_index(local_rank: int, device_count: int) -> int:
    """This rank's GPU among those it can see: where SLURM shows each task only its own (``--gpus-per-task=1``,
    ``--gpu-bind``) every rank sees one device, index 0, whatever its local rank."""
    if device_count < 1:
        raise ConfigError("train.device=cuda but this process sees no CUDA device")
    return local_rank % device_count


def _slurm_tasks_on_node(spec: str, node_id: int) -> Optional[int]:
    """SLURM_TASKS_PER_NODE's format, e.g. ``2(x3),1``: the task count of node ``node_id`` of the allocation."""
    counts = []
    for part in spec.split(","):
        n, _, rep = part.partition("(x")
        try:
            counts += [int(n)] * (int(rep.rstrip(")")) if rep else 1)
        except ValueError:
            return None
    return counts[node_id] if 0 <= node_id < len(counts) else None


def local_world_size(environ, world_size: int = 1) -> int:
    """Ranks on this node, from whichever launcher started them (the sbatch template unsets LOCAL_WORLD_SIZE)."""
    for key in ("LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "SLURM_NTASKS_PER_NODE"):
        if str(environ.get(key, "")).isdigit():
            return max(1, int(environ[key]))
    for key in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        if environ.get(key):
            n = _slurm_tasks_on_node(environ[key], int(environ.get("SLURM_NODEID", 0) or 0))
            if n:
                return n
    return max(1, world_size)


def cpu_threads(affinity: int, environ, world_size: int = 1) -> int:
    """torch's intra-op threads for one rank. ``affinity``: the CPUs this process may run on
    (``len(os.sched_getaffinity(0))``; ``os.cpu_count()`` ignores cgroups and binding). Where srun bound each
    task to its own CPUs (SLURM_CPU_BIND_TYPE other than none) the mask is already this rank's share; otherwise
    the node's ranks share the mask."""
    bind = str(environ.get("SLURM_CPU_BIND_TYPE", "")).strip(", ")
    if bind and not bind.startswith("none"):
        return max(1, affinity)
    return max(1, affinity // local_world_size(environ, world_size))


def start_processes(env, device_type: str):
    """Export the launcher's rank variables, pick this rank's device and CPU threads, join the process group.
    Returns the device."""
    from . import env as dist_env

    dist_env.follow_launcher(env)  # before the rendezvous, which can wait for ever on a launcher that is gone
    # DeepSpeed's ZeRO calls torch's older collective names, one warning per rank and step
    warnings.filterwarnings("ignore", category=FutureWarning, message=r"`torch\.distributed\.\w+` is deprecated")
    device = pick_device(env, device_type)
    dist_env.export(env, device.index if device.type == "cuda" else None)  # LOCAL_RANK: the device DeepSpeed uses
    init_distributed(env, device_type)
    return device


def pick_device(env, device_type: str) -> torch.device:
    """This rank's device (made current: NCCL and the kernels use the current one) and its CPU threads."""
    if "OMP_NUM_THREADS" not in os.environ:  # the CPUs this rank may use, shared with its node's peers
        torch.set_num_threads(cpu_threads(len(os.sched_getaffinity(0)), os.environ, env.world_size))
    if device_type != "cuda":
        return torch.device("cpu")
    device = torch.device("cuda", device_index(env.local_rank, torch.cuda.device_count()))
    torch.cuda.set_device(device)
    return device


def resolve_device(device, current_index=None) -> torch.device:
    """``device`` with its index. A CUDA device named without one (``"cuda"``, ``torch.device("cuda")``) is the
    current device (the rank's, set by :func:`pick_device`). Everything that takes a device id rather than a
    device needs the index: DALI builds a CPU pipeline for ``device_id=None`` and ``feed_ndarray`` then copies its
    host output into a CUDA pointer. ``current_index``: the current device's index (default: torch's)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", (current_index or torch.cuda.current_device)())
    return device


def where() -> dict:
    """For a run's start event: the hosts the ranks run on (one collective) and the code they run."""
    import socket

    import torch.distributed as dist

    names = [None] * dist.get_world_size()
    dist.all_gather_object(names, socket.gethostname())
    return {"hosts": sorted(set(names)), "code": str(_PKG)}


def init_distributed(env, device_type: str):
    import deepspeed

    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, rank=env.rank,
                               world_size=env.world_size)
    return backend


def initialize(model, optimizer, ds_config: dict):
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    return engine


class StepEnd(NamedTuple):
    """What the ranks agreed on at a step's end: whether its update was applied, and the loop's own flags."""
    applied: bool
    flags: Tuple[float, ...]


def micro_step(engine, loss, nonfinite, last: bool, flags: Sequence[float] = ()) -> Optional[StepEnd]:
    """One micro-batch's backward and, on the last micro-batch of a step (``last``), the optimizer step, applied
    only if every rank's loss was finite on every micro-batch of the step.

    Every rank runs every backward, finite or not, so DeepSpeed's gradient reductions (ZeRO-0/1's all-reduce at the
    boundary, ZeRO-2/3's reduce-scatter) and its micro-step counters stay in lockstep on all ranks (skipping a
    backward skipped the boundary's all-reduce: each rank then stepped with its own gradients). ``nonfinite`` (a
    float tensor on the device) collects the step's non-finite losses without a host synchronisation; the ranks
    agree on it by one all-reduce (MAX) at the boundary, together with the loop's own per-step ``flags`` (host
    values: a signal's code, a clock's verdict), and it is zeroed for the next step.

    One device-to-host wait per step, after the optimizer step is queued: where the inner optimizer is one of
    torch's fused kernels, the agreed verdict goes to it on the device as ``found_inf`` (the mechanism of torch's
    GradScaler: the kernel leaves weights, moments and step counts unchanged when it is 1), so the step is queued
    without the host knowing the verdict, and the host reads verdict and flags once afterwards. Other optimizers
    (DeepSpeed's CPU Adam under offload) need the verdict first: the wait comes before the step, which then goes
    through DeepSpeed's whole ``step()`` with the inner optimizer's update suppressed. Either way a skipped step
    clears the accumulated gradients in every ZeRO buffer and advances global_steps, with no weight and no moment
    changed, identically on every rank, as DeepSpeed does for an fp16 overflow (counted in ``skipped_steps``).
    Returns None inside a step, else :class:`StepEnd`."""
    import torch.distributed as dist

    if engine.is_gradient_accumulation_boundary() != last:
        raise RuntimeError("megadigpt's micro-step count disagrees with DeepSpeed's accumulation boundary")
    nonfinite += (~torch.isfinite(loss.detach())).float()
    engine.backward(loss)
    if not last:
        engine.step()  # counts the micro-step; no update inside a step
        return None
    agreed = nonfinite
    if flags:
        host = torch.tensor([float(f) for f in flags], dtype=nonfinite.dtype,
                            pin_memory=nonfinite.device.type == "cuda")
        agreed = torch.cat([nonfinite.reshape(1), host.to(nonfinite.device, non_blocking=True)])
    dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
    opt = engine.basic_optimizer
    if _masks_on_device(opt):
        opt.found_inf = (agreed[0] > 0).float()  # 0-d, 1.0: the fused kernel skips the whole update
        try:
            engine.step()
        finally:
            del opt.found_inf
        values = agreed.tolist()  # the step's one host synchronisation, behind the queued step
        applied = values[0] == 0
    else:
        values = agreed.tolist()  # the verdict is needed before the step
        applied = values[0] == 0
        if applied:
            engine.step()
        else:
            with _update_suppressed(engine):
                engine.step()
    nonfinite.zero_()
    if not applied and engine.was_step_applied():  # DeepSpeed did not skip it by itself (its fp16 check does)
        engine._step_applied = False
        engine.skipped_steps += 1
    return StepEnd(applied, tuple(values[1:]))


def _masks_on_device(opt) -> bool:
    """torch's fused Adam / AdamW / SGD read ``found_inf`` (a device tensor) and skip their update when it is 1."""
    return type(opt) in (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD) and opt.defaults.get("fused") is True


@contextlib.contextmanager
def _update_suppressed(engine):
    """The torch optimizer inside DeepSpeed's wrappers (ZeRO-0: the engine's own; ZeRO-1/2/3, bf16: the one they
    call on their fp32 partitions) does nothing: the wrappers copy back unchanged masters."""
    opt = engine.basic_optimizer
    own = vars(opt).get("step")  # e.g. an LR scheduler's wrapper: put back afterwards
    opt.step = lambda *args, **kwargs: None
    try:
        yield
    finally:
        if own is None:
            del opt.step
        else:
            opt.step = own


def to_device(t, device):
    """Host-to-device copy that does not block the host: from pinned memory (pinned here if the loader did not),
    on CUDA only (pinning needs a CUDA driver; on the CPU this is no copy at all)."""
    if device.type == "cuda" and t.device.type == "cpu":
        return (t if t.is_pinned() else t.pin_memory()).to(device, non_blocking=True)
    return t.to(device)


def set_lr(engine, lr: float):
    for group in engine.optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def grad_norm(engine) -> Optional[float]:
    """The last step's global gradient norm, or None for a step that was skipped (no update: no norm to report).
    DeepSpeed marks a non-finite norm as -1 (ZeRO-1/2, its clipping utilities) or inf/NaN elsewhere; a real norm
    is never negative, and metrics.jsonl must stay strict JSON (no NaN), so all of them are None."""
    if not engine.was_step_applied():
        return None
    try:
        g = engine.get_global_grad_norm()
    except Exception:  # noqa: BLE001 - not every stage exposes it
        return None
    if g is None:
        return None
    g = float(g.item() if torch.is_tensor(g) else g)
    return g if math.isfinite(g) and g >= 0 else None

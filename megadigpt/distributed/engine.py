"""The DeepSpeed engine: config from a JSON template in ds_configs/, process group, initialize."""

import json
import os
import warnings
from pathlib import Path
from typing import Optional

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


def build_ds_config(cfg, world_size: int, precision: str) -> dict:
    """Fill a template with the run's batch geometry, precision and clipping; keys the template sets explicitly
    (other than "auto") win, so a user's JSON can tune buckets, offload, etc."""
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
    ds.setdefault("steps_per_print", 10 ** 9)  # megadigpt logs itself
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def start_processes(env, device_type: str):
    """Export the launcher's rank variables, pick this rank's device and CPU threads, join the process group.
    Returns the device."""
    from . import env as dist_env

    dist_env.follow_launcher(env)  # before the rendezvous, which can wait for ever on a launcher that is gone
    dist_env.export(env)
    # DeepSpeed's ZeRO calls torch's older collective names, one warning per rank and step
    warnings.filterwarnings("ignore", category=FutureWarning, message=r"`torch\.distributed\.\w+` is deprecated")
    if "OMP_NUM_THREADS" not in os.environ:  # the cores of the node, shared by its ranks
        local = int(os.environ.get("LOCAL_WORLD_SIZE", env.world_size))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local)))
    if device_type == "cuda":
        torch.cuda.set_device(env.local_rank)
        device = torch.device("cuda", env.local_rank)
    else:
        device = torch.device("cpu")
    init_distributed(env, device_type)
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


def backward_if_finite(engine, loss, accum: int) -> bool:
    """Backward and step unless the loss is non-finite on any rank (every rank must agree before backward: one
    rank's NaN would poison everyone's gradients). A skipped micro-batch does no backward; with accumulation the
    step still goes on without it. Returns whether the micro-batch counted."""
    import torch.distributed as dist

    finite = torch.isfinite(loss.detach()).float()
    dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    if finite.item() == 1.0:
        engine.backward(loss)
        engine.step()
        return True
    if accum > 1:
        engine.step()
    return False


def set_lr(engine, lr: float):
    for group in engine.optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def grad_norm(engine) -> Optional[float]:
    try:
        g = engine.get_global_grad_norm()
    except Exception:  # noqa: BLE001 - not every stage exposes it
        return None
    if g is None:
        return None
    return float(g.item() if torch.is_tensor(g) else g)

"""AdamW parameter groups and the per-step learning-rate schedule of the reference (linear warm-up, half cosine)."""

import math
from typing import Optional

import torch


def param_groups(model: torch.nn.Module, weight_decay: float):
    """timm's rule, as the reference uses it: no weight decay on 1-D parameters (norms) and biases."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        ndim = len(getattr(p, "ds_shape", p.shape))  # a ZeRO-3-partitioned parameter's data is a 1-D placeholder
        (no_decay if ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


FUSED_DEVICES = ("cuda", "cpu")  # torch's fused AdamW kernels (apex's CUDA kernel now lives in torch; CPU since 2.4)


def offloads_optimizer(ds_config: Optional[dict]) -> bool:
    """Whether the resolved DeepSpeed config moves the optimizer step to the host (ZeRO-Offload / -Infinity)."""
    zero = (ds_config or {}).get("zero_optimization") or {}
    return str((zero.get("offload_optimizer") or {}).get("device", "none")).lower() in ("cpu", "nvme")


def choose_optimizer(ds_config: Optional[dict], device_type: str) -> str:
    """-> "cpu_adam" (DeepSpeedCPUAdam: DeepSpeed refuses any other client optimizer when the optimizer is
    offloaded, unless the config sets ``zero_force_ds_cpu_optimizer: false``), "fused" (torch's fused AdamW) or
    "torch" (torch's default AdamW)."""
    if offloads_optimizer(ds_config) and (ds_config or {}).get("zero_force_ds_cpu_optimizer", True):
        return "cpu_adam"
    return "fused" if device_type in FUSED_DEVICES else "torch"


def build_optimizer(model, ocfg, lr: float, device_type: str, groups=None, ds_config: Optional[dict] = None):
    """AdamW over ``groups`` (default: :func:`param_groups`), as :func:`choose_optimizer` picks for the resolved
    ``ds_config``: torch's fused kernel wherever torch has one (on CPU it measured 3.6x faster than the
    per-parameter loop for ViT-B's parameters, with the same results: tests/test_optim.py), DeepSpeed's CPU Adam
    (AdamW mode, JIT-built on first use) when the optimizer step is offloaded to the host."""
    groups = groups if groups is not None else param_groups(model, ocfg.weight_decay)
    kind = choose_optimizer(ds_config, device_type)
    if kind == "cpu_adam":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=lr, betas=tuple(ocfg.betas), eps=ocfg.eps, adamw_mode=True)
    kw = {"fused": True} if kind == "fused" else {}
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(ocfg.betas), eps=ocfg.eps, **kw)


def lr_at(step: int, peak: float, warmup_steps: float, total_steps: int, min_lr: float = 0.0) -> float:
    """Learning rate for optimizer step ``step`` (0-based), as the reference's per-iteration schedule."""
    if step < warmup_steps:
        return peak * step / warmup_steps
    span = max(total_steps - warmup_steps, 1e-9)
    return min_lr + (peak - min_lr) * 0.5 * (1.0 + math.cos(math.pi * (step - warmup_steps) / span))

"""AdamW parameter groups and the per-step learning-rate schedule of the reference (linear warm-up, half cosine)."""

import math

import torch


def param_groups(model: torch.nn.Module, weight_decay: float):
    """timm's rule, as the reference uses it: no weight decay on 1-D parameters (norms) and biases."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def build_optimizer(model, ocfg, lr: float, device_type: str, groups=None):
    """AdamW over ``groups`` (default: :func:`param_groups`). torch's fused kernel on CUDA (apex's kernel now lives
    in torch); the plain loop on CPU."""
    kw = {"fused": True} if device_type == "cuda" else {"foreach": False}
    groups = groups if groups is not None else param_groups(model, ocfg.weight_decay)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(ocfg.betas), eps=ocfg.eps, **kw)


def lr_at(step: int, peak: float, warmup_steps: float, total_steps: int, min_lr: float = 0.0) -> float:
    """Learning rate for optimizer step ``step`` (0-based), as the reference's per-iteration schedule."""
    if step < warmup_steps:
        return peak * step / warmup_steps
    span = max(total_steps - warmup_steps, 1e-9)
    return min_lr + (peak - min_lr) * 0.5 * (1.0 + math.cos(math.pi * (step - warmup_steps) / span))

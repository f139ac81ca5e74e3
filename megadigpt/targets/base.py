from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn as nn

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)

KINDS = ("open_clip", "timm", "efficientnet_lite0", "pixels")
LAYERS = {"efficientnet_lite0": ("stride16", "stride32"), "pixels": ("norm", "rgb"), "open_clip": ("final",),
          "timm": ("final", "<block index>")}  # the first is each kind's default


@dataclass(frozen=True)
class TargetSpec:
    """What the student needs to know about a target, known before it is built."""

    image_size: int  # the teacher's input resolution
    grid: int  # tokens per side
    dim: int  # token width
    has_cls: bool
    mean: Tuple[float, float, float]  # the teacher's input normalisation
    std: Tuple[float, float, float]
    classes: Optional[int] = None  # discrete targets (target.tokenizer): codebook size; tokens are indices


def resolved_layer(tcfg) -> str:
    """target.layer, or the kind's default. ``stride16`` was every kind's default before layers existed for other
    kinds, so configs saved then (and configs that switch ``target.kind`` from EfficientNet) carry it: for the other
    kinds it reads as their default."""
    default = LAYERS.get(tcfg.kind, ("final",))[0]
    if tcfg.layer is None or (tcfg.layer == "stride16" and tcfg.kind != "efficientnet_lite0"):
        return default
    return str(tcfg.layer)


def example_targets(spec: TargetSpec, batch: int = 1, device=None):
    """(tokens, cls) shaped like the target's output (for FLOP counting and memory tracing, e.g. on meta)."""
    if spec.classes:
        return torch.zeros(batch, spec.grid ** 2, dtype=torch.long, device=device), None
    return (torch.zeros(batch, spec.grid ** 2, spec.dim, device=device),
            torch.zeros(batch, spec.dim, device=device) if spec.has_cls else None)


def student_targets(tokens: torch.Tensor, cls: Optional[torch.Tensor], dtype):
    """The teacher's output in the student's compute dtype (indices of discrete targets stay integers)."""
    if tokens.is_floating_point():
        tokens = tokens.to(dtype)
    return tokens, (cls.to(dtype) if cls is not None else None)


class Target(nn.Module):
    """Base of all targets: frozen, eval mode forever, no grads."""

    spec: TargetSpec

    def train(self, mode: bool = True):  # a teacher never leaves eval mode (BatchNorm, dropout)
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor):  # pragma: no cover - abstract
        raise NotImplementedError

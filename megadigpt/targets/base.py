from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import torch
import torch.nn as nn

from ..config import ConfigError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)

KINDS = ("open_clip", "timm", "efficientnet_lite0", "pixels")


@dataclass(frozen=True)
class TargetSpec:
    """What the student needs to know about a target, known before it is built."""

    image_size: int  # the teacher's input resolution
    grid: int  # tokens per side
    dim: int  # token width
    has_cls: bool
    mean: Tuple[float, float, float]  # the teacher's input normalisation
    std: Tuple[float, float, float]


class Target(nn.Module):
    """Base of all targets: frozen, eval mode forever, no grads."""

    spec: TargetSpec

    def train(self, mode: bool = True):  # a teacher never leaves eval mode (BatchNorm, dropout)
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor):  # pragma: no cover - abstract
        raise NotImplementedError


def _check_weights(path: Optional[str], what: str):
    if path is not None and not Path(path).is_file():
        raise ConfigError(f"{what} weights file not found: {path}")


def describe_target(tcfg, mcfg) -> TargetSpec:
    """Sizes of the configured target, from configs and small metadata only."""
    size = tcfg.image_size or mcfg.img_size
    if tcfg.kind == "pixels":
        p = tcfg.patch_size or mcfg.patch_size
        if size % p:
            raise ConfigError(f"target image_size {size} is not divisible by the pixel patch {p}")
        return TargetSpec(size, size // p, 3 * p * p, False, IMAGENET_MEAN, IMAGENET_STD)
    if tcfg.kind == "efficientnet_lite0":
        from .efficientnet import describe

        return describe(tcfg, size)
    if tcfg.kind == "open_clip":
        from .openclip import describe

        return describe(tcfg, size)
    if tcfg.kind == "timm":
        from .timm_target import describe

        return describe(tcfg, size)
    raise ConfigError(f"unknown target.kind {tcfg.kind!r}; choose one of {', '.join(KINDS)}")


def build_target(tcfg, mcfg, device=None, dtype=torch.float32) -> Target:
    spec = describe_target(tcfg, mcfg)
    if tcfg.kind == "pixels":
        from .pixels import PixelTarget

        t = PixelTarget(spec, tcfg.patch_size or mcfg.patch_size)
    elif tcfg.kind == "efficientnet_lite0":
        from .efficientnet import EfficientNetTarget

        t = EfficientNetTarget(spec, tcfg)
    elif tcfg.kind == "open_clip":
        from .openclip import OpenCLIPTarget

        t = OpenCLIPTarget(spec, tcfg)
    else:
        from .timm_target import TimmTarget

        t = TimmTarget(spec, tcfg)
    t.requires_grad_(False)
    return t.to(device=device, dtype=dtype).eval()

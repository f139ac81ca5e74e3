from dataclasses import dataclass, replace
from typing import Optional, Tuple

import torch
import torch.nn as nn

from ..config import ConfigError

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


def describe_target(tcfg, mcfg) -> TargetSpec:
    """Sizes of the configured target, from configs and small metadata only. With ``tcfg.tokenizer`` the codebook
    file is read and checked against the target (teacher, layer, resolution, width) here, before anything heavy."""
    spec = describe_features(tcfg, mcfg)
    if tcfg.tokenizer:
        from ..tokenizer.codebook import load_codebook

        book = load_codebook(tcfg.tokenizer)
        book.check_matches(tcfg, spec)
        spec = replace(spec, classes=book.k, has_cls=False)  # the CLS feature is not a codebook token
    return spec


def describe_features(tcfg, mcfg) -> TargetSpec:
    """Sizes of the feature target itself (``target.tokenizer`` not applied); its weights are checked too (no
    silent random teacher; the file opened safely, once)."""
    from .weights import check

    spec = _describe_kind(tcfg, mcfg)
    check(tcfg)
    return spec


def _describe_kind(tcfg, mcfg) -> TargetSpec:
    size = tcfg.image_size or mcfg.img_size
    kinds = LAYERS.get(tcfg.kind)
    if kinds is None:
        raise ConfigError(f"unknown target.kind {tcfg.kind!r}; choose one of {', '.join(KINDS)}")
    layer = resolved_layer(tcfg)
    if tcfg.kind != "timm" and layer not in kinds:
        raise ConfigError(f"target.layer {layer!r} unknown for {tcfg.kind}; choose {' | '.join(kinds)}")
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
    from .timm_target import describe

    return describe(tcfg, size)


def build_target(tcfg, mcfg, device=None, dtype=torch.float32) -> Target:
    """The frozen target in ``dtype`` on ``device``; with ``tcfg.tokenizer`` wrapped so that it returns codebook
    indices (the assignment runs in fp32 whatever ``dtype`` is)."""
    spec = describe_features(tcfg, mcfg)
    try:
        t = _build_features(tcfg, mcfg, spec, device, dtype)
    except ConfigError:
        raise
    except (RuntimeError, KeyError, ValueError, OSError) as e:  # e.g. weights of another architecture
        msg = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)[:300]
        raise ConfigError(f"target.weights {tcfg.weights or '(default)'} could not be loaded into {tcfg.kind} "
                          f"{tcfg.model or ''}: {msg}") from None
    t.requires_grad_(False)
    t = t.to(device=device, dtype=dtype).eval()
    if tcfg.tokenizer:
        from ..tokenizer.codebook import load_codebook
        from .discrete import TokenizedTarget

        book = load_codebook(tcfg.tokenizer)
        book.check_matches(tcfg, spec)
        t = TokenizedTarget(t, book.centroids).to(device)
    return t


def _build_features(tcfg, mcfg, spec, device=None, dtype=torch.float32) -> Target:
    """The feature target; an open_clip teacher is built straight in ``dtype`` on ``device`` (its image tower
    alone: see targets/openclip.py), the others on the host in fp32 and moved by :func:`build_target`."""
    if tcfg.kind == "pixels":
        from .pixels import PixelTarget

        return PixelTarget(spec, tcfg.patch_size or mcfg.patch_size, normalise=resolved_layer(tcfg) == "norm")
    if tcfg.kind == "efficientnet_lite0":
        from .efficientnet import EfficientNetTarget

        return EfficientNetTarget(spec, tcfg)
    if tcfg.kind == "open_clip":
        from .openclip import OpenCLIPTarget

        return OpenCLIPTarget(spec, tcfg, device, dtype)
    from .timm_target import TimmTarget

    return TimmTarget(spec, tcfg)

"""The configured target by kind: its sizes (:func:`describe_target`, from configs and small metadata) and the
built teacher (:func:`build_target`). Above ``base`` and every kind; the kinds are imported when asked for (their
libraries are heavy)."""

from dataclasses import replace

import torch

from ..config import ConfigError
from .base import IMAGENET_MEAN, IMAGENET_STD, KINDS, LAYERS, Target, TargetSpec, resolved_layer


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

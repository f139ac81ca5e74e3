"""Sizes of the configured models, counted on the meta device (nothing allocated): parameters, the largest block,
forward FLOPs per image. What DeepSpeed's "auto" bucket sizes follow (``distributed/engine.py``), what MFU divides
by (``train/metrics.py``) and what the memory planner sums (``perf/memory.py``); below all three. FLOPs are
counted on meta tensors: see ``train/metrics.py`` for why."""

from dataclasses import dataclass, replace
from typing import Dict, Optional

import torch

from .targets.base import example_targets


def count_flops(fn, *args) -> Optional[float]:
    """FLOPs of ``fn(*args)``. Pass a module and inputs on the meta device (see the module docstring: on real
    tensors fused attention kernels are invisible to the counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    try:
        with FlopCounterMode(display=False) as counter:
            fn(*args)
        return float(counter.get_total_flops())
    except Exception:  # noqa: BLE001 - a teacher with ops the counter cannot see: no MFU, not a failed run
        return None


@dataclass(frozen=True)
class ModelSizes:
    student_params: int  # trainable
    largest_module_params: int  # the largest encoder/decoder block (ZeRO-3 gathers whole modules)
    teacher_params: int
    student_fwd_flops: Optional[float]  # per image
    teacher_fwd_flops: Optional[float]


def meta_teacher(tcfg, mcfg, classes: Optional[int] = None):
    """The teacher's architecture on the meta device (random, unallocated weights); a discrete target's codebook
    is a meta tensor of its size. ``classes``: plan a discrete target of that many ids without its tokenizer file
    (it replaces target.tokenizer)."""
    from .targets import describe_target
    from .targets.factory import describe_features
    from .targets.weights import NEEDS_WEIGHTS

    if tcfg.kind in NEEDS_WEIGHTS:  # the architecture alone: plan before (or without) the weights being here
        tcfg = replace(tcfg, weights=None, random_weights=True) if not tcfg.tokenizer or classes else tcfg
    features = describe_features(tcfg, mcfg)
    if classes:
        spec = replace(features, classes=classes, has_cls=False)
    else:
        spec = describe_target(tcfg, mcfg)
    t = _meta_features(tcfg, mcfg, features)
    if spec.classes:
        from .targets.discrete import TokenizedTarget

        t = TokenizedTarget(t, torch.empty(spec.classes, spec.dim, device="meta"))
    return t, spec


def _meta_features(tcfg, mcfg, spec):
    from .targets.base import resolved_layer

    if tcfg.kind == "pixels":
        from .targets.pixels import PixelTarget

        return PixelTarget(spec, tcfg.patch_size or mcfg.patch_size, resolved_layer(tcfg) == "norm")
    with torch.device("meta"):
        if tcfg.kind == "open_clip":
            from .targets.openclip import OpenCLIPTarget, vision_tower

            t = OpenCLIPTarget.__new__(OpenCLIPTarget)
            torch.nn.Module.__init__(t)
            t.visual = vision_tower(tcfg.model, spec.image_size, device="meta")  # the image tower alone, as built
            t.spec = spec
        elif tcfg.kind == "timm":
            from .targets.timm_target import TimmTarget, block_index, create

            t = TimmTarget.__new__(TimmTarget)
            torch.nn.Module.__init__(t)
            t.spec, t.net = spec, create(tcfg, spec.image_size, pretrained=False)
            t.prefix = getattr(t.net, "num_prefix_tokens", 1)
            t.block = None if resolved_layer(tcfg) == "final" else block_index(tcfg, len(t.net.blocks))
        else:
            from efficientnet_lite_pytorch import EfficientNet

            from .targets.efficientnet import EfficientNetTarget

            t = EfficientNetTarget.__new__(EfficientNetTarget)
            torch.nn.Module.__init__(t)
            t.spec, t.layer, t.net = spec, resolved_layer(tcfg), EfficientNet.from_name("efficientnet-lite0")
    t.requires_grad_(False)
    return t.eval()


def meta_student(cfg, spec, dtype=torch.float32):
    from .model import build_model

    with torch.device("meta"):
        model = build_model(cfg.model, spec.dim, spec.grid, spec.classes)
    return model.to(dtype)


def meta_inputs(cfg, spec, batch, s_dtype, t_dtype):
    m = cfg.model
    x = torch.empty(batch, 3, m.img_size, m.img_size, device="meta", dtype=s_dtype)
    xt = torch.empty(batch, 3, spec.image_size, spec.image_size, device="meta", dtype=t_dtype)
    order = torch.zeros(batch, m.segment_grid ** 2, dtype=torch.long, device="meta")
    return x, xt, order


_SIZES: Dict[tuple, ModelSizes] = {}
_PARAMS: Dict[tuple, int] = {}


def student_params(cfg, classes: Optional[int] = None) -> int:
    """Trainable parameters of the configured student, built on the meta device from the target's description
    alone (no teacher): what "auto" DeepSpeed bucket sizes follow."""
    from .config import dump_config
    from .targets import describe_target

    key = (dump_config(cfg), classes)
    if key not in _PARAMS:
        spec = describe_target(cfg.target, cfg.model)
        if classes:
            spec = replace(spec, classes=classes)
        student = meta_student(cfg, spec)
        _PARAMS[key] = sum(p.numel() for p in student.parameters() if p.requires_grad)
    return _PARAMS[key]


def model_sizes(cfg, classes: Optional[int] = None) -> ModelSizes:
    """Parameter counts and per-image forward FLOPs of the configured student and teacher (meta device);
    ``classes`` as in :func:`meta_teacher`."""
    from .config import dump_config

    key = (dump_config(cfg), classes)
    if key not in _SIZES:
        _SIZES[key] = _sizes(cfg, classes)
    return _SIZES[key]


def _sizes(cfg, classes=None) -> ModelSizes:
    teacher, spec = meta_teacher(cfg.target, cfg.model, classes)
    student = meta_student(cfg, spec)
    P = sum(p.numel() for p in student.parameters() if p.requires_grad)
    blocks = list(student.encoder.blocks) + [b for d in ("gen_decoder", "dis_decoder") if hasattr(student, d)
                                               for b in getattr(student, d).blocks]
    largest = max([sum(p.numel() for p in b.parameters()) for b in blocks] or [0])
    x, xt, order = meta_inputs(cfg, spec, 1, torch.float32, torch.float32)
    from .distributed.parallelize import set_attention_backend

    # the dense-mask attention's FLOPs whatever the backend (prefix skips work, flex hides it): MFU compares across
    sf = count_flops(set_attention_backend(student, "sdpa"), x, *example_targets(spec, 1, "meta"), order)
    # on meta, so that fused attention (open_clip's MHA fast path, CPU SDPA) is counted (see train/metrics.py)
    tf = count_flops(teacher, xt) if cfg.target.kind != "pixels" or spec.classes else 0.0
    return ModelSizes(P, largest, sum(p.numel() for p in teacher.parameters()), sf, tf)

"""Per-device memory of a segmentation step (``megadigpt segment``), without a GPU: the planner's method
(:mod:`megadigpt.perf.memory`) applied to the Segmentor (ViT encoder + neck + UperNet + auxiliary FCN head) at its
crop (512 px for ADE20K).

    model states   the Segmentor's trainable parameters counted on the meta device, in ZeRO's bytes per parameter
                   (``memory.model_states``: the same DeepSpeed arithmetic as pretraining's plan)
    activations    the live-tensor peak of one real training micro-step (forward at the crop, both heads' losses
                   at the label's size, backward) traced on the meta device with ``memory.LiveBytes``; SDPA is
                   modelled as a fused kernel (``memory.fused_attention_memory``), as on GPUs

No teacher (the teacher column is 0). ``python -m megadigpt.perf.segment_memory --config segment_ade20k_vitb16
--gpus 8 --gpu-mem 80`` prints the table ``megadigpt plan`` prints.
"""

import argparse
from typing import Dict, List, Optional, Sequence

import torch

from .memory import (RESERVE_GIB, LiveBytes, PlanRow, ds_buffers, fused_attention_memory, linear_plan_row, markdown,
                     plan_step_command)

_TRACES: Dict[tuple, int] = {}


def encoder_geometry(cfg, arch: Optional[str] = None, patch: Optional[int] = None):
    from ..model.classifier import EncoderGeometry
    from ..model.vit import VIT_SIZES

    m = cfg.model
    base = VIT_SIZES[arch or (m.arch if m.arch != "auto" else "vit_base")]
    return EncoderGeometry(m.embed_dim or base.embed_dim, m.depth or base.depth, m.num_heads or base.num_heads,
                           m.mlp_ratio or base.mlp_ratio, patch or m.patch_size or 16)


def _meta_segmentor(cfg, geom, dtype=torch.float32, checkpointing: bool = False):
    from ..train.segment import build_segmentor, segmentor_args

    with torch.device("meta"):
        model = build_segmentor(segmentor_args(cfg, geom), cfg, checkpointing=checkpointing)
    return model.to(dtype)


def segment_params(cfg, geom) -> tuple:
    """(trainable parameters, largest module's parameters) of the Segmentor."""
    model = _meta_segmentor(cfg, geom)
    P = sum(p.numel() for p in model.parameters() if p.requires_grad)
    largest = max(sum(p.numel() for p in b.parameters()) for b in list(model.backbone.blocks) +
                  [model.neck, model.decode_head])
    return P, largest


def trace_segment_step(cfg, geom, batch: int, precision: str = "bf16", checkpointing: bool = False) -> int:
    """Peak bytes of the tensors of one training micro-step at the crop (parameters excluded)."""
    key = (repr(cfg), geom, batch, precision, checkpointing)
    if key in _TRACES:
        return _TRACES[key]
    from ..model.segmentation import segmentation_loss

    dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    model = _meta_segmentor(cfg, geom, dt, checkpointing).train()
    for p in model.parameters():
        p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
    c = cfg.model.crop_size
    x = torch.empty(batch, 3, c, c, device="meta", dtype=dt)
    y = torch.empty(batch, c, c, device="meta", dtype=torch.long)
    tracker = LiveBytes()
    with fused_attention_memory(), tracker:
        out, aux = model(x)
        loss = segmentation_loss(out, aux, y, cfg.model.aux_weight)[0]
        loss.backward()
    _TRACES[key] = tracker.peak
    return tracker.peak


def plan_one(cfg, world: int, gpu_gib: float, stage: int, ckpt: bool, offload: bool, micro_batch: int,
             precision: str = "bf16", reserve_gib: float = RESERVE_GIB, arch: Optional[str] = None,
             patch: Optional[int] = None) -> PlanRow:
    geom = encoder_geometry(cfg, arch, patch)
    P, largest = segment_params(cfg, geom)
    # traced at 2 and 3 images (BatchNorm refuses 1 image in training outside SyncBatchNorm), linear in between;
    # built whole on each rank (see train.segment)
    return linear_plan_row(f"seg:{arch or cfg.model.arch}", geom.patch_size, P, largest, world, gpu_gib, stage, ckpt,
                           offload, micro_batch, cfg.train.global_batch, precision, reserve_gib,
                           ds_buffers(cfg, stage, P),
                           lambda b: trace_segment_step(cfg, geom, b, precision, ckpt), lo=2)


def plan(cfg, world: int, gpu_gib: float, models: Sequence[tuple], stages=(1, 2, 3), ckpts=(False, True),
         offloads=(False,), micro_batch: Optional[int] = None, precision: str = "bf16",
         reserve_gib: float = RESERVE_GIB) -> List[PlanRow]:
    """``models``: (arch, patch) pairs; the config's own encoder where arch is None."""
    rows = []
    for arch, patch in models:
        for stage in stages:
            for ck in ckpts:
                for off in offloads:
                    rows.append(plan_one(cfg, world, gpu_gib, stage, ck, off, micro_batch or cfg.train.micro_batch,
                                         precision, reserve_gib, arch, patch))
    return rows


def is_segment_config(name_or_path: Optional[str]) -> bool:
    """Whether a config (a built-in name or a file) is a ``megadigpt segment`` config (it has a ``segment:``
    section): what ``megadigpt plan`` asks before choosing this planner."""
    from ..config import ConfigError, read_yaml, resolve_config_path

    if not name_or_path:
        return False
    try:
        raw = read_yaml(resolve_config_path(name_or_path))
    except ConfigError:
        return False  # the pretraining planner reports it
    return isinstance(raw, dict) and "segment" in raw


def cmd_plan_segment(args) -> int:
    """``megadigpt plan --config <segmentation config>``: ``args`` is ``megadigpt plan``'s namespace (config,
    models, gpus, gpu_mem, zero, ckpt, offload, micro_batch, precision, reserve, json, overrides)."""
    from ..segment_config import load_segment_config

    cfg = load_segment_config(args.config, args.overrides)
    return plan_step_command(
        args, cfg, plan, (cfg.model.arch if cfg.model.arch != "auto" else "vit_base", cfg.model.patch_size or 16),
        f"# per-GPU memory of a segmentation step: {args.gpus} GPUs of {args.gpu_mem:g} GiB ({args.reserve:g} GiB "
        f"reserved), crop {cfg.model.crop_size}, {args.precision}, global batch {cfg.train.global_batch}; GiB per GPU")


def main(argv=None) -> int:
    from ..config import ConfigError
    from ..segment_config import load_segment_config

    p = argparse.ArgumentParser(description="per-GPU memory of a megadigpt segment step")
    p.add_argument("--config", default="segment_ade20k_vitb16")
    p.add_argument("--models", default=None, help="e.g. vit_base/16,vit_large/14 (default: the config's encoder)")
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--gpu-mem", type=float, default=80.0)
    p.add_argument("--zero", default="1,3")
    p.add_argument("--ckpt", default="off,on")
    p.add_argument("--micro-batch", type=int, default=None)
    p.add_argument("--precision", default="bf16")
    p.add_argument("--reserve", type=float, default=RESERVE_GIB)
    p.add_argument("overrides", nargs="*")
    a = p.parse_args(argv)
    try:
        cfg = load_segment_config(a.config, a.overrides)
        models = [(m.split("/")[0], int(m.split("/")[1]) if "/" in m else None) for m in a.models.split(",")] \
            if a.models else [(None if cfg.model.arch == "auto" else cfg.model.arch, cfg.model.patch_size)]
        rows = plan(cfg, a.gpus, a.gpu_mem, models, [int(z) for z in a.zero.split(",")],
                    [v == "on" for v in a.ckpt.split(",")], (False,), a.micro_batch, a.precision, a.reserve)
    except ConfigError as e:
        print(f"megadigpt: error: {e}")
        return 2
    print(f"# per-GPU memory of a segmentation step: {a.gpus} GPUs of {a.gpu_mem:g} GiB, crop "
          f"{cfg.model.crop_size}, {a.precision}, global batch {cfg.train.global_batch}; GiB per GPU")
    print(markdown(rows, a.gpus, a.gpu_mem))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Per-device memory of an image-text step (``megadigpt clip``), without a GPU: the planner's method
(:mod:`megadigpt.perf.memory`) applied to both towers (megadigpt's image tower + open_clip's text tower of
``text.model``) at the config's image size and context length.

    model states   the trainable parameters of both towers (a frozen tower's excluded) counted on the meta device,
                   in ZeRO's bytes per parameter (``memory.model_states``: the same DeepSpeed arithmetic as
                   pretraining's plan)
    activations    the live-tensor peak of one real training micro-step (both towers forward, the contrastive
                   logits of this rank's images against every rank's texts, as ``ClipLoss(local_loss=True)``
                   computes them, backward) traced on the meta device with ``memory.LiveBytes``; SDPA is modelled
                   as a fused kernel (``memory.fused_attention_memory``), as on GPUs

No teacher (the teacher column is 0). ``megadigpt plan --config clip_vitl14_laion --gpus 8`` prints the table.
"""

from typing import Dict, List, Optional, Sequence

import torch

from .memory import RESERVE_GIB, LiveBytes, PlanRow, ds_buffers, fused_attention_memory, linear_plan_row, plan_step_command
from .segment_memory import encoder_geometry

_TRACES: Dict[tuple, int] = {}


def _meta_clip(cfg, geom, dtype=torch.float32, checkpointing: bool = False):
    from ..train.clip import build_clip, freeze_towers

    with torch.device("meta"):
        model, _ = build_clip(cfg, geom, device="meta")
    freeze_towers(model, cfg.clip)
    if checkpointing:
        model.visual.set_grad_checkpointing(True)
        model.set_grad_checkpointing(True)
    return model.to(dtype)


def clip_params(cfg, geom) -> tuple:
    """(trainable parameters, largest module's parameters, frozen parameters) of both towers."""
    model = _meta_clip(cfg, geom)
    P = sum(p.numel() for p in model.parameters() if p.requires_grad)
    blocks = list(model.visual.blocks) + list(model.transformer.resblocks) + [model.token_embedding]
    return (P, max(sum(p.numel() for p in b.parameters()) for b in blocks),
            sum(p.numel() for p in model.parameters() if not p.requires_grad))


def trace_clip_step(cfg, geom, batch: int, world: int, precision: str = "bf16", checkpointing: bool = False) -> int:
    """Peak bytes of the tensors of one training micro-step (parameters and their gradients excluded)."""
    key = (repr(cfg), geom, batch, world, precision, checkpointing)
    if key in _TRACES:
        return _TRACES[key]
    import torch.nn.functional as F

    dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    model = _meta_clip(cfg, geom, dt, checkpointing).train()
    for p in model.parameters():
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
    s, ctx = cfg.model.img_size, model.context_length
    x = torch.empty(batch, 3, s, s, device="meta", dtype=dt)
    tokens = torch.zeros(batch, ctx, dtype=torch.long, device="meta")
    tracker = LiveBytes()
    with fused_attention_memory(), tracker:
        image, text, scale = model(x, tokens)[:3]
        every_text = torch.cat([text.float()] * world)  # the gathered texts (and images, for the reverse)
        every_image = torch.cat([image.float()] * world)
        labels = torch.zeros(batch, dtype=torch.long, device="meta")
        loss = (F.cross_entropy(scale.float() * image.float() @ every_text.T, labels) +
                F.cross_entropy(scale.float() * text.float() @ every_image.T, labels)) / 2
        loss.backward()
    _TRACES[key] = tracker.peak
    return tracker.peak


def plan_one(cfg, world: int, gpu_gib: float, stage: int, ckpt: bool, offload: bool, micro_batch: int,
             precision: str = "bf16", reserve_gib: float = RESERVE_GIB, arch: Optional[str] = None,
             patch: Optional[int] = None) -> PlanRow:
    geom = encoder_geometry(cfg, arch, patch)
    P, largest, frozen = clip_params(cfg, geom)
    return linear_plan_row(f"clip:{arch or cfg.model.arch}+{cfg.text.model}", geom.patch_size, P, largest, world,
                           gpu_gib, stage, ckpt, offload, micro_batch, cfg.train.global_batch, precision, reserve_gib,
                           ds_buffers(cfg, stage, P),
                           lambda b: trace_clip_step(cfg, geom, b, world, precision, ckpt), lo=1, frozen=frozen)


def plan(cfg, world: int, gpu_gib: float, models: Sequence[tuple], stages=(1, 2, 3), ckpts=(False, True),
         offloads=(False,), micro_batch: Optional[int] = None, precision: str = "bf16",
         reserve_gib: float = RESERVE_GIB) -> List[PlanRow]:
    """``models``: (arch, patch) pairs of the image tower; the config's own where arch is None."""
    return [plan_one(cfg, world, gpu_gib, stage, ck, off, micro_batch or cfg.train.micro_batch, precision,
                     reserve_gib, arch, patch)
            for arch, patch in models for stage in stages for ck in ckpts for off in offloads]


def is_clip_config(name_or_path: Optional[str]) -> bool:
    """Whether a config (a built-in name or a file) is a ``megadigpt clip`` config (it has a ``text:`` or
    ``clip:`` section): what ``megadigpt plan`` and ``bench`` ask before choosing this step."""
    from ..config import ConfigError, read_yaml, resolve_config_path

    if not name_or_path:
        return False
    try:
        raw = read_yaml(resolve_config_path(name_or_path))
    except ConfigError:
        return False  # the pretraining planner reports it
    return isinstance(raw, dict) and ("text" in raw or "clip" in raw)


def cmd_plan_clip(args) -> int:
    """``megadigpt plan --config <clip config>``: ``args`` is ``megadigpt plan``'s namespace."""
    from ..clip_config import load_clip_config

    cfg = load_clip_config(args.config, args.overrides)
    return plan_step_command(
        args, cfg, plan, (cfg.model.arch if cfg.model.arch != "auto" else "vit_large", cfg.model.patch_size or 14),
        f"# per-GPU memory of an image-text step: {args.gpus} GPUs of {args.gpu_mem:g} GiB ({args.reserve:g} GiB "
        f"reserved), {cfg.model.img_size} px, text tower {cfg.text.model}, {args.precision}, global batch "
        f"{cfg.train.global_batch} (contrasted per micro-step: micro-batch x {args.gpus}); GiB per GPU")

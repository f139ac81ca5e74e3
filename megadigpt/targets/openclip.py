"""OpenCLIP vision towers (the reference teacher is ViT-H-14): last-layer tokens after ``ln_post`` and ``proj``."""

import contextlib
import logging

import torch

from ..config import ConfigError
from .base import CLIP_MEAN, CLIP_STD, Target, TargetSpec


def _vision_cfg(name: str):
    import open_clip

    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ConfigError(f"unknown open_clip model {name!r} (see open_clip.list_models())")
    return cfg


def describe(tcfg, size: int) -> TargetSpec:
    if not tcfg.model:
        raise ConfigError("target.model must name an open_clip architecture, e.g. ViT-H-14")
    cfg = _vision_cfg(tcfg.model)
    v = cfg["vision_cfg"]
    if "timm_model_name" in v or v.get("attentional_pool") or isinstance(v.get("layers"), (list, tuple)):
        raise ConfigError(f"open_clip model {tcfg.model!r} is not a plain ViT tower; use target.kind=timm for it")
    patch = v["patch_size"]
    if size % patch:
        raise ConfigError(f"open_clip {tcfg.model} has patch {patch}; target image_size {size} is not divisible")
    return TargetSpec(size, size // patch, cfg["embed_dim"], True, CLIP_MEAN, CLIP_STD)


@contextlib.contextmanager
def quiet_random_init():
    """open_clip warns on the root logger for every model built without weights; where that is intended (a random
    teacher by target.random_weights, which the start event records, or the planner's meta build) say nothing."""
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


class OpenCLIPTarget(Target):
    def __init__(self, spec, tcfg):
        super().__init__()
        import open_clip

        # a file path or a pretrained tag; random weights only with target.random_weights (checked in describe)
        with quiet_random_init() if tcfg.random_weights else contextlib.nullcontext():
            model = open_clip.create_model(tcfg.model, pretrained=None if tcfg.random_weights else tcfg.weights,
                                           force_image_size=spec.image_size)
        self.visual = model.visual
        self.spec = spec
        if getattr(self.visual, "proj", None) is None:
            raise ConfigError(f"open_clip model {tcfg.model!r} has no projection on its vision tower")

    @torch.no_grad()
    def forward(self, images):
        v = self.visual
        x = v.ln_post(v.transformer(v._embeds(images))) @ v.proj
        return x[:, 1:], x[:, 0]

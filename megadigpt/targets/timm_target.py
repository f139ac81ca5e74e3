"""timm models as teachers (DINOv2, EVA, ...), from a local weights file: final-norm tokens of forward_features."""

import torch

from ..config import ConfigError
from .base import Target, TargetSpec, _check_weights


def _create(tcfg, size, pretrained: bool):
    import timm

    kw = dict(num_classes=0, img_size=size)
    if pretrained and tcfg.weights:
        kw.update(pretrained=True, pretrained_cfg_overlay=dict(file=tcfg.weights))
    return timm.create_model(tcfg.model, **kw)


def describe(tcfg, size: int) -> TargetSpec:
    import timm

    if not tcfg.model:
        raise ConfigError("target.model must name a timm model, e.g. vit_large_patch14_dinov2")
    if not timm.is_model(tcfg.model):
        raise ConfigError(f"unknown timm model {tcfg.model!r}")
    _check_weights(tcfg.weights, "timm teacher")
    with torch.device("meta"):  # sizes only: nothing is allocated or initialised
        m = _create(tcfg, size, pretrained=False)
    pe = getattr(m, "patch_embed", None)
    if pe is None or getattr(pe, "grid_size", None) is None:
        raise ConfigError(f"timm model {tcfg.model!r} has no patch grid; only ViT-style teachers are supported")
    gh, gw = pe.grid_size
    if gh != gw:
        raise ConfigError(f"timm teacher grid {gh}x{gw} is not square")
    cfg = m.pretrained_cfg
    return TargetSpec(size, gh, m.num_features, getattr(m, "cls_token", None) is not None,
                      tuple(cfg.get("mean", (0.485, 0.456, 0.406))), tuple(cfg.get("std", (0.229, 0.224, 0.225))))


class TimmTarget(Target):
    def __init__(self, spec, tcfg):
        super().__init__()
        self.spec = spec
        self.net = _create(tcfg, spec.image_size, pretrained=True)
        self.prefix = getattr(self.net, "num_prefix_tokens", 1)

    @torch.no_grad()
    def forward(self, images):
        x = self.net.forward_features(images)
        return x[:, self.prefix:], (x[:, 0] if self.spec.has_cls else None)

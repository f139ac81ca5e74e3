"""timm models as teachers (DINOv2, EVA, ...), from a local weights file.

``target.layer``: ``final`` (default: the final-norm tokens of forward_features) or a block index, 1-indexed or
negative from the end, whose output goes through the final norm (DiGIT: ``-3``, the third-from-last block)."""

import torch

from ..config import ConfigError
from .base import Target, TargetSpec, resolved_layer


def create(tcfg, size, pretrained: bool):
    """The timm model ``target.model`` at ``size`` px without a head; ``pretrained``: load ``target.weights``."""
    import timm

    kw = dict(num_classes=0, img_size=size)
    if pretrained and tcfg.weights and not tcfg.random_weights:
        kw.update(pretrained=True, pretrained_cfg_overlay=dict(file=tcfg.weights))
    return timm.create_model(tcfg.model, **kw)


def block_index(tcfg, depth: int):
    """target.layer -> None (final) or the 0-based block index."""
    layer = resolved_layer(tcfg)
    if layer == "final":
        return None
    try:
        i = int(layer)
    except ValueError:
        raise ConfigError(f"target.layer {layer!r}: a timm teacher takes final or a block index (1..{depth}, or "
                          f"-1..-{depth} from the end)") from None
    if not (1 <= i <= depth or -depth <= i <= -1):
        raise ConfigError(f"target.layer {i} is outside the teacher's {depth} blocks (1..{depth} or -1..-{depth})")
    return i - 1 if i > 0 else depth + i


def describe(tcfg, size: int) -> TargetSpec:
    import timm

    if not tcfg.model:
        raise ConfigError("target.model must name a timm model, e.g. vit_large_patch14_dinov2")
    if not timm.is_model(tcfg.model):
        raise ConfigError(f"unknown timm model {tcfg.model!r}")
    with torch.device("meta"):  # sizes only: nothing is allocated or initialised
        m = create(tcfg, size, pretrained=False)
    pe = getattr(m, "patch_embed", None)
    if pe is None or getattr(pe, "grid_size", None) is None:
        raise ConfigError(f"timm model {tcfg.model!r} has no patch grid; only ViT-style teachers are supported")
    if resolved_layer(tcfg) != "final":
        if not hasattr(m, "forward_intermediates") or not hasattr(m, "blocks"):
            raise ConfigError(f"timm model {tcfg.model!r} has no forward_intermediates: only target.layer=final")
        block_index(tcfg, len(m.blocks))
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
        self.net = create(tcfg, spec.image_size, pretrained=True)
        self.prefix = getattr(self.net, "num_prefix_tokens", 1)
        self.block = None if resolved_layer(tcfg) == "final" else block_index(tcfg, len(self.net.blocks))

    @torch.no_grad()
    def forward(self, images):
        if self.block is None:
            x = self.net.forward_features(images)
            return x[:, self.prefix:], (x[:, 0] if self.spec.has_cls else None)
        (out,) = self.net.forward_intermediates(images, indices=[self.block], norm=True, stop_early=True,
                                                 output_fmt="NLC", intermediates_only=True,
                                                 return_prefix_tokens=True)
        tokens, prefix = out if isinstance(out, tuple) else (out, None)
        return tokens, (prefix[:, 0] if self.spec.has_cls and prefix is not None else None)

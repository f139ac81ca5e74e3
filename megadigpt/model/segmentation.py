"""Semantic segmentation model: the ViT encoder (full attention) + the usual ViT neck + UperNet, as in BEiT/MAE's
ADE20K configs (mmseg's ``UPerHead`` + an auxiliary ``FCNHead``).

    image (crop, e.g. 512) -> resized to the encoder size (the multiple of the patch nearest the crop: 512 for
    patch 16, 518 = 37 x 14 for patch 14) -> ViT blocks, features taken after 4 blocks spread over the depth
    -> neck (BEiT's fpn1..4: 2 deconvs / 1 deconv / identity / 2x2 max-pool for patch 16 and 14; for another
    patch the resampling that reaches each stride) -> 4 levels, each resized to the crop's strides 1/4, 1/8, 1/16,
    1/32 where the encoder grid does not give them exactly (patch 14)
    -> UperNet (PPM on 1/32 + FPN, fused at 1/4) -> logits at 1/4; auxiliary FCN logits from the 1/16 level.

Patch 14 and a 512 crop: 512 is not a multiple of 14. The input is *resized* (bilinear) to 518 rather than padded:
every token then sees image content (padding would feed 6 px of zeros to the last token row and column, which the
encoder never saw in pretraining) and the grid stays square, so the position embedding is one bicubic
interpolation of the pretrained table (as fine-tuning does). The pyramid is resized back to the crop's strides
(bilinear), so the head, the loss and the labels work at the crop's own size; for patch 16 nothing is resized.

The backbone is timm's ``VisionTransformer`` itself (subclassed for the multi-level forward), built by
:func:`~megadigpt.model.classifier.build_classifier`'s arguments: the parameter names are timm's, so every weight
source fine-tuning reads loads here with the same code (``fit_to_classifier``). The forward is a method of the
ViT module itself, so that ZeRO-3's hooks gather its own parameters (``cls_token``, ``pos_embed``).

UperNet is written here in plain PyTorch, not taken from segmentation-models-pytorch (0.6.0 has a
``UPerNetDecoder``): that decoder wants the 6-level list of a CNN encoder (1/1 and 1/2 placeholders first), puts a
LayerNorm on every input level and BatchNorm in its PPM fuse regardless of ``use_norm``, has no dropout before the
classifier, and no auxiliary head. The method asks for mmseg's ``UPerHead`` (what MAE/BEiT's numbers were measured
with), which is ~80 lines; a dependency that differs from it in details that change results was not worth it.
"""

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from .classifier import EncoderGeometry, layer_id


def default_feature_blocks(depth: int) -> List[int]:
    """0-indexed blocks whose outputs feed the pyramid: depth/3, depth/2, 2 depth/3 and depth (1-indexed), i.e.
    BEiT/MAE's [3, 5, 7, 11] of 12 and [7, 11, 15, 23] of 24, for any depth (a shallow encoder repeats blocks)."""
    return [max(int(round(depth * f)), 1) - 1 for f in (1 / 3, 1 / 2, 2 / 3, 1.0)]


def encoder_size(crop: int, patch: int) -> int:
    """The encoder's input side for a crop: the nearest multiple of the patch (ties up), never 0."""
    return max(patch, int(math.floor(crop / patch + 0.5)) * patch)


class ViTBackbone(VisionTransformer):
    """timm's ViT returning the patch tokens of ``feature_blocks`` as (B, C, h, w) maps. Inputs of any size that
    the patch divides are accepted; the position embedding is resampled (bicubic) when the grid differs from the
    built one (whole-image inference on a non-square image)."""

    def setup_features(self, feature_blocks: Sequence[int], checkpointing: bool = False):
        self.feature_blocks = [int(b) for b in feature_blocks]
        self.patch_embed.strict_img_size = False
        self.fc_norm = nn.Identity()  # the classifier's norm / head are not part of the segmentation model
        self.norm = nn.Identity()
        self.head = nn.Identity()
        self.seg_checkpointing = checkpointing
        return self

    def _grid_pos(self, gh: int, gw: int) -> torch.Tensor:
        g0 = self.patch_embed.grid_size
        if (gh, gw) == tuple(g0):
            return self.pos_embed
        prefix, grid = self.pos_embed[:, :self.num_prefix_tokens], self.pos_embed[:, self.num_prefix_tokens:]
        C = grid.shape[-1]
        grid = grid.float().reshape(1, g0[0], g0[1], C).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False)
        grid = grid.permute(0, 2, 3, 1).reshape(1, gh * gw, C).to(self.pos_embed.dtype)
        return torch.cat([prefix, grid], dim=1)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        B, _, H, W = x.shape
        p = self.patch_embed.patch_size[0]
        gh, gw = H // p, W // p
        x = self.patch_embed(x)  # (B, gh * gw, C)
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1) + self._grid_pos(gh, gw)
        x = self.norm_pre(self.patch_drop(self.pos_drop(x)))
        wanted, feats = set(self.feature_blocks), {}
        last = max(self.feature_blocks)
        for i, blk in enumerate(self.blocks):
            if i > last:
                break  # blocks past the last tapped one do not run (their parameters are frozen out, see below)
            if self.seg_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
            if i in wanted:
                feats[i] = x[:, self.num_prefix_tokens:].transpose(1, 2).reshape(B, -1, gh, gw)
        return [feats[i] for i in self.feature_blocks]


class BatchNorm2d(nn.BatchNorm2d):
    """BatchNorm computed in fp32 whatever the engine's dtype (a bf16 engine casts weights, and sometimes the
    running statistics, to bf16; torch's CPU kernel refuses mixed dtypes, and bf16 running statistics would lose
    the small momentum updates): the statistics are kept in fp32, the output is cast back to the input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name in ("running_mean", "running_var"):
            b = getattr(self, name)
            if b is not None and b.dtype != torch.float32:
                b.data = b.data.float()
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
        use_batch = self.training or self.running_mean is None
        w = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.batch_norm(x.float(), self.running_mean, self.running_var, w, bias, use_batch, self.momentum,
                            self.eps).to(x.dtype)


class ConvBNReLU(nn.Sequential):
    """mmcv's ConvModule(conv without bias, BN, ReLU)."""

    def __init__(self, cin: int, cout: int, k: int):
        super().__init__(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), BatchNorm2d(cout), nn.ReLU(True))


def _resize(x: torch.Tensor, size) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def neck_scale(patch: int, stride: int) -> int:
    """log2 of the resampling from the encoder grid (stride ``patch``) to a pyramid level (``stride``), rounded:
    > 0 that many 2x deconvolutions, 0 identity, < 0 a max-pool of 2 ** -k. Patch 16 (and 14): 2, 1, 0, -1 for
    strides 4, 8, 16, 32, BEiT's fpn1..4; patch 8: 1, 0, -1, -2."""
    return int(round(math.log2(patch / stride)))


class Neck(nn.Module):
    """BEiT's multi-level neck, derived from the patch: each level ``fpn<i>`` resamples the encoder grid by
    :func:`neck_scale` (deconvolutions with BN + GELU between them as BEiT's fpn1, identity, or max-pool), then is
    resized (bilinear) to ``crop / stride`` exactly where it is not that already (patch 14: 148 -> 128, ...). For
    patch 16 this is BEiT's fpn1 (deconv-BN-GELU-deconv), fpn2 (deconv), fpn3 (identity), fpn4 (max-pool 2)."""

    STRIDES = (4, 8, 16, 32)

    def __init__(self, dim: int, patch: int):
        super().__init__()
        self.patch = patch
        for i, stride in enumerate(self.STRIDES, start=1):
            k = neck_scale(patch, stride)
            if k > 0:
                ops = []
                for j in range(k):
                    ops.append(nn.ConvTranspose2d(dim, dim, 2, 2))
                    if j < k - 1:
                        ops += [BatchNorm2d(dim), nn.GELU()]
                op = ops[0] if len(ops) == 1 else nn.Sequential(*ops)
            elif k == 0:
                op = nn.Identity()
            else:
                op = nn.MaxPool2d(2 ** -k, 2 ** -k)
            setattr(self, f"fpn{i}", op)

    def forward(self, feats: List[torch.Tensor], out_hw: Tuple[int, int]) -> List[torch.Tensor]:
        ops = (self.fpn1, self.fpn2, self.fpn3, self.fpn4)
        outs = [op(f) for op, f in zip(ops, feats)]
        return [_resize(o, (math.ceil(out_hw[0] / s), math.ceil(out_hw[1] / s))) for o, s in zip(outs, self.STRIDES)]


class UPerHead(nn.Module):
    """mmseg's ``UPerHead`` (pool scales 1, 2, 3, 6; ``channels`` wide; dropout 0.1 before the 1x1 classifier)."""

    def __init__(self, in_channels: Sequence[int], channels: int, num_classes: int, pool_scales=(1, 2, 3, 6),
                 dropout: float = 0.1):
        super().__init__()
        top = in_channels[-1]
        self.ppm = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvBNReLU(top, channels, 1))
                                 for s in pool_scales)
        self.bottleneck = ConvBNReLU(top + len(pool_scales) * channels, channels, 3)
        self.lateral_convs = nn.ModuleList(ConvBNReLU(c, channels, 1) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(ConvBNReLU(channels, channels, 3) for _ in in_channels[:-1])
        self.fpn_bottleneck = ConvBNReLU(len(in_channels) * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def psp(self, x):
        return self.bottleneck(torch.cat([x] + [_resize(p(x), x.shape[-2:]) for p in self.ppm], dim=1))

    def forward(self, levels: List[torch.Tensor]) -> torch.Tensor:
        lat = [conv(levels[i]) for i, conv in enumerate(self.lateral_convs)] + [self.psp(levels[-1])]
        for i in range(len(lat) - 1, 0, -1):  # top-down
            lat[i - 1] = lat[i - 1] + _resize(lat[i], lat[i - 1].shape[-2:])
        outs = [self.fpn_convs[i](lat[i]) for i in range(len(lat) - 1)] + [lat[-1]]
        outs = [outs[0]] + [_resize(o, outs[0].shape[-2:]) for o in outs[1:]]
        return self.conv_seg(self.dropout(self.fpn_bottleneck(torch.cat(outs, dim=1))))


class FCNHead(nn.Module):
    """mmseg's ``FCNHead`` as the auxiliary head of BEiT/MAE's configs (num_convs=1, concat_input=False)."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, num_convs: int = 1, dropout: float = 0.1):
        super().__init__()
        self.convs = nn.Sequential(*[ConvBNReLU(in_channels if i == 0 else channels, channels, 3)
                                     for i in range(num_convs)])
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x):
        return self.conv_seg(self.dropout(self.convs(x)))


@dataclass(frozen=True)
class SegmentorArgs:
    """Everything that determines the network (written into exports' ``config.json`` as ``model_args``)."""

    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float
    patch_size: int
    crop_size: int
    num_classes: int
    feature_blocks: Tuple[int, ...]
    channels: int = 512
    aux_channels: int = 256
    aux_level: int = 2  # index into the pyramid (1/4, 1/8, 1/16, 1/32): 2 = 1/16, as BEiT/MAE
    dropout: float = 0.1

    @property
    def geometry(self) -> EncoderGeometry:
        return EncoderGeometry(self.embed_dim, self.depth, self.num_heads, self.mlp_ratio, self.patch_size)

    @property
    def encoder_size(self) -> int:
        return encoder_size(self.crop_size, self.patch_size)

    def to_dict(self) -> dict:
        import dataclasses

        d = dataclasses.asdict(self)
        d["feature_blocks"] = list(self.feature_blocks)
        return d


class Segmentor(nn.Module):
    """``forward(x)`` (x: (B, 3, H, W), normalised): training -> (logits at 1/4, auxiliary logits at 1/16 or
    None); eval -> logits at 1/4. :meth:`predict` gives logits at the input's own size."""

    def __init__(self, args: SegmentorArgs, drop_path: float = 0.0, aux: bool = True, checkpointing: bool = False):
        super().__init__()
        self.args = args
        g = args.geometry
        kw = g.model_args(args.encoder_size, 0, "avg", drop_path)
        self.backbone = ViTBackbone(**kw).setup_features(args.feature_blocks, checkpointing)
        self.neck = Neck(g.embed_dim, g.patch_size)
        self.decode_head = UPerHead([g.embed_dim] * 4, args.channels, args.num_classes, dropout=args.dropout)
        self.auxiliary_head = FCNHead(g.embed_dim, args.aux_channels, args.num_classes,
                                      dropout=args.dropout) if aux else None
        # blocks after the last tapped one never run: no gradient would reach them (DeepSpeed and the optimizer
        # would carry dead state); with the default taps the last block is tapped, so this removes nothing
        last = max(args.feature_blocks)
        for blk in self.backbone.blocks[last + 1:]:
            blk.requires_grad_(False)

    def levels(self, x: torch.Tensor) -> List[torch.Tensor]:
        H, W = x.shape[-2:]
        p = self.args.patch_size
        if H % p or W % p:  # the crop (512) -> the encoder size (518 for patch 14): see the module docstring
            eh, ew = encoder_size(H, p), encoder_size(W, p)
            x = F.interpolate(x, size=(eh, ew), mode="bilinear", align_corners=False)
        return self.neck(self.backbone(x), (H, W))

    def forward(self, x: torch.Tensor):
        levels = self.levels(x)
        out = self.decode_head(levels)
        if not self.training:
            return out
        aux = self.auxiliary_head(levels[self.args.aux_level]) if self.auxiliary_head is not None else None
        return out, aux

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Logits at the input's size (bilinear, align_corners=False, as mmseg)."""
        out = self.forward(x)
        if isinstance(out, tuple):
            out = out[0]
        return _resize(out, x.shape[-2:])


def segmentation_loss(out, aux, target: torch.Tensor, aux_weight: float = 0.4, ignore_index: int = 255,
                      weight: Optional[torch.Tensor] = None):
    """mmseg's: each head's logits resized to the label's size (bilinear), cross-entropy over the non-ignored
    pixels (mean), ``decode + aux_weight * aux``. ``weight`` (B,): per-image weights (0 for a bad sample); the
    mean is over the pixels of weighted images. -> (total, decode loss, aux loss or None), scalars."""
    def ce(logits):
        logits = _resize(logits.float(), target.shape[-2:])
        per_px = F.cross_entropy(logits, target.long(), ignore_index=ignore_index, reduction="none")
        valid = (target != ignore_index).float()
        if weight is not None:
            valid = valid * weight.view(-1, 1, 1).float()
        return (per_px * valid).sum() / valid.sum().clamp(min=1.0)

    main = ce(out)
    if aux is None:
        return main, main, None
    a = ce(aux)
    return main + aux_weight * a, main, a


def segment_param_groups(model: Segmentor, weight_decay: float, layer_decay: float):
    """BEiT/MAE's layer-wise lr decay over the backbone (:func:`~megadigpt.model.classifier.layer_id` of the timm
    names), the neck and heads at layer depth + 1 (the full lr); no weight decay on 1-D parameters, biases,
    ``pos_embed`` and ``cls_token``."""
    depth = model.args.depth
    skip = {"backbone." + n for n in model.backbone.no_weight_decay()}
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        ndim = len(getattr(p, "ds_shape", p.shape))
        no_wd = ndim == 1 or name.endswith(".bias") or name in skip
        lid = layer_id(name[len("backbone."):], depth) if name.startswith("backbone.") else depth + 1
        key = (lid, no_wd)
        if key not in groups:
            groups[key] = {"params": [], "weight_decay": 0.0 if no_wd else weight_decay,
                           "lr_scale": layer_decay ** (depth + 1 - lid), "layer_id": lid}
        groups[key]["params"].append(p)
    return [groups[k] for k in sorted(groups)]


def load_backbone(model: Segmentor, weights) -> dict:
    """Pretrained encoder weights (timm names, from ``load_encoder_weights``) into the backbone: the position
    embedding interpolated to the encoder grid, the classifier's head and norms dropped. -> fine-tuning's load
    report; ConfigError when the trunk does not fit."""
    from .classifier import fit_to_classifier

    sd, report = fit_to_classifier(model.backbone, weights)
    model.backbone.load_state_dict(sd, strict=False)
    return report


def sync_batchnorm(model: nn.Module, device_type: str, world: int) -> nn.Module:
    """SyncBatchNorm (as BEiT/MAE's configs) where torch has it: CUDA with several ranks. Elsewhere (CPU, gloo)
    plain BatchNorm, whose running statistics the loop averages over the ranks every step
    (:func:`average_bn_buffers`) so that every rank evaluates and saves the same network."""
    if device_type == "cuda" and world > 1:
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def bn_buffers(model: nn.Module) -> List[torch.Tensor]:
    return [b for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            for b in (m.running_mean, m.running_var) if b is not None]


def average_bn_buffers(model: nn.Module) -> None:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    bufs = bn_buffers(model)
    if not bufs:
        return
    flat = torch.cat([b.detach().float().reshape(-1) for b in bufs])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    i = 0
    for b in bufs:
        n = b.numel()
        b.copy_(flat[i:i + n].view_as(b).to(b.dtype))
        i += n

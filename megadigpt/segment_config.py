"""The config tree of ``megadigpt segment`` (semantic segmentation: UperNet on the ViT encoder), beside
:mod:`megadigpt.config`'s trees and read by the same machinery: ``load_config(name, overrides,
root=SegmentRunConfig)`` (unknown keys and out-of-range values are one-line errors), the same ``Rule`` table
(this module adds its sections' rules to ``RULES`` on import) and the same resume check
(``check_resume_config``: the geometry keys below).

Sections: ``model`` (encoder geometry, crop, pyramid taps, head widths), ``data`` (pairs, ADE20K protocol,
mmseg's augmentation), ``optim`` (fine-tuning's AdamW + layer decay, with the poly schedule of BEiT/MAE's ADE20K
configs), ``train`` (fine-tuning's: the shared run section of DeepSpeed, precision, checkpoints, run
directory; plus ``peak_tflops`` for ``megadigpt bench``), ``segment`` (evaluation).
"""

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union

from . import config as _config
from .config import (FRACTION, FRACTION_ABOVE_0, FRACTION_BELOW_1, LOADERS, NON_NEGATIVE, POSITIVE, STD,  # noqa: F401
                     FinetuneOptimConfig, FinetuneTrainConfig, Rule, plain, at_least, each, one_of, ordered)


@dataclass
class SegmentModelConfig:
    arch: str = "auto"  # auto: the geometry of train.init_from's weights; or vit_tiny..vit_e for a fresh encoder
    patch_size: Optional[int] = None  # default: from the weights (or 16)
    crop_size: int = 512  # training crop and sliding window (square); the encoder runs at the nearest multiple of the patch (518 for patch 14)
    embed_dim: Optional[int] = None  # override the arch's width
    depth: Optional[int] = None  # override the arch's depth
    num_heads: Optional[int] = None  # default: the pretraining run's, the export's, or the standard size's
    mlp_ratio: Optional[float] = None  # override the arch's MLP ratio
    drop_path: float = 0.1  # stochastic depth of the encoder (BEiT/MAE ADE20K: 0.1 for B)
    num_classes: int = 150  # classes after the label mapping (ADE20K: 150)
    feature_blocks: Optional[List[int]] = None  # 1-indexed blocks feeding the pyramid; default depth/3, depth/2, 2*depth/3, depth (4, 6, 8, 12 of 12)
    channels: int = 512  # UperNet width (mmseg UPerHead channels)
    aux_channels: int = 256  # auxiliary FCN head width (on the 1/16 level)
    aux_weight: float = 0.4  # auxiliary loss weight (0 = no auxiliary head)
    dropout: float = 0.1  # dropout before each head's classifier


@dataclass
class SegmentDataConfig:
    train: Optional[Union[str, List[str]]] = None  # image+mask pairs: an ADE20K root (images/<split>, annotations/<split>), a folder with images/ and masks/, or shards with <key>.jpg + <key>.<mask_ext>
    val: Optional[Union[str, List[str]]] = None  # evaluation pairs, same layouts
    train_split: str = "training"  # ADE20K layout: the subfolder of images/ and annotations/ for data.train
    val_split: str = "validation"  # ADE20K layout: the subfolder for data.val
    mask_ext: str = "png"  # shards: the mask member's extension (e.g. seg.png for <key>.seg.png)
    reduce_zero_label: bool = True  # ADE20K protocol: label 0 ignored, 1..K -> 0..K-1
    scale: Tuple[int, int] = (2048, 512)  # resize scale (long, short) of training (times the random ratio) and evaluation
    ratio_range: Tuple[float, float] = (0.5, 2.0)  # training: random factor on scale
    cat_max_ratio: float = 0.75  # training crop: re-draw (up to 10x) while one class covers more than this share
    hflip: bool = True  # training: horizontal flip with probability 0.5
    photometric: bool = True  # training: mmseg's PhotoMetricDistortion
    mean: Tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: Tuple[float, float, float] = (0.229, 0.224, 0.225)
    num_workers: int = 4  # per rank: DataLoader workers (DALI is not used for segmentation)
    cache_dir: Optional[str] = None  # local copies of remote shards; default $MEGADIGPT_CACHE or ~/.cache/megadigpt/shards
    io_timeout_s: float = 60.0  # remote reads: seconds without progress before a read is abandoned and retried
    io_retries: int = 3  # remote reads: retries with backoff before a shard is skipped


@dataclass
class SegmentOptimConfig(FinetuneOptimConfig):
    lr: Optional[float] = 1e-4  # absolute peak lr (BEiT/MAE ADE20K B: 1e-4 at batch 16)
    min_lr: float = 0.0  # poly's end value
    layer_decay: float = 0.65  # layer-wise lr decay over the encoder; neck and heads get the full lr
    warmup_epochs: float = 0.0
    warmup_steps: Optional[int] = 1500  # linear warm-up from warmup_ratio * lr
    schedule: str = "poly"  # poly (mmseg PolyLR, BEiT/MAE) | cosine (fine-tuning's)
    poly_power: float = 1.0
    warmup_ratio: float = 1e-6  # the warm-up's starting fraction of the lr (mmseg's warmup_ratio)


@dataclass
class SegmentTrainConfig(FinetuneTrainConfig):
    run_dir: str = "runs/segment"  # checkpoints, best/ and last/ exports, metrics.jsonl
    epochs: float = 0.0  # used only where max_steps is unset
    max_steps: Optional[int] = 160000  # optimizer steps (iterations, as mmseg counts them)
    global_batch: int = 16
    micro_batch: int = 2  # images per rank per forward; >= 2 unless SyncBatchNorm across GPUs
    zero_stage: int = 1
    ckpt_every: int = 4000  # optimizer steps between checkpoints (also at every evaluation and on a signal)
    peak_tflops: Optional[float] = None  # per-device peak for MFU (`megadigpt bench`); default: known GPUs, or a measured CPU matmul


@dataclass
class SegmentConfig:
    eval_every: int = 16000  # optimizer steps between evaluations (and always after the last)
    eval_mode: str = "slide"  # slide (crop windows eval_stride apart, mmseg ADE20K) | whole (the resized image at once)
    eval_stride: int = 341  # sliding-window stride (mmseg ADE20K: 341 for a 512 crop)
    eval_batch: int = 4  # windows per forward in sliding-window evaluation
    ema_decay: float = 0.0  # parameter EMA (0 = off); evaluated and exported too
    head_init_std: float = 0.01  # normal init std of the heads' 1x1 classifiers (mmseg's conv_seg: 0.01)


@dataclass
class SegmentRunConfig:
    model: SegmentModelConfig = field(default_factory=SegmentModelConfig)
    data: SegmentDataConfig = field(default_factory=SegmentDataConfig)
    optim: SegmentOptimConfig = field(default_factory=SegmentOptimConfig)
    train: SegmentTrainConfig = field(default_factory=SegmentTrainConfig)
    segment: SegmentConfig = field(default_factory=SegmentConfig)

    def to_dict(self) -> Dict[str, Any]:
        return plain(dataclasses.asdict(self))


_config.TREES.append(("Semantic segmentation (`megadigpt segment`)", SegmentRunConfig, ("segment",)))

_config.RULES.update({
    SegmentModelConfig: dict(arch=one_of(lambda: ("auto",) + _config.vit_archs()), patch_size=POSITIVE,
                             crop_size=POSITIVE, embed_dim=POSITIVE, depth=POSITIVE, num_heads=POSITIVE,
                             mlp_ratio=POSITIVE, drop_path=FRACTION_BELOW_1, num_classes=at_least(1),
                             feature_blocks=each(at_least(1)), channels=POSITIVE, aux_channels=POSITIVE,
                             aux_weight=NON_NEGATIVE, dropout=FRACTION_BELOW_1),
    SegmentDataConfig: dict(scale=each(POSITIVE), ratio_range=ordered(POSITIVE), cat_max_ratio=FRACTION_ABOVE_0,
                            std=STD, num_workers=NON_NEGATIVE, io_timeout_s=POSITIVE, io_retries=NON_NEGATIVE),
    SegmentOptimConfig: dict(schedule=one_of("poly", "cosine"), poly_power=POSITIVE, warmup_ratio=FRACTION),
    SegmentTrainConfig: dict(peak_tflops=POSITIVE),
    SegmentConfig: dict(eval_every=POSITIVE, eval_mode=one_of("slide", "whole"), eval_stride=POSITIVE,
                        eval_batch=POSITIVE, ema_decay=FRACTION_BELOW_1, head_init_std=NON_NEGATIVE),
})
# geometry keys whose change makes a run directory's checkpoint another network (check_resume_config)
_config.RESUME_KEYS["SegmentRunConfig"] = {"model": ("patch_size", "crop_size", "embed_dim", "depth", "num_heads",
                                                      "mlp_ratio", "num_classes", "feature_blocks", "channels",
                                                      "aux_channels", "aux_weight")}


def load_segment_config(name_or_path: Optional[str] = None, overrides: Optional[List[str]] = None) -> SegmentRunConfig:
    return _config.load_config(name_or_path, overrides, root=SegmentRunConfig)

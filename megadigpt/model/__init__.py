"""The D-iGPT student in plain PyTorch. Nothing here knows about DeepSpeed or distributed training."""

from .digpt import DiGPT, build_model
from .masks import SegmentLayout, segment_causal_mask
from .vit import VIT_SIZES, ViTEncoder, default_taps

__all__ = ["DiGPT", "build_model", "SegmentLayout", "segment_causal_mask", "VIT_SIZES", "ViTEncoder",
           "default_taps"]

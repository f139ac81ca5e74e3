"""Image sources and augmentation pipelines. The torch path (``loader: torch``) runs everywhere."""

from .sources import Sample, find_samples, check_source
from .pretrain_loader import PretrainStream, View
from .loaders import build_pretrain_loader

__all__ = ["Sample", "find_samples", "check_source", "PretrainStream", "View", "build_pretrain_loader"]

"""Semantic segmentation metrics, mmseg's ``IoUMetric`` arithmetic on one confusion matrix.

The (K, K) int64 confusion matrix (rows: ground truth, columns: prediction) is summed over every pixel of every
validation image that is not ``ignore_index``, then summed over the ranks (one all-reduce); each rank adds only
the images of its own slice (the evaluation slices are disjoint and cover the set: each image counted once), and
padding batches add nothing. From the matrix:

- per-class IoU = TP / (TP + FP + FN); a class absent from both prediction and ground truth over the whole set has
  a union of 0 and an IoU of NaN, and is left out of the mean (mmseg's ``np.nanmean``). A class predicted but never
  in the ground truth has IoU 0 and counts;
- mIoU = the mean over the classes with a defined IoU; per-class accuracy = TP / ground-truth pixels (NaN where
  the class never occurs), mAcc its nanmean; aAcc (pixel accuracy) = all TP / all counted pixels.

ADE20K protocol (mmseg's ``reduce_zero_label=True``): label 0 ("other") is ignored and 1..150 become 0..149
(:func:`reduce_zero_label`), applied to the masks as they are read.
"""

import math
from typing import List, Optional

import numpy as np
import torch

IGNORE = 255


def reduce_zero_label(mask: np.ndarray) -> np.ndarray:
    """uint8 mask: 0 -> 255 (ignored), k -> k - 1 (mmseg's LoadAnnotations(reduce_zero_label=True); a 255 in the
    file stays 255)."""
    m = mask.astype(np.int16) - 1
    m[mask == 0] = IGNORE
    m[mask == IGNORE] = IGNORE
    return m.astype(np.uint8)


def confusion(pred: torch.Tensor, label: torch.Tensor, num_classes: int, ignore_index: int = IGNORE) -> torch.Tensor:
    """(K, K) int64 counts of (label, pred) over the pixels whose label is not ``ignore_index``. Labels at or
    above ``num_classes`` (other than the ignore index) are ignored too."""
    pred, label = pred.reshape(-1).long(), label.reshape(-1).long()
    keep = (label != ignore_index) & (label >= 0) & (label < num_classes)
    idx = label[keep] * num_classes + pred[keep].clamp(0, num_classes - 1)
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def all_reduce_confusion(conf: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(conf)
    return conf


def metrics_from_confusion(conf, class_names: Optional[List[str]] = None) -> dict:
    """-> {"mIoU", "mAcc", "aAcc" (percent), "IoU" / "Acc" (per class, percent, None where NaN), "pixels"}."""
    c = np.asarray(conf.cpu() if torch.is_tensor(conf) else conf, dtype=np.float64)
    tp = np.diag(c)
    gt, pr = c.sum(1), c.sum(0)
    union = gt + pr - tp
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
        acc = np.where(gt > 0, tp / gt, np.nan)
    total = c.sum()

    def nanmean(v):
        v = v[~np.isnan(v)]
        return float(v.mean() * 100) if len(v) else float("nan")

    def listed(v):
        return [None if math.isnan(x) else float(x * 100) for x in v]

    out = {"mIoU": nanmean(iou), "mAcc": nanmean(acc), "aAcc": float(tp.sum() / total * 100) if total else float("nan"),
           "IoU": listed(iou), "Acc": listed(acc), "pixels": int(total),
           "classes_present": int((union > 0).sum())}
    if class_names is not None:
        out["class_names"] = list(class_names)
    return out

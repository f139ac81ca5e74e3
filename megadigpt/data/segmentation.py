"""Semantic segmentation input: (image, mask) pairs, mmseg's ADE20K training pipeline and evaluation geometry.

Layouts (a source is one of them; shards may be local or remote, as everywhere in megadigpt):

- ADE20K's release: ``<root>/images/<split>/*.jpg`` with ``<root>/annotations/<split>/*.png`` (``split``:
  ``data.train_split`` / ``data.val_split``, ``training`` / ``validation`` by default);
- a generic folder: ``<root>/images/**`` with ``<root>/masks/**`` (or ``<root>/annotations/**``), paired by the path
  relative to the folder without its extension (``images/a/b.jpg`` <-> ``masks/a/b.png``);
- webdataset shards (file, folder of .tar, glob, ``{a..b}``, URLs) with ``<key>.jpg`` (any image extension) and
  ``<key>.<mask_ext>`` (``png`` by default; e.g. ``seg.png`` for ``<key>.seg.png``).

Masks hold class indices (8-bit grey or palette PNG, the size of the image; 255 = ignored). With
``reduce_zero_label`` (ADE20K) label 0 is ignored and 1..K become 0..K-1 (:func:`~megadigpt.train.seg_metrics.
reduce_zero_label`); labels at or above ``num_classes`` are ignored in the loss and the metrics.

Training (mmseg's ADE20K pipeline, every random choice drawn from ``np.random.default_rng([seed, epoch, index])``,
so a resumed epoch, any worker count and any rank give the same crops):
RandomResize(scale=(2048, 512), ratio 0.5-2.0, keep ratio; image bilinear, mask nearest) -> RandomCrop(crop,
cat_max_ratio=0.75: up to 10 re-draws while one class covers more than 75 % of the crop's labelled pixels) ->
horizontal flip (0.5) -> PhotoMetricDistortion (brightness +-32, contrast 0.5-1.5, saturation 0.5-1.5, hue +-18 in
OpenCV's 8-bit HSV, each with probability 0.5, contrast first or last at random) -> normalise -> pad to the crop
(image 0 after normalisation, mask 255), as mmseg's data preprocessor.

Evaluation (mmseg's ADE20K test pipeline): Resize(scale=(2048, 512), keep ratio) -> the model at that size (sliding
windows or the whole image, :mod:`megadigpt.train.segment`) -> logits resized to the original image -> compared
with the original-resolution mask. Each rank evaluates ``range(rank, n, world)``: every image exactly once.

Bad images (undecodable image or mask, a mask that is not single-channel or not the image's size) are flagged
``valid = False`` with the reason (a blank image, an all-ignored mask), recorded in ``bad_samples.jsonl`` like
other loaders' bad samples, and counted in no loss or metric.

The torch DataLoader path only: DALI is not used for segmentation. Its decoders and resizes work on images, not
on label maps paired with them (nearest-neighbour resizing of the mask with the image's own random geometry,
cat_max_ratio's re-draws that look at the mask's class histogram), and an ADE20K step is dominated by the
UperNet forward/backward at 512 px (16 images per step), not by decoding: the 2 x 20k images of ADE20K are read
in a few minutes per epoch by DataLoader workers.

The pair list is a plain Python list (ADE20K: 20k + 2k pairs); the memory-mapped SampleIndex of the classification
and pretraining loaders is for label-only samples.
"""

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from ..config import ConfigError
from .pretrain_loader import decode_problem, decode_rgb, sample_rng
from .sources import IMAGE_EXTS, Problem, Sample

IGNORE = 255


@dataclass(frozen=True)
class SegPair:
    image: Sample
    mask: Sample


# ---------------------------------------------------------------------------------------------- listing
def _folder_pairs(root: Path, split: Optional[str], problems: List[Problem]) -> List[SegPair]:
    if split and (root / "images" / split).is_dir() and (root / "annotations" / split).is_dir():
        img_dir, mask_dir = root / "images" / split, root / "annotations" / split  # ADE20K
    elif (root / "images").is_dir() and ((root / "masks").is_dir() or (root / "annotations").is_dir()):
        img_dir = root / "images"
        mask_dir = root / "masks" if (root / "masks").is_dir() else root / "annotations"
    else:
        raise ConfigError(f"{root}: not a segmentation folder (expected images/{split or '<split>'}/ with "
                          f"annotations/{split or '<split>'}/ as ADE20K, or images/ with masks/)")
    masks = {}
    for p in sorted(mask_dir.rglob("*")):
        if p.is_file() and p.suffix.lower() in (".png", ".bmp", ".tif", ".tiff"):
            masks.setdefault(str(p.relative_to(mask_dir).with_suffix("")), p)
    pairs = []
    for p in sorted(img_dir.rglob("*")):
        if not (p.is_file() and p.suffix.lower() in IMAGE_EXTS):
            continue
        rel = str(p.relative_to(img_dir).with_suffix(""))
        m = masks.get(rel)
        if m is None:
            problems.append(Problem(str(p), rel, f"no mask for this image in {mask_dir}"))
            continue
        pairs.append(SegPair(Sample(str(p), key=rel), Sample(str(m), key=rel)))
    return pairs


def _shard_pairs(shards: List[str], mask_ext: str, problems: List[Problem]) -> List[SegPair]:
    from .sources import scan_tar

    mext = "." + mask_ext.lower().lstrip(".")
    pairs = []
    for shard in shards:
        try:
            f = open(shard, "rb")
        except OSError as e:
            problems.append(Problem(shard, "", f"unreadable shard: {e.strerror}"))
            continue
        with f:
            size = os.fstat(f.fileno()).st_size
            members = scan_tar(shard, f, size, problems)
        for key, parts in members.items():
            img = next((parts[e] for e in IMAGE_EXTS if e in parts and e != mext), None)
            if img is None or mext not in parts:
                what = "image" if img is None else f"mask ({mext})"
                problems.append(Problem(shard, key, f"no {what} member (members: {', '.join(sorted(parts))})"))
                continue
            msk = parts[mext]
            if img[0] + img[1] > size or msk[0] + msk[1] > size:
                problems.append(Problem(shard, key, "truncated: a member runs past the end of the shard"))
                continue
            pairs.append(SegPair(Sample(shard, img[0], img[1], key), Sample(shard, msk[0], msk[1], key)))
    return pairs


def find_pairs(source, split: Optional[str] = None, mask_ext: str = "png") -> Tuple[List[SegPair], List[Problem]]:
    """-> (pairs, problems found while listing). ConfigError when the source holds no pair."""
    from .sources import resolve_paths

    problems: List[Problem] = []
    kind, where = resolve_paths(source, problems)
    if kind == "folder":
        pairs = _folder_pairs(Path(where), split, problems)
    elif kind == "tar":
        pairs = _shard_pairs(where, mask_ext, problems)
    else:
        raise ConfigError(f"segmentation data {source!r}: expected an ADE20K-style or images/+masks/ folder or "
                          f"shards with image and .{mask_ext} members, not a {kind} source")
    if not pairs:
        extra = f" ({len(problems)} problems, e.g. {problems[0].path}: {problems[0].reason})" if problems else ""
        raise ConfigError(f"segmentation data {source!r} holds no image+mask pairs{extra}")
    return pairs, problems


def check_pairs_source(source, split: Optional[str] = None) -> None:
    """Cheap early check: the source exists and has a known layout (no shard is scanned)."""
    from .sources import resolve_paths

    kind, where = resolve_paths(source)
    if kind == "missing":  # previewing (submit --dry-run): the source is not on this machine, and that was noted
        return
    if kind == "folder":
        root = Path(where)
        if not ((split and (root / "images" / split).is_dir()) or (root / "images").is_dir()):
            raise ConfigError(f"{root}: not a segmentation folder (expected images/ and annotations/ or masks/)")
    elif kind != "tar":
        raise ConfigError(f"segmentation data {source!r}: not a folder or shards")


# ---------------------------------------------------------------------------------------------- decoding
def decode_mask(data: bytes) -> np.ndarray:
    import io

    img = Image.open(io.BytesIO(data))
    img.load()
    if img.mode in ("P", "L"):
        return np.array(img, dtype=np.uint8)
    if img.mode in ("I", "I;16", "I;16B", "I;16L"):
        arr = np.array(img)
        if arr.max() > 255:
            raise ValueError(f"mask has labels up to {arr.max()} (8-bit class indices expected)")
        return arr.astype(np.uint8)
    raise ValueError(f"mask is {img.mode}, not a single-channel class-index image")


def load_pair(pair: SegPair, reduce_zero: bool, handles=None):
    """-> (RGB uint8 (H, W, 3), mask uint8 (H, W)); raises on a bad pair."""
    from ..train.seg_metrics import reduce_zero_label

    img = np.asarray(decode_rgb(pair.image.read(handles)))
    mask = decode_mask(pair.mask.read(handles))
    if mask.shape != img.shape[:2]:
        raise ValueError(f"mask is {mask.shape[1]}x{mask.shape[0]}, image {img.shape[1]}x{img.shape[0]}")
    return img, (reduce_zero_label(mask) if reduce_zero else mask)


# ---------------------------------------------------------------------------------------------- augmentation
def rescale_size(h: int, w: int, scale: Sequence[int]) -> Tuple[int, int]:
    """mmcv's ``rescale_size`` with keep_ratio: the largest size within (long, short) = scale. -> (h, w)."""
    f = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return int(h * f + 0.5), int(w * f + 0.5)


def resize_pair(img: np.ndarray, mask: Optional[np.ndarray], h: int, w: int):
    out = np.asarray(Image.fromarray(img).resize((w, h), Image.BILINEAR))
    if mask is None:
        return out, None
    return out, np.asarray(Image.fromarray(mask).resize((w, h), Image.NEAREST))


def _crop_box(rng, h: int, w: int, crop: int):
    y = int(rng.integers(0, max(h - crop, 0) + 1))
    x = int(rng.integers(0, max(w - crop, 0) + 1))
    return y, min(y + crop, h), x, min(x + crop, w)


def random_crop(rng, img, mask, crop: int, cat_max_ratio: float):
    """mmseg's RandomCrop: a box; while one class holds >= cat_max_ratio of the labelled pixels (or only one class
    is there), up to 10 new boxes; the last drawn is used."""
    box = _crop_box(rng, *mask.shape, crop)
    if cat_max_ratio < 1.0:
        for _ in range(10):
            y1, y2, x1, x2 = box
            _, cnt = np.unique(mask[y1:y2, x1:x2][mask[y1:y2, x1:x2] != IGNORE], return_counts=True)
            if len(cnt) > 1 and cnt.max() / cnt.sum() < cat_max_ratio:
                break
            box = _crop_box(rng, *mask.shape, crop)
    y1, y2, x1, x2 = box
    return img[y1:y2, x1:x2], mask[y1:y2, x1:x2]


def rgb_to_hsv8(img: np.ndarray) -> np.ndarray:
    """OpenCV's 8-bit HSV (H in [0, 180), S and V in [0, 255]) of a uint8 RGB image, in numpy."""
    x = img.astype(np.float32)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    v = x.max(-1)
    mn = x.min(-1)
    d = v - mn
    s = np.where(v > 0, d * 255.0 / np.maximum(v, 1e-6), 0.0)
    dd = np.maximum(d, 1e-6)
    h = np.where(v == r, 60.0 * (g - b) / dd, np.where(v == g, 120.0 + 60.0 * (b - r) / dd,
                                                       240.0 + 60.0 * (r - g) / dd))
    h = np.where(d == 0, 0.0, h)
    h = np.where(h < 0, h + 360.0, h)
    out = np.stack([np.round(h / 2.0) % 180, np.round(s), np.round(v)], -1)
    return np.clip(out, 0, 255).astype(np.uint8)


def hsv8_to_rgb(hsv: np.ndarray) -> np.ndarray:
    h = hsv[..., 0].astype(np.float32) * 2.0
    s = hsv[..., 1].astype(np.float32) / 255.0
    v = hsv[..., 2].astype(np.float32)
    c = v * s
    hp = (h / 60.0) % 6
    xx = c * (1 - np.abs(hp % 2 - 1))
    m = v - c
    z = np.zeros_like(c)
    sector = np.floor(hp).astype(np.int64)
    table = [(c, xx, z), (xx, c, z), (z, c, xx), (z, xx, c), (xx, z, c), (c, z, xx)]
    rgb = np.zeros(hsv.shape, np.float32)
    for k, (a, bb, cc) in enumerate(table):
        sel = sector == k
        rgb[sel] = np.stack([a[sel], bb[sel], cc[sel]], -1)
    return np.clip(np.round(rgb + m[..., None]), 0, 255).astype(np.uint8)


def _convert(img, alpha=1.0, beta=0.0):
    return np.clip(img.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def photometric_distortion(rng, img: np.ndarray, brightness_delta=32, contrast=(0.5, 1.5), saturation=(0.5, 1.5),
                           hue_delta=18) -> np.ndarray:
    """mmseg's PhotoMetricDistortion, in its order and with its probabilities, drawing from ``rng``."""
    if rng.integers(2):
        img = _convert(img, beta=rng.uniform(-brightness_delta, brightness_delta))
    mode = rng.integers(2)

    def do_contrast(im):
        return _convert(im, alpha=rng.uniform(*contrast)) if rng.integers(2) else im

    if mode == 1:
        img = do_contrast(img)
    if rng.integers(2):
        hsv = rgb_to_hsv8(img)
        hsv[..., 1] = _convert(hsv[..., 1], alpha=rng.uniform(*saturation))
        img = hsv8_to_rgb(hsv)
    if rng.integers(2):
        hsv = rgb_to_hsv8(img)
        hsv[..., 0] = (hsv[..., 0].astype(np.int64) + int(rng.integers(-hue_delta, hue_delta + 1))) % 180
        img = hsv8_to_rgb(hsv)
    if mode == 0:
        img = do_contrast(img)
    return img


@dataclass(frozen=True)
class SegAugment:
    crop: int = 512
    scale: Tuple[int, int] = (2048, 512)
    ratio_range: Tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    hflip: bool = True
    photometric: bool = True


def augment(rng, img: np.ndarray, mask: np.ndarray, a: SegAugment):
    """The training pipeline of one pair (before normalisation and padding)."""
    r = rng.uniform(*a.ratio_range)
    h, w = rescale_size(*mask.shape, (a.scale[0] * r, a.scale[1] * r))
    img, mask = resize_pair(img, mask, h, w)
    img, mask = random_crop(rng, img, mask, a.crop, a.cat_max_ratio)
    if a.hflip and rng.random() < 0.5:
        img, mask = img[:, ::-1], mask[:, ::-1]
    if a.photometric:
        img = photometric_distortion(rng, np.ascontiguousarray(img))
    return np.ascontiguousarray(img), np.ascontiguousarray(mask)


def normalise(img: np.ndarray, mean, std) -> torch.Tensor:
    x = torch.from_numpy(np.array(img, dtype=np.float32)).permute(2, 0, 1) / 255.0  # a copy: PIL's are read-only
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


# ---------------------------------------------------------------------------------------------- datasets
class SegTrainSet(torch.utils.data.Dataset):
    """Item i of ``indices``: the augmented crop of pair ``indices[i]`` for ``epoch`` (padded to the crop)."""

    def __init__(self, pairs: Sequence[SegPair], indices: Sequence[int], aug: SegAugment, mean, std, seed: int,
                 epoch: int, reduce_zero: bool):
        self.pairs, self.indices, self.aug = pairs, list(indices), aug
        self.mean, self.std, self.seed, self.epoch, self.reduce_zero = mean, std, seed, epoch, reduce_zero

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        index = self.indices[i]
        c = self.aug.crop
        image = torch.zeros(3, c, c)
        mask = torch.full((c, c), IGNORE, dtype=torch.uint8)
        try:
            img, m = load_pair(self.pairs[index], self.reduce_zero)
        except Exception as e:  # noqa: BLE001 - a bad pair is flagged, not fatal
            return image, mask, False, index, self.epoch, _why(self.pairs[index], e)
        img, m = augment(sample_rng(self.seed, self.epoch, index), img, m, self.aug)
        h, w = m.shape
        image[:, :h, :w] = normalise(img, self.mean, self.std)
        mask[:h, :w] = torch.from_numpy(np.array(m))
        return image, mask, True, index, self.epoch, None


def _why(pair: SegPair, e: BaseException) -> str:
    if isinstance(e, ValueError) and str(e).startswith("mask"):
        return str(e)
    try:
        data = pair.image.read()
    except OSError:
        data = None
    return decode_problem(data, e)


def _collate_train(items):
    return {"image": torch.stack([it[0] for it in items]), "mask": torch.stack([it[1] for it in items]),
            "valid": torch.tensor([it[2] for it in items]), "index": torch.tensor([it[3] for it in items]),
            "bad": [(it[3], it[4], it[5]) for it in items if not it[2]]}


def train_loader(pairs, rank: int, world: int, epoch: int, seed: int, batch_size: int, aug: SegAugment, mean, std,
                 reduce_zero: bool, num_workers: int = 2, skip_batches: int = 0, pin_memory: bool = False):
    """This rank's batches of ``epoch`` (classification's per-epoch permutation: equal slices, tail dropped),
    starting after ``skip_batches`` (a resumed epoch)."""
    from .classification import shard_indices

    indices = shard_indices(len(pairs), rank, world, epoch, seed, True)[skip_batches * batch_size:]
    ds = SegTrainSet(pairs, indices, aug, mean, std, seed, epoch, reduce_zero)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, drop_last=True,
                                       num_workers=num_workers, collate_fn=_collate_train, pin_memory=pin_memory,
                                       persistent_workers=False)


class SegEvalSet(torch.utils.data.Dataset):
    """Pair ``indices[i]`` resized to the evaluation scale (keep ratio), with its original mask."""

    def __init__(self, pairs, indices, scale, mean, std, reduce_zero: bool):
        self.pairs, self.indices, self.scale = pairs, list(indices), scale
        self.mean, self.std, self.reduce_zero = mean, std, reduce_zero

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        index = self.indices[i]
        try:
            img, m = load_pair(self.pairs[index], self.reduce_zero)
        except Exception as e:  # noqa: BLE001
            return {"image": None, "mask": None, "valid": False, "index": index, "reason": _why(self.pairs[index], e)}
        if self.scale:
            h, w = rescale_size(*m.shape, self.scale)
            img, _ = resize_pair(img, None, h, w)
        return {"image": normalise(img, self.mean, self.std), "mask": torch.from_numpy(m.copy()), "valid": True,
                "index": index, "reason": None}


def eval_indices(n: int, rank: int, world: int) -> List[int]:
    """Every image exactly once over the ranks (slices differ by at most one)."""
    return list(range(rank, n, world))


def eval_loader(pairs, rank: int, world: int, scale, mean, std, reduce_zero: bool, num_workers: int = 2):
    ds = SegEvalSet(pairs, eval_indices(len(pairs), rank, world), scale, mean, std, reduce_zero)
    return torch.utils.data.DataLoader(ds, batch_size=None, shuffle=False, num_workers=num_workers,
                                       collate_fn=lambda x: x)


def slide_windows(h: int, w: int, crop: int, stride: int) -> List[Tuple[int, int, int, int]]:
    """mmseg's ``slide_inference`` windows (y1, y2, x1, x2): a grid of ``stride`` steps, the last window of each
    row and column moved back to end at the image's edge; windows are at most ``crop`` on each side."""
    hg = max(h - crop + stride - 1, 0) // stride + 1
    wg = max(w - crop + stride - 1, 0) // stride + 1
    out = []
    for i in range(hg):
        for j in range(wg):
            y1, x1 = i * stride, j * stride
            y2, x2 = min(y1 + crop, h), min(x1 + crop, w)
            out.append((max(y2 - crop, 0), y2, max(x2 - crop, 0), x2))
    return out


def num_windows(h: int, w: int, crop: int, stride: int) -> int:
    return (max(h - crop + stride - 1, 0) // stride + 1) * (max(w - crop + stride - 1, 0) // stride + 1)


def eval_size(h: int, w: int, scale) -> Tuple[int, int]:
    return rescale_size(h, w, scale) if scale else (h, w)


def steps_per_epoch_of(n: int, world: int, micro: int, accum: int) -> int:
    return (n // world) // micro // accum


def ceil_div(a: int, b: int) -> int:
    return int(math.ceil(a / b))

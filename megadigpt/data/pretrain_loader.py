"""The pretraining input stream (torch path).

Determinism and resume: the stream is the concatenation of per-epoch permutations of the dataset, each drawn
from (seed, epoch). Optimizer step s consumes stream positions [s*G, (s+1)*G) for global batch G; rank r's
micro-batch a of that step is the slice starting at s*G + (a*world + r)*micro. Every random choice of a sample
(crop box, flip, segment order) is drawn from (seed, epoch, index) alone. So a run reproduces itself exactly
after a resume at any step, and the global batch is the same set of identically augmented images for any world
size and accumulation split.

Bad images (truncated, garbage, empty, unreadable) never stop the run: the sample comes back as zeros with
``valid = False`` and a reason, the trainer leaves it out of the loss, counts it and records it
(:mod:`megadigpt.data.bad_samples`).
"""

import io
import math
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from .images import examine_image
from .sources import Sample

INTERP = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}


@dataclass(frozen=True)
class View:
    """One rendering of the crop: the student's or the teacher's (its own size and normalisation)."""

    size: int
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, index])


def random_resized_crop_box(rng: np.random.Generator, height: int, width: int, scale, ratio):
    """torchvision's RandomResizedCrop.get_params, drawing from ``rng``. Returns (top, left, h, w)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def decode_rgb(data: bytes) -> Image.Image:
    """Decode any PIL-readable image (JPEG, PNG named .jpg, CMYK, grayscale, palette) to RGB; raises on garbage."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        img = Image.open(io.BytesIO(data))
        img.load()
    return img.convert("RGB")


def decode_problem(data, exc: BaseException) -> str:
    """Why a sample did not decode, in words: the header check's finding where it has one, else the error."""
    if data is None:
        return f"unreadable: {getattr(exc, 'strerror', None) or exc}"
    return examine_image(data)[0] or f"decode failed: {type(exc).__name__}: {str(exc)[:160]}"


class PretrainStream(torch.utils.data.Dataset):
    """Map-style dataset over global stream positions; see the module docstring."""

    def __init__(self, samples: Sequence[Sample], sizes: Sequence[int], num_segments: int, seed: int,
                 scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), interpolation="bicubic", hflip=True):
        # a SampleIndex stays one (memory-mapped, pickled by reference); never materialised as a list
        self.samples = samples if hasattr(samples, "__getitem__") and hasattr(samples, "__len__") else list(samples)
        self.sizes = sorted(set(sizes))
        self.num_segments, self.seed = num_segments, seed
        self.scale, self.ratio, self.hflip = tuple(scale), tuple(ratio), hflip
        if interpolation not in INTERP:
            raise ValueError(f"interpolation must be one of {list(INTERP)}")
        self.interp, self.interp_name = INTERP[interpolation], interpolation
        self._perm_cache: Dict[int, np.ndarray] = {}
        self._handles: Dict[str, object] = {}

    def __getstate__(self):
        # open file handles do not travel (DALI's spawned source workers, spawned DataLoader workers): reopened
        return {**self.__dict__, "_handles": {}}

    def __len__(self):
        return len(self.samples)

    def locate(self, position: int) -> Tuple[int, int]:
        """Stream position -> (epoch, dataset index)."""
        n = len(self.samples)
        epoch = position // n
        perm = self._perm_cache.get(epoch)
        if perm is None:
            perm = np.random.default_rng([self.seed, epoch]).permutation(n)
            if n <= np.iinfo(np.uint32).max:  # the same order in half the memory (36M samples: 144 MiB, not 288)
                perm = perm.astype(np.uint32)
            self._perm_cache = {epoch: perm}  # one epoch at a time
        return epoch, int(perm[position % n])

    def __getitem__(self, position: int):
        epoch, index = self.locate(position)
        sample = self.samples[index]
        rng = sample_rng(self.seed, epoch, index)
        data, why = None, None
        try:
            data = sample.read(self._handles)
        except Exception as e:  # noqa: BLE001 - an unreadable member is a bad sample too
            why = decode_problem(None, e)
        views, box, reason = render_views(data, why, rng, self.sizes, self.scale, self.ratio, self.hflip,
                                          self.interp)
        # the segment order has its own stream, so it does not depend on whether the image decoded
        order = torch.from_numpy(np.random.default_rng([self.seed, epoch, index, 1]).permutation(self.num_segments))
        return {"views": views, "order": order, "valid": reason is None, "label": sample.label, "index": index,
                "epoch": epoch, "box": box, "reason": reason}


def render_views(data: Optional[bytes], why: Optional[str], rng: np.random.Generator, sizes: Sequence[int], scale,
                 ratio, hflip: bool, interp) -> Tuple[List[torch.Tensor], tuple, Optional[str]]:
    """One sample's views (the torch path of both access modes): decode, draw the crop box and the flip from
    ``rng`` (in that order), resize the crop to every size. Returns (uint8 CHW views, (top, left, h, w, flip), None)
    or, for an image that does not decode (or ``why`` given: known bad), zero views, a zero box and the reason."""
    try:
        if why:
            raise ValueError(why)
        img = decode_rgb(data)
        top, left, h, w = random_resized_crop_box(rng, img.height, img.width, scale, ratio)
        flip = bool(hflip and rng.random() < 0.5)
        crop = img.crop((left, top, left + w, top + h))
        views = []
        for s in sizes:
            v = crop.resize((s, s), interp)
            if flip:
                v = v.transpose(Image.FLIP_LEFT_RIGHT)
            views.append(torch.from_numpy(np.asarray(v, dtype=np.uint8).copy()).permute(2, 0, 1))
        return views, (top, left, h, w, flip), None
    except Exception as e:  # noqa: BLE001 - any undecodable input is a bad sample, not a dead run
        return ([torch.zeros(3, s, s, dtype=torch.uint8) for s in sizes], (0, 0, 0, 0, False),
                why or decode_problem(data, e))


def collate(items: List[dict]) -> dict:
    return {
        "views": [torch.stack([it["views"][k] for it in items]) for k in range(len(items[0]["views"]))],
        "order": torch.stack([it["order"] for it in items]).long(),
        "valid": torch.tensor([it["valid"] for it in items]),
        "label": torch.tensor([it["label"] for it in items]),
        "index": torch.tensor([it["index"] for it in items]),
        "epoch": torch.tensor([it["epoch"] for it in items]),
        # (dataset index, epoch, reason) of each bad sample: what bad_samples.jsonl records
        "bad": [(it["index"], it["epoch"], it["reason"]) for it in items if not it["valid"]],
    }


class StepBatchSampler(torch.utils.data.Sampler):
    """Yields this rank's micro-batches of stream positions for optimizer steps [start_step, total_steps)."""

    def __init__(self, global_batch: int, micro_batch: int, rank: int, world: int, start_step: int, total_steps: int):
        self.G, self.m, self.rank, self.world = global_batch, micro_batch, rank, world
        self.accum = global_batch // (micro_batch * world)
        self.start, self.total = start_step, total_steps

    def __len__(self):
        return max(0, self.total - self.start) * self.accum

    def __getitem__(self, i: int) -> List[int]:
        """The i-th micro-batch this sampler yields (random access, nothing materialised)."""
        step, a = self.start + i // self.accum, i % self.accum
        first = step * self.G + (a * self.world + self.rank) * self.m
        return list(range(first, first + self.m))

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

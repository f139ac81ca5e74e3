"""Fine-tuning and evaluation input (labels included), DALI or torch.

train: RandomResizedCrop(scale 0.08-1, bicubic), horizontal flip, RandAugment (m9, n2), normalisation.
eval : resize the shorter side to size / crop_pct (bicubic), centre crop, normalisation.
Random erasing, mixup and cutmix are batch operations of the fine-tuning loop (on the device), not of the
pipelines. Bad images are replaced by a blank one and flagged ``valid = False``; each batch names its bad
samples (``bad``: dataset index, epoch, reason). On DALI, decode failures fall back per sample as in
:mod:`megadigpt.data.dali_loader` (Pillow decodes what DALI does not).

Each rank reads a disjoint slice of the per-epoch permutation (train: equal-sized slices, the tail dropped;
eval: every sample exactly once, slices may differ by one). Training augmentation is a function of (seed, epoch,
sample) on both paths (DALI: the crop box, flip and RandAugment's ops and signs are drawn in Python from the
sample's own stream and handed to DALI), so it does not depend on the rank or the batch that reads the sample.
"""

import logging
import os
from typing import List, Sequence

import numpy as np
import torch

from ..distributed.engine import resolve_device
from .dali_loader import (PLACEHOLDER, explain_failure, meta_to_torch, prepare, py_start_method, run_pipeline,
                          view_to_torch)
from .pretrain_loader import decode_problem, decode_rgb, random_resized_crop_box
from .sources import Sample

log = logging.getLogger(__name__)


def shard_indices(n: int, rank: int, world: int, epoch: int, seed: int, train: bool) -> List[int]:
    if not train:
        return list(range(rank, n, world))
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    per_rank = n // world
    return perm[rank * per_rank:(rank + 1) * per_rank].tolist()


# ---------------------------------------------------------------------------------------------- torch path
def _posterize(img, bits_to_keep, **__):
    """timm's RandAugment posterize, but 0 bits gives the black image old Pillow gave: Pillow >= 10 raises for
    bits < 1, and timm's 'inc1' policy reaches 0 bits at magnitude 10 (m9 + mstd0.5 noise, clipped to 10) - about
    1 image in 700 would otherwise fail (and be dropped as a bad sample)."""
    from PIL import Image, ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep < 1:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def _patch_timm_posterize():
    from timm.data import auto_augment

    for name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
        if name in auto_augment.NAME_TO_OP:
            auto_augment.NAME_TO_OP[name] = _posterize


def timm_transform(train: bool, size: int, mean, std, crop_pct: float = 0.875, auto_augment="rand-m9-mstd0.5-inc1",
                   scale=(0.08, 1.0)):
    from timm.data import create_transform

    if auto_augment in ("none", "", None):
        auto_augment = None
    _patch_timm_posterize()
    if train:
        return create_transform(size, is_training=True, scale=scale, hflip=0.5, auto_augment=auto_augment,
                                interpolation="bicubic", re_prob=0.0, mean=mean, std=std)
    return create_transform(size, is_training=False, crop_pct=crop_pct, interpolation="bicubic", mean=mean, std=std)


class LabelledImages(torch.utils.data.Dataset):
    """``seed``: (run seed, epoch) -> every training sample's augmentation is drawn from its own stream, so a
    resumed epoch (``skip_batches``) and any worker count give the same images as an uninterrupted run."""

    def __init__(self, samples: Sequence[Sample], indices: Sequence[int], transform, size: int, seed=None,
                 epoch: int = 0):
        self.samples, self.indices, self.transform, self.size = samples, list(indices), transform, size
        self.seed, self.epoch = seed, epoch

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        s = self.samples[self.indices[i]]
        if self.seed is not None:
            import random

            k = int(np.random.SeedSequence([*self.seed, self.indices[i]]).generate_state(1)[0])
            random.seed(k)
            np.random.seed(k)  # timm's RandAugment picks its ops with numpy
            torch.manual_seed(k)
        data = None
        try:
            data = s.read()
            return self.transform(decode_rgb(data)), s.label, True, self.indices[i], self.epoch, None
        except Exception as e:  # noqa: BLE001 - a bad image is flagged, not fatal
            return (torch.zeros(3, self.size, self.size), s.label, False, self.indices[i], self.epoch,
                    decode_problem(data, e))


def _collate(items):
    return {"image": torch.stack([it[0] for it in items]), "label": torch.tensor([it[1] for it in items]),
            "valid": torch.tensor([it[2] for it in items]), "index": torch.tensor([it[3] for it in items]),
            "bad": [(it[3], it[4], it[5]) for it in items if not it[2]]}


def torch_loader(samples, indices, train, size, batch_size, mean, std, crop_pct=0.875, num_workers=2, seed=0,
                 epoch=0, auto_augment="rand-m9-mstd0.5-inc1", scale=(0.08, 1.0), pin_memory=False):
    ds = LabelledImages(samples, indices, timm_transform(train, size, mean, std, crop_pct, auto_augment, scale), size,
                        seed=(seed, epoch) if train else None, epoch=epoch)
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, drop_last=train,
                                       num_workers=num_workers, collate_fn=_collate, generator=g,
                                       worker_init_fn=None, persistent_workers=False, pin_memory=pin_memory)


# ---------------------------------------------------------------------------------------------- DALI path
def eval_geometry(w: int, h: int, size: int, crop_pct: float):
    """torchvision's arithmetic for Resize(int(size / crop_pct)) + CenterCrop(size): resized (h, w) and the crop's
    top-left corner, so that DALI cuts exactly the pixels timm's eval transform cuts."""
    short = int(size / crop_pct)
    if w <= h:
        nw, nh = short, int(short * h / w)
    else:
        nh, nw = short, int(short * w / h)
    return nh, nw, int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))


RA_N, RA_M = 2, 9  # RandAugment: ops per image, magnitude bin (timm's rand-m9 ... with n=2)
RATIO = (3 / 4, 4 / 3)


def augment_draw(seed: int, epoch: int, index: int, height: int, width: int, scale, num_ops: int):
    """The training augmentation of one sample, from its own stream: crop box (top, left, h, w), flip, the
    RandAugment op of each of the RA_N levels and the sign of its magnitude."""
    rng = np.random.default_rng([seed, epoch, index, 3])
    box = random_resized_crop_box(rng, height, width, scale, RATIO)
    flip = bool(rng.random() < 0.5)
    return box, flip, rng.integers(0, num_ops, RA_N), rng.integers(0, 2, RA_N)


class _LabelledSource:
    """``start``: the batch the pipeline's first iteration serves (a rebuilt pipeline goes on from there);
    ``pillow_only``: sample indices DALI failed on (why a sample is bad travels in the output). Training: each
    sample's augmentation comes from :func:`augment_draw` ((seed, epoch, index); ``num_ops`` RandAugment ops)."""

    def __init__(self, samples, indices, batch_size, drop_last, size=224, crop_pct=0.875, seed=0, epoch=0,
                 scale=(0.08, 1.0), num_ops=1):
        self.samples, self.indices, self.bs = samples, list(indices), batch_size
        self.size, self.crop_pct = size, crop_pct
        self.seed, self.epoch, self.scale, self.num_ops = seed, epoch, scale, num_ops
        self.with_geometry = not drop_last  # eval only: the exact resize / crop of torchvision
        n = len(self.indices)
        self.num_batches = n // batch_size if drop_last else (n + batch_size - 1) // batch_size
        self.handles = {}
        self.start, self.pillow_only = 0, set()

    def __getstate__(self):
        # DALI's spawned source workers get a copy: no open file handles (they reopen their own)
        return {**self.__dict__, "handles": {}}

    def batch_indices(self, b: int) -> List[int]:
        idx = self.indices[b * self.bs:(b + 1) * self.bs]
        return idx + [idx[-1]] * (self.bs - len(idx))  # a partial last batch is padded; the padding is cut off

    def encoded(self, i: int):
        """Sample i as DALI gets it: (bytes, (width, height), why it is bad or None)."""
        try:
            data, reason, w, h = prepare(self.samples[i].read(self.handles), i in self.pillow_only)
        except OSError as e:
            data, reason = None, f"unreadable: {e.strerror or e}"
        if data is None:
            return PLACEHOLDER, (8, 8), reason
        return data, (w, h), None

    def draw(self, i: int, wh):
        """Training: sample i's (crop start, crop shape, flip, ops, signs) as DALI arrays."""
        (top, left, h, w), flip, ops, signs = augment_draw(self.seed, self.epoch, i, wh[1], wh[0], self.scale,
                                                           self.num_ops)
        return (np.array([top, left], dtype=np.int32), np.array([h, w], dtype=np.int32),
                np.array(flip, dtype=np.int32), ops.astype(np.int32), signs.astype(np.int32))

    def sample(self, i: int):
        """Sample i's outputs: bytes, label, valid, eval geometry or training draws, why it is bad (carried by
        the pipeline: a parallel source runs in other processes)."""
        data, wh, reason = self.encoded(i)
        if self.with_geometry:
            nh, nw, top, left = eval_geometry(*wh, self.size, self.crop_pct)
            extra = (np.array([nh, nw, top, left], dtype=np.float32),)
        else:
            extra = self.draw(i, wh)
        return (np.frombuffer(data, dtype=np.uint8), np.array(self.samples[i].label, dtype=np.int64),
                np.array(reason is None, dtype=np.int32), *extra,
                np.frombuffer((reason or "-").encode(), dtype=np.uint8))

    def __call__(self, info):
        """Batch mode (serial): ``info`` is the iteration; sample mode (DALI's parallel external source): a
        SampleInfo, one sample of the batch."""
        if isinstance(info, int):
            b = min(self.start + info, self.num_batches - 1)
            return [list(c) for c in zip(*(self.sample(i) for i in self.batch_indices(b)))]
        b = min(self.start + info.iteration, self.num_batches - 1)
        return self.sample(self.batch_indices(b)[info.idx_in_batch])


class _ProbeSource:
    """One sample a batch, for finding which samples DALI fails on."""

    def __init__(self, source: _LabelledSource, indices: List[int]):
        self.source, self.todo = source, indices

    def index_of(self, k: int) -> int:
        return self.todo[k]

    def __call__(self, iteration: int):
        i = self.todo[min(iteration, len(self.todo) - 1)]
        data, wh, _ = self.source.encoded(i)
        enc = np.frombuffer(data, dtype=np.uint8)
        if self.source.with_geometry:
            return [[enc]]
        start, shape = self.source.draw(i, wh)[:2]
        return [[enc], [start], [shape]]


def _probe_pipeline(source, train: bool, device_id, scale):
    """The pipeline's decoder alone, batch size 1 (training: the sample's own crop box, as in the pipeline)."""
    from nvidia.dali import fn, pipeline_def, types

    dev = "mixed" if device_id is not None else "cpu"

    @pipeline_def(batch_size=1, num_threads=1, device_id=device_id, prefetch_queue_depth=1, exec_dynamic=True)
    def pipe():
        if train:
            enc, start, shape = fn.external_source(source=source, num_outputs=3, batch=True)
            return fn.decoders.image_slice(enc, start, shape, device=dev, output_type=types.RGB, axis_names="HW",
                                           normalized_anchor=False, normalized_shape=False)
        enc = fn.external_source(source=source, num_outputs=1, batch=True)[0]
        return fn.decoders.image(enc, device=dev, output_type=types.RGB)

    p = pipe()
    p.build()
    return p


def rand_augment_suite():
    """DALI's RandAugment suite (the ops ``rand_augment`` chooses from), for ``_rand_augment``."""
    from nvidia.dali.auto_aug.rand_augment import get_rand_augment_suite

    return get_rand_augment_suite(use_shape=False)


def _rand_augment(img, ops, signs):
    """DALI's ``apply_rand_augment`` (n=RA_N, m=RA_M, fill 128), with each level's op and magnitude sign given
    per sample (``ops``, ``signs``: (RA_N,) from the source) instead of drawn by DALI's own generator."""
    from nvidia.dali.auto_aug.core import select, signed_bin

    suite = rand_augment_suite()
    for level in range(RA_N):
        mag = signed_bin(RA_M, random_sign=signs[level])
        img = select(suite, ops[level], data=img, magnitude_bin=mag, num_magnitude_bins=31, fill_value=128,
                     interp_type=None)
    return img


def build_dali_pipeline(source, train: bool, size: int, batch_size: int, mean, std, device_id, num_threads: int,
                        crop_pct: float = 0.875, seed: int = 0, scale=(0.08, 1.0), rand_aug: bool = True,
                        py_workers: int = 0):
    """``py_workers`` > 0: the source runs in that many DALI worker processes (parallel external source)."""
    from nvidia.dali import fn, pipeline_def, types

    dev = "mixed" if device_id is not None else "cpu"
    parallel = py_workers > 0
    extra = dict(py_num_workers=py_workers, py_start_method=py_start_method("cuda" if device_id is not None
                                                                            else "cpu")) if parallel else {}
    src = dict(parallel=True, batch=False) if parallel else dict(batch=True)

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
                  enable_conditionals=True, exec_dynamic=True, **extra)
    def pipe():
        if train:
            # every random choice comes from the source, drawn per sample (augment_draw): no DALI RNG is used
            enc, label, valid, start, shape, mirror, ops, signs, reason = fn.external_source(
                source=source, num_outputs=9, **src)
            img = fn.decoders.image_slice(enc, start, shape, device=dev, output_type=types.RGB, axis_names="HW",
                                          normalized_anchor=False, normalized_shape=False)
            img = fn.resize(img, resize_x=size, resize_y=size, interp_type=types.INTERP_CUBIC, antialias=True)
            if rand_aug:
                img = _rand_augment(img, ops, signs)
            crop = None
        else:
            enc, label, valid, geo, reason = fn.external_source(source=source, num_outputs=5, **src)
            img = fn.decoders.image(enc, device=dev, output_type=types.RGB)
            img = fn.resize(img, resize_y=geo[0], resize_x=geo[1], interp_type=types.INTERP_CUBIC, antialias=True)
            img = fn.slice(img, fn.stack(geo[2], geo[3]), fn.constant(fdata=[float(size), float(size)]),
                           axis_names="HW", normalized_anchor=False, normalized_shape=False)
            mirror, crop = 0, None
        out = fn.crop_mirror_normalize(img, crop=crop, mirror=mirror, dtype=types.FLOAT, output_layout="CHW",
                                       mean=[255 * m for m in mean], std=[255 * s for s in std])
        return out, label, valid, reason

    return pipe()


class DaliClassificationLoader:
    def __init__(self, samples, indices, train, size, batch_size, mean, std, device, crop_pct=0.875,
                 num_threads=2, seed=0, epoch=0, scale=(0.08, 1.0), rand_aug=True, py_workers=0):
        self.source = _LabelledSource(samples, indices, batch_size, drop_last=train, size=size, crop_pct=crop_pct,
                                      seed=seed, epoch=epoch, scale=scale,
                                      num_ops=len(rand_augment_suite()) if train else 1)
        self.n_items, self.epoch = len(indices), epoch
        self.train, self.bs, self.device = train, batch_size, resolve_device(device)  # the index DALI needs
        self.device_id = self.device.index if self.device.type == "cuda" else None
        self.scale = scale
        # arguments, not a closure over self: a reference cycle would leave the loader to the cyclic collector,
        # which may run it in a forked DataLoader worker, where stopping DALI's (absent) threads hangs
        self._args = (train, size, batch_size, mean, std, self.device_id, num_threads, crop_pct, seed * 100_003
                      + epoch + 1, scale, rand_aug, py_workers)
        self._pid = os.getpid()
        self.pipe = self._build()

    def _build(self, seed_offset: int = 0):
        train, size, bs, mean, std, device_id, threads, crop_pct, seed, scale, rand_aug, py_workers = self._args
        p = build_dali_pipeline(self.source, train, size, bs, mean, std, device_id, threads, crop_pct,
                                seed=seed + seed_offset, scale=scale, rand_aug=rand_aug, py_workers=py_workers)
        p.build()
        return p

    def __len__(self):
        return self.source.num_batches

    def close(self):
        """Stop DALI's threads now (see DaliPretrainLoader); also done when the loader is collected."""
        if getattr(self, "pipe", None) is not None:
            if getattr(self, "_pid", None) == os.getpid():  # not in a forked child: DALI's threads are not there
                self.pipe._shutdown()
            self.pipe = None

    def __del__(self):
        self.close()

    def _probe(self, b: int):
        """The samples of batches b and b + 1 (either may have been in flight) that DALI fails on alone."""
        src = self.source
        todo = [i for k in range(b, min(b + 2, src.num_batches)) for i in src.batch_indices(k)]
        return explain_failure(list(dict.fromkeys(todo)), lambda t: _ProbeSource(src, t),
                               lambda ps: _probe_pipeline(ps, self.train, self.device_id, self.scale),
                               src.pillow_only, self.device_id)

    def __iter__(self):
        b, rebuilds = 0, 0
        while b < self.source.num_batches:
            try:
                img, label, valid, reasons = run_pipeline(self.pipe, self.device)
            except Exception as e:  # noqa: BLE001 - find the samples DALI fails on; Pillow decodes them
                culprits = self._probe(b)
                self.close()
                if not culprits:
                    raise RuntimeError(f"the DALI pipeline failed on batch {b} and no sample explains it; this is "
                                       f"not bad data (set data.loader=torch to continue without DALI): {e}") from e
                for i in sorted(culprits):
                    log.warning("DALI cannot decode %s %s; Pillow decodes it from now on (a bad sample if Pillow "
                                "cannot either)",
                                self.source.samples[i].path, self.source.samples[i].key)
                self.source.pillow_only |= culprits
                self.source.start, rebuilds = b, rebuilds + 1
                self.pipe = self._build(rebuilds)  # a failed DALI pipeline is unusable: go on from batch b
                continue
            x = view_to_torch(img, self.device, torch.float32)
            keep = min(self.bs, self.n_items - b * self.bs)
            valid = meta_to_torch(valid).reshape(-1)[:keep].bool()
            index = torch.tensor(self.source.batch_indices(b)[:keep])
            bad = [(int(index[r]), self.epoch, np.array(reasons[r]).tobytes().decode(errors="replace"))
                   for r in torch.nonzero(~valid).reshape(-1).tolist()]
            yield {"image": x[:keep], "label": meta_to_torch(label).reshape(-1)[:keep], "valid": valid,
                   "index": index, "bad": bad}
            b += 1


def build_classification_loader(samples: Sequence[Sample], train: bool, size: int, batch_size: int, rank: int = 0,
                                world: int = 1, epoch: int = 0, seed: int = 0, kind: str = "torch", device=None,
                                num_workers: int = 2, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                                crop_pct: float = 0.875, auto_augment: str = "rand-m9-mstd0.5-inc1",
                                scale=(0.08, 1.0), skip_batches: int = 0):
    """``skip_batches``: start the epoch after this many batches (a resumed fine-tune continues mid-epoch)."""
    indices = shard_indices(len(samples), rank, world, epoch, seed, train)[skip_batches * batch_size:]
    if kind == "dali":
        return DaliClassificationLoader(samples, indices, train, size, batch_size, mean, std,
                                        device or torch.device("cpu"), crop_pct, max(1, num_workers), seed, epoch,
                                        scale, auto_augment not in ("none", "", None),
                                        py_workers=(num_workers + 1) // 2)  # as the pretraining DALI loader
    # pinned batches let the trainer's .to(device, non_blocking=True) overlap the copy (CUDA only)
    return torch_loader(samples, indices, train, size, batch_size, mean, std, crop_pct, num_workers, seed, epoch,
                        auto_augment, scale, pin_memory=device is not None and device.type == "cuda")

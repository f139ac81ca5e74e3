"""Fine-tuning and evaluation input (labels included), DALI or torch.

train: RandomResizedCrop(scale 0.08-1, bicubic), horizontal flip, RandAugment (m9, n2), normalisation.
eval : resize the shorter side to size / crop_pct (bicubic), centre crop, normalisation.
Random erasing, mixup and cutmix are batch operations of the fine-tuning loop (on the device), not of the
pipelines. Bad images are replaced by a blank one and flagged ``valid = False``.

Each rank reads a disjoint slice of the per-epoch permutation (train: equal-sized slices, the tail dropped;
eval: every sample exactly once, slices may differ by one).
"""

from typing import List, Sequence

import numpy as np
import torch

from .dali_loader import _PLACEHOLDER, _meta_to_torch, _view_to_torch, inspect_image
from .pretrain_loader import decode_rgb
from .sources import Sample


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

    def __init__(self, samples: Sequence[Sample], indices: Sequence[int], transform, size: int, seed=None):
        self.samples, self.indices, self.transform, self.size = samples, list(indices), transform, size
        self.seed = seed

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
        try:
            return self.transform(decode_rgb(s.read())), s.label, True
        except Exception:  # noqa: BLE001 - a bad image is flagged, not fatal
            return torch.zeros(3, self.size, self.size), s.label, False


def _collate(items):
    return {"image": torch.stack([x for x, _, _ in items]), "label": torch.tensor([y for _, y, _ in items]),
            "valid": torch.tensor([v for _, _, v in items])}


def torch_loader(samples, indices, train, size, batch_size, mean, std, crop_pct=0.875, num_workers=2, seed=0,
                 epoch=0, auto_augment="rand-m9-mstd0.5-inc1", scale=(0.08, 1.0)):
    ds = LabelledImages(samples, indices, timm_transform(train, size, mean, std, crop_pct, auto_augment, scale), size,
                        seed=(seed, epoch) if train else None)
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, drop_last=train,
                                       num_workers=num_workers, collate_fn=_collate, generator=g,
                                       worker_init_fn=None, persistent_workers=False)


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


class _LabelledSource:
    def __init__(self, samples, indices, batch_size, drop_last, size=224, crop_pct=0.875):
        self.samples, self.indices, self.bs = samples, list(indices), batch_size
        self.size, self.crop_pct = size, crop_pct
        self.with_geometry = not drop_last  # eval only: the exact resize / crop of torchvision
        n = len(self.indices)
        self.num_batches = n // batch_size if drop_last else (n + batch_size - 1) // batch_size
        self.handles = {}

    def __call__(self, iteration: int):
        b = min(iteration, self.num_batches - 1)
        idx = self.indices[b * self.bs:(b + 1) * self.bs]
        idx = idx + [idx[-1]] * (self.bs - len(idx))  # a partial last batch is padded; the padding is cut off
        enc, lab, val, geo = [], [], [], []
        for i in idx:
            s = self.samples[i]
            try:
                data = s.read(self.handles)
            except OSError:
                data = b""
            wh = inspect_image(data)
            ok = wh is not None
            enc.append(np.frombuffer(data if ok else _PLACEHOLDER, dtype=np.uint8))
            lab.append(np.array(s.label, dtype=np.int64))
            val.append(np.array(ok, dtype=np.int32))
            if self.with_geometry:
                nh, nw, top, left = eval_geometry(*(wh if ok else (8, 8)), self.size, self.crop_pct)
                geo.append(np.array([nh, nw, top, left], dtype=np.float32))
        return (enc, lab, val, geo) if self.with_geometry else (enc, lab, val)


def build_dali_pipeline(source, train: bool, size: int, batch_size: int, mean, std, device_id, num_threads: int,
                        crop_pct: float = 0.875, seed: int = 0, scale=(0.08, 1.0), rand_aug: bool = True):
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.auto_aug import rand_augment

    dev = "mixed" if device_id is not None else "cpu"

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
                  enable_conditionals=True, exec_dynamic=True)
    def pipe():
        if train:
            enc, label, valid = fn.external_source(source=source, num_outputs=3, batch=True)
            img = fn.decoders.image_random_crop(enc, device=dev, output_type=types.RGB, random_area=list(scale),
                                                random_aspect_ratio=[3 / 4, 4 / 3])
            img = fn.resize(img, resize_x=size, resize_y=size, interp_type=types.INTERP_CUBIC, antialias=True)
            if rand_aug:
                img = rand_augment.rand_augment(img, n=2, m=9)
            mirror = fn.random.coin_flip()
            crop = None
        else:
            enc, label, valid, geo = fn.external_source(source=source, num_outputs=4, batch=True)
            img = fn.decoders.image(enc, device=dev, output_type=types.RGB)
            img = fn.resize(img, resize_y=geo[0], resize_x=geo[1], interp_type=types.INTERP_CUBIC, antialias=True)
            img = fn.slice(img, fn.stack(geo[2], geo[3]), fn.constant(fdata=[float(size), float(size)]),
                           axis_names="HW", normalized_anchor=False, normalized_shape=False)
            mirror, crop = 0, None
        out = fn.crop_mirror_normalize(img, crop=crop, mirror=mirror, dtype=types.FLOAT, output_layout="CHW",
                                       mean=[255 * m for m in mean], std=[255 * s for s in std])
        return out, label, valid

    return pipe()


class DaliClassificationLoader:
    def __init__(self, samples, indices, train, size, batch_size, mean, std, device, crop_pct=0.875,
                 num_threads=2, seed=0, epoch=0, scale=(0.08, 1.0), rand_aug=True):
        self.source = _LabelledSource(samples, indices, batch_size, drop_last=train, size=size, crop_pct=crop_pct)
        self.n_items = len(indices)
        self.train, self.bs, self.device = train, batch_size, device
        device_id = device.index if device.type == "cuda" else None
        self.pipe = build_dali_pipeline(self.source, train, size, batch_size, mean, std, device_id, num_threads,
                                        crop_pct, seed=seed * 100_003 + epoch + 1, scale=scale, rand_aug=rand_aug)
        self.pipe.build()

    def __len__(self):
        return self.source.num_batches

    def close(self):
        """Stop DALI's threads now (see DaliPretrainLoader); also done when the loader is collected."""
        if getattr(self, "pipe", None) is not None:
            self.pipe._shutdown()
            self.pipe = None

    def __del__(self):
        self.close()

    def __iter__(self):
        for b in range(self.source.num_batches):
            img, label, valid = self.pipe.run()
            x = _view_to_torch(img, self.device, torch.float32)
            keep = min(self.bs, self.n_items - b * self.bs)
            yield {"image": x[:keep], "label": _meta_to_torch(label).reshape(-1)[:keep],
                   "valid": _meta_to_torch(valid).reshape(-1)[:keep].bool()}


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
                                        scale, auto_augment not in ("none", "", None))
    return torch_loader(samples, indices, train, size, batch_size, mean, std, crop_pct, num_workers, seed, epoch,
                        auto_augment, scale)

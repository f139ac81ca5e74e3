"""Image-text pairs for ``megadigpt clip``: webdataset shards as img2dataset writes them (``key.jpg`` + ``key.txt``,
optionally ``key.json``), or image files with a ``.txt`` beside them.

The images are listed exactly as every other stage lists them (:func:`megadigpt.data.sources.scan_source`: local
or remote shards, brace sets, ``pipe:``, the shard cache, the memory-mapped index; bad members counted). A caption
is read when its image is: the tar members that follow the image's (webdataset groups a sample's members, and
img2dataset writes them in the order ``.jpg``, ``.json``, ``.txt``) are walked, header by header, until the ``.txt``
member of the same key (:func:`read_caption`). Nothing about captions enters the index, so an index built for
pretraining serves here unchanged. A caption that is missing, larger than ``MAX_CAPTION_BYTES``, or not UTF-8 makes
the pair a bad sample with that reason (``bad_samples.jsonl``), never a crash and never an empty caption trained on.

Written here: webdataset's own readers iterate shards sequentially; megadigpt's loaders read samples at random
(exact resume, any rank count), so the one member needed is found from the image's offset.
"""

import os
import tarfile
from typing import Optional, Sequence

import numpy as np
import torch

from .samples import Sample, open_regular
from .sources import member_key
from .streaming import StreamDataset

MAX_CAPTION_BYTES = 1 << 16  # 64 KiB: LAION's longest captions are a few KiB
MAX_MEMBERS_AFTER = 8  # members of the same sample walked after the image's


class CaptionError(ValueError):
    """Why an image has no usable caption (the bad sample's reason)."""


def _caption_from_file(path: str) -> bytes:
    txt = os.path.splitext(path)[0] + ".txt"
    try:
        with open_regular(txt) as f:
            data = f.read(MAX_CAPTION_BYTES + 1)
    except FileNotFoundError:
        raise CaptionError(f"no caption ({os.path.basename(txt)} is missing)")
    except OSError as e:
        raise CaptionError(f"caption unreadable ({e.strerror or e})")
    return data


def _caption_from_tar(sample: Sample, f) -> bytes:
    pos = sample.offset + (sample.size + 511) // 512 * 512  # the header after the image's data
    long_name = None
    for _ in range(MAX_MEMBERS_AFTER):
        f.seek(pos)
        buf = f.read(512)
        if len(buf) < 512 or buf == b"\0" * 512:
            break
        try:
            info = tarfile.TarInfo.frombuf(buf, "utf-8", "surrogateescape")
        except tarfile.TarError as e:
            raise CaptionError(f"no caption (the tar header after the image is damaged: {e})")
        data_at, pos = pos + 512, pos + 512 + (info.size + 511) // 512 * 512
        if info.type in (tarfile.GNUTYPE_LONGNAME, tarfile.XHDTYPE, tarfile.XGLTYPE):
            f.seek(data_at)
            payload = f.read(min(info.size, 1 << 16))
            if info.type == tarfile.GNUTYPE_LONGNAME:
                long_name = payload.rstrip(b"\0").decode("utf-8", "surrogateescape")
            elif b" path=" in payload:
                long_name = payload.split(b" path=", 1)[1].split(b"\n", 1)[0].decode("utf-8", "surrogateescape")
            continue
        name, long_name = long_name or info.name, None
        split = member_key(name)
        if split is None or split[0] != sample.key:
            break  # the next sample
        if split[1] == ".txt":
            if info.size > MAX_CAPTION_BYTES:
                raise CaptionError(f"caption of {info.size} bytes (more than {MAX_CAPTION_BYTES})")
            f.seek(data_at)
            return f.read(info.size)
    raise CaptionError("no caption (no .txt member with the image's key)")


def read_caption(sample: Sample, handles=None) -> str:
    """The caption of ``sample`` (stripped text); :class:`CaptionError` with the reason where there is none."""
    if sample.offset < 0:
        data = _caption_from_file(sample.path)
    else:
        f = handles.get(sample.path) if handles is not None else None
        if f is None:
            f = open_regular(sample.path)
            if handles is not None:
                handles[sample.path] = f
        try:
            data = _caption_from_tar(sample, f)
        finally:
            if handles is None:
                f.close()
    return caption_text(data)


def caption_text(data: bytes) -> str:
    """A caption member's bytes -> its stripped text; :class:`CaptionError` where it is larger than
    :data:`MAX_CAPTION_BYTES`, not UTF-8 or empty."""
    if len(data) > MAX_CAPTION_BYTES:
        raise CaptionError(f"caption larger than {MAX_CAPTION_BYTES} bytes")
    try:
        text = data.decode("utf-8").strip()
    except UnicodeDecodeError as e:
        raise CaptionError(f"caption is not UTF-8 (byte {e.start}: {data[e.start:e.start + 1]!r})")
    if not text:
        raise CaptionError("empty caption")
    return text


def _seed_all(key) -> None:
    """Python's, numpy's and torch's generators from one key (timm's transforms draw from all three)."""
    import random

    k = int(np.random.SeedSequence(list(key)).generate_state(1)[0])
    random.seed(k)
    np.random.seed(k)
    torch.manual_seed(k)


class CaptionedImages(torch.utils.data.Dataset):
    """(image tensor, token ids, valid, index, epoch, reason). Each training pair's augmentation is drawn from its
    own (seed, epoch, index) stream, as fine-tuning's (:class:`megadigpt.data.classification.LabelledImages`), so a
    resumed epoch and any worker count give the same pairs. A bad pair is a blank image and blank tokens with
    ``valid`` False and its reason: the loss leaves it out."""

    def __init__(self, samples: Sequence[Sample], indices: Sequence[int], transform, tokenize, size: int,
                 context_length: int, seed=None, epoch: int = 0):
        self.samples, self.indices, self.transform, self.tokenize = samples, list(indices), transform, tokenize
        self.size, self.context_length, self.seed, self.epoch = size, context_length, seed, epoch
        self.handles = {}

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        from .pretrain_loader import decode_problem, decode_rgb

        index = self.indices[i]
        s = self.samples[index]
        if self.seed is not None:
            _seed_all([*self.seed, index])
        data = None
        try:
            data = s.read(self.handles)
            image = self.transform(decode_rgb(data))
            tokens = self.tokenize([read_caption(s, self.handles)])[0]
            return image, tokens, True, index, self.epoch, None
        except CaptionError as e:
            reason = str(e)
        except Exception as e:  # noqa: BLE001 - a bad image is flagged, not fatal
            reason = decode_problem(data, e)
        return (torch.zeros(3, self.size, self.size), torch.zeros(self.context_length, dtype=torch.long), False,
                index, self.epoch, reason)


def collate(items):
    return {"image": torch.stack([it[0] for it in items]), "text": torch.stack([it[1] for it in items]),
            "valid": torch.tensor([it[2] for it in items]), "index": torch.tensor([it[3] for it in items]),
            "bad": [(it[3], it[4], it[5]) for it in items if not it[2]]}


def pair_loader(samples, indices, transform, tokenize, size: int, context_length: int, batch_size: int,
                train: bool, num_workers: int = 2, seed: int = 0, epoch: int = 0, pin_memory: bool = False):
    """A DataLoader of image-text micro-batches over ``indices`` (this rank's, in order)."""
    ds = CaptionedImages(samples, indices, transform, tokenize, size, context_length,
                         seed=(seed, epoch) if train else None, epoch=epoch)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, drop_last=train,
                                       num_workers=num_workers, collate_fn=collate, pin_memory=pin_memory,
                                       persistent_workers=False)


class DaliPairLoader:
    """Image-text micro-batches with the images decoded and augmented by NVIDIA DALI (on the GPU where there is
    one): fine-tuning's :class:`megadigpt.data.classification.DaliClassificationLoader` (each image's crop and flip
    from (seed, epoch, index), so a resumed epoch sees the same pairs; images DALI cannot decode go to Pillow, then
    to the bad samples) over this rank's ``indices``, without RandAugment, and the captions read and tokenised here
    for the same indices (a bad caption makes its pair a bad sample with the reason, as in :class:`CaptionedImages`).
    DALI's readers do not hand over a caption member, so the captions are read beside them, from the image's
    offset (:func:`read_caption`)."""

    def __init__(self, samples, indices, tokenize, context_length: int, train: bool, size: int, batch_size: int,
                 mean, std, device, crop_pct: float, num_threads: int, seed: int, epoch: int, scale):
        from .classification import DaliClassificationLoader

        self.samples, self.tokenize, self.context_length, self.epoch = samples, tokenize, context_length, epoch
        self.images = DaliClassificationLoader(samples, indices, train, size, batch_size, mean, std, device, crop_pct,
                                               max(1, num_threads), seed, epoch, tuple(scale), rand_aug=False,
                                               py_workers=(num_threads + 1) // 2)
        self.handles = {}

    def __len__(self):
        return len(self.images)

    def close(self):
        self.images.close()
        for f in self.handles.values():
            f.close()
        self.handles = {}

    def __iter__(self):
        for b in self.images:
            valid, bad, texts = b["valid"].clone(), list(b["bad"]), []
            for r, i in enumerate(b["index"].tolist()):
                tokens = torch.zeros(self.context_length, dtype=torch.long)
                if bool(valid[r]):
                    try:
                        tokens = self.tokenize([read_caption(self.samples[i], self.handles)])[0]
                    except CaptionError as e:
                        valid[r] = False
                        bad.append((i, self.epoch, str(e)))
                texts.append(tokens)
            yield {"image": b["image"], "text": torch.stack(texts), "valid": valid, "index": b["index"], "bad": bad}


class PairStreamDataset(StreamDataset):
    """Stream mode (``data.mode: stream``) for image-text pairs: :class:`megadigpt.data.streaming.StreamDataset`'s
    readers, shard order, shuffle buffer, read cursors and shard faults, with each sample's ``.txt`` member read
    beside its image (at most :data:`MAX_CAPTION_BYTES`; a larger one is not read) and made into (image, tokens).
    Each pair's augmentation is drawn from (seed, epoch, shard, ordinal), as pretraining's stream draws its crops."""

    extra = {".txt": MAX_CAPTION_BYTES}

    def __init__(self, urls, transform, tokenize, size: int, context_length: int, seed: int, rank: int, world: int,
                 workers: int, shuffle_buffer: int, start=None):
        super().__init__(urls, [size], 1, seed, rank, world, workers, shuffle_buffer, start=start)
        self.transform, self.tokenize, self.size, self.context_length = transform, tokenize, size, context_length

    @staticmethod
    def collate(items):
        return stream_pair_collate(items)

    def _item(self, rec, slot, cursor, problems):
        sid, ordinal, epoch = rec["shard"], rec["ordinal"], rec["epoch"]
        data, _, reason = self._rec_image(rec)
        item = {"index": -1, "epoch": epoch, "url": self.urls[sid], "key": rec["key"], "id": (sid, ordinal),
                "slot": slot, "cursor": cursor, "problems": list(problems)}
        caption = rec["parts"].get(".txt")
        if reason is None and ".txt" in rec.get("oversize", {}):
            reason = f"caption of {rec['oversize']['.txt']} bytes (more than {MAX_CAPTION_BYTES})"
        elif reason is None and caption is None:
            reason = "no caption (no .txt member with the image's key)"
        if reason is None:
            from .pretrain_loader import decode_problem, decode_rgb

            _seed_all([self.seed, epoch, sid, ordinal])
            try:
                tokens = self.tokenize([caption_text(caption)])[0]
                image = self.transform(decode_rgb(data))
                return {**item, "image": image, "text": tokens, "valid": True, "reason": None}
            except CaptionError as e:
                reason = str(e)
            except Exception as e:  # noqa: BLE001 - a bad image is flagged, not fatal
                reason = decode_problem(data, e)
        return {**item, "image": torch.zeros(3, self.size, self.size),
                "text": torch.zeros(self.context_length, dtype=torch.long), "valid": False, "reason": reason}


def stream_pair_collate(items):
    """A stream-mode micro-batch of pairs: :func:`collate`'s fields and what stream mode tracks (as
    :func:`megadigpt.data.streaming.stream_collate`)."""
    out = {"image": torch.stack([it["image"] for it in items]), "text": torch.stack([it["text"] for it in items]),
           "valid": torch.tensor([it["valid"] for it in items]), "index": torch.tensor([it["index"] for it in items]),
           "bad": []}
    out["bad_stream"] = [(it["url"], it["key"], it["epoch"], it["reason"]) for it in items if not it["valid"]]
    out["ids"] = [(it["id"][0], it["key"]) for it in items]
    out["cursor"] = (items[-1]["slot"], list(items[-1]["cursor"]))
    out["shard_problems"] = [p for it in items for p in it["problems"]]
    return out


def write_captioned_shard(path, pairs) -> None:
    """A webdataset shard as img2dataset writes it: ``key.jpg``, ``key.json``, ``key.txt`` per (key, jpeg bytes,
    caption bytes or None) — for tests, the evidence and users' small sets."""
    import io
    import json

    with tarfile.open(path, "w") as tf:
        for key, jpeg, caption in pairs:
            members = [(f"{key}.jpg", jpeg), (f"{key}.json", json.dumps({"key": key}).encode())]
            if caption is not None:
                members.append((f"{key}.txt", caption))
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def caption_problem(sample: Sample) -> Optional[str]:
    """None, or why ``sample`` has no usable caption (for checks before a run)."""
    try:
        read_caption(sample)
    except CaptionError as e:
        return str(e)
    return None


def caption_labelled(source, out_dir, templates, seed: int = 0, limit: Optional[int] = None,
                     per_shard: int = 10000, name: str = "captioned") -> list:
    """Caption a labelled set (shards with ``.cls`` and ``classes.txt``, or class folders) with class-name
    templates: image ``i`` gets ``templates[j](class name)``, ``j`` drawn from (seed, i); written as img2dataset
    writes pairs (``key.jpg`` + ``key.json`` + ``key.txt``), plus the ``key.cls`` label and ``classes.txt``, so the
    same shards serve zero-shot scoring. Returns the shard paths. (The evidence of docs/clip.md; tests.)"""
    import io
    import json
    from pathlib import Path

    from .sources import check_class_names, scan_source

    samples, _ = scan_source(source)
    names = check_class_names(source, source)
    if not names:
        raise ValueError(f"{source}: no class names (classes.txt or class folders)")
    n = len(samples) if limit is None else min(limit, len(samples))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "classes.txt").write_text("\n".join(names) + "\n")
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(templates), size=n)
    paths = []
    handles = {}
    for start in range(0, n, per_shard):
        path = out_dir / f"{name}-{start // per_shard:06d}.tar"
        with tarfile.open(path, "w") as tf:
            for i in range(start, min(n, start + per_shard)):
                s = samples[i]
                caption = templates[picks[i]](names[s.label]) if callable(templates[picks[i]]) else \
                    templates[picks[i]].format(names[s.label])
                key = f"{i:08d}"
                for ext, data in ((".jpg", s.read(handles)), (".cls", str(s.label).encode()),
                                  (".json", json.dumps({"source_key": s.key, "template": int(picks[i])}).encode()),
                                  (".txt", caption.encode())):
                    info = tarfile.TarInfo(key + ext)
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
        paths.append(str(path))
    for f in handles.values():
        f.close()
    return paths

"""Stream mode for pretraining (``data.mode: stream``; under ``auto`` when every item of ``data.source`` is remote):
webdataset shards read front to back, without a local copy, through :func:`megadigpt.data.remote.open_url`.

Shard order and split. For each (seed, epoch) the shard order is ``default_rng([seed, epoch]).permutation(n)``.
It is dealt to ``world x workers`` slots (global slot = rank x workers + DataLoader worker; a rank without
DataLoader workers is one slot): slot k reads ``order[k::slots]``. Every shard is read by exactly one slot per
epoch. Fewer shards than slots is refused at planning time. A slot moves on to its next epoch when its shards
are read; the slots of a run are not in lock-step.

Reading. Each slot reads its shards in order as tar streams and groups consecutive members by key
(``<key>.<ext>``, webdataset's convention: the first member with an image extension of
:data:`megadigpt.data.sources.IMAGE_EXTS` is the image, ``.cls`` the label). The tar headers are walked with
:mod:`tarfile` (mode ``r:``) over the remote file, which only ever seeks forward: webdataset's own tar iterators
give members and names but not the byte offset of each sample's first header, which the resume position needs.
Damage is found as :mod:`megadigpt.data.sources` finds it for local shards (a header cut short, a member's data
cut short, no end-of-archive blocks), plus a tar header extension (pax record, GNU long name) of more than
:data:`HEADER_LIMIT` bytes, which :mod:`tarfile` would read whole. Bad samples decided from the headers, before
any member data is read: an image or ``.cls`` member declared larger than ``data.max_member_bytes`` (reason
``member <name> is <N> bytes, more than data.max_member_bytes=<M>``; its bytes are skipped 1 MiB at a time, never
held), and a sample whose key an earlier sample of the shard had (reason ``duplicate key <key> in the shard (an
earlier sample has it)``; the first is kept; a member repeating an extension of the sample being grouped starts
such a duplicate). Index mode gives both the same reasons.

Shuffle. Each slot holds ``data.shuffle_buffer`` samples and emits one drawn at random (``rng([seed, epoch,
slot])``) for each one it reads; at the end of its epoch the buffer is emptied in random order. Each sample's
crop box and flip are drawn from ``rng([seed, epoch, shard, ordinal])`` and its segment order from ``rng([seed,
epoch, shard, ordinal, 1])`` (shard: the index in the source's shard list; ordinal: the sample's place in its
shard), so augmentation depends neither on the buffer nor on the world size. The decoding, the output dict and
the collate are :mod:`megadigpt.data.pretrain_loader`'s; the trainer's loop is the indexed mode's.

Resume. Every emitted sample carries its slot's read cursor at the moment of emission: (epoch, place in the
slot's shard list, ordinal of the next sample to read, byte offset of that sample's first tar header). The
trainer's process keeps the latest cursor of each of its slots from the batches it consumed; each checkpoint
stores them (a JSON file per rank in the checkpoint's folder). A resumed slot reopens its shard at the cursor
(an HTTP Range request) with an empty buffer. Guarantee: after a resume no sample is trained on twice (every
sample read before the cursor was emitted before the last consumed one, or sat in the buffer), and at most
``shuffle_buffer`` samples per slot are skipped (those in its buffer at the checkpoint). Samples prefetched but
never consumed are read again. A resume with another world size x workers, seed, shuffle buffer or shard list is
refused. Unlike indexed mode, a resumed run does not reproduce the uninterrupted run's batches.

Faults. A shard that cannot be read after the retries (HTTP 404, refused connections, a connection dropped more
often than ``data.io_retries``, a stall past ``data.io_timeout_s``, a connection past its deadline: see
:mod:`megadigpt.data.remote`), that is longer than ``data.max_shard_bytes``, that comes compressed
(``Content-Encoding``) or that is damaged is skipped: the samples already read from it stay, and it is reported
once (``bad_samples.jsonl``, ``kind: shard``, the URL, key empty). A sample that does not decode, a member over
the cap and a duplicate key are bad samples (``valid=False``, ``kind: decode`` with the reason) as in indexed
mode. A slot that reads no sample at all in an epoch from its start stops the run with one line (instead of
spinning); a source of which no shard opens is refused before anything heavy starts. ``manifest.json`` is read
whole (at most 64 MiB) within its deadline, with one retry; one that cannot be read (other than a 404) is named
in the line that asks for ``data.epoch_size``.
"""

import hashlib
import json
import logging
import os
import tarfile
import time
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..config import ConfigError
from ..distributed.engine import resolve_device
from .pretrain_loader import INTERP, collate, random_resized_crop_box, render_views
from .remote import RemoteError, expand_urls, is_remote, open_url, read_small
from .sources import IMAGE_EXTS

log = logging.getLogger(__name__)

STATE_FILE = "stream_rank{rank}.json"  # per rank, in the checkpoint's tag folder

Cursor = Tuple[int, int, int, int]  # (epoch, place in the slot's shard list, next ordinal, its header's offset)


# ============================================================================ planning (cheap, no decoding)


def resolve_mode(mode: str, source) -> str:
    """``data.mode`` -> "stream" | "indexed" (``auto``: stream when every item of the source is remote)."""
    if mode in ("stream", "indexed"):
        return mode
    if mode != "auto":
        raise ConfigError(f"data.mode must be auto, indexed or stream, got {mode!r}")
    items = expand_urls(source)
    return "stream" if items and all(is_remote(u) for u in items) else "indexed"


def stream_urls(source) -> List[str]:
    """The shards of a stream-mode source, in order: URLs, ``pipe:`` commands and local ``.tar`` paths (brace
    sets expanded; a local folder gives its ``*.tar``)."""
    out = []
    for u in expand_urls(source):
        if not is_remote(u) and os.path.isdir(os.path.expanduser(u)):
            d = os.path.expanduser(u)
            out += sorted(os.path.join(d, n) for n in os.listdir(d) if n.endswith(".tar"))
        elif is_remote(u):
            out.append(u)
        elif not u.endswith(".tar"):
            raise ConfigError(f"data.mode=stream reads .tar shards; {u} is not one (use data.mode=indexed)")
        else:
            out.append(os.path.expanduser(u))
    if not out:
        raise ConfigError(f"data source {source!r} names no shards")
    return out


def shards_hash(urls: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(urls).encode()).hexdigest()[:16]


def shard_order(n_shards: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n_shards)


def slot_shards(n_shards: int, seed: int, epoch: int, slot: int, slots: int) -> List[int]:
    """The shards (indices into the shard list) slot ``slot`` of ``slots`` reads in ``epoch``, in order."""
    return [int(s) for s in shard_order(n_shards, seed, epoch)[slot::slots]]


def check_slots(n_shards: int, world: int, workers: int) -> None:
    slots = world * max(1, workers)
    if n_shards < slots:
        raise ConfigError(f"stream mode needs at least one shard per reader: {n_shards} shards for {world} ranks x "
                          f"{max(1, workers)} workers = {slots} readers (use fewer data.num_workers or ranks, more "
                          f"shards, or data.mode=indexed)")


def _manifest_url(first: str) -> Optional[str]:
    if first.startswith("pipe:"):
        return None
    return first.rsplit("/", 1)[0] + "/manifest.json" if "/" in first else "manifest.json"


def read_manifest(urls: Sequence[str]) -> Optional[dict]:
    """``manifest.json`` beside the first shard (what ``data build`` writes), or None where there is none."""
    return _read_manifest(urls)[0]


def _read_manifest(urls: Sequence[str]) -> Tuple[Optional[dict], Optional[str]]:
    """(the manifest or None, why it could not be read: None where there is none or it was read). Read whole
    within its deadline and at most :data:`megadigpt.data.remote.SMALL_FILE_BYTES`, one retry."""
    where = _manifest_url(urls[0])
    if where is None:
        return None, None
    try:
        data = json.loads(read_small(where, retries=1).decode())
    except RemoteError as e:
        text = str(e).splitlines()[0] if str(e) else "RemoteError"
        return None, (None if ": HTTP 404" in text or text.endswith(": not found") else text)
    except (OSError, ValueError, UnicodeDecodeError) as e:
        return None, f"{where} is not a JSON manifest ({type(e).__name__})"
    return (data if isinstance(data, dict) else None), None


def epoch_size(urls: Sequence[str], configured: Optional[int], needed_for: Optional[str] = "train.epochs"
               ) -> Optional[int]:
    """Samples per epoch: the manifest's counts of these shards, else ``data.epoch_size``, else None where nothing
    needs it (``needed_for`` None: a run of ``train.max_steps`` with its warm-up in steps; the epoch counter is then
    unknown), else one line naming what needs it."""
    manifest, why = _read_manifest(urls)
    if manifest:
        try:
            counts = {str(r["name"]): int(r["count"]) for r in manifest.get("shards", [])}
        except (KeyError, TypeError, ValueError):
            counts = {}
        names = [os.path.basename(u.split("?", 1)[0]) for u in urls]
        if counts and all(n in counts for n in names):
            return sum(counts[n] for n in names)
    if configured:
        if why:
            log.warning("stream mode: %s; using data.epoch_size=%s", why, configured)
        return int(configured)
    if needed_for is None:
        return None
    raise ConfigError(f"stream mode needs the epoch size for {needed_for}: no manifest.json beside {urls[0]} lists "
                      f"these shards{f' ({why})' if why else ''}, and data.epoch_size is not set (or give "
                      f"train.max_steps and optim.warmup_steps: then no epoch size is needed)")


def probe_shards(urls: Sequence[str]) -> int:
    """The index of the first shard that opens and starts like a tar; one line when none does."""
    first_error = None
    for i, u in enumerate(urls):
        try:
            with open_url(u) as f:
                head = f.read(tarfile.BLOCKSIZE)
            tarfile.TarInfo.frombuf(head, tarfile.ENCODING, "surrogateescape")
            return i
        except (RemoteError, OSError, tarfile.TarError) as e:
            first_error = first_error or f"{u}: {e}"
    raise ConfigError(f"no shard of data.source can be read ({len(urls)} tried; first: {first_error})")


def check_resume_mode(saved: Optional[dict], current: Optional[dict]) -> None:
    """A checkpoint's stream state (``saved``, None for an indexed-mode checkpoint) against this run's
    (``current``: its :func:`run_identity`, None in indexed mode): refused (one line) where the mode or the
    readers differ."""
    if current is not None:
        check_resume_state(saved, current)
    elif saved is not None:
        raise ConfigError("the latest checkpoint was written in data.mode=stream; resuming it in indexed mode would "
                          "change the data order: use data.mode=stream or a new train.run_dir")


def check_resume_state(saved: Optional[dict], current: dict) -> None:
    """Refuse (one line) resuming a stream-mode checkpoint with other settings, or one of the other mode."""
    if saved is None:
        raise ConfigError("the latest checkpoint was written in data.mode=indexed; resuming it in stream mode would "
                          "change the data order: use data.mode=indexed or a new train.run_dir")
    names = {"slots": "ranks x data.num_workers", "world": "ranks", "workers": "data.num_workers",
             "seed": "train.seed", "shuffle_buffer": "data.shuffle_buffer", "shards_hash": "the shard list"}
    for k in ("world", "workers", "seed", "shuffle_buffer", "shards_hash"):
        if saved.get(k) != current.get(k):
            raise ConfigError(f"the stream-mode checkpoint was written with {names[k]} = {saved.get(k)}, now "
                              f"{current.get(k)}: its read positions do not apply; use the same settings or a new "
                              f"train.run_dir")


# ============================================================================ reading one shard


class ShardDamaged(OSError):
    """A shard whose tar structure breaks off (cut short, an invalid header)."""


class _HeaderReads:
    """The shard as :mod:`tarfile` sees it: its reads are headers (512-byte blocks) and header extensions (pax
    records, GNU long names), which tarfile reads whole into memory; one of more than :data:`HEADER_LIMIT` bytes
    is damage, not a read (member data is read by :func:`iter_shard` itself, under ``data.max_member_bytes``)."""

    def __init__(self, f):
        self.f = f

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0 or n > HEADER_LIMIT:
            raise tarfile.ReadError(f"a tar header extension of {n} bytes at byte {self.f.tell()} (more than "
                                    f"{HEADER_LIMIT})")
        return self.f.read(n)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.f.seek(offset, whence)

    def tell(self) -> int:
        return self.f.tell()


HEADER_LIMIT = 1 << 20  # bytes of one pax header or GNU long name (real ones are under 1 kB)


def iter_shard(url: str, offset: int = 0, ordinal: int = 0, timeout_s: float = None,
               retries: int = None, max_member_bytes: int = None, extra: Optional[Dict[str, int]] = None
               ) -> Iterator[dict]:
    """The samples of one shard from byte ``offset`` (a sample's first header) on, numbered from ``ordinal``:
    dicts with ``key``, ``ordinal``, ``offset`` (its first header), ``next`` (the next sample's first header; None
    after the last), ``parts`` ({ext: bytes} of its image and ``.cls`` members; None for a member seen, not read)
    and ``bad`` (None, or why the sample is bad although the shard is fine). Raises :class:`RemoteError` (after
    the retries) or :class:`ShardDamaged` where the shard breaks off, after the samples read before.

    Bad samples, decided before any member data is read: an image or ``.cls`` member whose header declares more
    than ``max_member_bytes`` (default ``data.max_member_bytes``; its bytes are skipped, never held), and a sample
    whose key an earlier sample of the shard had (the first is kept; a member repeating an extension of the
    sample being grouped starts such a duplicate too). Keys are remembered from ``offset`` on: after a resume
    mid-shard, a duplicate of a key before the cursor is not recognised.

    ``extra``: {ext: most bytes} of more members to read (``{".txt": 65536}``: a pair's caption); one declared
    larger is not read (``parts[ext]`` None) and its size is in the sample's ``oversize`` ({ext: bytes})."""
    from .remote import member_too_large

    f = open_url(url, offset, timeout_s, retries)
    with f:
        try:
            tf = tarfile.open(fileobj=_HeaderReads(f), mode="r:")
        except tarfile.TarError as e:
            raise ShardDamaged(f"not a readable tar stream at byte {offset} ({e})") from None
        extra = dict(extra or {})
        group, key, start, prev_exts, bad, oversize = {}, None, offset, None, None, {}
        seen = set()
        damage = None
        while True:
            try:
                m = tf.next()
            except tarfile.TarError as e:  # a member's data cut short, a header extension over the limit
                damage = f"truncated near byte {f.tell()} ({e})" if "header extension" not in str(e) else str(e)
                break
            tf.members = []  # the walk keeps nothing (a shard may hold a million members)
            if m is None:
                break
            if not m.isfile():
                continue
            base = os.path.basename(m.name)
            if "." not in base:
                continue
            k = os.path.join(os.path.dirname(m.name), base.split(".", 1)[0])
            ext = "." + base.split(".", 1)[1].lower()
            if k != key or ext in group:
                if key is not None:
                    yield {"key": key, "ordinal": ordinal, "offset": start, "next": m.offset, "parts": group,
                           "bad": bad, "oversize": oversize}
                    prev_exts = set(group)
                    ordinal += 1
                    seen.add(key)
                group, key, start, bad, oversize = {}, k, m.offset, None, {}
                if k in seen:
                    bad = f"duplicate key {k} in the shard (an earlier sample has it)"
            wanted = bad is None and ((ext in IMAGE_EXTS and not any(e in IMAGE_EXTS for e in group)) or
                                      ext == ".cls" or (ext in extra and ext not in group))
            if not wanted:
                group.setdefault(ext, None)  # seen, not needed
                continue
            if ext in extra and m.size > extra[ext]:  # (an extra member over its cap: said by the sample's user)
                oversize[ext], group[ext] = m.size, None
                continue
            too_large = None if ext in extra else member_too_large(m.name, m.size, max_member_bytes)
            if too_large:
                bad, group[ext] = too_large, None
                continue
            f.seek(m.offset_data)
            data = f.read(m.size)
            if len(data) < m.size:
                damage = f"truncated: member {k}{ext} cut at byte {f.tell()}"
                break
            group[ext] = data
        if damage is None:
            f.seek(tf.offset)
            block = f.read(tarfile.BLOCKSIZE)
            if len(block) < tarfile.BLOCKSIZE:
                damage = f"ends at byte {f.tell()} without the end-of-archive blocks (truncated?)"
            elif block.strip(b"\0"):
                damage = f"invalid tar header at byte {tf.offset}"
        if key is not None and (damage is None or (prev_exts is not None and set(group) >= prev_exts)):
            # before damage, the last sample counts only if it has the members the one before it had
            yield {"key": key, "ordinal": ordinal, "offset": start, "next": None, "parts": group, "bad": bad,
                   "oversize": oversize}
        if damage is not None:
            raise ShardDamaged(damage)


# ============================================================================ the dataset


class StreamDataset(torch.utils.data.IterableDataset):
    """One rank's slots (one per DataLoader worker) as an endless stream of samples; see the module docstring.
    ``encoded``: yield what the DALI source hands DALI (bytes, box, flip) instead of decoded views.
    ``start``: {slot: cursor} to resume from (absent slots start at the beginning). A subclass makes other
    samples from the same records (:class:`megadigpt.data.captions.PairStream`: image-text pairs) by its own
    ``_item``, ``extra`` (members :func:`iter_shard` reads besides the image and ``.cls``) and ``collate``."""

    extra: Dict[str, int] = {}
    collate = None  # (stream_collate, set below where it is defined)

    def __init__(self, urls: Sequence[str], sizes: Sequence[int], num_segments: int, seed: int, rank: int,
                 world: int, workers: int, shuffle_buffer: int, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3),
                 interpolation="bicubic", hflip=True, start: Optional[Dict[int, Cursor]] = None,
                 encoded: bool = False, timeout_s: float = None, retries: int = None):
        self.urls = list(urls)
        self.sizes = sorted(set(sizes))
        self.num_segments, self.seed = num_segments, seed
        self.rank, self.world, self.workers = rank, world, max(1, workers)
        self.slots = self.world * self.workers
        self.buffer = max(1, int(shuffle_buffer))
        self.scale, self.ratio, self.hflip = tuple(scale), tuple(ratio), hflip
        self.interp, self.interp_name = INTERP[interpolation], interpolation
        self.start = {int(k): tuple(v) for k, v in (start or {}).items()}
        self.encoded = encoded
        self.timeout_s, self.retries = timeout_s, retries
        from . import remote

        self._remote_options = remote.options()  # spawned workers do not inherit configure()

    def my_slots(self) -> List[int]:
        return [self.rank * self.workers + w for w in range(self.workers)]

    def start_cursor(self, slot: int) -> Cursor:
        return self.start.get(slot, (0, 0, 0, 0))

    def __iter__(self):
        from . import remote

        remote.configure(**self._remote_options)
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        if info is not None and info.num_workers != self.workers:
            raise RuntimeError(f"StreamDataset planned for {self.workers} workers, run by {info.num_workers}")
        return self.iter_slot(self.rank * self.workers + worker)

    def iter_slot(self, slot: int) -> Iterator[dict]:
        epoch, pos, ordinal, offset = self.start_cursor(slot)
        n = len(self.urls)
        problems: List[Tuple[str, str, int]] = []  # shard failures not yet handed over (they ride on a sample)
        while True:
            shards = slot_shards(n, self.seed, epoch, slot, self.slots)
            if pos >= len(shards):  # resumed at the end of an epoch
                epoch, pos, ordinal, offset = epoch + 1, 0, 0, 0
                continue
            from_start = pos == 0 and ordinal == 0
            rng = np.random.default_rng([self.seed, epoch, slot])
            buf: List[dict] = []
            read = 0
            while pos < len(shards):
                sid = shards[pos]
                url = self.urls[sid]
                try:
                    for rec in iter_shard(url, offset, ordinal, self.timeout_s, self.retries, extra=self.extra):
                        read += 1
                        rec.update(shard=sid, epoch=epoch)
                        buf.append(rec)
                        if len(buf) >= self.buffer:
                            j = int(rng.integers(len(buf)))
                            buf[j], buf[-1] = buf[-1], buf[j]
                            cursor = (epoch, pos + 1, 0, 0) if rec["next"] is None else (
                                epoch, pos, rec["ordinal"] + 1, rec["next"])
                            yield self._item(buf.pop(), slot, cursor, problems)
                            problems = []
                except (OSError, tarfile.TarError) as e:  # RemoteError, ShardDamaged: skip the shard, say so
                    reason = str(e).splitlines()[0] if str(e) else type(e).__name__
                    log.warning("stream mode: skipping shard %s: %s", url, reason)
                    problems.append((url, reason, epoch))
                pos, ordinal, offset = pos + 1, 0, 0
            if from_start and read == 0:
                first = problems[0][1] if problems else "no samples"
                raise RuntimeError(f"stream mode: none of the {len(shards)} shards of reader {slot} (rank "
                                   f"{self.rank}, worker {slot % self.workers}) gave a sample in epoch {epoch} "
                                   f"(first: {first})")
            while buf:  # the end of the epoch: empty the buffer
                j = int(rng.integers(len(buf)))
                buf[j], buf[-1] = buf[-1], buf[j]
                yield self._item(buf.pop(), slot, (epoch + 1, 0, 0, 0), problems)
                problems = []
            epoch, pos, ordinal, offset = epoch + 1, 0, 0, 0

    # ---------------------------------------------------------------- one sample
    def _rec_image(self, rec) -> Tuple[Optional[bytes], int, Optional[str]]:
        from .sources import parse_label

        parts = rec["parts"]
        img = next((parts[e] for e in IMAGE_EXTS if parts.get(e) is not None), None)
        label, why = -1, None
        if parts.get(".cls") is not None:
            label, why = parse_label(parts[".cls"])
        if rec.get("bad"):  # a member over data.max_member_bytes, a duplicate key: never decoded
            return None, -1, rec["bad"]
        if img is None:
            why = f"no image member (members: {', '.join(sorted(parts)) or 'none'})"
        return img, label, why

    def _item(self, rec: dict, slot: int, cursor: Cursor, problems) -> dict:
        sid, ordinal, epoch = rec["shard"], rec["ordinal"], rec["epoch"]
        data, label, why = self._rec_image(rec)
        rng = np.random.default_rng([self.seed, epoch, sid, ordinal])
        order = np.random.default_rng([self.seed, epoch, sid, ordinal, 1]).permutation(self.num_segments)
        base = {"order": torch.from_numpy(order), "label": label, "index": -1, "epoch": epoch,
                "url": self.urls[sid], "key": rec["key"], "id": (sid, ordinal), "slot": slot, "cursor": cursor,
                "problems": list(problems)}
        if self.encoded:
            return {**base, **self._encoded(data, why, rng)}
        views, box, reason = render_views(data, why, rng, self.sizes, self.scale, self.ratio, self.hflip, self.interp)
        return {**base, "views": views, "valid": reason is None, "box": box, "reason": reason}

    def _encoded(self, data, why, rng) -> dict:
        from .dali_loader import PLACEHOLDER, prepare

        enc, reason, w, h = (None, why, 0, 0) if why else prepare(data, False)
        if enc is None:
            return {"encoded": PLACEHOLDER, "box": (0, 0, 8, 8, False), "valid": False, "reason": reason}
        top, left, bh, bw = random_resized_crop_box(rng, h, w, self.scale, self.ratio)
        flip = bool(self.hflip and rng.random() < 0.5)
        return {"encoded": enc, "raw": data, "box": (top, left, bh, bw, flip), "valid": True, "reason": None}


def stream_collate(items: List[dict]) -> dict:
    """:func:`pretrain_loader.collate`'s batch, plus what stream mode tracks: ``ids`` ((shard, key) of each sample),
    ``cursor`` (slot, read cursor of the last sample: a batch comes from one DataLoader worker), ``bad_stream``
    ((url, key, epoch, reason) of each bad sample) and ``shard_problems`` ((url, reason, epoch) of skipped
    shards)."""
    if "encoded" in items[0]:
        out = {"order": torch.stack([it["order"] for it in items]).long(),
               "valid": torch.tensor([it["valid"] for it in items]),
               "label": torch.tensor([it["label"] for it in items]),
               "index": torch.tensor([it["index"] for it in items]),
               "epoch": torch.tensor([it["epoch"] for it in items]),
               "encoded": [it["encoded"] for it in items], "raw": [it.get("raw") for it in items],
               "box": [it["box"] for it in items], "reasons": [it["reason"] for it in items]}
    else:
        out = collate(items)
    out["bad"] = []  # indexed mode's (dataset index, ...) records: stream mode names shard and key instead
    out["bad_stream"] = [(it["url"], it["key"], it["epoch"], it["reason"]) for it in items if not it["valid"]]
    out["ids"] = [(it["id"][0], it["key"]) for it in items]
    out["cursor"] = (items[-1]["slot"], list(items[-1]["cursor"]))
    out["shard_problems"] = [p for it in items for p in it["problems"]]
    return out


StreamDataset.collate = staticmethod(stream_collate)


# ============================================================================ the loader


class StreamLoader:
    """This rank's ``count`` micro-batches (torch path), with the read cursor of each of its slots as of the last
    batch handed out (:meth:`state`: what a checkpoint stores)."""

    def __init__(self, dataset: StreamDataset, micro_batch: int, count: int, num_workers: int):
        self.dataset, self.micro, self.count, self.num_workers = dataset, micro_batch, max(0, count), num_workers
        self.cursors: Dict[int, Cursor] = {s: dataset.start_cursor(s) for s in dataset.my_slots()}
        self.sizes = dataset.sizes

    def __len__(self):
        return self.count

    def _batches(self):
        return iter(torch.utils.data.DataLoader(
            self.dataset, batch_size=self.micro, num_workers=self.num_workers, collate_fn=self.dataset.collate,
            persistent_workers=False, pin_memory=torch.cuda.is_available(),
            prefetch_factor=2 if self.num_workers > 0 else None))

    def raw(self):
        """The ``count`` batches, without noting them as consumed (a consumer that prefetches, like the DALI
        source, calls :meth:`note` when it hands each one on)."""
        if not self.count:
            return
        it = self._batches()
        try:
            for _ in range(self.count):
                try:
                    b = next(it)
                except RuntimeError as e:  # a reader that cannot read any shard: its one line, not a traceback
                    lines = [ln for ln in str(e).splitlines() if "stream mode: none of" in ln]
                    if lines:
                        raise ConfigError(lines[-1].split("RuntimeError: ", 1)[-1]) from None
                    raise
                yield b
        finally:
            del it  # stops the DataLoader workers

    def note(self, batch: dict) -> None:
        slot, cur = batch["cursor"]
        self.cursors[int(slot)] = tuple(int(x) for x in cur)

    def __iter__(self):
        for b in self.raw():
            self.note(b)
            yield b

    def state(self) -> dict:
        d = self.dataset
        return {"rank": d.rank, **run_identity(d.urls, d.world, d.workers, d.seed, d.buffer),
                "cursors": {str(s): list(c) for s, c in sorted(self.cursors.items())}}


def run_identity(urls, world, workers, seed, shuffle_buffer) -> dict:
    """What a stream-mode resume must match (in the checkpoint marker and in each rank's state file)."""
    return {"world": int(world), "workers": max(1, int(workers)), "seed": int(seed),
            "shuffle_buffer": int(shuffle_buffer), "shards_hash": shards_hash(urls), "shards": len(urls)}


def write_state(tag_dir, loader: StreamLoader) -> str:
    """This rank's read cursors into the checkpoint's folder (before ``ckpt.save``: passed as an extra file)."""
    from pathlib import Path

    path = Path(tag_dir) / STATE_FILE.format(rank=loader.dataset.rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(loader.state()))
    os.replace(tmp, path)
    return str(path)


def read_state(tag_dir, rank: int) -> Optional[dict]:
    from pathlib import Path

    path = Path(tag_dir) / STATE_FILE.format(rank=rank)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def start_cursors(state: Optional[dict]) -> Dict[int, Cursor]:
    if not state:
        return {}
    return {int(k): tuple(int(x) for x in v) for k, v in state.get("cursors", {}).items()}


# ============================================================================ measurement


def measure_stream_throughput(urls: Sequence[str], batches: int = 50, kind: str = "torch", micro_batch: int = 64,
                              num_workers: int = 2, image_size: int = 224, shuffle_buffer: int = 1000,
                              seed: int = 0) -> dict:
    """Images/s of the stream loader over ``urls`` (one rank): ``kind`` "torch" (Pillow in DataLoader workers) or
    "dali" (DALI decoding fed by the same stream). For ``benchmarks/data_scale.py``."""
    ds = StreamDataset(urls, [image_size], 4, seed, 0, 1, num_workers, shuffle_buffer, encoded=kind == "dali")
    loader = StreamLoader(ds, micro_batch, batches + 1, num_workers)
    if kind == "dali":
        from .dali_loader import DaliStreamLoader

        dev = resolve_device("cuda" if torch.cuda.is_available() else "cpu")  # DALI needs the index
        loader = DaliStreamLoader(loader, dev, num_threads=max(1, num_workers))
    n, t0 = 0, None
    for i, b in enumerate(loader):
        if i == 0:
            t0 = time.perf_counter()  # after the workers started and the first batch arrived
            continue
        n += len(b["valid"])
    dt = time.perf_counter() - t0 if t0 is not None else float("nan")
    return {"kind": kind, "images": n, "seconds": dt, "images_per_s": n / dt if dt else float("nan"),
            "micro_batch": micro_batch, "num_workers": num_workers, "image_size": image_size}

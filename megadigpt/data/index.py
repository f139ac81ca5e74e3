"""The compact sample index: every sample of a source as a few bytes in flat numpy columns, memory-mapped.

A source resolved into a Python list of :class:`~megadigpt.data.sources.Sample` costs ~240 MiB per million samples
in every rank, and every rank re-parses every tar header at start-up. A :class:`SampleIndex` holds the same
information column-wise:

- per sample: the image member's data offset (tar data offsets are multiples of 512: ``offset // 512`` as uint32
  where every offset fits, else the byte offset as int64, -1 for a plain file), its size (uint32 where every size
  is below 2**32-1, which then means unknown; else int64, -1 = unknown), its label (int16, int32 or int64: the
  narrowest that holds every label; -1 = none), and its key (one bytes blob plus offsets). Every column is as wide
  as the values it receives: nothing wraps (version 1 stored labels as int32 and sizes as uint32, so a ``.cls`` of
  2**32+5 read back as 5; a version-1 folder is refused with what to do, or rescanned where it is found beside
  its shards);
- per shard (a tar shard, or a plain image file: a "shard" of one sample at offset -1): its path (relative to the
  index folder where the shard lies beside or below the folder's parent, so shards and index move together), file
  size and mtime_ns (what makes an index fresh), the first sample, and a source-name id (``data merge``).

Samples are grouped by shard, so a sample's shard is a ``searchsorted`` on the first-sample table: no per-sample
shard column.

On disk (an *index folder*) it is ``index.json`` (format, version, counts, names of the sources) and one ``.npy`` per
column, read with ``np.load(mmap_mode="r", allow_pickle=False)``: nothing in it is pickled or can run code, and
every file's dtype and length is checked on open (a damaged or tampered folder is one :class:`ConfigError`).
``problems.jsonl`` beside them lists what the scan found (damaged shards, samples without an image, bad labels).

Memory: resident memory counts the file pages a process has mapped, and random lookups over an epoch would map
every page of the columns they read (36M samples: ~275 MiB for offsets and sizes alone). Worse, on this machine's
kernel (6.18, large page-cache folios) one random touch of a mapping maps ~1.7 MiB, so even dropping the mapping
every 128 lookups (``madvise(MADV_DONTNEED)``) left ~200 MiB resident at 10M samples (measured: see the docs).
So single lookups do not go through the mappings: they read the 4-16 bytes they need with ``os.pread`` (five
calls, ~13 us a lookup here; the pages stay in the shared page cache), and the resident memory of an open index is
its shard table, whatever the number of samples and lookups. The mappings serve the vectorised column reads
(``.labels``, subsets, merges), after which :meth:`SampleIndex.release` drops their pages again.

Pickling (DataLoader workers, DALI's spawned workers) carries the folder path and the view (a range, or the row
numbers of a subset), and the receiver reopens the files; an in-memory index (folders, sample lists, shards
scanned without an index) carries its arrays. Never a list of Samples.

Written here rather than taken from a library: it needs one flat table over the whole source with bounded
resident memory, a label column and freshness checks, where webdataset's wids and DALI's ``.idx`` files index
shard by shard.
"""

import json
import logging
import mmap
import os
import shutil
import stat
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..config import ConfigError
from ..safe_fs import shorten
from .samples import Problem, Sample

log = logging.getLogger(__name__)

FORMAT = "megadigpt-sample-index"
VERSION = 2  # 2: labels up to int64, sizes up to int64 (1 wrapped them into int32 / uint32)
BLOCK = 512  # tar data offsets are multiples of this
NO_SIZE = 0xFFFFFFFF  # a uint32 size column: unknown (plain files; Sample.size -1); an int64 one uses -1

# column file -> (allowed dtypes, length: "n" samples, "n1" samples + 1, "m" shards, "m1" shards + 1, "blob")
COLUMNS = {
    "offset": ((np.uint32, np.int64), "n"),
    "size": ((np.uint32, np.int64), "n"),
    "label": ((np.int16, np.int32, np.int64), "n"),
    "key_off": ((np.uint32, np.int64), "n1"),
    "key_blob": ((np.uint8,), "kblob"),
    "shard_first": ((np.int64,), "m1"),
    "shard_size": ((np.int64,), "m"),
    "shard_mtime": ((np.int64,), "m"),
    "shard_source": ((np.int32,), "m"),
    "path_off": ((np.uint32, np.int64), "m1"),
    "path_blob": ((np.uint8,), "pblob"),
}
_SMALL = ("shard_first", "shard_size", "shard_mtime", "shard_source", "path_off")  # loaded into memory


class IndexVersionError(ConfigError):
    """An index folder of another format version (one line saying what to do)."""


def _norm_sizes(a) -> np.ndarray:
    """A size column's values as int64, -1 = unknown (a uint32 column's NO_SIZE)."""
    a = np.asarray(a)
    out = a.astype(np.int64)
    if a.dtype == np.uint32:
        out[a == NO_SIZE] = -1
    return out


def _size_dtype(max_size: int):
    return np.uint32 if max_size < NO_SIZE else np.int64


def _blob_gather(off: np.ndarray, blob: np.ndarray, rows: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """The byte strings ``rows`` of (off, blob) as a new (off, blob), vectorised."""
    rows = np.asarray(rows, dtype=np.int64)
    starts = np.asarray(off[rows], dtype=np.int64)
    lens = np.asarray(off[rows + 1], dtype=np.int64) - starts
    new_off = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lens, out=new_off[1:])
    total = int(new_off[-1])
    if total == 0:
        return new_off, np.zeros(0, dtype=np.uint8)
    src = np.repeat(starts - new_off[:-1], lens) + np.arange(total, dtype=np.int64)
    return new_off, np.asarray(blob[src], dtype=np.uint8)


def _encode(strings: Sequence[str]) -> Tuple[np.ndarray, np.ndarray]:
    enc = [s.encode("utf-8", "backslashreplace") for s in strings]
    off = np.zeros(len(enc) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in enc], out=off[1:])
    return off, np.frombuffer(b"".join(enc), dtype=np.uint8).copy()


class _Store:
    """The columns and the shard table of one index: numpy arrays (in memory) or memory maps (an index folder)."""

    def __init__(self, cols: Dict[str, np.ndarray], unit: int, sources: List[str], root: str = ""):
        # the mmap objects (for madvise), and the columns as plain ndarray views of them: np.memmap's own
        # __getitem__ costs microseconds a lookup
        self._maps = [a._mmap for k, a in cols.items() if getattr(a, "_mmap", None) is not None and k not in _SMALL]
        maps_of = dict(cols)
        cols = {k: (a.view(np.ndarray) if isinstance(a, np.memmap) else a) for k, a in cols.items()}
        self.cols, self.unit, self.sources, self.root = cols, unit, list(sources), root
        # scalar lookups of a folder read with pread, not through the mappings (see the module docstring)
        self._fd: Dict[str, Tuple[int, int, int, bool]] = {}
        if root:
            for k in ("offset", "size", "label", "key_off", "key_blob"):
                a = maps_of[k]
                self._fd[k] = (os.open(os.path.join(root, f"{k}.npy"), os.O_RDONLY), int(a.offset),
                               a.dtype.itemsize, a.dtype.kind == "i")
            self._fdl = tuple(self._fd[k] for k in ("key_off", "key_blob", "offset", "size", "label"))
        self.n = len(cols["size"])
        self.m = len(cols["shard_size"])
        self.first = np.asarray(cols["shard_first"], dtype=np.int64)
        self._paths: Dict[int, str] = {}

    # ---------------------------------------------------------------- lookups
    def shard_of(self, p) -> Union[int, np.ndarray]:
        if isinstance(p, int):
            return int(self.first.searchsorted(p, side="right")) - 1
        return np.searchsorted(self.first, p, side="right") - 1

    def key(self, p: int) -> str:
        if self._fd:
            a, b = self._read("key_off", p, 2)
            fd, base, _, _ = self._fd["key_blob"]
            return os.pread(fd, b - a, base + a).decode("utf-8", "backslashreplace") if b > a else ""
        ko = self.cols["key_off"]
        return bytes(self.cols["key_blob"][int(ko[p]):int(ko[p + 1])]).decode("utf-8", "backslashreplace")

    def path_of_shard(self, s: int) -> str:
        p = self._paths.get(s)
        if p is None:
            off, blob = self.cols["path_off"], self.cols["path_blob"]
            p = bytes(blob[int(off[s]):int(off[s + 1])]).decode("utf-8", "backslashreplace")
            if self.root and not os.path.isabs(p):
                p = os.path.normpath(os.path.join(self.root, p))
            if len(self._paths) > 65536:
                self._paths.clear()
            self._paths[s] = p
        return p

    def offset(self, p: int) -> int:
        o = int(self.cols["offset"][p])
        return o * self.unit if self.unit != 1 else o

    def _read(self, name: str, p: int, count: int = 1) -> List[int]:
        fd, base, isz, signed = self._fd[name]
        b = os.pread(fd, isz * count, base + p * isz)
        if len(b) != isz * count:
            raise ConfigError(f"sample index {self.root}: {name}.npy is shorter than index.json says (changed?)")
        return [int.from_bytes(b[j * isz:(j + 1) * isz], "little", signed=signed) for j in range(count)]

    def sample(self, p: int) -> Sample:
        if self._fd:  # five small preads (~2 us each here): no page of the columns becomes resident
            (fk, bk, ik, _), (fb, bb, _, _), (fo, bo, io_, _), (fs, bs, is_, ss), (fl, bl, il, sl) = self._fdl
            kb = os.pread(fk, 2 * ik, bk + p * ik)
            ob, sb = os.pread(fo, io_, bo + p * io_), os.pread(fs, is_, bs + p * is_)
            lb = os.pread(fl, il, bl + p * il)
            if len(kb) != 2 * ik or len(ob) != io_ or len(sb) != is_ or len(lb) != il:
                raise ConfigError(f"sample index {self.root}: a column file is shorter than index.json says "
                                  f"(changed since it was opened?)")
            a, b = int.from_bytes(kb[:ik], "little"), int.from_bytes(kb[ik:], "little")
            key = os.pread(fb, b - a, bb + a).decode("utf-8", "backslashreplace") if b > a else ""
            off = int.from_bytes(ob, "little", signed=self.unit == 1)
            size = int.from_bytes(sb, "little", signed=ss)
            return Sample(self.path_of_shard(self.shard_of(p)), off * self.unit if self.unit != 1 else off,
                          -1 if size == NO_SIZE and not ss else size, key, int.from_bytes(lb, "little", signed=True))
        c = self.cols
        ko = c["key_off"]
        a, b = int(ko[p]), int(ko[p + 1])
        size = int(c["size"][p])
        if size == NO_SIZE and c["size"].dtype == np.uint32:
            size = -1
        return Sample(self.path_of_shard(self.shard_of(p)), self.offset(p), size,
                      bytes(c["key_blob"][a:b]).decode("utf-8", "backslashreplace"), int(c["label"][p]))

    def release(self) -> None:
        """Drop the mapped pages from this process (they stay in the page cache): bounded resident memory."""
        for mm in self._maps:
            try:
                mm.madvise(mmap.MADV_DONTNEED)
            except (OSError, ValueError, AttributeError):  # pragma: no cover - closed or not supported
                pass

    def offsets_bytes(self, rows) -> np.ndarray:
        o = np.asarray(self.cols["offset"][rows], dtype=np.int64)
        return o * self.unit if self.unit != 1 else o

    # ---------------------------------------------------------------- freshness
    def stale(self, shard_ids=None) -> Optional[str]:
        """Why the index no longer describes its tar shards (the first one changed, moved or gone), else None.
        Entries without a recorded size (plain files, sample lists) are read whole, so they are not checked."""
        ids = range(self.m) if shard_ids is None else shard_ids
        size, mtime = self.cols["shard_size"], self.cols["shard_mtime"]
        for s in ids:
            if size[s] < 0:
                continue
            path = self.path_of_shard(int(s))
            try:
                st = os.stat(path)
            except OSError:
                return f"{path} is gone"
            if not stat.S_ISREG(st.st_mode):
                return f"{path} is not a regular file (a device, FIFO or folder is never read as a shard)"
            if st.st_size != size[s] or st.st_mtime_ns != mtime[s]:
                return f"{path} changed since the index was written (size or mtime)"
        return None


def _gather(store: _Store, rows) -> _Store:
    """An in-memory store of the rows ``rows`` of ``store`` (any order, repeats allowed); paths made absolute."""
    rows = np.asarray(rows, dtype=np.int64)
    c = store.cols
    sid = store.shard_of(rows) if len(rows) else np.zeros(0, dtype=np.int64)
    cuts = np.flatnonzero(np.diff(sid) != 0) + 1 if len(rows) else np.zeros(0, dtype=np.int64)
    starts = np.concatenate([[0], cuts]).astype(np.int64) if len(rows) else np.zeros(0, dtype=np.int64)
    run_sid = sid[starts]
    key_off, key_blob = _blob_gather(c["key_off"], c["key_blob"], rows)
    path_off, path_blob = _encode([store.path_of_shard(int(s)) for s in run_sid])
    cols = {"offset": store.offsets_bytes(rows) if len(rows) else np.zeros(0, np.int64),
            "size": _norm_sizes(c["size"][rows]), "label": np.asarray(c["label"][rows]),
            "key_off": key_off, "key_blob": key_blob,
            "shard_first": np.concatenate([starts, [len(rows)]]).astype(np.int64),
            "shard_size": np.asarray(c["shard_size"][run_sid], dtype=np.int64),
            "shard_mtime": np.asarray(c["shard_mtime"][run_sid], dtype=np.int64),
            "shard_source": np.asarray(c["shard_source"][run_sid], dtype=np.int32),
            "path_off": path_off, "path_blob": path_blob}
    store.release()
    return _Store(cols, 1, store.sources)


class SampleIndex:
    """The samples of a source, in order: ``len``, ``idx[i]`` -> :class:`Sample`, ``idx[a:b]`` and
    ``idx.subset(indices)`` -> SampleIndex, iteration, ``.labels`` (a numpy int array). See the module docstring."""

    def __init__(self, store: _Store, rows=None):
        self._store = store
        self._rows = rows  # None (all), a range, or an int64 array of store rows

    # ---------------------------------------------------------------- the sequence
    def __len__(self) -> int:
        return self._store.n if self._rows is None else len(self._rows)

    def _phys(self, i: int) -> int:
        n = len(self)
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"sample {i} out of range ({n} samples)")
        return i if self._rows is None else int(self._rows[i])

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self._view(range(*i.indices(len(self))))
        return self._store.sample(self._phys(i))

    def __iter__(self) -> Iterator[Sample]:
        for i in range(len(self)):
            yield self[i]

    def rows(self) -> np.ndarray:
        """The store rows of this view (an array; for a whole index, 0..n-1)."""
        if self._rows is None:
            return np.arange(self._store.n, dtype=np.int64)
        if isinstance(self._rows, range):
            return np.arange(self._rows.start, self._rows.stop, self._rows.step, dtype=np.int64)
        return self._rows

    def store_rows(self, pos: np.ndarray) -> np.ndarray:
        """The store rows of positions ``pos`` of this view (vectorised, nothing else materialised)."""
        pos = np.asarray(pos, dtype=np.int64)
        if self._rows is None:
            return pos
        if isinstance(self._rows, range):
            return self._rows.start + pos * self._rows.step
        return self._rows[pos]

    def _view(self, sel) -> "SampleIndex":
        """sel: a range or an int array of positions in this view."""
        if isinstance(sel, range) and sel.step == 1 and (self._rows is None or isinstance(self._rows, range)):
            base = range(self._store.n) if self._rows is None else self._rows
            rows = base[sel.start:sel.stop]
            if rows.start == 0 and rows.stop == self._store.n and rows.step == 1:
                rows = None
        else:
            pos = np.arange(sel.start, sel.stop, sel.step) if isinstance(sel, range) else sel
            rows = self.store_rows(pos)
        if not self._store.root:  # in memory: compact, so a pickled subset carries only its own rows
            r = self.rows() if rows is None else (
                np.arange(rows.start, rows.stop, rows.step) if isinstance(rows, range) else rows)
            if len(r) == self._store.n and np.array_equal(r, np.arange(self._store.n)):
                return SampleIndex(self._store)
            return SampleIndex(_gather(self._store, r))
        return SampleIndex(self._store, rows)

    def subset(self, indices) -> "SampleIndex":
        """The samples at ``indices`` (positions in this index; any order, repeats allowed)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = len(self)
        if len(idx) and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"subset index out of range ({n} samples)")
        return self._view(np.where(idx < 0, idx + n, idx))

    # ---------------------------------------------------------------- columns
    @property
    def labels(self) -> np.ndarray:
        lab = self._store.cols["label"]
        if self._rows is None:
            return lab
        if isinstance(self._rows, range):
            return lab[self._rows.start:self._rows.stop:self._rows.step]
        return lab[self._rows]

    def sizes(self) -> np.ndarray:
        """The image members' sizes (int64; -1 = unknown: plain files read whole)."""
        s = self._store.cols["size"]
        return _norm_sizes(s if self._rows is None else s[self.rows()])

    def shard_ids(self) -> np.ndarray:
        return self._store.shard_of(self.rows())

    @property
    def num_shards(self) -> int:
        return self._store.m

    def shard_path(self, s: int) -> str:
        return self._store.path_of_shard(int(s))

    def path_of(self, i: int) -> str:
        p = self._phys(i)
        return self._store.path_of_shard(self._store.shard_of(p))

    def key_of(self, i: int) -> str:
        return self._store.key(self._phys(i))

    def source_of(self, i: int) -> str:
        """The name of the merged source sample i came from ("" outside ``data merge`` output)."""
        st = self._store
        sid = int(st.cols["shard_source"][st.shard_of(self._phys(i))])
        return st.sources[sid] if 0 <= sid < len(st.sources) else ""

    @property
    def source_names(self) -> List[str]:
        return list(self._store.sources)

    @property
    def folder(self) -> Optional[str]:
        """The index folder this reads from (None: in memory)."""
        return self._store.root or None

    def release(self) -> None:
        """Drop the pages this process touched (see the module docstring); lookups go on working."""
        self._store.release()

    # ---------------------------------------------------------------- pickling: by reference
    def __getstate__(self):
        st = self._store
        if st.root:
            return {"root": st.root, "rows": self._rows}
        return {"cols": st.cols, "unit": st.unit, "sources": st.sources, "rows": self._rows}

    def __setstate__(self, state):
        if "root" in state:
            self._store = open_store(state["root"])
        else:
            self._store = _Store(state["cols"], state["unit"], state["sources"])
        self._rows = state["rows"]

    def __repr__(self):
        where = self._store.root or "in memory"
        return f"SampleIndex({len(self)} samples, {self._store.m} shards, {where})"


# ============================================================================ building in memory

class ColumnBuilder:
    """Collects shards (each: its rows' offsets, sizes, labels, keys) into an in-memory :class:`SampleIndex`,
    one numpy chunk per shard: no per-sample objects survive a shard."""

    def __init__(self, sources: Sequence[str] = ()):
        self.sources = list(sources)
        self._parts: Dict[str, list] = {k: [] for k in ("offset", "size", "label", "klen", "kblob")}
        self._shards: List[tuple] = []
        self.n = 0

    def add_shard(self, path: str, file_size: int, mtime_ns: int, offsets, sizes, labels, keys: Sequence[str],
                  source: int = 0) -> None:
        offsets = np.asarray(offsets, dtype=np.int64)
        enc = [k.encode("utf-8", "backslashreplace") for k in keys]
        sizes = np.asarray(sizes, dtype=np.int64)  # (an OverflowError here is a caller's bug: scans refuse them)
        self._parts["offset"].append(offsets)
        self._parts["size"].append(np.where(sizes < 0, -1, sizes))
        self._parts["label"].append(np.asarray(labels, dtype=np.int64))
        self._parts["klen"].append(np.fromiter((len(b) for b in enc), dtype=np.int64, count=len(enc)))
        self._parts["kblob"].append(np.frombuffer(b"".join(enc), dtype=np.uint8))
        self._shards.append((path, int(file_size), int(mtime_ns), self.n, int(source)))
        self.n += len(offsets)

    def add_plain(self, paths: Sequence[str], keys: Sequence[str], labels) -> None:
        """Plain files: each a shard of one sample at offset -1 (not checked for freshness: read whole)."""
        labels = np.asarray(labels, dtype=np.int64)
        k = len(paths)
        enc = [x.encode("utf-8", "backslashreplace") for x in keys]
        self._parts["offset"].append(np.full(k, -1, dtype=np.int64))
        self._parts["size"].append(np.full(k, -1, dtype=np.int64))
        self._parts["label"].append(labels)
        self._parts["klen"].append(np.fromiter((len(b) for b in enc), dtype=np.int64, count=k))
        self._parts["kblob"].append(np.frombuffer(b"".join(enc), dtype=np.uint8))
        self._shards += [(p, -1, -1, self.n + j, 0) for j, p in enumerate(paths)]
        self.n += k

    def build(self) -> SampleIndex:
        def cat(name, dtype):
            parts = self._parts[name]
            return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype=dtype)

        klen = cat("klen", np.int64)
        key_off = np.zeros(len(klen) + 1, dtype=np.int64)
        np.cumsum(klen, out=key_off[1:])
        labels = cat("label", np.int64)
        path_off, path_blob = _encode([s[0] for s in self._shards])
        cols = {"offset": cat("offset", np.int64), "size": cat("size", np.int64),
                "label": labels.astype(_label_dtype(labels)), "key_off": key_off, "key_blob": cat("kblob", np.uint8),
                "shard_first": np.array([s[3] for s in self._shards] + [self.n], dtype=np.int64),
                "shard_size": np.array([s[1] for s in self._shards], dtype=np.int64),
                "shard_mtime": np.array([s[2] for s in self._shards], dtype=np.int64),
                "shard_source": np.array([s[4] for s in self._shards], dtype=np.int32),
                "path_off": path_off, "path_blob": path_blob}
        self._parts = {k: [] for k in self._parts}
        return SampleIndex(_Store(cols, 1, self.sources))


def _label_dtype(labels: np.ndarray):
    """The narrowest of int16 / int32 / int64 that holds every label (never one that wraps)."""
    if len(labels) == 0:
        return np.int16
    lo, hi = int(np.min(labels)), int(np.max(labels))
    for dt in (np.int16, np.int32):
        if np.iinfo(dt).min <= lo and hi <= np.iinfo(dt).max:
            return dt
    return np.int64


def from_samples(samples: Sequence[Sample], sources: Sequence[str] = ()) -> SampleIndex:
    """An in-memory index of Sample records (sample lists, tests): consecutive samples of one file share an entry."""
    b = ColumnBuilder(sources)
    run: List[Sample] = []

    def flush():
        if run:
            b.add_shard(run[0].path, -1, -1, [s.offset for s in run], [s.size for s in run],
                        [s.label for s in run], [s.key for s in run])
            run.clear()

    for s in samples:
        if run and (s.path != run[0].path or s.offset < 0):
            flush()
        run.append(s)
        if s.offset < 0:
            flush()
    flush()
    return b.build()


# ============================================================================ the index folder

class IndexWriter:
    """Writes an index folder shard by shard in bounded memory: columns are appended to raw temporary files and
    turned into ``.npy`` files (narrowest dtype that holds every value) at :meth:`close`, which also writes
    ``index.json`` and ``problems.jsonl`` and renames the temporary folder into place (atomic: a killed writer
    leaves the old index, or none, never half of one)."""

    def __init__(self, out_dir, sources: Sequence[str] = ()):
        self.out = Path(out_dir).absolute()
        if self.out.exists() and not (self.out / "index.json").is_file() and any(self.out.iterdir()):
            raise ConfigError(f"{self.out} exists and is not an index folder; give an empty or new folder")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.out.with_name(f".{self.out.name}.tmp{os.getpid()}")
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir()
        self.sources = list(sources)
        self._raw = {k: open(self.tmp / f"{k}.raw", "wb") for k in ("offset", "size", "label", "klen", "key_blob")}
        self._shards: List[tuple] = []
        self._problems = open(self.tmp / "problems.jsonl", "w")
        self.n = 0
        self.kblob = 0
        self._lab = [0, 0]  # min, max
        self._max_size = 0
        self._off_blocks = True  # every offset a non-negative multiple of 512 below 2**32 blocks
        self.problems = 0

    def _rel(self, path: str) -> str:
        """Relative to the index folder where the shard lies under the folder's parent (they move together)."""
        p = os.path.abspath(path)
        base = str(self.out.parent)
        if p.startswith(base + os.sep):
            return os.path.relpath(p, str(self.out))
        return p

    def add(self, path: str, file_size: int, mtime_ns: int, offsets, sizes, labels, key_off, key_blob,
            source: int = 0) -> None:
        """One shard's rows (numpy arrays; keys as offsets + blob)."""
        offsets = np.asarray(offsets, dtype=np.int64)
        k = len(offsets)
        if k:
            self._off_blocks &= bool(offsets.min() >= 0 and not (offsets % BLOCK).any()
                                     and offsets.max() // BLOCK < 2 ** 32)
            labels = np.asarray(labels, dtype=np.int64)
            self._lab = [min(self._lab[0], int(labels.min())), max(self._lab[1], int(labels.max()))]
            sizes = _norm_sizes(sizes)  # int64, -1 = unknown
            self._max_size = max(self._max_size, int(sizes.max()))
            offsets.tofile(self._raw["offset"])
            sizes.tofile(self._raw["size"])
            labels.tofile(self._raw["label"])
            np.diff(np.asarray(key_off, dtype=np.int64)).tofile(self._raw["klen"])
            kb = np.asarray(key_blob, dtype=np.uint8)
            kb.tofile(self._raw["key_blob"])
            self.kblob += len(kb)
        self._shards.append((self._rel(path), int(file_size), int(mtime_ns), self.n, int(source)))
        self.n += k

    def add_store(self, store: _Store, rows: np.ndarray, source: Optional[int] = None) -> None:
        """Rows of another index (any order; repeats allowed), as shard entries of this one; ``source``: the
        source id of them all (None: each keeps its own)."""
        g = _gather(store, rows)
        c = g.cols
        for s in range(g.m):
            a, b = int(g.first[s]), int(g.first[s + 1])
            ko = c["key_off"][a:b + 1]
            self.add(g.path_of_shard(s), int(c["shard_size"][s]), int(c["shard_mtime"][s]), c["offset"][a:b],
                     c["size"][a:b], c["label"][a:b], ko - ko[0], c["key_blob"][int(ko[0]):int(ko[-1])],
                     int(c["shard_source"][s]) if source is None else source)

    def add_problems(self, problems: Sequence[Problem]) -> None:
        for p in problems:
            self._problems.write(json.dumps({"path": self._rel(p.path) if not _is_url(p.path) else p.path,
                                             "key": p.key, "reason": p.reason}) + "\n")
            self.problems += 1

    def _finish(self, name: str, raw_dtype, dtype, n: int, convert=None, chunk: int = 1 << 22) -> None:
        with open(self.tmp / f"{name}.raw", "rb") as src, open(self.tmp / f"{name}.npy", "wb") as dst:
            np.lib.format.write_array_header_1_0(dst, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                                       "fortran_order": False, "shape": (n,)})
            done = 0
            while done < n:
                a = np.fromfile(src, dtype=raw_dtype, count=min(chunk, n - done))
                if len(a) == 0:
                    raise OSError(f"short temporary column {name}")
                (convert(a) if convert else a).astype(dtype, copy=False).tofile(dst)
                done += len(a)
        os.unlink(self.tmp / f"{name}.raw")

    def _save(self, name: str, arr: np.ndarray) -> None:
        np.save(self.tmp / f"{name}.npy", arr, allow_pickle=False)

    def close(self) -> Path:
        for f in self._raw.values():
            f.close()
        self._problems.close()
        n = self.n
        unit = BLOCK if self._off_blocks else 1
        self._finish("offset", np.int64, np.uint32 if unit == BLOCK else np.int64, n,
                     (lambda a: a // BLOCK) if unit == BLOCK else None)
        size_dtype = _size_dtype(self._max_size)
        self._finish("size", np.int64, size_dtype, n,
                     (lambda a: np.where(a < 0, NO_SIZE, a)) if size_dtype == np.uint32 else None)
        lab_dtype = _label_dtype(np.array(self._lab))
        self._finish("label", np.int64, lab_dtype, n)
        self._finish("key_blob", np.uint8, np.uint8, self.kblob)
        # key offsets from the lengths, chunk by chunk
        ko_dtype = np.uint32 if self.kblob < 2 ** 32 else np.int64
        with open(self.tmp / "klen.raw", "rb") as src, open(self.tmp / "key_off.npy", "wb") as dst:
            np.lib.format.write_array_header_1_0(dst, {"descr": np.lib.format.dtype_to_descr(np.dtype(ko_dtype)),
                                                       "fortran_order": False, "shape": (n + 1,)})
            np.zeros(1, dtype=ko_dtype).tofile(dst)
            total = 0
            while True:
                a = np.fromfile(src, dtype=np.int64, count=1 << 22)
                if not len(a):
                    break
                c = np.cumsum(a) + total
                total = int(c[-1])
                c.astype(ko_dtype).tofile(dst)
        os.unlink(self.tmp / "klen.raw")
        sh = self._shards
        path_off, path_blob = _encode([s[0] for s in sh])
        self._save("shard_first", np.array([s[3] for s in sh] + [n], dtype=np.int64))
        self._save("shard_size", np.array([s[1] for s in sh], dtype=np.int64))
        self._save("shard_mtime", np.array([s[2] for s in sh], dtype=np.int64))
        self._save("shard_source", np.array([s[4] for s in sh], dtype=np.int32))
        self._save("path_off", path_off.astype(np.uint32 if len(path_blob) < 2 ** 32 else np.int64))
        self._save("path_blob", path_blob)
        meta = {"format": FORMAT, "version": VERSION, "count": n, "shards": len(sh), "offset_unit": unit,
                "key_bytes": self.kblob, "path_bytes": int(len(path_blob)), "sources": self.sources,
                "problems": self.problems}
        (self.tmp / "index.json").write_text(json.dumps(meta, indent=1) + "\n")
        old = None
        if self.out.exists():
            old = self.out.with_name(f".{self.out.name}.old{os.getpid()}")
            os.replace(self.out, old)
        os.replace(self.tmp, self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.out

    def abort(self) -> None:
        for f in self._raw.values():
            f.close()
        self._problems.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def _is_url(p: str) -> bool:
    return p.startswith("pipe:") or ("://" in p and not p.startswith("file://"))


def write_index(index: SampleIndex, out_dir, problems: Sequence[Problem] = (), chunk: int = 1 << 20) -> Path:
    """Write any SampleIndex (in memory, or a view of another folder) as an index folder."""
    w = IndexWriter(out_dir, index.source_names)
    try:
        st, n = index._store, len(index)
        for a in range(0, n, chunk):
            w.add_store(st, index.store_rows(np.arange(a, min(n, a + chunk))))
        w.add_problems(problems)
        return w.close()
    except BaseException:
        w.abort()
        raise


def is_index_folder(path) -> bool:
    return (Path(path) / "index.json").is_file()


_OPEN: Dict[tuple, _Store] = {}


def _damaged(root, why) -> ConfigError:
    return ConfigError(f"sample index {root} is damaged or not ours: {why} (rebuild it: megadigpt data index)")


def open_store(root) -> _Store:
    """Open (once per process) and check an index folder: format, version, every file's dtype and length."""
    root = os.path.abspath(str(root))
    try:
        meta_st = os.stat(os.path.join(root, "index.json"))
    except OSError as e:
        raise ConfigError(f"sample index {root}: no index.json ({e.strerror})") from None
    cache_key = (root, meta_st.st_ino, meta_st.st_mtime_ns)  # a rewritten index is opened afresh
    st = _OPEN.get(cache_key)
    if st is not None:
        return st
    try:
        meta = json.loads(Path(root, "index.json").read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise _damaged(root, f"index.json is not readable JSON ({str(e).splitlines()[0][:120]})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise _damaged(root, "index.json is not a megadigpt sample index")
    version = meta.get("version")
    if version != VERSION:
        if type(version) is int and 1 <= version < VERSION:
            raise IndexVersionError(
                f"sample index {root} has format version {version}, written by an older megadigpt (its label and "
                f"size columns could wrap); this one reads version {VERSION}: rebuild it (megadigpt data index "
                f"<its shards> --out {root}, or data merge / data build again)")
        raise _damaged(root, f"index version {shorten(version, 40)}, this megadigpt reads {VERSION}")
    try:
        n, m = int(meta["count"]), int(meta["shards"])
        lengths = {"n": n, "n1": n + 1, "m": m, "m1": m + 1, "kblob": int(meta["key_bytes"]),
                   "pblob": int(meta["path_bytes"])}
        unit = int(meta["offset_unit"])
        sources = [str(s) for s in meta.get("sources") or []]
    except (KeyError, TypeError, ValueError) as e:
        raise _damaged(root, f"index.json lacks or garbles {e}") from None
    if unit not in (1, BLOCK) or n < 0 or m < 0:
        raise _damaged(root, "index.json has impossible counts")
    cols = {}
    for name, (dtypes, length) in COLUMNS.items():
        f = Path(root, f"{name}.npy")
        try:
            a = np.load(f, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            raise _damaged(root, f"{f.name}: {str(e).splitlines()[0][:120] if str(e) else type(e).__name__}") from None
        if a.ndim != 1 or a.dtype.type not in dtypes or a.dtype.byteorder not in ("=", "<", "|"):
            raise _damaged(root, f"{f.name} holds {a.dtype} of shape {a.shape}, expected 1-d "
                                 f"{'/'.join(np.dtype(d).name for d in dtypes)}")
        if len(a) != lengths[length]:
            raise _damaged(root, f"{f.name} has {len(a)} entries, index.json says {lengths[length]}")
        if name == "offset" and (a.dtype == np.uint32) != (unit == BLOCK):
            raise _damaged(root, f"offset.npy holds {a.dtype}, which does not go with offset_unit {unit}")
        cols[name] = np.array(a) if name in _SMALL else a
    first = cols["shard_first"]
    if first[0] != 0 or first[-1] != n or (np.diff(first) < 0).any():
        raise _damaged(root, "shard_first.npy is not a partition of the samples")
    po = cols["path_off"]
    if po[0] != 0 or po[-1] != lengths["pblob"] or (np.diff(po.astype(np.int64)) < 0).any():
        raise _damaged(root, "path_off.npy does not partition path_blob.npy")
    ko = cols["key_off"]
    if int(ko[0]) != 0 or int(ko[-1]) != lengths["kblob"]:
        raise _damaged(root, "key_off.npy does not span key_blob.npy")
    if (cols["shard_source"] >= max(1, len(sources))).any():
        raise _damaged(root, "shard_source.npy names sources index.json does not list")
    st = _Store(cols, unit, sources, root)
    _OPEN[cache_key] = st
    return st


def open_index(root, check_fresh: bool = True) -> SampleIndex:
    """The SampleIndex of an index folder; :class:`ConfigError` (one line) when damaged or (``check_fresh``) when
    one of its tar shards changed since it was written."""
    st = open_store(root)
    if check_fresh:
        why = st.stale()
        if why:
            raise ConfigError(f"sample index {st.root} is stale: {why}; rebuild it (megadigpt data index)")
    return SampleIndex(st)


def read_problems(root) -> List[Problem]:
    """What the scan that wrote an index folder found (``problems.jsonl``), paths resolved."""
    f = Path(root, "problems.jsonl")
    out: List[Problem] = []
    if not f.is_file():
        return out
    for n, line in enumerate(f.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            p = str(r["path"])
            if not _is_url(p) and not os.path.isabs(p):
                p = os.path.normpath(os.path.join(str(root), p))
            out.append(Problem(p, str(r.get("key", "")), str(r["reason"])))
        except (ValueError, KeyError, TypeError):
            raise _damaged(root, f"problems.jsonl:{n} is not a problem record") from None
    return out


# ============================================================================ synthetic indexes (benchmarks, tests)

def write_synthetic(out_dir, n: int, shard_size: int = 10000, mean_size: int = 110_000, seed: int = 0,
                    classes: int = 1000) -> Path:
    """An index folder of ``n`` synthetic samples (keys ``%09d``, random sizes and labels) over sparse placeholder
    shard files (size and mtime real, no data on disk): what benchmarks/data_scale.py and the memory tests open.
    Built from numpy arrays shard by shard, in bounded memory."""
    out = Path(out_dir)
    shards = out.parent / (out.name + "_shards")
    shards.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    w = IndexWriter(out)
    try:
        for k, a in enumerate(range(0, n, shard_size)):
            m = min(shard_size, n - a)
            sizes = rng.integers(mean_size // 2, mean_size * 3 // 2, m)
            offsets = np.zeros(m, dtype=np.int64)
            blocks = 1 + (sizes + BLOCK - 1) // BLOCK + 2  # header, data, a .cls member
            offsets[1:] = np.cumsum(blocks[:-1]) * BLOCK
            offsets += BLOCK
            ids = np.arange(a, a + m, dtype=np.int64)
            digits = (ids[:, None] // (10 ** np.arange(8, -1, -1, dtype=np.int64))) % 10 + 48
            path = shards / f"{k:06d}.tar"
            with open(path, "wb") as f:
                f.truncate(int(offsets[-1] + blocks[-1] * BLOCK + 2 * BLOCK))
            st = path.stat()
            w.add(str(path), st.st_size, st.st_mtime_ns, offsets, sizes, rng.integers(0, classes, m),
                  np.arange(0, 9 * m + 1, 9, dtype=np.int64), digits.astype(np.uint8).ravel())
        return w.close()
    except BaseException:
        w.abort()
        raise

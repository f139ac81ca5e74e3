"""Where images come from: webdataset shards (the layout img2dataset writes, local or at http(s)/s3/gs/pipe: URLs
through :mod:`megadigpt.data.remote`), image folders, the demo photos.

A source is resolved into a :class:`~megadigpt.data.index.SampleIndex`: flat numpy columns (memory-mapped from an
index folder where one is fresh, built in memory otherwise) that hand out :class:`Sample` records on lookup;
decoding happens in the loader.

Where an index is used (see :mod:`megadigpt.data.index`):
- an index folder (holding ``index.json``: what ``data index`` / ``data build`` / ``data merge`` write) given as
  the source; a stale one (a tar shard changed since) is refused in one line;
- a folder of tar shards with a fresh ``index/`` inside (``data build --out X`` writes ``X/index``; ``data index
  <shards> --out <folder>/index`` for shards written elsewhere), and a shard list or pattern all of whose shards
  lie in one folder with such an index: used automatically; a stale one is ignored (with a warning) and the
  shards are scanned as without one.
Without a fresh index, tar headers are scanned shard by shard straight into numpy columns.

Remote shards in indexed mode: a shard that cannot be read after the retries (:class:`RemoteError`) is skipped and
reported as a :class:`Problem` (key ""), like a damaged local shard; only a source of which no shard can be read
is an error.
"""

import errno
import functools
import glob
import json
import logging
import os
import re
import tarfile
from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..config import ConfigError, missing_path
from ..safe_fs import shorten
from .remote import SMALL_FILE_BYTES, RemoteError, cache_shard, expand_urls, is_remote
from .samples import Problem, Sample, open_regular  # noqa: F401 - Problem, Sample: re-exported

log = logging.getLogger(__name__)

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".jpe", ".gif", ".tif", ".tiff")
# Real photos that ship inside the scikit-image wheel: the embedded default data of the demo.
DEMO_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "hubble_deep_field.jpg", "retina.jpg",
               "ihc.png", "motorcycle_left.png", "motorcycle_right.png", "camera.png", "coins.png", "moon.png",
               "brick.png", "grass.png", "gravel.png", "color.png")


def read_small_file(path, limit: int, what: str) -> bytes:
    """A small data file's bytes (``classes.txt``, a ``.idx``, ``manifest.json``): a regular file of at most
    ``limit`` bytes, else :class:`OSError` with the reason."""
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise OSError(errno.EFBIG, f"{what} is {size} bytes, more than the {limit} such a file can be", str(path))
        data = f.read(limit + 1)
    if len(data) > limit:
        raise OSError(errno.EFBIG, f"{what} grew past {limit} bytes while read", str(path))
    return data


def demo_dir() -> Path:
    try:
        import skimage
    except ImportError as e:  # pragma: no cover - installed with megadigpt
        raise ConfigError("the demo data needs scikit-image (pip install scikit-image)") from e
    return Path(skimage.__file__).parent / "data"


def resolve_paths(source: Union[str, Sequence[str]], problems: Optional[List[Problem]] = None):
    """-> ('demo', [files]) | ('tar', [shards]) | ('folder', root) | ('list', file) | ('index', folder).
    Remote shards that cannot be read are skipped and added to ``problems`` (a ConfigError only when no shard at
    all is readable; without ``problems`` they are still skipped, e.g. for the early check)."""
    problems = [] if problems is None else problems
    remote_failed: List[Problem] = []
    items = [source] if isinstance(source, str) else list(source)
    if items == ["demo"]:
        d = demo_dir()
        files = [str(d / n) for n in DEMO_PHOTOS if (d / n).is_file()]
        if not files:
            raise ConfigError(f"no demo photos found in {d}")
        return "demo", files
    shards, folders, missing = [], [], []
    for item in items:
        item = os.path.expanduser(str(item))
        expanded = expand_urls(item)  # {000..009} ranges and {train,val} comma sets (braceexpand)
        if len(expanded) > 1:  # the shards of a brace set that are not there: one line, not one per shard
            gone = [e for e in expanded if not is_remote(e) and not any(ch in e for ch in "*?[") and
                    not os.path.exists(e)]
            if gone:
                more = f" (and {len(gone) - 1} more of {item})" if len(gone) > 1 else ""
                missing.append(missing_path(f"data source not found: {gone[0]}{more}"))  # raises unless previewing
                gone = set(gone)
                expanded = [e for e in expanded if e not in gone]
        for e in expanded:
            if is_remote(e):  # http(s)://, s3://, gs://, pipe: - read through a local copy (remote.cache_shard)
                try:
                    shards.append(cache_shard(e))
                except RemoteError as err:
                    log.warning("skipping a remote shard: %s", err)
                    remote_failed.append(Problem(e, "", str(err)))
                continue
            if any(ch in e for ch in "*?["):
                matches = sorted(glob.glob(e))
                if not matches:
                    missing.append(missing_path(f"data source pattern matches no file: {e}"))  # raises unless previewing
                    continue
                shards += [m for m in matches if m.endswith(".tar")]
                continue
            p = Path(e)
            if not p.exists():
                missing.append(missing_path(f"data source not found: {e}"))  # raises unless previewing
                continue
            if p.is_dir() and (p / "index.json").is_file() or p.name == "index.json" and p.is_file():
                if len(items) != 1 or len(expanded) != 1:
                    raise ConfigError("an index folder must be the only data source")
                return "index", str(p if p.is_dir() else p.parent)
            if p.is_dir():
                tars = sorted(str(q) for q in p.glob("*.tar"))
                if tars:
                    shards += tars
                else:
                    folders.append(str(p))
            elif p.suffix == ".tar":
                shards.append(str(p))
            elif p.suffix == ".jsonl":
                if len(items) != 1:
                    raise ConfigError("a sample list (.jsonl) must be the only data source")
                return "list", str(p)
            else:
                raise ConfigError(f"data source {e} is neither a folder nor a .tar shard")
    if shards and folders:
        raise ConfigError("mixing image folders and tar shards in one source is not supported")
    if folders:
        if len(folders) > 1:
            raise ConfigError("give one image folder (or shards)")
        return "folder", folders[0]
    if not shards:
        if missing:  # previewing (submit --dry-run): the source is not on this machine, and that was noted
            return "missing", []
        if remote_failed:
            more = f" (and {len(remote_failed) - 1} more shards)" if len(remote_failed) > 1 else ""
            raise ConfigError(f"no shard of {source!r} is readable: {remote_failed[0].reason}{more}")
        raise ConfigError(f"data source {source!r} contains no .tar shards or images")
    problems += remote_failed
    return "tar", shards




def check_source(source) -> str:
    """Cheap existence check for early validation; returns the source kind. An index folder is opened (its files
    checked) and its shards checked for freshness; a partly readable remote source passes (its unreadable shards
    are skipped later, and reported)."""
    kind, where = resolve_paths(source)
    if kind == "index":
        from .index import open_index

        open_index(where)
    return kind


def read_sample_list(path) -> List[Sample]:
    """A sample list (what ``data validate`` and ``data merge`` write): one JSON object per line."""
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                s = Sample(rec["path"], rec.get("offset", -1), rec.get("size", -1), rec.get("key", ""),
                           rec.get("label", -1))
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise ConfigError(f"{path}:{n}: not a sample record ({shorten(str(e), 80)})") from None
            if not isinstance(s.path, str) or not isinstance(s.key, str):
                raise ConfigError(f"{path}:{n}: path and key must be strings")
            for name in ("offset", "size", "label"):  # what the index columns (int64) can hold, nothing wider
                v = getattr(s, name)
                if type(v) is not int or not -1 <= v <= INT64_MAX:
                    raise ConfigError(f"{path}:{n}: {name} {shorten(v, 40)} is not an integer in [-1, 2**63-1]")
            out.append(s)
    return out


def write_sample_list(path, samples, extra=None) -> None:
    """Write samples (plus optional per-sample dicts, e.g. the source name) as a .jsonl sample list, atomically."""
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "w") as f:
        for i, s in enumerate(samples):
            rec = {"path": s.path, "offset": s.offset, "size": s.size, "key": s.key, "label": s.label}
            if extra is not None:
                rec.update(extra[i])
            f.write(json.dumps(rec) + "\n")
    os.replace(tmp, path)


IDX_LIMIT = 256 << 20  # a DALI .idx line is ~50 bytes a sample: far above any shard's
TEXT_LIMIT = 16 << 20  # classes.txt, manifest.json
CLS_LIMIT = 4096  # a .cls member holds a class number: a longer one is not read
INT64_MAX = 2 ** 63 - 1
DEFAULT_MAX_MEMBER_BYTES = 256 << 20  # data.max_member_bytes where a caller gives none


def _read_dali_index(shard: str):
    """Offsets from a DALI webdataset index (``<shard>.idx``, as wds2idx or ``data build`` write it)."""
    idx = Path(shard).with_suffix(".idx")
    if not os.path.lexists(idx):
        return None
    try:
        lines = read_small_file(idx, IDX_LIMIT, "the DALI index").decode().splitlines()
        if not lines or not lines[0].startswith("v1."):
            return None
        recs = []
        for line in lines[1:]:
            parts = line.split()
            comps = {}
            for j in range(0, len(parts) - 3, 4):
                ext, off, size, name = parts[j:j + 4]
                if not (off.isdigit() and size.isdigit()) or len(off) > 18 or len(size) > 18:
                    raise ValueError(f"offset or size {off!r} {size!r} is not a byte count")
                comps["." + ext.lower()] = (int(off), int(size), name)
            recs.append(comps)
    except (OSError, UnicodeDecodeError, ValueError) as e:  # a damaged index: the tar itself is the truth
        log.warning("ignoring the unreadable DALI index %s (%s); scanning the shard", idx, e)
        return None
    return recs


def parse_label(raw: bytes) -> Tuple[int, Optional[str]]:
    """A ``.cls`` member -> (label, None), or (-1, why it is not a label): ASCII digits only, >= 0, at most
    2**63-1 (the index's int64 label column: a larger one is refused, never wrapped)."""
    try:
        text = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        return -1, f"unparsable label {raw[:24]!r} (.cls)"
    if not text:
        return -1, "empty label (.cls)"
    if not re.fullmatch(r"[+-]?[0-9]+", text):
        return -1, f"unparsable label {raw[:24]!r} (.cls)"
    digits = text.lstrip("+-").lstrip("0")
    if len(digits) > 19 or (digits and int(digits) > INT64_MAX):
        return -1, f"label {shorten(text, 40)} does not fit int64 (.cls; the largest is 2**63-1)"
    if text.startswith("-") and digits:
        return -1, f"negative label {int(text)} (.cls)"
    return int(text), None


def _members_text(parts) -> str:
    return ", ".join(sorted(parts)) or "none"


def _rows_from_members(shard: str, members: Dict[str, Dict[str, Tuple[int, int]]], f, file_size: int,
                       problems: List[Problem]):
    """members: key -> {ext: (data offset, size)} -> (keys, offsets, sizes, labels) of the usable samples. A
    sample needs an image member and, if it has a ``.cls``, a parsable one; members that run past the end of the
    file are truncated."""
    keys, offs, sizes, labels = [], [], [], []
    for key, parts in members.items():
        cut = sorted(e for e, (off, size) in parts.items() if off + size > file_size)
        if cut:
            problems.append(Problem(shard, key, f"truncated: member {key}{cut[0]} runs past the end of the shard "
                                                f"({file_size} bytes)"))
            continue
        img = next((parts[e] for e in IMAGE_EXTS if e in parts), None)
        if img is None:
            problems.append(Problem(shard, key, f"no image member (members: {_members_text(parts)})"))
            continue
        label = -1
        if ".cls" in parts:
            off, size = parts[".cls"]
            if size > CLS_LIMIT:
                problems.append(Problem(shard, key, f"unparsable label: the .cls member is {size} bytes (not read)"))
                continue
            f.seek(off)
            label, why = parse_label(f.read(size))
            if why:
                problems.append(Problem(shard, key, why))
                continue
        keys.append(key)
        offs.append(img[0])
        sizes.append(img[1])
        labels.append(label)
    return keys, offs, sizes, labels


class _BoundedFile:
    """A read-only view of a shard for :mod:`tarfile`, through ``os.pread``: reads end at the file's size whatever a
    header claims (a PAX ``size`` of 10**29 makes tarfile ask for that many bytes, or seek there), and a seek past
    the end is only remembered. So a hostile header costs a short read, never a huge allocation or an overflow."""

    def __init__(self, fd: int, size: int):
        self.fd, self.size, self.pos = fd, size, 0

    def read(self, n: int = -1) -> bytes:
        left = max(0, self.size - self.pos)
        n = left if n is None or n < 0 else min(n, left)
        out = []
        while n > 0:
            b = os.pread(self.fd, min(n, 1 << 24), self.pos)
            if not b:  # the file shrank while read
                break
            out.append(b)
            self.pos += len(b)
            n -= len(b)
        return b"".join(out)

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.pos, 2: self.size}[whence]
        self.pos = max(0, base + int(offset))
        return self.pos

    def tell(self) -> int:
        return self.pos


def member_key(name: str):
    """``dir/abc.jpg`` -> (``dir/abc``, ``.jpg``); None for names without an extension."""
    base = os.path.basename(name)
    if "." not in base:
        return None
    return os.path.join(os.path.dirname(name), base.split(".", 1)[0]), "." + base.split(".", 1)[1].lower()


def _printable(name: str) -> str:
    """A name for a one-line message: as is when short and printable, else its shortened repr."""
    return name if len(name) <= 80 and name.isprintable() else shorten(name, 80)


def duplicate_reason(key: str) -> str:
    """The bad-sample reason of a later sample whose key an earlier sample of the shard has (both access modes)."""
    return f"duplicate key {key} in the shard (an earlier sample has it)"


def scan_tar(shard: str, f, file_size: int, problems: List[Problem]) -> Dict[str, Dict[str, Tuple[int, int]]]:
    """Walk the tar headers with :mod:`tarfile`, keeping every member read before any damage, and report the
    damage: tarfile itself stops silently at a header cut short or overwritten, and raises at a member whose data
    is cut, so where the walk stopped is checked against the end-of-archive blocks.

    Samples are grouped as webdataset groups them: a run of consecutive members with one key, a new run where the
    key changes or an extension repeats. A run whose key an earlier run has is a bad sample (the first is kept), so
    both access modes train on the same samples. A header claiming more bytes than the whole shard (a PAX size of
    10**29) or a negative size ends the walk as damage; members whose names are not UTF-8 are skipped and the shard
    reported once."""
    members: Dict[str, Dict[str, Tuple[int, int]]] = {}
    last_key = None
    try:
        tf = tarfile.open(fileobj=_BoundedFile(f.fileno(), file_size), mode="r:")
    except Exception as e:  # noqa: BLE001 - tarfile's own errors, and what hostile headers make it raise
        problems.append(Problem(shard, "", f"not a readable tar file ({type(e).__name__}: {shorten(str(e), 100)})"))
        return members
    damage = None
    run_key, run_exts, run_dup = None, set(), False
    bad_names, first_bad = 0, None
    with tf:
        while True:
            try:
                m = tf.next()
            except tarfile.TarError as e:  # data of the last member cut short ("unexpected end of data")
                damage = f"truncated at byte {file_size} ({e})"
                break
            except Exception as e:  # noqa: BLE001 - a hostile header (overflowing numbers, bad PAX records)
                damage = (f"unreadable tar header after byte {tf.offset} ({type(e).__name__}: "
                          f"{shorten(str(e), 100)})")
                break
            if m is None:
                break
            if m.size < 0 or m.size > file_size:
                damage = (f"member {_printable(m.name)} claims {m.size} bytes, more than the whole shard "
                          f"({file_size} bytes): a damaged or hostile header at byte {m.offset}")
                break
            if not m.isfile():
                continue
            try:
                m.name.encode("utf-8")
            except UnicodeEncodeError:
                bad_names += 1
                first_bad = first_bad or m.name.encode("utf-8", "surrogateescape")
                continue
            split = member_key(m.name)
            if split is None:
                continue
            key, ext = split
            if key != run_key or ext in run_exts:  # a new sample starts (webdataset's rule)
                run_key, run_exts, run_dup = key, set(), key in members
                if run_dup:
                    problems.append(Problem(shard, key, duplicate_reason(key)))
            run_exts.add(ext)
            if run_dup:
                continue
            members.setdefault(key, {})[ext] = (m.offset_data, m.size)
            last_key = key
        if damage is None:
            end = tf.offset  # where the next header would start
            block = os.pread(f.fileno(), tarfile.BLOCKSIZE, end) if end < file_size else b""
            if end >= file_size:
                damage = f"ends at byte {file_size} without the end-of-archive blocks (truncated?)"
            elif len(block) < tarfile.BLOCKSIZE:
                damage = f"cut inside a tar header at byte {end} ({len(block)} of {tarfile.BLOCKSIZE} bytes)"
            elif block.strip(b"\0"):
                damage = f"invalid tar header at byte {end}: the remaining {file_size - end} bytes are unreadable"
    if bad_names:
        problems.append(Problem(shard, "", f"{bad_names} member name{'s are' if bad_names > 1 else ' is'} not UTF-8 "
                                           f"(e.g. {shorten(first_bad, 60)}); {'their' if bad_names > 1 else 'its'} "
                                           f"samples were left out"))
    if damage is not None:
        problems.append(Problem(shard, "", damage))
        if last_key is not None and all(off + size <= file_size for off, size in members[last_key].values()):
            # webdataset samples are contiguous: the one before the damage may have lost members after it. It is
            # complete if it has the members most samples of the shard have; else (or with nothing to compare) not.
            kinds = Counter(frozenset(parts) for k, parts in members.items() if k != last_key)
            if not kinds or not set(members[last_key]) >= kinds.most_common(1)[0][0]:
                members.pop(last_key)
                problems.append(Problem(shard, last_key, "may be incomplete: the shard is damaged right after it"))
    return members


def scan_shard(shard: str, problems: List[Problem]):
    """One local tar shard -> (file size, mtime_ns, keys, offsets, sizes, labels) of its usable samples; what is
    wrong with it goes to ``problems``. Reads the DALI ``.idx`` beside it where there is one, else the headers. A
    path that is not a regular file (a FIFO, a device, a folder) is a damaged shard, never read."""
    try:
        f = open_regular(shard)
    except OSError as e:
        problems.append(Problem(shard, "", f"unreadable shard: {e.strerror or e}"))
        return -1, -1, [], [], [], []
    with f:
        st = os.fstat(f.fileno())
        file_size = st.st_size
        indexed = _read_dali_index(shard)
        if indexed is not None:
            members = {}
            for n, comps in enumerate(indexed):
                name = next(iter(comps.values()))[2] if comps else str(n)
                key = name.split(".", 1)[0]
                if key in members:
                    problems.append(Problem(shard, key, duplicate_reason(key)))
                    continue
                members[key] = {e: (off, size) for e, (off, size, _) in comps.items()}
        else:
            members = scan_tar(shard, f, file_size, problems)
            expected = _manifest_count(shard)
            if expected is not None and expected > len(members):  # what a cut shard lost, where it is known
                problems.append(Problem(shard, "", f"{expected - len(members)} of {expected} samples missing "
                                                   f"(manifest.json counts {expected})"))
        return (file_size, st.st_mtime_ns) + _rows_from_members(shard, members, f, file_size, problems)


@functools.lru_cache(maxsize=8)
def _manifest_counts(path: str, mtime_ns: int) -> Dict[str, int]:
    try:
        return {r["name"]: int(r["count"]) for r in json.loads(read_small_file(path, TEXT_LIMIT, "manifest.json"))
                .get("shards", [])}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return {}


def _manifest_count(shard: str) -> Optional[int]:
    """The sample count ``data build``'s manifest.json beside the shard records for it, if any (read once per
    folder, not once per shard)."""
    path = Path(shard).parent / "manifest.json"
    try:
        mtime = path.stat().st_mtime_ns
    except OSError:
        return None
    return _manifest_counts(str(path), mtime).get(Path(shard).name)


def _fresh_index_for(shards: List[str]):
    """(SampleIndex, problems) from the fresh ``index/`` of the one folder all ``shards`` lie in, covering every one
    of them; None where there is none (or it is stale: then the shards are scanned)."""
    from .index import IndexVersionError, SampleIndex, open_store, read_problems

    parents = {os.path.dirname(os.path.abspath(s)) for s in shards}
    if len(parents) != 1:
        return None
    folder = os.path.join(parents.pop(), "index")
    if not os.path.isfile(os.path.join(folder, "index.json")):
        return None
    try:
        st = open_store(folder)  # damaged or tampered: one line, not a silent rescan
    except IndexVersionError as e:  # written by an older megadigpt: as if stale
        log.warning("ignoring %s; scanning the shards", e)
        return None
    pos: Dict[str, List[int]] = {}
    for j in range(st.m):
        pos.setdefault(st.path_of_shard(j), []).append(j)
    want = [os.path.abspath(s) for s in shards]
    missing = [s for s in want if s not in pos]
    if missing:
        log.info("the index in %s does not list %s; scanning the shards", folder, missing[0])
        return None
    ids = [j for s in want for j in pos[s]]
    why = st.stale(ids)
    if why:
        log.warning("ignoring the stale sample index %s (%s); scanning the shards (megadigpt data index rebuilds "
                    "it)", folder, why)
        return None
    if ids == list(range(st.m)):
        idx = SampleIndex(st)
    else:
        rows = [np.arange(st.first[j], st.first[j + 1], dtype=np.int64) for j in ids]
        idx = SampleIndex(st, np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64))
    wanted = set(want)
    return idx, [p for p in read_problems(folder) if p.path in wanted]


def _scan_shards(shards: List[str], problems: List[Problem]):
    from .index import ColumnBuilder

    b = ColumnBuilder()
    for shard in shards:
        size, mtime, keys, offs, sizes, labels = scan_shard(shard, problems)
        b.add_shard(shard, size, mtime, offs, sizes, labels, keys)
    return b.build()


def _member_limit() -> int:
    """``data.max_member_bytes`` as the entry point set it (``remote.configure_from(cfg.data)``), else 256 MiB."""
    from . import remote

    opts = getattr(remote, "options", None)
    return int((opts() if opts else {}).get("max_member_bytes") or DEFAULT_MAX_MEMBER_BYTES)


def member_too_large(name: str, size: int, limit: int) -> str:
    """The bad-sample reason of a member above ``data.max_member_bytes`` (both access modes: the text is
    :func:`megadigpt.data.remote.member_too_large`'s)."""
    from .remote import member_too_large as reason

    return reason(name, size, limit)


def _tar_member_name(path: str, data_offset: int, key: str) -> str:
    """The name in the tar header right before a member's data (ustar: prefix/name), for naming it in a problem;
    the key where that header cannot be read."""
    try:
        with open_regular(path) as f:
            h = os.pread(f.fileno(), tarfile.BLOCKSIZE, data_offset - tarfile.BLOCKSIZE)
        info = tarfile.TarInfo.frombuf(h, "utf-8", "surrogateescape")
        return info.name.encode("utf-8", "backslashreplace").decode() if info.name else key
    except (OSError, ValueError, tarfile.TarError):
        return key


def _drop_oversize(out, limit: int, problems: List[Problem]):
    """The samples of ``out`` whose image member is at most ``limit`` bytes; each larger one a problem (before
    anything reads it). Vectorised over the size column (an index folder's stays mapped only for this)."""
    sizes = out.sizes()
    big = np.flatnonzero(sizes > limit)
    out.release()
    if not len(big):
        return out
    for i in big.tolist():
        s = out[i]
        name = _tar_member_name(s.path, s.offset, s.key) if s.offset >= tarfile.BLOCKSIZE else s.key
        problems.append(Problem(s.path, s.key, member_too_large(name, s.size, limit)))
    keep = np.ones(len(sizes), dtype=bool)
    keep[big] = False
    return out.subset(np.flatnonzero(keep))


def scan_source(source, max_member_bytes: Optional[int] = None):
    """The samples of a source as a :class:`~megadigpt.data.index.SampleIndex`, and the problems found while
    listing them (damaged shards, unreadable remote shards, samples without an image member, unparsable labels,
    duplicate keys, image members above ``max_member_bytes`` (default: ``data.max_member_bytes`` as
    :func:`megadigpt.data.remote.configure_from` set it, else 256 MiB)): each a
    :class:`Problem` naming the shard and key. Decoding problems are found later, by the loaders (or
    ``data validate``)."""
    from .index import open_index, read_problems

    problems: List[Problem] = []
    kind, where = resolve_paths(source, problems)
    if kind == "tar":
        found = _fresh_index_for(where)
        if found is not None:
            out, found_problems = found
            problems += found_problems
        else:
            out = _scan_shards(where, problems)
    elif kind == "index":
        out = open_index(where)
        problems += read_problems(where)
    else:
        out = _plain_samples(kind, where)
    limit = _member_limit() if max_member_bytes is None else int(max_member_bytes)
    out = _drop_oversize(out, limit, problems)
    if not len(out):
        extra = f" ({len(problems)} problems, e.g. {problems[0].path}: {problems[0].reason})" if problems else ""
        raise ConfigError(f"data source {source!r} holds no images{extra}")
    if problems:
        log.warning("%d bad samples or shard problems in %s, e.g. %s %s: %s (megadigpt data validate lists them)",
                    len(problems), source, problems[0].path, problems[0].key, problems[0].reason)
    return out, problems


def _plain_samples(kind, where):
    from .index import ColumnBuilder, from_samples

    if kind == "list":
        return from_samples(read_sample_list(where))
    b = ColumnBuilder()
    if kind == "demo":
        b.add_plain(where, [Path(f).stem for f in where], [-1] * len(where))
        return b.build()
    root = Path(where)
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())
    rel = [p.relative_to(root) for p in files]
    # every class folder, the list label_names() gives (an empty one included: a class without images), so that
    # labels and names agree
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    cidx = {c: i for i, c in enumerate(classes)}
    b.add_plain([str(p) for p in files], [str(r) for r in rel],
                [cidx.get(r.parts[0], -1) if len(r.parts) > 1 else -1 for r in rel])
    return b.build()


def find_samples(source):
    """The usable samples of a source, a :class:`~megadigpt.data.index.SampleIndex` (see :func:`scan_source` for
    the problems found on the way)."""
    return scan_source(source)[0]


def parse_class_names(text: Union[str, bytes], where: str) -> List[str]:
    """``classes.txt``: one class name per line, label 0 first. A blank line (it would shift every later label's
    name), a repeated name or a file naming no class is one :class:`ConfigError` line; trailing blank lines are
    fine."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"{where} is not UTF-8 text (byte {e.start})") from None
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    names: List[str] = []
    seen: Dict[str, int] = {}
    for n, line in enumerate(lines, 1):
        name = line.strip()
        if not name:
            raise ConfigError(f"{where}:{n}: a blank line; each line names the class of one label (line 1: label "
                              f"0), so a blank one would shift every name after it")
        if name in seen:
            raise ConfigError(f"{where}:{n}: class name {shorten(name, 60)} is already on line {seen[name]}; each "
                              f"class is named once")
        seen[name] = n
        names.append(name)
    if not names:
        raise ConfigError(f"{where} names no class")
    return names


def _classes_file(path) -> List[str]:
    try:
        data = read_small_file(path, TEXT_LIMIT, "classes.txt")
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror or e}") from None
    return parse_class_names(data, str(path))


def _remote_classes(url: str) -> Optional[List[str]]:
    """``classes.txt`` beside a remote shard (the URL's last path element replaced), one try; None if absent."""
    if url.startswith("pipe:"):
        return None
    base, sep, _ = url.split("?", 1)[0].rpartition("/")
    if not sep or base.endswith(":/"):
        return None
    try:
        path = cache_shard(base + "/classes.txt", retries=0, max_bytes=SMALL_FILE_BYTES)  # a small file: capped
        data = read_small_file(path, TEXT_LIMIT, "classes.txt")
    except (RemoteError, OSError):
        return None
    return parse_class_names(data, base + "/classes.txt")


def label_names(source) -> Optional[List[str]]:
    """Class names in label order, where the source says: class folders (sorted, e.g. ImageNet synsets), or a
    ``classes.txt`` (one name per line) beside tar shards (local or remote), a sample list, or in an index folder.
    None where unknown. A remote source is asked once (no retries), before any shard is downloaded."""
    items = [source] if isinstance(source, str) else list(source)
    if items and items != ["demo"]:
        first_item = expand_urls(os.path.expanduser(str(items[0])))[:1]
        if first_item and is_remote(first_item[0]):
            return _remote_classes(first_item[0])
    kind, where = resolve_paths(source)
    if kind == "index":
        from .index import open_index

        idx = open_index(where, check_fresh=False)
        cands = [Path(where) / "classes.txt"] + ([Path(idx.shard_path(0)).parent / "classes.txt"] if idx.num_shards
                                                 else [])
        for f in cands:
            if os.path.lexists(f):
                return _classes_file(f)
        return None
    if kind == "folder":
        root = Path(where)
        return sorted(p.name for p in root.iterdir() if p.is_dir()) or None
    first = where[0] if isinstance(where, list) and where else where
    if kind in ("tar", "list") and first:
        f = Path(first).parent / "classes.txt"
        if os.path.lexists(f):
            return _classes_file(f)
    return None


def check_class_names(train_source, val_source, train_what: str = "data.train",
                      val_what: str = "data.val") -> Optional[List[str]]:
    """The training source's class names (None where it names none), after checking them against the validation
    source's where both name their classes (class folders, ``classes.txt``): labels are class indices, so the two
    must name the same classes in the same order, else a validation "dog" would be scored as the training class
    that has dog's index. A mismatch is one :class:`ConfigError` line naming the classes that differ."""
    train, val = label_names(train_source), label_names(val_source)
    if train is None or val is None or train == val:
        return train
    only_t = [n for n in train if n not in set(val)]
    only_v = [n for n in val if n not in set(train)]

    def few(items, quote=True):
        return ", ".join(shorten(n, 40) if quote else n for n in items[:5]) + (
            f" and {len(items) - 5} more" if len(items) > 5 else "")

    if only_t or only_v:
        parts = ([f"only {train_what} has {few(only_t)}"] if only_t else []) + (
            [f"only {val_what} has {few(only_v)}"] if only_v else [])
        raise ConfigError(f"{train_what} and {val_what} name different classes: {'; '.join(parts)} (labels are "
                          f"class indices: give both the same class folders or the same classes.txt)")
    moved = [f"{shorten(n, 40)} is {i} in {train_what}, {val.index(n)} in {val_what}"
             for i, n in enumerate(train) if val.index(n) != i]
    raise ConfigError(f"{train_what} and {val_what} number their classes differently: {few(moved, False)} (labels are "
                      f"class indices: give both the same classes.txt)")

"""Checkpoints in ``<run_dir>/checkpoints/``: DeepSpeed's sharded layout per tag (``step_XXXXXXXX/``), plus

- ``step_XXXXXXXX/megadigpt.json``: written by rank 0 after every rank has written *and fsynced* its files. A tag
  without it is incomplete (a crash during the save) and is never resumed from. It lists every file of the tag
  with its size and CRC-32 (``files``), so a damaged checkpoint (truncated, overwritten, bytes flipped) is found
  before DeepSpeed reads it.
- ``latest``: the newest complete tag, replaced atomically (temporary file, fsync, rename). If it is missing or
  unreadable, the newest complete tag is found by listing.

So a ``kill -9`` at any moment, during a save too, leaves a run directory that resumes from a complete
checkpoint. Complete tags older than a new one, beyond ``keep``, are deleted after it is complete; incomplete ones
(no marker file) at the next successful save; a tag whose marker is invalid never (:func:`prune`).

A marker is data anyone can edit: it is read only as a regular file of at most ``MARKER_LIMIT`` bytes, parsed
with bounded nesting, and held to a schema (:func:`check_marker_fields`); an invalid one makes its tag unverified
with the reason, never a fresh start (:func:`resumable_tag`). Every file written here goes through
:mod:`megadigpt.safe_fs`: pointers and markers replaced atomically (a planted link replaced, never followed),
shards created fresh, logs appended to only as regular files.

Resuming verifies sizes and checksums (each rank reads a share of the files) and falls back to the newest tag
that verifies. A save that fails (a full disk) stops every rank with one line,
leaves the tag unmarked and removed, and leaves ``latest`` on the previous checkpoint.

Checksums: CRC-32 (zlib), computed while DeepSpeed's ``torch.save`` writes (no second read); it detects accidental
damage, which is all a marker anyone can edit can promise. Measured on this project's 2-core development machine:
zlib.crc32 1.75 GB/s, sha256 (SHA-NI) 0.88 GB/s, blake2b 0.64 GB/s: verifying on resume costs ~0.6 s per GB of
checkpoint per rank reading it (plus the disk's read time), split over the ranks.
"""

import errno
import json
import math
import os
import re
import shutil
import stat
import sys
import time
import zlib
from pathlib import Path
from typing import List, Optional, Tuple

from .. import safe_fs
from ..config import ConfigError

MARKER = "megadigpt.json"
TAG_RE = re.compile(r"^step_(\d{8})$")
UNIVERSAL_RE = re.compile(r"^step_(\d{8})_universal$")
MARKER_LIMIT = 4 << 20  # bytes: ~100 bytes per listed file, two files per rank: ~20,000 ranks
MARKER_DEPTH = 32       # nesting of objects and lists in a marker (ours is 3 deep)
LATEST_LIMIT = 4096     # bytes of ``checkpoints/latest``: one tag name


def checkpoint_dir(run_dir) -> Path:
    return Path(run_dir) / "checkpoints"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _tag_step(tag: str) -> Optional[int]:
    m = TAG_RE.match(tag) or UNIVERSAL_RE.match(tag)
    return int(m.group(1)) if m else None


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _depth_problem(obj) -> Optional[str]:
    """Objects and lists nested deeper than MARKER_DEPTH (walked without recursion)."""
    stack = [(obj, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, (dict, list)):
            if depth > MARKER_DEPTH:
                return f"it is nested more than {MARKER_DEPTH} levels deep"
            stack.extend((x, depth + 1) for x in (v.values() if isinstance(v, dict) else v))
    return None


def _name_problem(name) -> Optional[str]:
    """A ``files`` entry must name a file directly inside the tag folder."""
    if not isinstance(name, str) or not name:
        return f"files names {safe_fs.shorten(name)}, not a file name"
    if "/" in name or "\\" in name or name in (".", "..") or "\x00" in name or name == MARKER:
        return f"files names {safe_fs.shorten(name)}, which is not a file inside the tag folder"
    if len(name.encode("utf-8", "surrogatepass")) > safe_fs.NAME_MAX or any(ord(c) < 32 for c in name):
        return f"files names {safe_fs.shorten(name)}, not a file name"
    return None


_COUNTS = {"global_batch": 1, "world_size": 1, "bad_samples": 0, "nonfinite_steps": 0, "skipped_shards": 0}


def check_marker_fields(marker, tag: str, total_steps: Optional[int] = None) -> Optional[str]:
    """Why a parsed marker does not describe the checkpoint in ``tag`` (None: it does). The schema:

    - an object; ``step`` a whole number (not a bool) >= 0, equal to the step in the tag's name
      (``step_00000042`` -> 42), and <= the schedule's ``total_steps`` (the marker's own, and ``total_steps``
      where the caller knows it);
    - ``files`` (absent only in markers of older megadigpt): an object of file names directly inside the tag folder
      (no ``/``, no ``..``, not absolute, not the marker) to ``{"size": whole number >= 0, "crc32": 8 hex digits}``;
    - ``time`` a finite number; ``global_batch``, ``world_size`` whole numbers >= 1; ``seed`` a whole number;
      ``bad_samples``, ``nonfinite_steps``, ``skipped_shards`` whole numbers >= 0; ``tokenizer`` a string or null;
      ``teacher``, ``stream`` objects or null; ``best`` an object; ``schedule`` an object whose ``total_steps`` is a
      whole number >= 0 and ``warmup_steps``, ``peak_lr``, ``min_lr`` finite numbers;
    - other keys any JSON, nested at most MARKER_DEPTH deep."""
    if not isinstance(marker, dict):
        return f"it is a JSON {type(marker).__name__}, not an object"
    problem = _depth_problem(marker)
    if problem:
        return problem
    step = marker.get("step")
    if "step" not in marker:
        return "it has no step"
    if not _is_int(step) or step < 0:
        return f"step is {safe_fs.shorten(step, 40)}, not a whole number >= 0"
    named = _tag_step(tag)
    if named is not None and step != named:
        return f"step is {step}, but the folder name says {named}"
    if "time" in marker and not _is_number(marker["time"]):
        return f"time is {safe_fs.shorten(marker['time'], 40)}, not a number"
    for key, low in _COUNTS.items():
        if key in marker and not (_is_int(marker[key]) and marker[key] >= low):
            return f"{key} is {safe_fs.shorten(marker[key], 40)}, not a whole number >= {low}"
    if "seed" in marker and not _is_int(marker["seed"]):
        return f"seed is {safe_fs.shorten(marker['seed'], 40)}, not a whole number"
    if marker.get("tokenizer") is not None and not isinstance(marker["tokenizer"], str):
        return f"tokenizer is {safe_fs.shorten(marker['tokenizer'], 40)}, not a string"
    for key in ("teacher", "stream"):
        if marker.get(key) is not None and not isinstance(marker[key], dict):
            return f"{key} is {safe_fs.shorten(marker[key], 40)}, not an object"
    if "best" in marker and not isinstance(marker["best"], dict):
        return f"best is {safe_fs.shorten(marker['best'], 40)}, not an object"
    schedule = marker.get("schedule")
    if "schedule" in marker:
        if not isinstance(schedule, dict):
            return f"schedule is {safe_fs.shorten(schedule, 40)}, not an object"
        if "total_steps" in schedule and not (_is_int(schedule["total_steps"]) and schedule["total_steps"] >= 0):
            return f"schedule.total_steps is {safe_fs.shorten(schedule['total_steps'], 40)}, not a whole number >= 0"
        for key in ("warmup_steps", "peak_lr", "min_lr"):
            if key in schedule and not _is_number(schedule[key]):
                return f"schedule.{key} is {safe_fs.shorten(schedule[key], 40)}, not a number"
        if "total_steps" in schedule and step > schedule["total_steps"]:
            return f"step {step} is past the schedule's total_steps {schedule['total_steps']}"
    if total_steps is not None and step > total_steps:
        return f"step {step} is past this run's total_steps {total_steps}"
    if "files" in marker:
        files = marker["files"]
        if not isinstance(files, dict):
            return f"files is {safe_fs.shorten(files, 60)}, not an object of file names"
        for name, rec in files.items():
            problem = _name_problem(name)
            if problem:
                return problem
            if not isinstance(rec, dict):
                return f"files[{safe_fs.shorten(name, 60)}] is {safe_fs.shorten(rec, 40)}, not an object"
            if not (_is_int(rec.get("size")) and rec["size"] >= 0):
                return f"files[{safe_fs.shorten(name, 60)}].size is {safe_fs.shorten(rec.get('size'), 40)}, not a " \
                       f"whole number >= 0"
            crc = rec.get("crc32")
            if crc is not None and not (isinstance(crc, str) and re.fullmatch(r"[0-9a-f]{8}", crc)):
                return f"files[{safe_fs.shorten(name, 60)}].crc32 is {safe_fs.shorten(crc, 40)}, not 8 hex digits"
    return None


def parse_marker(data: bytes, tag: str, total_steps: Optional[int] = None) -> Tuple[Optional[dict], Optional[str]]:
    """``(marker, None)``, or ``(None, why it is not a marker of tag)``. Never raises on what the bytes hold."""
    try:
        marker = json.loads(data.decode("utf-8"))
    except RecursionError:
        return None, f"it is nested more than {MARKER_DEPTH} levels deep"
    except (ValueError, MemoryError) as e:  # not UTF-8, not JSON, an integer of more than 4300 digits
        return None, f"it is not JSON ({' '.join(str(e).split())[:120]})"
    problem = check_marker_fields(marker, tag, total_steps)
    return (None, problem) if problem else (marker, None)


def _lstat(path) -> Optional[os.stat_result]:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        return None


def marker_status(run_dir, tag: str, total_steps: Optional[int] = None) -> Tuple[Optional[dict], Optional[str]]:
    """The marker of ``tag``: ``(marker, None)`` valid; ``(None, None)`` there is none (an incomplete save);
    ``(None, reason)`` there is one, and it is unreadable or invalid: the tag is not resumed from and not pruned.
    Read only as a regular file, not through a link, at most MARKER_LIMIT bytes."""
    ckdir = checkpoint_dir(run_dir)
    tdir, path = ckdir / tag, ckdir / tag / MARKER
    try:
        st = _lstat(tdir)
        if st is None:
            return None, None
        if stat.S_ISLNK(st.st_mode):
            return None, f"its folder {tdir} is a symbolic link"
        if not stat.S_ISDIR(st.st_mode):
            return None, f"{tdir} is not a folder"
        st = _lstat(path)
        if st is None:
            return None, None
        if not stat.S_ISREG(st.st_mode):
            return None, f"its marker {MARKER} is a symbolic link or not a regular file"
        if st.st_size > MARKER_LIMIT:
            return None, f"its marker {MARKER} is {st.st_size} bytes, more than the {MARKER_LIMIT} a marker may hold"
        data = safe_fs.read_regular(path, limit=MARKER_LIMIT, root=ckdir, what="checkpoint marker")
    except ConfigError as e:
        return None, f"its marker {MARKER} cannot be read ({e})"
    except OSError as e:
        return None, f"its marker {MARKER} cannot be read ({e.strerror or type(e).__name__})"
    if data is None:  # removed meanwhile
        return None, None
    marker, problem = parse_marker(data, tag, total_steps)
    if problem:
        return None, f"its marker {MARKER} is invalid: {problem}"
    return marker, None


def read_marker(run_dir, tag: str) -> Optional[dict]:
    """The marker of ``tag`` if it is valid (:func:`marker_status`), else None."""
    return marker_status(run_dir, tag)[0]


def _tag_names(run_dir) -> List[str]:
    """Names in ``checkpoints/`` that look like tags (folders, and links planted under such names), sorted."""
    try:
        return sorted(n for n in os.listdir(checkpoint_dir(run_dir)) if TAG_RE.match(n))
    except (FileNotFoundError, NotADirectoryError):
        return []


def _marked_tags(run_dir) -> List[str]:
    """Tags with a marker file (valid or not), and tag names that are links: what a resume must account for."""
    d = checkpoint_dir(run_dir)
    out = []
    for n in _tag_names(run_dir):
        st = _lstat(d / n)
        if st is None:
            continue
        if stat.S_ISLNK(st.st_mode) or (stat.S_ISDIR(st.st_mode) and os.path.lexists(d / n / MARKER)):
            out.append(n)
    return out


def complete_tags(run_dir) -> List[str]:
    """Tags whose marker is valid, oldest first."""
    return [t for t in _marked_tags(run_dir) if read_marker(run_dir, t) is not None]


def _read_latest(run_dir) -> str:
    """The tag ``checkpoints/latest`` names, or "" when it is missing, not a regular file, or holds no tag name."""
    ckdir = checkpoint_dir(run_dir)
    try:
        data = safe_fs.read_regular(ckdir / "latest", limit=LATEST_LIMIT, root=ckdir, what="checkpoint pointer")
        tag = (data or b"").decode("utf-8").strip()
    except (ConfigError, OSError, UnicodeDecodeError):
        return ""
    return tag if TAG_RE.match(tag) else ""


def _candidates(run_dir) -> List[str]:
    """Marked tags in the order a resume tries them: the one ``latest`` names, then older ones, newest first
    (never one newer than ``latest``: a rollback points it back past the checkpoints of a diverged stretch). With
    ``latest`` missing or unreadable: every marked tag, newest first. Tags with an invalid marker are included:
    they are skipped with their reason, and if none verifies the resume is refused."""
    tag = _read_latest(run_dir)
    tags = _marked_tags(run_dir)
    if tag in tags and read_marker(run_dir, tag) is not None:
        tags = [t for t in tags if t <= tag]
    return tags[::-1]


def verify(run_dir, tag: str, checksums: bool = False, share=(0, 1)) -> Optional[str]:
    """Why ``tag`` cannot be resumed from, or None. Its marker must be valid (:func:`marker_status`); every listed
    file a regular file (not a link, not a device) of its recorded size (cheap: lstat); with ``checksums``, the
    CRC-32 of the files in this rank's ``share`` (rank, world: every world-th file). A marker written before files
    were recorded (older megadigpt) verifies by its presence alone."""
    marker, problem = marker_status(run_dir, tag)
    if marker is None:
        return problem or "no completeness marker"
    files = marker.get("files")
    if files is None:
        return None
    ckdir = checkpoint_dir(run_dir)
    d = ckdir / tag
    for name, rec in sorted(files.items()):
        try:
            st = os.lstat(d / name)
        except FileNotFoundError:
            return f"{name} is missing"
        except OSError as e:
            return f"{name} is unreadable ({e.strerror})"
        if stat.S_ISLNK(st.st_mode):
            return f"{name} is a symbolic link, not the file its marker lists"
        if not stat.S_ISREG(st.st_mode):
            return f"{name} is not a regular file"
        if st.st_size != rec["size"]:
            return f"{name} has {st.st_size} bytes, its marker says {rec['size']}"
    if checksums:
        rank, world = share
        for name, rec in sorted(files.items())[rank::world]:
            try:
                _, crc = _digest(d / name, root=ckdir)
            except ConfigError:
                return f"{name} is a symbolic link or not a regular file"
            except OSError as e:
                return f"{name} is unreadable ({e.strerror})"
            if rec.get("crc32") is not None and crc != rec["crc32"]:
                return f"{name} does not match its checksum (crc32 {crc}, its marker says {rec['crc32']})"
    return None


def latest_tag(run_dir) -> Optional[str]:
    """The tag to resume from: ``latest`` if it names a complete checkpoint whose files have their recorded sizes,
    else the newest older one that does (cheap: :func:`verified_latest_tag` also checks the checksums)."""
    for tag in _candidates(run_dir):
        if verify(run_dir, tag) is None:
            return tag
    return None


def _none_verifies(run_dir, skipped) -> ConfigError:
    return ConfigError(f"no checkpoint in {checkpoint_dir(run_dir)} verifies ("
                       + "; ".join(f"{t}: {r}" for t, r in skipped) + "): restore one, or move the folder "
                       "away to start over")


def resumable_tag(run_dir) -> Optional[str]:
    """:func:`latest_tag`, refusing (ConfigError) where marked tags exist and none verifies (cheap checks: sizes):
    starting over would ignore them and then prune them. Checked before anything heavy."""
    skipped = []
    for tag in _candidates(run_dir):
        reason = verify(run_dir, tag)
        if reason is None:
            return tag
        skipped.append((tag, reason))
    if skipped:
        raise _none_verifies(run_dir, skipped)
    return None


def verified_latest_tag(run_dir, rank0: bool = True) -> Optional[str]:
    """:func:`latest_tag` with checksums: each rank checks a share of the files and all ranks agree (a collective
    when the process group is up). Skipped tags are reported on rank 0 (stderr and ``metrics.jsonl``); if tags
    exist and none verifies, ConfigError (starting over would overwrite them)."""
    import torch.distributed as dist

    multi = dist.is_available() and dist.is_initialized()
    share = (dist.get_rank(), dist.get_world_size()) if multi else (0, 1)
    skipped = []
    for tag in _candidates(run_dir):
        mine = verify(run_dir, tag, checksums=True, share=share)
        reasons = [mine]
        if multi:
            reasons = [None] * share[1]
            dist.all_gather_object(reasons, mine)
        reason = next((r for r in reasons if r), None)
        if reason is None:
            if rank0 and skipped:
                _report_skipped(run_dir, skipped, tag)
            return tag
        skipped.append((tag, reason))
    if skipped:
        raise _none_verifies(run_dir, skipped)
    return None


def _report_skipped(run_dir, skipped, tag):
    for bad, reason in skipped:
        print(f"megadigpt: warning: checkpoint {bad} is damaged ({reason}); resuming from {tag}", file=sys.stderr,
              flush=True)
    with safe_fs.open_append(Path(run_dir) / "metrics.jsonl", root=run_dir, what="metrics log") as f:
        for bad, reason in skipped:
            f.write(json.dumps({"time": time.time(), "event": "checkpoint_skipped", "tag": bad, "reason": reason,
                                "resume_from": tag}) + "\n")


def _digest(path, fsync: bool = False, root=None):
    """(size, crc32 as 8 hex digits) of a file, streamed; with ``fsync``, its data is made durable too. Only a
    regular file is read, never through a link (below ``root``): else ConfigError."""
    crc, size = 0, 0
    with os.fdopen(safe_fs.open_fd(path, os.O_RDONLY, root=root, what="checkpoint file"), "rb") as f:
        while True:
            chunk = f.read(1 << 22)
            if not chunk:
                break
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
        if fsync:
            os.fsync(f.fileno())
    return size, f"{crc:08x}"


def _fsync_dir(path):
    dfd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _atomic_write(path: Path, text: str, root=None, what: str = "run file"):
    """Replace ``path`` (a pointer, a marker, a verdict: files megadigpt alone writes) through a fresh temporary
    (:func:`safe_fs.write_atomic`: a link planted at the name is replaced itself, one at an old temporary's name
    is left alone; neither is written through), then make the rename durable."""
    safe_fs.write_atomic(path, text, root=root, what=what, replace_links=True)
    _fsync_dir(path.parent)


def set_latest(run_dir, tag: str):
    ckdir = checkpoint_dir(run_dir)
    _atomic_write(ckdir / "latest", tag + "\n", root=ckdir, what="checkpoint pointer")


class CheckpointWriteError(ConfigError):
    """A save failed on some rank (a full disk, say): one line, exit code 2, the previous checkpoint intact."""


class _CountingWriter:
    """The file object ``torch.save`` writes through: counts and checksums the bytes as they pass (no second
    read), and being a Python file, a full disk surfaces as OSError(ENOSPC); ``torch.save(path)``'s own writer
    reports only "file write failed"."""

    def __init__(self, f):
        self.f, self.size, self.crc, self.error = f, 0, 0, None

    def write(self, b):
        mv = memoryview(b).cast("B")
        self.crc = zlib.crc32(mv, self.crc)
        done = 0
        try:
            while done < len(mv):  # a nearly full disk takes part of a write; the next attempt raises ENOSPC
                done += self.f.write(mv[done:])
        except OSError as e:  # torch's zip writer turns it into "unexpected pos": keep the cause
            self.error = self.error or e
            raise
        self.size += done
        return done

    def flush(self):
        self.f.flush()


class _GuardedWrites:
    """Stands in for the engine's checkpoint engine (and its recovery-script copy) during one save. A write that
    fails is recorded, not raised: DeepSpeed's save has barriers after the writes, and a rank that raised would
    leave the others waiting there forever. Every file written is fsynced and its size and CRC-32 recorded."""

    def __init__(self, inner, step: int, root=None):
        self.inner, self.step, self.files, self.error, self.root = inner, step, {}, None, root

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def save(self, state_dict, path):
        if self.error is not None:
            return
        from ..testing import active

        try:
            if active("enospc_in_save", self.step):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))  # tests, where tmpfs is refused
            if type(self.inner).__name__ == "TorchCheckpointEngine":
                import torch

                with os.fdopen(_fresh_file(path, self.root), "wb") as f:
                    w = _CountingWriter(f)
                    try:
                        torch.save(state_dict, w, _use_new_zipfile_serialization=self.inner.zipfile_serialization)
                    except RuntimeError as e:
                        raise (w.error or e)
                    f.flush()
                    os.fsync(f.fileno())
                self.files[str(path)] = (w.size, f"{w.crc:08x}")
            else:  # another engine writes its own way: read its file back
                safe_fs.check_no_links(path, self.root, "checkpoint file")
                self.inner.save(state_dict, path)
                self.files[str(path)] = _digest(path, fsync=True, root=self.root)
        except (OSError, RuntimeError, ConfigError) as e:
            self.fail(e, path)

    def guard(self, fn):
        def call(*args, **kw):
            if self.error is None:
                try:
                    fn(*args, **kw)
                except OSError as e:
                    self.fail(e, e.filename)
                except ConfigError as e:
                    self.fail(e, None)
        return call

    def fail(self, e, path):
        self.error = _describe(e, path)
        try:  # unlink removes a planted link itself, never its target
            os.unlink(path)
        except (OSError, TypeError):
            pass


RECOVERY_SCRIPTS = ("zero_to_fp32.py", "zero_to_torch.py")  # what DeepSpeed 0.19's _copy_recovery_script writes


def _fresh_copies(copy):
    """DeepSpeed's recovery-script copy (``shutil.copyfile``, which writes through a link and then chmods its
    target), with the names it writes unlinked first: a planted link there is removed itself, never followed."""
    def call(save_path, *args, **kw):
        for name in RECOVERY_SCRIPTS:
            st = _lstat(os.path.join(save_path, name))
            if st is not None and not stat.S_ISDIR(st.st_mode):
                os.unlink(os.path.join(save_path, name))
        return copy(save_path, *args, **kw)
    return call


def _fresh_file(path, root) -> int:
    """A new file at ``path`` for writing: no link on the way or at the name (one ConfigError naming it), and an
    earlier file there (a rerun of the tag) unlinked first, so a hard link planted there is not written through."""
    safe_fs.check_no_links(path, root, "checkpoint file")
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    return safe_fs.open_fd(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, root=root, what="checkpoint file")


def _describe(e, path=None) -> str:
    if isinstance(e, ConfigError):
        return " ".join(str(e).split())
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return "no space left on device" if e.errno == errno.ENOSPC else "disk quota exceeded"
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror.lower()} ({e.filename or path})"
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} ({path})"


def save(engine, run_dir, step: int, client_state: dict, keep: int = 0, is_rank0: bool = True,
         extra_files=()) -> str:
    """Save on every rank: DeepSpeed writes the shards (each rank fsyncs and checksums its own, and its
    ``extra_files``, already written into the tag folder); the ranks exchange what they wrote; rank 0 writes the
    marker listing every file, points ``latest`` at the tag and prunes. A write that fails anywhere raises
    :class:`CheckpointWriteError` on every rank, after rank 0 removed the unmarked tag."""
    import torch.distributed as dist

    from ..testing import fault

    multi = dist.is_available() and dist.is_initialized()
    tag = tag_for(step)
    ckdir = checkpoint_dir(run_dir)
    tdir = ckdir / tag
    previous = latest_tag(run_dir) if is_rank0 else None
    error = None
    try:
        ckdir.mkdir(parents=True, exist_ok=True)
        safe_fs.check_no_links(tdir, ckdir, "checkpoint folder")  # a link planted as the tag: not written through
        if is_rank0:  # overwriting a tag (a rerun after a rollback): incomplete first
            try:
                os.unlink(tdir / MARKER)
                _fsync_dir(tdir)
            except (FileNotFoundError, NotADirectoryError):
                pass
    except (OSError, ConfigError) as e:
        error = _describe(e, ckdir)
    guard = _GuardedWrites(engine.checkpoint_engine, step, root=ckdir)
    guard.error = error
    engine.checkpoint_engine = guard
    recovery = hasattr(type(engine), "_copy_recovery_script")
    if recovery:  # rank 0's copy of DeepSpeed's zero_to_fp32.py beside the tags: same rule
        engine._copy_recovery_script = guard.guard(_fresh_copies(engine._copy_recovery_script))
    try:  # DeepSpeed's first barrier comes before any rank writes: the old marker is gone by then
        engine.save_checkpoint(str(ckdir), tag=tag, client_state=client_state, save_latest=False)
    except OSError as e:
        guard.error = guard.error or _describe(e)
    finally:
        engine.checkpoint_engine = guard.inner
        if recovery:
            del engine._copy_recovery_script
    fault("kill_in_save", step)  # tests: die after the shards are written, before the tag is complete
    files, error = {}, guard.error
    if error is None:
        try:
            for path in extra_files:
                guard.files[str(path)] = _digest(path, fsync=True, root=ckdir)
            for sub in {Path(p).parent for p in guard.files} | {tdir, ckdir}:
                _fsync_dir(sub)
            files = {os.path.relpath(p, tdir): {"size": n, "crc32": c} for p, (n, c) in guard.files.items()}
        except OSError as e:
            error = _describe(e, e.filename)
        except ConfigError as e:
            error = _describe(e)
    reports = [(files, error)]
    if multi:  # every rank's files are on disk (or its error is known) before rank 0 marks the tag
        reports = [None] * dist.get_world_size()
        dist.all_gather_object(reports, (files, error))
    failed = next((r for _, r in reports if r), None)
    if is_rank0 and failed is None:
        listed = {}
        for f, _ in reports:
            listed.update(f)
        try:
            for p in sorted(tdir.iterdir()):  # what no rank reported: regular files only, never a planted link
                st = os.lstat(p)
                if stat.S_ISREG(st.st_mode) and p.name not in listed and p.name != MARKER \
                        and not p.name.startswith(f".{MARKER}.tmp"):
                    n, c = _digest(p, fsync=True, root=ckdir)
                    listed[p.name] = {"size": n, "crc32": c}
            marker = {"step": step, "time": time.time(),
                      **{k: v for k, v in client_state.items()
                         if v is None or isinstance(v, (int, float, str, dict, list))},
                      "files": listed}
            text = json.dumps(marker)
            _, problem = parse_marker(text.encode(), tag)  # never write a marker a resume would refuse
            if problem:
                raise ConfigError(f"the marker megadigpt would write is invalid ({problem})")
            _atomic_write(tdir / MARKER, text, root=ckdir, what="checkpoint marker")
            set_latest(run_dir, tag)
        except (OSError, ConfigError) as e:
            failed = _describe(e, getattr(e, "filename", None))
            try:
                (tdir / MARKER).unlink()
            except OSError:
                pass
            try:  # ``latest`` may already name the new tag: point it back
                if previous:
                    set_latest(run_dir, previous)
            except (OSError, ConfigError):
                pass
    if multi:
        verdict = [failed]
        dist.broadcast_object_list(verdict, src=0)
        failed = verdict[0]
    if failed:
        if is_rank0:
            shutil.rmtree(tdir, ignore_errors=True)  # unmarked, and its space is what the next try needs
        if multi:
            dist.barrier()
        raise CheckpointWriteError(f"{failed} while saving checkpoint {tag} to {ckdir} ("
                                   + (f"the previous checkpoint {previous} is intact)" if previous else
                                      "there is no earlier checkpoint)") if is_rank0 else failed)
    if is_rank0:
        prune(run_dir, keep, protect=tag)
    if multi:
        dist.barrier()
    return tag


def prune(run_dir, keep: int, protect: str):
    """After ``protect`` (the tag this process has just written and marked) is complete: delete tag folders with
    no marker file at all (saves that never completed), and complete tags *older than* ``protect`` beyond the
    ``keep`` newest (``protect`` counted). Never deleted: ``protect``; complete tags newer than it (a rollback's
    diverged stretch, until the run overwrites them); a tag whose marker is unreadable or invalid (no decision is
    taken on what it says: it is left for a person to inspect); a name that is a link or not a folder. So no
    checkpoint is deleted because of what another checkpoint's marker claims."""
    d = checkpoint_dir(run_dir)
    complete = []
    for tag in _tag_names(run_dir):
        st = _lstat(d / tag)
        if tag == protect or st is None or not stat.S_ISDIR(st.st_mode):  # (lstat: a link is not a folder)
            continue
        marker, problem = marker_status(run_dir, tag)
        if marker is None and problem is None:
            shutil.rmtree(d / tag, ignore_errors=True)  # a save that never completed
        elif marker is not None and tag < protect:
            complete.append(tag)
    if keep > 0:
        for tag in complete[:max(0, len(complete) - (keep - 1))]:
            shutil.rmtree(d / tag, ignore_errors=True)
            u = d / universal_tag(tag)
            if (st := _lstat(u)) is not None and stat.S_ISDIR(st.st_mode):
                shutil.rmtree(u, ignore_errors=True)


def universal_tag(tag: str) -> str:
    return f"{tag}_universal"


def make_universal(run_dir, tag: str) -> str:
    """Convert a ZeRO checkpoint into DeepSpeed's universal format (loadable on any world size); idempotent."""
    import subprocess
    import sys

    d = checkpoint_dir(run_dir)
    out = d / universal_tag(tag)
    safe_fs.check_no_links(out, d, "universal checkpoint folder")  # a planted link there: one line
    if marker_status(run_dir, out.name)[0] is not None:
        return out.name
    shutil.rmtree(out, ignore_errors=True)
    # DeepSpeed's ds_to_universal, with every torch.load made safe (it unpickles the shards with weights_only=False)
    cmd = [sys.executable, "-m", "megadigpt.checkpoint.safe_universal", "--input_folder", str(d / tag),
           "--output_folder", str(out), "--inject_missing_state", "--num_extract_workers", "1",
           "--num_merge_workers", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    refused = [l for l in proc.stderr.splitlines() if l.startswith("megadigpt: error: ")]
    if proc.returncode == 2 and refused:
        from ..config import ConfigError

        shutil.rmtree(out, ignore_errors=True)
        raise ConfigError(refused[-1][len("megadigpt: error: "):])
    if proc.returncode != 0:
        raise RuntimeError(f"converting {tag} to a universal checkpoint failed:\n{proc.stderr[-2000:]}")
    _atomic_write(out / MARKER, safe_fs.read_regular(d / tag / MARKER, limit=MARKER_LIMIT, root=d,
                                                     what="checkpoint marker"), root=d, what="checkpoint marker")
    return out.name


def load(engine, run_dir, tag: str, universal: bool = False) -> dict:
    """Resume ``engine`` from ``tag``. Nothing in the files may run code: every rank first scans the whole tag
    (so a payload in any rank's shard stops all ranks with the same one-line ConfigError), and DeepSpeed's own
    ``torch.load`` calls (checkpoint engine, ZeRO-3 universal loader) run with ``weights_only=True``."""
    from .safe_load import check_folder, deepspeed_loads

    name = universal_tag(tag) if universal else tag
    check_folder(checkpoint_dir(run_dir) / name)
    with deepspeed_loads():
        path, client_state = engine.load_checkpoint(str(checkpoint_dir(run_dir)), tag=name)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {tag} from {checkpoint_dir(run_dir)}")
    return client_state or {}


class ResumeState:
    """What a (re)started run resumes from, read once before anything heavy: the newest checkpoint whose files
    have their recorded sizes (``tag``, None: a fresh start) and its marker. Every start-up question is answered
    from it: may this config resume it (:meth:`check`), does the lr schedule change (:meth:`schedule_changes`),
    is the run already finished (:meth:`finished`), which teacher did it use (``marker["teacher"]``). The engine
    then loads the newest tag that passes the checksums too (:func:`start_engine`: usually the same one)."""

    def __init__(self, run_dir, tag: Optional[str], marker: Optional[dict]):
        self.run_dir, self.tag, self.marker = Path(run_dir), tag, marker

    @classmethod
    def read(cls, run_dir) -> "ResumeState":
        """ConfigError where marked tags exist and none verifies (see :func:`resumable_tag`)."""
        tag = resumable_tag(run_dir)
        return cls(run_dir, tag, read_marker(run_dir, tag) if tag else None)

    def get(self, key, default=None):
        return (self.marker or {}).get(key, default)

    def check(self, train_cfg, tokenizer: Optional[str] = None):
        """Refuse (ConfigError) a checkpoint trained with another global batch or seed (the data order would
        change) or another tokenizer (``tokenizer``: the codebook's fingerprint; the token indices would mean
        other things)."""
        from ..config import ConfigError

        marker, run_dir = self.marker, self.run_dir
        if not marker:
            return
        for key in ("global_batch", "seed"):
            if key in marker and marker[key] != getattr(train_cfg, key):
                raise ConfigError(f"{run_dir} was trained with train.{key}={marker[key]}, now "
                                  f"{getattr(train_cfg, key)}: resuming would change the data order; use a new "
                                  f"train.run_dir")
        if "tokenizer" in marker and marker["tokenizer"] != tokenizer:
            raise ConfigError(f"{run_dir} was trained with tokenizer {marker['tokenizer'] or 'none (features)'}, now "
                              f"{tokenizer or 'none (features)'}: resuming would change what the heads predict; use "
                              f"the same target.tokenizer or a new train.run_dir")

    def schedule_changes(self, schedule: dict, allow: bool = False) -> list:
        """Refuse (ConfigError) to resume a run whose learning-rate schedule would change: ``schedule`` holds this
        start's resolved ``total_steps``, ``warmup_steps``, ``peak_lr`` and ``min_lr``; the marker holds the ones
        it was trained with. A new ``train.max_steps`` or ``train.epochs``, a new lr or warm-up, and a data source
        of another size (``epochs`` are counted in images) all change them, and a changed schedule reshapes the lr
        curve from the resumed step on (a finished 20-step run extended to 30 jumps from its final lr back up the
        cosine). With ``allow`` (``--allow-schedule-change``) the changes are returned, for the run's log,
        instead. Checkpoints written before the marker held a schedule are not checked."""
        from ..config import ConfigError

        old = self.get("schedule")
        if not isinstance(old, dict):
            return []
        changes = []
        for k in SCHEDULE_KEYS:
            a, b = old.get(k), schedule.get(k)
            if a is None or b is None:
                continue
            same = a == b if k.endswith("steps") else abs(float(a) - float(b)) <= 1e-9 * max(abs(float(a)), 1e-30)
            if not same:
                changes.append(f"{k} {a} -> {b}")
        if changes and not allow:
            raise ConfigError(f"{self.run_dir} was trained with another lr schedule ({'; '.join(changes)}): resuming "
                              f"would reshape it from step {self.get('step')} on; pass --allow-schedule-change to "
                              f"continue with the new one (it is recorded in metrics.jsonl), or use a new "
                              f"train.run_dir")
        return changes

    def finished(self, total_steps: int) -> Optional[int]:
        """The checkpoint's step if it has reached ``total_steps`` and is whole (the run is finished: rerunning the
        command has nothing to do), else None. A final checkpoint that fails its checksums is not a finished run
        (the resume falls back to the last good one)."""
        step = self.get("step")  # valid markers only: a whole number, the one the tag's name says
        if not (isinstance(step, int) and step >= total_steps):
            return None
        return step if verify(self.run_dir, self.tag, checksums=True) is None else None


def check_resumable(run_dir, train_cfg, tokenizer: Optional[str] = None):
    """:meth:`ResumeState.check` of the run directory's newest checkpoint (cheap: reads the marker only)."""
    ResumeState.read(run_dir).check(train_cfg, tokenizer)


SCHEDULE_KEYS = ("total_steps", "warmup_steps", "peak_lr", "min_lr")


def check_schedule(run_dir, schedule: dict, allow: bool = False) -> list:
    """:meth:`ResumeState.schedule_changes` of the run directory's newest checkpoint."""
    return ResumeState.read(run_dir).schedule_changes(schedule, allow)


def finished_step(run_dir, total_steps: int) -> Optional[int]:
    """:meth:`ResumeState.finished` of the run directory's newest checkpoint."""
    return ResumeState.read(run_dir).finished(total_steps)


def start_engine(model, optimizer, ds_config: dict, run_dir, train_cfg, world_size: int, rank0: bool,
                 tokenizer: Optional[str] = None, checked: bool = False):
    """The run's DeepSpeed engine, resumed from the newest complete checkpoint if there is one (see
    :func:`resume_point`) -> ``(engine, tag, marker, universal)``; ``tag`` None: a fresh start. A checkpoint
    written by another number of ranks is loaded through DeepSpeed's universal checkpoint (the optimizer state
    kept), then :func:`repair_universal_load`. The one sequence that pretraining, fine-tuning and segmentation
    share."""
    from ..distributed import engine as ds_engine

    tag, marker, universal = resume_point(run_dir, train_cfg, world_size, rank0, tokenizer, checked)
    if universal:
        ds_config["checkpoint"] = {"load_universal": True}
    engine = ds_engine.initialize(model, optimizer, ds_config)
    own = [{k: v for k, v in g.items() if k in ("weight_decay", "betas", "eps", "lr_scale")}
           for g in engine.optimizer.param_groups]
    if tag:
        load(engine, run_dir, tag, universal)
        if universal:
            repair_universal_load(engine, own)
    return engine, tag, marker, universal


def repair_universal_load(engine, groups):
    """Two defects of DeepSpeed's ZeRO-3 universal-checkpoint loader (deepspeed 0.19), measured here:
    it copies param group 0's hyperparameters into every group (taking weight decay off our decay group, as
    group 0 is the no-decay one), and it gives every group's Adam state the same ``step`` tensor object, which
    torch's AdamW then increments once per group per step (wrong bias correction from the first update on)."""
    import torch

    for g, own in zip(engine.optimizer.param_groups, groups):
        g.update(own)
    inner = getattr(engine.optimizer, "optimizer", None)
    for state in (inner.state.values() if inner is not None else []):
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def resume_point(run_dir, train_cfg, world_size: int, rank0: bool, tokenizer: Optional[str] = None,
                 checked: bool = False):
    """What a (re)started run resumes from, decided before the engine exists: ``(tag, marker, universal)``.
    Refuses what :func:`check_resumable` refuses. When the world size changed (ZeRO > 0), the checkpoint is
    converted to DeepSpeed's universal format (rank 0, once) and ``universal`` is True: the engine must be built
    with ``{"checkpoint": {"load_universal": True}}``."""
    if not checked:  # (``checked``: the caller's ResumeState.check ran on the same marker)
        check_resumable(run_dir, train_cfg, tokenizer)
    tag = verified_latest_tag(run_dir, rank0)
    marker = read_marker(run_dir, tag) if tag else None
    if not tag:
        return None, None, False
    universal = bool(marker.get("world_size", world_size) != world_size and train_cfg.zero_stage > 0)
    if universal:  # rank 0 converts; every rank learns how it went (a refused file stops all of them, at once)
        def convert():
            try:
                make_universal(run_dir, tag)
            except ConfigError as e:
                return str(e)
            except Exception as e:  # noqa: BLE001 - e.g. DeepSpeed's converter failed: say so on every rank
                lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [type(e).__name__]
                return f"converting {tag} to a universal checkpoint failed: {lines[0]}" + (
                    f" ... {lines[-1]}" if len(lines) > 1 else "")
            return None

        problem = rank0_while_others_wait(checkpoint_dir(run_dir), universal_tag(tag), convert, rank0)
        if problem:
            raise ConfigError(problem)
    return tag, marker, universal


def rank0_while_others_wait(folder: Path, name: str, fn, rank0: bool, poll_s: float = 0.5):
    """Rank 0 runs ``fn`` (which returns a problem, or None) while the other ranks wait on the file system, outside
    any collective: a conversion longer than the process group's timeout (DeepSpeed's default is 10 minutes; a
    ViT-L checkpoint of 64 ranks can take longer) must not trip the NCCL watchdog on the waiting ranks. Rank 0
    writes its verdict to ``folder/.<name>.<nonce>.status`` (the nonce, broadcast first, keeps an earlier attempt's
    file from answering); the others poll for it. Every rank returns the verdict. A rank 0 that dies meanwhile
    ends the job through its launcher (torchrun; srun --kill-on-bad-exit), as any failed rank does."""
    import uuid

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return fn()
    nonce = [uuid.uuid4().hex if rank0 else None]
    dist.broadcast_object_list(nonce, src=0)
    status = Path(folder) / f".{name}.{nonce[0]}.status"
    if rank0:
        problem = fn()
        _atomic_write(status, json.dumps({"problem": problem}), root=folder, what="conversion verdict")
    else:
        while not status.is_file():
            time.sleep(poll_s)
        problem = json.loads(safe_fs.read_regular(status, limit=1 << 20, root=folder,
                                                  what="conversion verdict"))["problem"]
    dist.barrier()  # every rank has read the verdict: a short wait, all are here within poll_s
    if rank0:
        status.unlink(missing_ok=True)
    return problem

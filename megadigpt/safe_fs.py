"""Files in a run directory that megadigpt did not make: never written or read through a planted link.

Run directories are shared on clusters and unpacked from colleagues' tarballs, so any name in one may be a
symbolic link (``ln -s ~/notes.txt RUN/.lock``) or a device. Every file megadigpt creates, rewrites or appends to
there goes through one of these:

- :func:`open_fd` / :func:`open_append`: ``O_NOFOLLOW`` on the last component, and no link among the components
  below the run directory (the run directory itself may be a link: that is the user's choice); the opened file
  must be a regular file. A planted link or a device is one :class:`~megadigpt.config.ConfigError` naming it.
- :func:`write_atomic`: a fresh temporary (``O_CREAT | O_EXCL | O_NOFOLLOW``, so never an existing file or a link)
  written, fsynced and renamed over the name: ``rename`` replaces a link itself, never what it points at, and a
  kill leaves either the old file or the new one.
- :func:`read_regular`: reads a run file only when it is a regular file (never through a link), with a size cap.
- :func:`pipe_commands` / :func:`announce_commands`: the shell commands of ``pipe:`` sources, printed once at
  start and recorded in the run record.
- :func:`check_path_text` (from :mod:`megadigpt.config`, re-exported): a path with a NUL byte, a control character
  or an over-long name is one line.

Written here rather than taken from a library: it is a handful of ``os.open`` flags and ``fstat`` checks whose
exact semantics matter (``pathlib`` and ``open()`` follow links; no well-kept library offers "no link below this
folder").
"""

import errno
import os
import stat
import sys
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Union

from .config import NAME_MAX, PATH_MAX, ConfigError, check_path_text, check_text, shorten

__all__ = ["NAME_MAX", "PATH_MAX", "check_path_text", "check_text", "shorten", "check_no_links", "open_fd",
           "open_append", "write_atomic", "replace_via", "read_regular", "remove_entry", "pipe_commands", "announce_commands"]

PathLike = Union[str, os.PathLike]


def _planted(path: Path, what: str) -> ConfigError:
    return ConfigError(f"{what} {path} is a symbolic link or not a regular file; megadigpt does not write or read "
                       f"run files through links it did not make (remove it, or use another run directory)")


def check_no_links(path: PathLike, root: Optional[PathLike] = None, what: str = "run file") -> Path:
    """No component of ``path`` below ``root`` (default: the path's parent) is a symbolic link; the last one, if it
    exists, is a regular file or a folder."""
    p = Path(path)
    base = Path(root) if root is not None else p.parent
    try:
        rel = p.relative_to(base)
    except ValueError:
        rel = Path(p.name)
        base = p.parent
    cur = base
    for part in rel.parts:
        cur = cur / part
        try:
            st = os.lstat(cur)
        except FileNotFoundError:
            return p
        if stat.S_ISLNK(st.st_mode) or not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
            raise _planted(cur, what)
    return p


def open_fd(path: PathLike, flags: int, mode: int = 0o644, root: Optional[PathLike] = None,
            what: str = "run file") -> int:
    """``os.open`` that never follows a link (below ``root``) and only opens regular files."""
    p = check_no_links(path, root, what)
    try:
        fd = os.open(p, flags | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0), mode)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.EMLINK, errno.ENXIO, errno.EISDIR):
            raise _planted(p, what) from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise _planted(p, what)
        if hasattr(os, "O_NONBLOCK"):  # only there so that opening a planted FIFO cannot block; regular files
            import fcntl            # ignore it, but take it off all the same

            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_append(path: PathLike, root: Optional[PathLike] = None, what: str = "run file", fresh_line: bool = True,
                buffering: int = 1):
    """A text log opened for appending (``metrics.jsonl``, ``bad_samples.jsonl``, ``jobs.jsonl``): no link, a regular
    file; when the file ends without a newline (a line torn by ``kill -9``), a newline is written first so the next
    record starts on a fresh line instead of being swallowed by the torn one."""
    fd = open_fd(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, root=root, what=what)
    try:
        if fresh_line:
            size = os.fstat(fd).st_size
            if size > 0 and _last_byte(fd, size) not in (None, b"\n"):
                os.write(fd, b"\n")
        return os.fdopen(fd, "a", buffering=buffering)
    except BaseException:
        os.close(fd)
        raise


def _last_byte(fd, size) -> Optional[bytes]:
    """The file's last byte, read through a second descriptor (an O_APPEND|O_WRONLY one cannot be read)."""
    try:
        rfd = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY)
    except OSError:
        return None
    try:
        return os.pread(rfd, 1, size - 1)
    finally:
        os.close(rfd)


def write_atomic(path: PathLike, data: Union[bytes, str], root: Optional[PathLike] = None, what: str = "run file",
                 mode: int = 0o644, fsync: bool = True, replace_links: bool = False) -> Path:
    """Replace ``path`` with ``data``: a fresh temporary in the same folder, never an existing file or a link,
    renamed into place. A link (or a device) planted at ``path`` is one line naming it, or with
    ``replace_links`` (temporaries and pointers megadigpt alone writes) replaced itself, never its target. A
    folder at ``path`` is refused in one line."""
    p = Path(path)
    check_no_links(p.parent, root if root is not None else p.parent, what)
    if not replace_links:
        check_no_links(p, p.parent, what)  # a link or a device planted at the name: one line naming it
    if not p.is_symlink() and p.is_dir():
        raise ConfigError(f"{what} {p} is a folder; a file goes there")
    if isinstance(data, str):
        data = data.encode()

    def write(tmp: Path) -> None:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0),
                     mode & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if fsync:
                os.fsync(f.fileno())

    return replace_via(p, write)


def replace_via(path: PathLike, write: Callable[[Path], None]) -> Path:
    """Replace ``path`` with what ``write(temporary)`` writes to a fresh name in the same folder
    (``.<name>.tmp<pid>``; this pid's leftover is unlinked first, never followed), renamed over ``path`` when
    complete: a kill leaves the old file or the new one, never half of one, and a link or hard link at ``path`` is
    replaced, not written through. The temporary is removed on every failure."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    try:
        write(tmp)
        os.replace(tmp, p)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return p


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def read_regular(path: PathLike, limit: int = 64 << 20, root: Optional[PathLike] = None,
                 what: str = "run file") -> Optional[bytes]:
    """A run file's bytes, or None when it does not exist. A link or a device is one line; a file over ``limit``
    bytes is one line naming its size (it is not read)."""
    try:
        fd = open_fd(path, os.O_RDONLY, root=root, what=what)
    except FileNotFoundError:
        return None
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise ConfigError(f"{what} {path} is {size} bytes, more than the {limit} this file can hold; it was "
                              f"not read")
        chunks, got = [], 0
        while got <= limit:
            b = os.read(fd, min(1 << 20, limit + 1 - got))
            if not b:
                break
            chunks.append(b)
            got += len(b)
        if got > limit:
            raise ConfigError(f"{what} {path} grew past {limit} bytes while read")
        return b"".join(chunks)
    finally:
        os.close(fd)


def pipe_commands(*values) -> List[str]:
    """The ``pipe:`` shell commands among data sources (strings or lists of them), each once, in order."""
    out: List[str] = []
    for v in values:
        for s in (v if isinstance(v, (list, tuple)) else [v]):
            if isinstance(s, str) and s.startswith("pipe:") and s not in out:
                out.append(s)
    return out


def announce_commands(commands: Sequence[str], rank0: bool = True) -> List[str]:
    """``pipe:`` sources run shell commands: each is printed once at start (``megadigpt: runs: <command>``) so a
    command that came from a shared config or merge spec is never run without a word; the caller records the list
    in the run record (the start event of ``metrics.jsonl``)."""
    if rank0:
        for c in commands:
            print(f"megadigpt: runs: {c[len('pipe:'):].strip()}", file=sys.stderr, flush=True)
    return list(commands)


def remove_entry(path: PathLike) -> None:
    """Remove a temporary or leftover name megadigpt owns (``best.tmp``, ``best.old``): a link (planted or not) is
    unlinked itself, never followed; a folder is removed; a missing name is fine."""
    import shutil

    p = Path(path)
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(p)
    else:
        os.unlink(p)

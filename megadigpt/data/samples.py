"""The records a source hands out: a :class:`Sample` (where an image's bytes are) and a :class:`Problem` (a bad
sample or damaged shard, and why), and :func:`open_regular`, how a data file is opened. Below ``sources`` and
``index``, which both build them."""

import errno
import os
import stat
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Sample:
    path: str  # an image file, or a tar shard
    offset: int = -1  # byte offset of the image member inside the tar (-1 for plain files)
    size: int = -1
    key: str = ""
    label: int = -1  # -1 where unknown

    def read(self, handles=None) -> bytes:
        """The image bytes. Only regular files are opened (a FIFO, a device such as ``/dev/zero``, a folder is an
        :class:`OSError` naming what it is: a bad sample, never a read that does not end)."""
        if self.offset < 0:
            with open_regular(self.path) as f:
                return f.read()
        f = handles.get(self.path) if handles is not None else None
        if f is None:
            f = open_regular(self.path)
            if handles is not None:
                handles[self.path] = f
        f.seek(self.offset)
        return f.read(self.size)


_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"))


def _not_regular(mode: int) -> Optional[str]:
    """Why a file of this mode is not read as data (None: a regular file)."""
    if stat.S_ISREG(mode):
        return None
    kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
    return f"not a regular file ({kind}); it was not read"


def open_regular(path: str):
    """A data file (shard, image, ``.idx``, ``classes.txt``) opened for reading, only when it is a regular file:
    symbolic links are followed (shared datasets are often links), but a FIFO never blocks the open and a device,
    folder or socket is never read. Else :class:`OSError` (``strerror``: why)."""
    st = os.stat(path)
    why = _not_regular(st.st_mode)
    if why:
        raise OSError(errno.EINVAL, why, str(path))
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0))
    try:
        why = _not_regular(os.fstat(fd).st_mode)  # swapped between the stat and the open
        if why:
            raise OSError(errno.EINVAL, why, str(path))
        if hasattr(os, "O_NONBLOCK"):
            import fcntl

            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


@dataclass(frozen=True)
class Problem:
    """A bad sample (or a damaged shard: ``key`` empty), by identity, and why."""

    path: str  # the shard or the image file
    key: str
    reason: str

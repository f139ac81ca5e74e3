"""Shards wherever they are: URL syntax, remote reads with timeouts, deadlines, byte budgets and retries, and the
local shard cache.

Which library does what:
- brace expansion (``{000000..000099}`` ranges and ``{train,val}`` comma sets, as webdataset writes them):
  ``braceexpand``, the library webdataset itself uses;
- ``http(s)://``: the standard library's ``urllib`` (one GET, no transparent decompression, socket timeouts);
- ``s3://``, ``gs://`` and every other fsspec protocol: ``fsspec`` (``s3fs`` / ``gcsfs`` are the user's install,
  as for webdataset and open_clip users; credentials come from their usual environment);
- ``pipe:<command>``: the command's standard output, webdataset's convention (``pipe:aws s3 cp s3://b/x.tar -``);
  a command that exits non-zero is an error, not a short shard.

Bounds on every remote read (issue 28: a server sending one byte per second, an endless body or a gzip bomb must
neither hang a run nor fill a disk):

- *per read*: every connect and every read has a timeout (``data.io_timeout_s``);
- *per transfer* (a shard download, one stream connection, a small file such as ``manifest.json`` or
  ``classes.txt``): a deadline of ``data.io_deadline_s`` (default 5 x ``data.io_timeout_s``) plus the size at
  ``data.io_min_rate_mb_s`` (MB = 10^6 bytes): the declared size (HTTP ``Content-Length``, fsspec's size) where
  there is one, else the bytes received so far (a transfer of unknown length must keep up that average rate).
  Only time spent waiting for the network counts (a stream read at the trainer's pace is not timed out). The
  connect and the response headers are watched by a timer that shuts the socket down at the deadline; the body
  is checked after every read, so a deadline is overshot by at most one ``data.io_timeout_s``. A ``pipe:``
  command over its deadline is killed with its process group. A deadline passed is a failed try like any other
  (retried with backoff, then :class:`RemoteError`);
- *bytes*: a download ends at its declared size; a declared size or a transfer of unknown length over
  ``data.max_shard_bytes`` (small files: :data:`SMALL_FILE_BYTES`) is refused at once (not retried). Responses
  are requested with ``Accept-Encoding: identity``; one compressed anyway (``Content-Encoding`` gzip, deflate,
  br, ...) is refused at once (``urllib`` never decompresses, so a gzip bomb is not expanded);
- *s3:// and the other fsspec protocols*: the deadline and the byte budget are checked between reads (of 4 MiB
  at most); a single blocked read is bounded by the filesystem's own timeouts (s3fs / gcsfs settings).

Remote shards are read through a local copy (:func:`cache_shard`): downloaded once into the cache folder
(``$MEGADIGPT_CACHE``, default ``~/.cache/megadigpt/shards``), into ``<name>.part<pid>`` renamed into place only
when complete, so a killed download never leaves a short shard behind and ranks sharing a node share the copy.
The partial file is removed on every exit path (an error, ``KeyboardInterrupt``, and SIGTERM where no other
handler is installed: a handler removes it, then the signal takes its default course); what a ``kill -9`` leaves
is swept when a process first uses the cache folder (:func:`sweep_partials`: a ``.part<pid>`` whose process no
longer runs on this machine and which was not written for :data:`PART_GRACE_S`, or any not written for
:data:`PART_STALE_S`). A failed download is retried with exponential backoff (0.5 s, 1 s, 2 s, ...), then it
is an error naming the URL (:class:`RemoteError`, one line); a 4xx answer (but 408/429), a size over the budget
and an encoded body are errors at once.

Stream mode reads shards without a local copy (:func:`open_url`): a sequential file that reconnects at its
current offset when a read fails or stalls. For ``http(s)://`` it is written here over ``urllib`` rather than
fsspec's ``HTTPFile``: that file sends a HEAD and then one Range request per block (5 MiB by default) and gives
no retry, while a shard stream wants one GET for the whole shard, a socket timeout on the connect and on every
read (a stalled server must not hang a run), and a Range request from the current offset only when the
connection fails. Other fsspec protocols (``s3://``, ``gs://``) are opened with fsspec and ``seek``-ed to the
offset on each (re)open. ``pipe:`` commands cannot seek: a failed read restarts the command and skips to the
offset. Each (re)connection has its own deadline; the byte budget counts from the start of the shard.
"""

import hashlib
import http.client
import os
import re
import select
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import List, Optional, Sequence, Union

import braceexpand

TIMEOUT_S = 60.0  # seconds without progress before a read is abandoned (and retried)
RETRIES = 3
DEADLINE_FACTOR = 5.0  # data.io_deadline_s, where not set: this many data.io_timeout_s
MIN_RATE_MB_S = 1.0  # data.io_min_rate_mb_s: the deadline grows by one second per this many MB (10^6 bytes)
MAX_SHARD_BYTES = 64 << 30  # data.max_shard_bytes: a shard download or stream never goes past this
MAX_MEMBER_BYTES = 256 << 20  # data.max_member_bytes: a tar member read into memory never goes past this
SMALL_FILE_BYTES = 64 << 20  # manifest.json, classes.txt: read whole, at most this much
PART_GRACE_S = 120.0  # a dead process's .part<pid> left this long unwritten is swept
PART_STALE_S = 3600.0  # any .part<pid> left this long unwritten is swept (a live download writes every read)


_OPTIONS = {"cache_dir": None, "timeout_s": TIMEOUT_S, "retries": RETRIES, "deadline_s": None,
            "min_rate_mb_s": MIN_RATE_MB_S, "max_shard_bytes": MAX_SHARD_BYTES, "max_member_bytes": MAX_MEMBER_BYTES}


def configure(cache_dir=None, timeout_s: float = TIMEOUT_S, retries: int = RETRIES, deadline_s: Optional[float] = None,
              min_rate_mb_s: float = MIN_RATE_MB_S, max_shard_bytes: int = MAX_SHARD_BYTES,
              max_member_bytes: int = MAX_MEMBER_BYTES) -> None:
    """Process-wide settings of remote reads (``data.cache_dir``, ``data.io_timeout_s``, ``data.io_retries``,
    ``data.io_deadline_s``, ``data.io_min_rate_mb_s``, ``data.max_shard_bytes``, ``data.max_member_bytes``), set
    once by each entry point before it resolves a source; what :func:`cache_shard`, :func:`open_url` and the
    stream reader use when not told otherwise. Sweeps the cache folder's leftover partial downloads."""
    _OPTIONS.update(cache_dir=cache_dir, timeout_s=float(timeout_s), retries=int(retries),
                    deadline_s=None if deadline_s is None else float(deadline_s), min_rate_mb_s=float(min_rate_mb_s),
                    max_shard_bytes=int(max_shard_bytes), max_member_bytes=int(max_member_bytes))
    _FAILED.clear()
    _sweep_once(default_cache_dir())


def configure_from(data) -> None:
    """:func:`configure` from a config's ``data`` section (keys it lacks keep their defaults)."""
    g = lambda k, d: getattr(data, k, d)  # noqa: E731
    configure(g("cache_dir", None), g("io_timeout_s", TIMEOUT_S), g("io_retries", RETRIES), g("io_deadline_s", None),
              g("io_min_rate_mb_s", MIN_RATE_MB_S), g("max_shard_bytes", MAX_SHARD_BYTES),
              g("max_member_bytes", MAX_MEMBER_BYTES))


def options() -> dict:
    return dict(_OPTIONS)


def deadline_floor_s(timeout_s: Optional[float] = None) -> float:
    """The deadline of a transfer of 0 bytes: ``data.io_deadline_s``, else 5 x ``data.io_timeout_s``."""
    if _OPTIONS["deadline_s"] is not None:
        return float(_OPTIONS["deadline_s"])
    return DEADLINE_FACTOR * float(_OPTIONS["timeout_s"] if timeout_s is None else timeout_s)


def member_too_large(name: str, size: int, cap: Optional[int] = None) -> Optional[str]:
    """The bad-sample reason of a tar member over ``data.max_member_bytes`` (None when within): the same text in
    both access modes."""
    cap = int(_OPTIONS["max_member_bytes"] if cap is None else cap)
    if size > cap:
        return f"member {name} is {size} bytes, more than data.max_member_bytes={cap}"
    return None


class RemoteError(OSError):
    """A shard that could not be read after the retries; ``str()`` is one line naming the URL."""


class _Permanent(Exception):
    """A failure no retry can mend (HTTP 4xx other than 408/429, a size over the budget, an encoded body): the
    shard is reported at once."""


class DeadlineExceeded(TimeoutError):
    """A transfer that took longer than its deadline (a failed try: retried like a timeout)."""


def is_remote(url: str) -> bool:
    url = str(url)
    return url.startswith("pipe:") or ("://" in url and not url.startswith("file://"))


def expand_urls(spec: Union[str, Sequence[str]]) -> List[str]:
    items = [spec] if isinstance(spec, str) else list(spec)
    out: List[str] = []
    for item in items:
        out += list(braceexpand.braceexpand(str(item)))
    return out


def default_cache_dir() -> str:
    return (_OPTIONS["cache_dir"] or os.environ.get("MEGADIGPT_CACHE")
            or str(Path.home() / ".cache" / "megadigpt" / "shards"))


# ============================================================================ budgets


class Budget:
    """The deadline and the byte budget of one transfer. ``charge(n, waited_s)`` after every read: ``n`` bytes
    arrived after ``waited_s`` seconds of waiting; raises :class:`DeadlineExceeded` when the time waited passes
    ``floor_s + size / rate`` (size: the declared one, else the bytes so far) and ``_Permanent`` when more than
    ``limit`` bytes (counted from ``start``, the offset the transfer began at) arrive."""

    def __init__(self, floor_s: float, min_rate_mb_s: float, limit: int, start: int = 0, what: str = "shard",
                 limit_key: Optional[str] = "data.max_shard_bytes"):
        self.floor_s, self.rate = float(floor_s), float(min_rate_mb_s) * 1e6
        self.limit, self.start, self.what, self.limit_key = int(limit), int(start), what, limit_key
        self.declared: Optional[int] = None
        self.got = 0
        self.waited = 0.0

    def declare(self, size: Optional[int]) -> None:
        """The size the server announced for this transfer (the rest of the file from ``start``)."""
        if size is None:
            return
        self.declared = int(size)
        if self.start + self.declared > self.limit:
            raise _Permanent(f"the {self.what} is {self.start + self.declared} bytes, more than {self._cap()}")

    def _cap(self) -> str:
        return f"{self.limit_key}={self.limit}" if self.limit_key else f"the {self.limit} bytes a small {self.what} may have"

    def allowed_s(self) -> float:
        size = self.declared if self.declared is not None else self.got
        return self.floor_s + size / self.rate

    def charge(self, n: int, waited_s: float) -> None:
        self.got += n
        self.waited += waited_s
        if self.start + self.got > self.limit:
            raise _Permanent(f"the {self.what} goes on past {self._cap()}{' bytes' if self.limit_key else ''}")
        if self.waited > self.allowed_s():
            raise DeadlineExceeded(self.passed())

    def passed(self) -> str:
        size = f"{self.declared} declared bytes" if self.declared is not None else f"{self.got} bytes received"
        return (f"over its deadline: {self.waited:.1f} s waited, {self.allowed_s():.1f} s allowed for {size} "
                f"(data.io_deadline_s + size / data.io_min_rate_mb_s)")


def _budget(limit: Optional[int] = None, start: int = 0, what: str = "shard", timeout_s: float = None) -> Budget:
    """A transfer's budget from the configured options; ``limit`` None: ``data.max_shard_bytes``."""
    key = "data.max_shard_bytes" if limit is None else None
    return Budget(deadline_floor_s(timeout_s), _OPTIONS["min_rate_mb_s"],
                  _OPTIONS["max_shard_bytes"] if limit is None else limit, start, what, key)


# ============================================================================ http(s): urllib, watched


def _watched(conn_class, sockets: list):
    class Watched(conn_class):
        def connect(self):
            super().connect()
            sockets.append(self.sock)

    return Watched


class _WatchedHTTP(urllib.request.HTTPHandler):
    def __init__(self, sockets):
        super().__init__()
        self.sockets = sockets

    def do_open(self, http_class, req, **kw):
        return super().do_open(_watched(http_class, self.sockets), req, **kw)


class _WatchedHTTPS(urllib.request.HTTPSHandler):
    def __init__(self, sockets):
        super().__init__()
        self.sockets = sockets

    def do_open(self, http_class, req, **kw):
        return super().do_open(_watched(http_class, self.sockets), req, **kw)


def _http_get(url: str, offset: int, timeout_s: float, budget: Budget):
    """A GET of ``url`` from byte ``offset`` (a Range request when > 0), ``Accept-Encoding: identity``. The connect
    and the response headers must arrive within ``budget``'s floor: a timer shuts the socket down then (a server
    trickling its headers). A compressed answer is ``_Permanent``; the declared length goes to ``budget``."""
    headers = {"Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    sockets: list = []
    fired = threading.Event()

    def stop():
        fired.set()
        for s in list(sockets):
            try:
                socket.socket.shutdown(s, socket.SHUT_RDWR)
            except OSError:
                pass

    opener = urllib.request.build_opener(_WatchedHTTP(sockets), _WatchedHTTPS(sockets))
    allowed = max(0.0, budget.allowed_s() - budget.waited)
    timer = threading.Timer(allowed, stop)
    timer.daemon = True
    t0 = time.monotonic()
    timer.start()
    try:
        resp = opener.open(urllib.request.Request(url, headers=headers), timeout=timeout_s)
    except Exception:
        if fired.is_set():
            budget.waited += time.monotonic() - t0
            raise DeadlineExceeded(f"no answer within the deadline ({allowed:.1f} s)") from None
        raise
    finally:
        timer.cancel()
    budget.waited += time.monotonic() - t0
    if fired.is_set():
        resp.close()
        raise DeadlineExceeded(f"no answer within the deadline ({allowed:.1f} s)")
    resp.megadigpt_socket = sockets[-1] if sockets else None  # for per-read timeouts within the deadline
    enc = (resp.headers.get("Content-Encoding") or "").strip().lower()
    if enc not in ("", "identity"):
        resp.close()
        raise _Permanent(f"the server sent it with Content-Encoding: {enc[:40]} although asked for identity "
                         f"(compressed transfers are not decoded: a small body could expand without bound)")
    return resp


def _content_length(resp) -> Optional[int]:
    length = resp.headers.get("Content-Length")
    try:
        return int(length) if length is not None and int(length) >= 0 else None
    except ValueError:
        return None


# ============================================================================ pipe: commands


class _Command:
    """A ``pipe:`` command in its own process group: its standard output read in chunks, each within a timeout;
    the last 4 kB of its standard error kept (read as it comes, so a chatty command never blocks); :meth:`kill`
    ends the whole group (the shell and what it started)."""

    def __init__(self, command: str):
        self.proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     start_new_session=True)
        _ACTIVE_COMMANDS.add(self)
        self.err = b""
        self._err_open = True

    def _read_err(self) -> None:
        b = os.read(self.proc.stderr.fileno(), 65536)
        if b:
            self.err = (self.err + b)[-4096:]
        else:
            self._err_open = False

    def read(self, n: int, timeout_s: float) -> bytes:
        out = self.proc.stdout.fileno()
        end = time.monotonic() + timeout_s
        while True:
            fds = [out] + ([self.proc.stderr.fileno()] if self._err_open else [])
            ready, _, _ = select.select(fds, [], [], max(0.0, end - time.monotonic()))
            if not ready:
                raise TimeoutError(f"the command wrote nothing for {timeout_s:g} s")
            if self._err_open and self.proc.stderr.fileno() in ready:
                self._read_err()
            if out in ready:
                b = os.read(out, n)
                if not b:
                    self._finish(timeout_s)
                return b

    def _finish(self, timeout_s: float) -> None:
        try:
            code = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"the command closed its output but did not exit within {timeout_s:g} s") from None
        while self._err_open and select.select([self.proc.stderr.fileno()], [], [], 0)[0]:
            self._read_err()
        if code != 0:
            last = self.err.decode(errors="replace").strip().splitlines()[-1:] or [""]
            raise OSError(f"the command exited with status {code} {last[0][:200]}".strip())

    def kill(self) -> None:
        _ACTIVE_COMMANDS.discard(self)
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                self.proc.kill()
        else:  # the shell is gone; what it started may still run in its group
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self.proc.wait()
        for s in (self.proc.stdout, self.proc.stderr):
            s.close()


# ============================================================================ the shard cache

_ACTIVE_PARTS: set = set()  # partial downloads of this process (removed by the SIGTERM handler)
_ACTIVE_COMMANDS: set = set()  # running pipe: commands of this process (killed by it)
_SWEPT: set = set()
# URLs this process gave up on, with the reason: a deadline or a budget is spent once per process, not once per
# caller (the scan, the plan's checks and a loader all ask for the same shard or classes.txt); configure() clears it
_FAILED: dict = {}
_PART = re.compile(r"\.part(\d+)$")


def _unlink(path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError:
        pass


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def sweep_partials(cache_dir, now: Optional[float] = None) -> List[str]:
    """Remove the partial downloads (``*.part<pid>``) killed processes left in ``cache_dir``: those whose process
    no longer runs on this machine and which were not written for :data:`PART_GRACE_S` (a download on another
    node sharing the folder keeps writing), and any not written for :data:`PART_STALE_S`. Returns their paths."""
    now = time.time() if now is None else now
    removed = []
    try:
        entries = list(os.scandir(cache_dir))
    except OSError:
        return removed
    for e in entries:
        m = _PART.search(e.name)
        if not m:
            continue
        try:
            st = e.stat(follow_symlinks=False)
        except OSError:
            continue
        idle = now - st.st_mtime
        pid = int(m.group(1))
        if idle > PART_STALE_S or (idle > PART_GRACE_S and pid != os.getpid() and not _alive(pid)):
            _unlink(e.path)
            removed.append(e.path)
    return removed


def _sweep_once(cache_dir) -> None:
    key = os.path.abspath(str(cache_dir))
    if key in _SWEPT:
        return
    _SWEPT.add(key)
    sweep_partials(key)


def _on_sigterm(signum, frame):  # pragma: no cover - exercised in a subprocess (tests/test_hostile_remote.py)
    for p in list(_ACTIVE_PARTS):
        _unlink(p)
    for c in list(_ACTIVE_COMMANDS):
        try:
            os.killpg(c.proc.pid, signal.SIGKILL)
        except OSError:
            pass
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


class _CleanOnTerm:
    """While a download runs in the main thread of a process whose SIGTERM is the default (death): a handler
    that removes the partial file and kills the command, then dies of the signal as before. Where the program
    installed its own handler (the trainer's checkpoint-and-exit flag), that one stays and ``finally`` cleans."""

    def __enter__(self):
        self.installed = False
        if threading.current_thread() is threading.main_thread():
            try:
                if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
                    signal.signal(signal.SIGTERM, _on_sigterm)
                    self.installed = True
            except ValueError:
                pass
        return self

    def __exit__(self, *exc):
        if self.installed and signal.getsignal(signal.SIGTERM) is _on_sigterm:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _timed_read(read, n: int, timeout_s: float, budget: Budget, sock=None) -> bytes:
    """``read(n, wait)`` within the per-read timeout and what is left of ``budget``'s deadline (a socket's
    timeout is set to the shorter of the two); the wait and the bytes are charged to ``budget``."""
    wait = max(0.01, min(timeout_s, budget.allowed_s() - budget.waited + 0.01))
    if sock is not None:
        sock.settimeout(wait)
    t0 = time.monotonic()
    try:
        b = read(n, wait)
    except (socket.timeout, TimeoutError) as e:
        budget.waited += time.monotonic() - t0
        if budget.waited >= budget.allowed_s():
            raise DeadlineExceeded(budget.passed()) from None
        raise e
    budget.charge(len(b), time.monotonic() - t0)
    return b


def _download(url: str, dst, timeout_s: float, budget: Budget) -> None:
    """Copy ``url`` into the open file ``dst`` within ``budget``; raises on any failure (a short read included)."""
    chunk = 1 << 22
    if url.startswith("pipe:"):
        cmd = _Command(url[5:])
        try:
            while True:
                b = _timed_read(cmd.read, chunk, timeout_s, budget)
                if not b:
                    return
                dst.write(b)
        except DeadlineExceeded as e:
            raise DeadlineExceeded(f"the command ran {e} and was killed") from None
        finally:
            cmd.kill()
    if url.startswith(("http://", "https://")):
        resp = _http_get(url, 0, timeout_s, budget)
        try:
            budget.declare(_content_length(resp))
            while True:
                b = _timed_read(lambda n, _w: resp.read1(n), chunk, timeout_s, budget, resp.megadigpt_socket)
                if not b:
                    break
                dst.write(b)
        finally:
            resp.close()
        if budget.declared is not None and budget.got < budget.declared:
            raise ConnectionError(f"connection closed at byte {budget.got} of {budget.declared}")
        return
    import fsspec

    t0 = time.monotonic()
    with fsspec.open(url, "rb").open() as src:
        budget.charge(0, time.monotonic() - t0)
        size = getattr(src, "size", None)
        budget.declare(size if isinstance(size, int) else None)
        while True:
            b = _timed_read(lambda n, _w: src.read(n), chunk, timeout_s, budget)
            if not b:
                break
            dst.write(b)


def cache_shard(url: str, cache_dir: str = None, timeout_s: float = None, retries: int = None,
                max_bytes: Optional[int] = None) -> str:
    """A complete local copy of ``url`` (downloaded once); :class:`RemoteError` after ``retries`` retries.
    ``max_bytes``: the byte budget (default ``data.max_shard_bytes``; pass :data:`SMALL_FILE_BYTES` for a small
    file such as ``classes.txt``). A URL this process gave up on fails at once with the same reason until the next
    :func:`configure` (a stalled server costs its deadline once per process, not once per caller)."""
    from ..safe_fs import open_fd

    timeout_s = _OPTIONS["timeout_s"] if timeout_s is None else timeout_s
    retries = _OPTIONS["retries"] if retries is None else retries
    cache = Path(cache_dir or default_cache_dir())
    cache.mkdir(parents=True, exist_ok=True)
    _sweep_once(cache)
    base = os.path.basename(url.split("?", 1)[0].rstrip("/")) or "shard"
    if url.startswith("pipe:"):
        base = "pipe.tar"
    path = cache / f"{hashlib.sha256(url.encode()).hexdigest()[:16]}-{base}"
    if path.is_file():
        return str(path)
    if url in _FAILED:  # already given up on in this process (a scan, then a loader): not waited for again
        raise RemoteError(_FAILED[url])
    tmp = path.with_name(path.name + f".part{os.getpid()}")
    what = "shard" if max_bytes is None else "file"
    why = "unknown"
    with _CleanOnTerm():
        for attempt in range(retries + 1):
            if attempt:
                time.sleep(backoff_s(attempt))
            try:
                _unlink(tmp)  # an earlier process with our pid (never followed: a link is removed, not its target)
                _ACTIVE_PARTS.add(str(tmp))
                fd = open_fd(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, root=cache, what="shard cache file")
                with os.fdopen(fd, "wb") as dst:
                    _download(url, dst, timeout_s, _budget(max_bytes, what=what, timeout_s=timeout_s))
                os.replace(tmp, path)
                return str(path)
            except _Permanent as e:
                why = str(e)
                break
            except urllib.error.HTTPError as e:
                why = _why(e)
                if 400 <= e.code < 500 and e.code not in (408, 429):
                    break
            except FileNotFoundError:  # fsspec: a missing object
                why = "not found"
                break
            except Exception as e:  # noqa: BLE001 - network errors come in many types (urllib, botocore, OSError)
                why = _why(e)
            finally:
                _unlink(tmp)
                _ACTIVE_PARTS.discard(str(tmp))
    _FAILED[url] = f"cannot read {url}: {why} (after {attempt + 1} tries)"
    raise RemoteError(_FAILED[url])


def read_small(url: str, limit: int = SMALL_FILE_BYTES, timeout_s: float = None, retries: int = None) -> bytes:
    """A small remote file (``manifest.json``, ``classes.txt``) read whole into memory, with the deadline of its
    size and at most ``limit`` bytes; :class:`RemoteError` (one line) otherwise."""
    with RemoteFile(url, 0, timeout_s, retries, limit=limit, what="file") as f:
        return f.read()


def backoff_s(attempt: int) -> float:
    """Seconds to wait before retry ``attempt`` (1, 2, ...): 0.5, 1, 2, 4, ..."""
    return 0.5 * 2 ** (attempt - 1)


def _why(e: BaseException) -> str:
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code} {e.reason}"
    if isinstance(e, urllib.error.URLError):
        e = e.reason if isinstance(e.reason, BaseException) else e
    if isinstance(e, DeadlineExceeded):
        return str(e)
    if isinstance(e, (socket.timeout, TimeoutError)):
        return "timed out"
    text = str(e).splitlines()[0][:200] if str(e) else ""
    return f"{type(e).__name__}: {text}".rstrip(": ")


class RemoteFile:
    """A shard read front to back (see :func:`open_url`). ``read(n)`` returns ``n`` bytes unless the shard ends;
    ``seek`` forward skips, ``seek`` back reconnects at the offset; ``failures`` counts the reconnects.
    ``limit``: the byte budget (default ``data.max_shard_bytes``), ``what``: "shard" or "file" (messages)."""

    def __init__(self, url: str, offset: int = 0, timeout_s: float = None, retries: int = None,
                 limit: Optional[int] = None, what: str = "shard"):
        self.url = url
        self.timeout_s = float(_OPTIONS["timeout_s"] if timeout_s is None else timeout_s)
        self.retries = int(_OPTIONS["retries"] if retries is None else retries)
        self.limit, self.what = limit, what
        self.pos = int(offset)  # the network position; what tell() says is ``pos - _back``
        self._tail = b""  # the last bytes read (up to TAIL): a short seek back is served from here
        self._back = 0
        self.failures = 0
        self._end = None  # where the server said the body ends (HTTP), to tell a dropped connection from the end
        self._resp = self._proc = self._file = self._sock = None
        self._budget: Optional[Budget] = None
        self._eof = False
        self._retrying(self._connect, connects=True)

    # ------------------------------------------------------------------ connections
    def _connect(self):
        self._disconnect()
        self._eof = False
        u = self.url
        if is_remote(u):
            self._budget = _budget(self.limit, self.pos, self.what, self.timeout_s)
        else:  # a local path (stream mode over local shards): no deadline, no byte budget
            self._budget = Budget(float("inf"), _OPTIONS["min_rate_mb_s"], 1 << 62, self.pos, self.what)
        if u.startswith("pipe:"):
            self._proc = _Command(u[5:])
            self._skip(self.pos)
        elif u.startswith(("http://", "https://")):
            try:
                resp = _http_get(u, self.pos, self.timeout_s, self._budget)
            except urllib.error.HTTPError as e:
                e.close()
                if e.code == 416:  # the offset is the end of the shard: nothing more to read
                    self._eof, self._end = True, self.pos
                    return
                if 400 <= e.code < 500 and e.code not in (408, 429):
                    raise _Permanent(_why(e)) from None
                raise
            self._resp, self._sock = resp, getattr(resp, "megadigpt_socket", None)
            length = _content_length(resp)
            if self.pos and resp.status == 200:  # the server ignored the Range: skip what was read already
                self._end = length
                self._budget.start = 0
                self._budget.declare(length)
                self._skip(self.pos)
            else:
                self._end = self.pos + length if length is not None else None
                self._budget.declare(length)
        else:
            import fsspec

            t0 = time.monotonic()
            self._file = fsspec.open(u, "rb").open()
            self._budget.charge(0, time.monotonic() - t0)
            size = getattr(self._file, "size", None)
            if isinstance(size, int):
                self._budget.declare(max(0, size - self.pos))
            if self.pos:
                self._file.seek(self.pos)

    def _skip(self, n: int) -> None:
        got = 0
        while got < n:
            b = self._raw_read(min(1 << 20, n - got))
            if not b:
                raise OSError(f"the stream ended at byte {got}, before the offset {n}")
            got += len(b)

    def _raw_read(self, n: int) -> bytes:
        """At most ``n`` bytes, within the per-read timeout and what is left of the connection's deadline."""
        if self._resp is not None:
            resp = self._resp  # read1: what has arrived (up to n); a stall later does not lose it
            return _timed_read(lambda k, _w: resp.read1(k), n, self.timeout_s, self._budget, self._sock)
        if self._file is not None:
            f = self._file
            return _timed_read(lambda k, _w: f.read(k), n, self.timeout_s, self._budget)
        if self._proc is not None:
            return _timed_read(self._proc.read, n, self.timeout_s, self._budget)
        return b""

    def _disconnect(self):
        for name in ("_resp", "_file"):
            obj = getattr(self, name)
            if obj is not None:
                try:
                    obj.close()
                except Exception:  # noqa: BLE001 - closing a broken connection may fail too
                    pass
                setattr(self, name, None)
        self._sock = None
        if self._proc is not None:
            self._proc.kill()
            self._proc = None

    def _final(self, e: BaseException) -> "RemoteError":
        """The error of a failure no retry mends (an answer over the budget or encoded, a 4xx, a missing file)."""
        return RemoteError(f"cannot read {self.url}: {'not found' if isinstance(e, FileNotFoundError) else e}")

    def _retrying(self, fn, connects: bool = False):
        """Run ``fn``; on a failure reconnect at ``self.pos`` with backoff, ``retries`` times in all for this
        file (a failed reconnect counts as a try), then :class:`RemoteError`. ``connects``: ``fn`` is the connect
        itself (calling it again is the reconnect)."""
        while True:
            try:
                return fn()
            except (_Permanent, FileNotFoundError) as e:
                self._disconnect()
                raise self._final(e) from None
            except (OSError, http.client.HTTPException, ValueError) as e:
                err = e
                while True:
                    self.failures += 1
                    self._disconnect()
                    if self.failures > self.retries:
                        raise RemoteError(f"cannot read {self.url} at byte {self.pos}: {_why(err)} (after "
                                          f"{self.failures} tries)") from None
                    time.sleep(backoff_s(self.failures))
                    if connects:
                        break
                    try:
                        self._connect()
                        break
                    except (_Permanent, FileNotFoundError) as e2:
                        self._disconnect()
                        raise self._final(e2) from None
                    except (OSError, http.client.HTTPException, ValueError) as e2:
                        err = e2
            except BaseException:  # KeyboardInterrupt, SystemExit: no connection or command left behind
                self._disconnect()
                raise

    # ------------------------------------------------------------------ file interface
    def _read_some(self, n: int) -> bytes:
        if self._eof:
            return b""
        if self._resp is None and self._file is None and self._proc is None:
            self._connect()
        b = self._raw_read(n)
        if not b and self._end is not None and self.pos < self._end:
            raise ConnectionError(f"connection closed at byte {self.pos} of {self._end}")
        if not b:
            self._eof = True
        return b

    TAIL = 1 << 13  # tarfile steps back at most one 512-byte block

    def read(self, n: int = -1) -> bytes:
        out = []
        want = n if n is not None and n >= 0 else None
        if self._back:  # after a short seek back
            start = len(self._tail) - self._back
            b = self._tail[start:] if want is None else self._tail[start:start + want]
            self._back -= len(b)
            out.append(b)
            if want is not None:
                want -= len(b)
        while want is None or want > 0:
            b = self._retrying(lambda: self._read_some(1 << 20 if want is None else min(want, 1 << 20)))
            if not b:
                break
            out.append(b)
            self.pos += len(b)
            self._tail = (self._tail + b)[-self.TAIL:]
            if want is not None:
                want -= len(b)
        return b"".join(out)

    def tell(self) -> int:
        return self.pos - self._back

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence == 1:
            offset += self.tell()
        elif whence != 0:
            raise OSError("a remote shard stream seeks from its start or its current position only")
        if self.pos - len(self._tail) <= offset <= self.pos:  # within what was just read
            self._back = self.pos - offset
        elif offset > self.pos:
            self._back = 0
            while self.pos < offset:  # forward: read and drop (tar members one does not need), 1 MiB at a time
                if not self.read(min(1 << 20, offset - self.pos)):
                    break
        else:  # further back: a new connection at the offset
            self.pos, self._tail, self._back = offset, b"", 0
            self._retrying(self._connect, connects=True)
        return self.tell()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def close(self) -> None:
        self._disconnect()

    @property
    def closed(self) -> bool:
        return self._resp is None and self._file is None and self._proc is None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_url(url: str, offset: int = 0, timeout_s: float = None, retries: int = None) -> RemoteFile:
    """A shard (a URL, ``pipe:`` command or local path) as a sequential binary file starting at byte ``offset``.
    Every connect and every read has a timeout of ``timeout_s``, every connection a deadline (the module
    docstring) and the whole shard the byte budget ``data.max_shard_bytes``; a read that fails, stalls, passes
    its deadline or ends before the length the server announced reconnects at the current offset (HTTP Range;
    ``pipe:`` restarts the command and skips) after 0.5, 1, 2, ... s, ``retries`` times in all for this file;
    then :class:`RemoteError`, one line naming the URL. A 404 (any HTTP 4xx but 408/429), a size over the budget
    and a compressed answer are a RemoteError at once. ``None``: the configured values (:func:`configure`)."""
    return RemoteFile(url, offset, timeout_s, retries)

"""Shards wherever they are: URL syntax, remote reads with timeouts and retries, and the local shard cache.

Which library does what:
- brace expansion (``{000000..000099}`` ranges and ``{train,val}`` comma sets, as webdataset writes them):
  ``braceexpand``, the library webdataset itself uses;
- ``http(s)://``, ``s3://``, ``gs://`` and every other fsspec protocol: ``fsspec`` (``s3fs`` / ``gcsfs`` are the
  user's install, as for webdataset and open_clip users; credentials come from their usual environment);
- ``pipe:<command>``: the command's standard output, webdataset's convention (``pipe:aws s3 cp s3://b/x.tar -``);
  a command that exits non-zero is an error, not a short shard.

Remote shards are read through a local copy (:func:`cache_shard`): downloaded once into the cache folder
(``$MEGADIGPT_CACHE``, default ``~/.cache/megadigpt/shards``), into a temporary file renamed into place only when
complete, so a killed download never leaves a short shard behind and ranks sharing a node share the copy. Every
read has a timeout; a failed download is retried with exponential backoff (0.5 s, 1 s, 2 s, ...), then it is an
error naming the URL (:class:`RemoteError`, one line).

Stream mode reads shards without a local copy (:func:`open_url`): a sequential file that reconnects at its
current offset when a read fails or stalls. For ``http(s)://`` it is written here over ``urllib`` rather than
fsspec's ``HTTPFile``: that file sends a HEAD and then one Range request per block (5 MiB by default) and gives
no retry, while a shard stream wants one GET for the whole shard, a socket timeout on the connect and on every
read (a stalled server must not hang a run), and a Range request from the current offset only when the
connection fails. Other fsspec protocols (``s3://``, ``gs://``) are opened with fsspec and ``seek``-ed to the
offset on each (re)open: their timeouts are the filesystem's own (s3fs / gcsfs settings). ``pipe:`` commands
cannot seek: a failed read restarts the command and skips to the offset.
"""

import hashlib
import http.client
import os
import select
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import List, Sequence, Union

import braceexpand

TIMEOUT_S = 60.0  # seconds without progress before a read is abandoned (and retried)
RETRIES = 3


_OPTIONS = {"cache_dir": None, "timeout_s": TIMEOUT_S, "retries": RETRIES}


def configure(cache_dir=None, timeout_s: float = TIMEOUT_S, retries: int = RETRIES) -> None:
    """Process-wide settings of remote reads (``data.cache_dir``, ``data.io_timeout_s``, ``data.io_retries``),
    set once by each entry point before it resolves a source; what :func:`cache_shard` and :func:`open_url` use
    when not told otherwise."""
    _OPTIONS.update(cache_dir=cache_dir, timeout_s=float(timeout_s), retries=int(retries))


def options() -> dict:
    return dict(_OPTIONS)


class RemoteError(OSError):
    """A shard that could not be read after the retries; ``str()`` is one line naming the URL."""


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


def _download(url: str, dst, timeout_s: float) -> None:
    """Copy ``url`` into the open file ``dst``; raises on any failure (a short read included)."""
    if url.startswith("pipe:"):
        proc = subprocess.Popen(url[5:], shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            out, err = proc.communicate(timeout=max(timeout_s, 1.0) * 10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise TimeoutError(f"the command ran over {max(timeout_s, 1.0) * 10:.0f} s")
        if proc.returncode != 0:
            last = err.decode(errors="replace").strip().splitlines()[-1:] or [""]
            raise OSError(f"the command exited with status {proc.returncode} {last[0][:200]}".strip())
        dst.write(out)
        return
    import fsspec

    kwargs = {}
    if url.startswith(("http://", "https://")):
        import aiohttp

        kwargs["client_kwargs"] = {"timeout": aiohttp.ClientTimeout(total=None, sock_connect=timeout_s,
                                                                     sock_read=timeout_s)}
    with fsspec.open(url, "rb", **kwargs) as src:
        while True:
            b = src.read(1 << 22)
            if not b:
                break
            dst.write(b)


def cache_shard(url: str, cache_dir: str = None, timeout_s: float = None, retries: int = None) -> str:
    """A complete local copy of ``url`` (downloaded once); :class:`RemoteError` after ``retries`` retries."""
    timeout_s = _OPTIONS["timeout_s"] if timeout_s is None else timeout_s
    retries = _OPTIONS["retries"] if retries is None else retries
    cache = Path(cache_dir or default_cache_dir())
    cache.mkdir(parents=True, exist_ok=True)
    base = os.path.basename(url.split("?", 1)[0].rstrip("/")) or "shard"
    if url.startswith("pipe:"):
        base = "pipe.tar"
    path = cache / f"{hashlib.sha256(url.encode()).hexdigest()[:16]}-{base}"
    if path.is_file():
        return str(path)
    tmp = path.with_name(path.name + f".part{os.getpid()}")
    why = "unknown"
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(0.5 * 2 ** (attempt - 1))
        try:
            with open(tmp, "wb") as dst:
                _download(url, dst, timeout_s)
            os.replace(tmp, path)
            return str(path)
        except FileNotFoundError:  # fsspec's http: a 404, and also a refused connection or a 5xx answer
            why = "not found or unreachable (HTTP error, refused connection, or no such file)"
        except Exception as e:  # noqa: BLE001 - network errors come in many types (aiohttp, botocore, OSError)
            why = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}".rstrip(": ")
        finally:
            if tmp.exists():
                tmp.unlink()
    raise RemoteError(f"cannot read {url}: {why} (after {attempt + 1} tries)")


def backoff_s(attempt: int) -> float:
    """Seconds to wait before retry ``attempt`` (1, 2, ...): 0.5, 1, 2, 4, ..."""
    return 0.5 * 2 ** (attempt - 1)


class _Permanent(Exception):
    """A failure no retry can mend (HTTP 4xx other than 408/429): the shard is reported at once."""


def _why(e: BaseException) -> str:
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code} {e.reason}"
    if isinstance(e, urllib.error.URLError):
        e = e.reason if isinstance(e.reason, BaseException) else e
    if isinstance(e, (socket.timeout, TimeoutError)):
        return "timed out"
    text = str(e).splitlines()[0][:200] if str(e) else ""
    return f"{type(e).__name__}: {text}".rstrip(": ")


class RemoteFile:
    """A shard read front to back (see :func:`open_url`). ``read(n)`` returns ``n`` bytes unless the shard ends;
    ``seek`` forward skips, ``seek`` back reconnects at the offset; ``failures`` counts the reconnects."""

    def __init__(self, url: str, offset: int = 0, timeout_s: float = None, retries: int = None):
        self.url = url
        self.timeout_s = float(_OPTIONS["timeout_s"] if timeout_s is None else timeout_s)
        self.retries = int(_OPTIONS["retries"] if retries is None else retries)
        self.pos = int(offset)  # the network position; what tell() says is ``pos - _back``
        self._tail = b""  # the last bytes read (up to TAIL): a short seek back is served from here
        self._back = 0
        self.failures = 0
        self._end = None  # where the server said the body ends (HTTP), to tell a dropped connection from the end
        self._resp = self._proc = self._file = None
        self._eof = False
        self._retrying(self._connect)

    # ------------------------------------------------------------------ connections
    def _connect(self):
        self._disconnect()
        self._eof = False
        u = self.url
        if u.startswith("pipe:"):
            self._proc = subprocess.Popen(u[5:], shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            self._skip(self.pos)
        elif u.startswith(("http://", "https://")):
            req = urllib.request.Request(u, headers={"Range": f"bytes={self.pos}-"} if self.pos else {})
            try:
                resp = urllib.request.urlopen(req, timeout=self.timeout_s)
            except urllib.error.HTTPError as e:
                e.close()
                if e.code == 416:  # the offset is the end of the shard: nothing more to read
                    self._eof, self._end = True, self.pos
                    return
                if 400 <= e.code < 500 and e.code not in (408, 429):
                    raise _Permanent(_why(e)) from None
                raise
            self._resp = resp
            length = resp.headers.get("Content-Length")
            if self.pos and resp.status == 200:  # the server ignored the Range: skip what was read already
                self._end = int(length) if length is not None else None
                self._skip(self.pos)
            else:
                self._end = self.pos + int(length) if length is not None else None
        else:
            import fsspec

            self._file = fsspec.open(u, "rb").open()
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
        if self._resp is not None:
            return self._resp.read1(n)  # what has arrived (up to n): a stall later does not lose it
        if self._file is not None:
            return self._file.read(n)
        if self._proc is not None:
            fd = self._proc.stdout.fileno()
            ready, _, _ = select.select([fd], [], [], self.timeout_s)
            if not ready:
                raise TimeoutError(f"the command wrote nothing for {self.timeout_s:g} s")
            b = os.read(fd, n)
            if not b:
                code = self._proc.wait(timeout=self.timeout_s)
                if code != 0:
                    last = self._proc.stderr.read().decode(errors="replace").strip().splitlines()[-1:] or [""]
                    raise OSError(f"the command exited with status {code} {last[0][:200]}".strip())
            return b
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
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.kill()
            self._proc.wait()
            for s in (self._proc.stdout, self._proc.stderr):
                s.close()
            self._proc = None

    def _retrying(self, fn):
        """Run ``fn``; on a failure reconnect at ``self.pos`` with backoff, ``retries`` times in all for this
        file, then :class:`RemoteError`."""
        while True:
            try:
                return fn()
            except _Permanent as e:
                self._disconnect()
                raise RemoteError(f"cannot read {self.url}: {e}") from None
            except FileNotFoundError:
                self._disconnect()
                raise RemoteError(f"cannot read {self.url}: not found") from None
            except (OSError, http.client.HTTPException, ValueError) as e:
                self.failures += 1
                self._disconnect()
                if self.failures > self.retries:
                    raise RemoteError(f"cannot read {self.url} at byte {self.pos}: {_why(e)} (after "
                                      f"{self.failures} tries)") from None
                time.sleep(backoff_s(self.failures))
                try:
                    self._connect()
                except _Permanent as e2:
                    self._disconnect()
                    raise RemoteError(f"cannot read {self.url}: {e2}") from None
                except (OSError, http.client.HTTPException, ValueError):
                    continue  # counted on the next round of the loop, by calling fn again

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
            while self.pos < offset:  # forward: read and drop (tar members one does not need)
                if not self.read(min(1 << 20, offset - self.pos)):
                    break
        else:  # further back: a new connection at the offset
            self.pos, self._tail, self._back = offset, b"", 0
            self._retrying(self._connect)
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
    Every connect and every read has a timeout of ``timeout_s``; a read that fails, stalls or ends before the
    length the server announced reconnects at the current offset (HTTP Range; ``pipe:`` restarts the command and
    skips) after 0.5, 1, 2, ... s, ``retries`` times in all for this file; then :class:`RemoteError`, one line
    naming the URL. A 404 (any HTTP 4xx but 408/429) is a RemoteError at once. ``None``: the configured values
    (:func:`configure`)."""
    return RemoteFile(url, offset, timeout_s, retries)

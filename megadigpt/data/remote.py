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
"""

import hashlib
import os
import subprocess
import time
from pathlib import Path
from typing import List, Sequence, Union

import braceexpand

TIMEOUT_S = 60.0  # seconds without progress before a read is abandoned (and retried)
RETRIES = 3


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
    return os.environ.get("MEGADIGPT_CACHE") or str(Path.home() / ".cache" / "megadigpt" / "shards")


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


def cache_shard(url: str, cache_dir: str = None, timeout_s: float = TIMEOUT_S, retries: int = RETRIES) -> str:
    """A complete local copy of ``url`` (downloaded once); :class:`RemoteError` after ``retries`` retries."""
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

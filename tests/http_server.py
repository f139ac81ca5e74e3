"""A real HTTP server on 127.0.0.1 for the data tests: serves a folder with Range support, and injects the faults
of the network edge on request (per path): a 404, a connection dropped after N bytes, a slow server, a body cut
short with a correct-looking Content-Length, a refused connection (an address where nothing listens), and the
hostile ones (issue 28): a body or headers trickled at N bytes/s, an endless body (no Content-Length), and a
gzip Content-Encoding bomb.

    with ShardServer(folder) as srv:
        url = srv.url("train-000000.tar")          # http://127.0.0.1:<port>/train-000000.tar
        srv.faults["train-000001.tar"] = Fault(drop_after=50_000, times=1)   # the first request is dropped
        srv.faults["a.tar"] = Fault(trickle_bps=1)   # one byte per second, forever (as far as a test goes)
        srv.faults["b.tar"] = Fault(body=endless_zeros)               # no Content-Length, never ends
        srv.faults["c.tar"] = Fault(gzip_bomb=64 << 20)               # 64 MiB of zeros as a 64 kB gzip body
        srv.requests                                # what was asked: [(path, range header)]

Plain ``http.server`` (standard library) with a Range-aware handler: nothing here is mocked; the client talks
TCP to a real server.
"""

import gzip
import io
import socket
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Tuple


@dataclass
class Fault:
    status: Optional[int] = None  # answer with this status (404, 500, 503) instead of the file
    drop_after: Optional[int] = None  # close the connection after this many body bytes
    truncate_to: Optional[int] = None  # serve only this many bytes of the file (Content-Length says so: a short file)
    delay_s: float = 0.0  # wait this long before the first byte
    stall_s: float = 0.0  # then stall this long after the first 1 KiB (a slow server)
    times: Optional[int] = None  # apply to the first `times` requests of the path only (None: always)
    trickle_bps: Optional[float] = None  # send the body at this many bytes per second (Content-Length correct)
    trickle_headers_bps: Optional[float] = None  # send the status line, then an endless header at this rate
    body: Optional[Callable[[], Iterable[bytes]]] = None  # send these chunks instead (no Content-Length; closed at the end)
    gzip_bomb: Optional[int] = None  # send this many zero bytes gzip-compressed, with Content-Encoding: gzip


class ShardServer:
    def __init__(self, root, host: str = "127.0.0.1"):
        self.root = Path(root)
        self.faults: Dict[str, Fault] = {}
        self.requests: List[Tuple[str, Optional[str]]] = []
        self._counts: Dict[str, int] = {}
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _fault(self, name) -> Optional[Fault]:
                with server._lock:
                    server.requests.append((name, self.headers.get("Range")))
                    n = server._counts.get(name, 0)
                    server._counts[name] = n + 1
                f = server.faults.get(name)
                if f is None or (f.times is not None and n >= f.times):
                    return None
                return f

            def do_HEAD(self):
                self._serve(head=True)

            def do_GET(self):
                self._serve(head=False)

            def _trickle(self, data: bytes, bps: float) -> None:
                step = max(1, int(bps / 20))  # 20 writes a second
                for i in range(0, len(data), step):
                    self.wfile.write(data[i:i + step])
                    self.wfile.flush()
                    time.sleep(step / bps)

            def _hostile(self, fault: Fault, head: bool) -> bool:
                """The faults that replace the whole answer; True when one did."""
                try:
                    if fault.trickle_headers_bps:
                        self.wfile.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
                        step = max(1, int(fault.trickle_headers_bps / 20))
                        while True:  # until the client gives up (a broken pipe)
                            self.wfile.write(b"a" * step)
                            self.wfile.flush()
                            time.sleep(step / fault.trickle_headers_bps)
                    if fault.body is not None:
                        self.send_response(200)
                        self.send_header("Content-Type", "application/x-tar")
                        self.send_header("Connection", "close")
                        self.end_headers()
                        self.close_connection = True
                        if not head:
                            for chunk in fault.body():
                                self.wfile.write(chunk)
                        return True
                    if fault.gzip_bomb is not None:
                        body = _bomb(fault.gzip_bomb)
                        self.send_response(200)
                        self.send_header("Content-Type", "application/x-tar")
                        self.send_header("Content-Encoding", "gzip")
                        self.send_header("Content-Length", str(len(body)))
                        self.end_headers()
                        if not head:
                            self.wfile.write(body)
                        return True
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True
                    return True
                return False

            def _serve(self, head: bool):
                name = self.path.split("?", 1)[0].lstrip("/")
                fault = self._fault(name)
                path = (server.root / name).resolve()
                if fault and fault.delay_s:
                    time.sleep(fault.delay_s)
                if fault and not fault.status and self._hostile(fault, head):
                    return
                if (fault and fault.status) or not path.is_file() or server.root.resolve() not in path.parents:
                    status = fault.status if fault and fault.status else 404
                    body = b"not found\n" if status == 404 else b"error\n"
                    self.send_response(status)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    if not head:
                        self.wfile.write(body)
                    return
                data = path.read_bytes()
                if fault and fault.truncate_to is not None:
                    data = data[:fault.truncate_to]
                size = len(data)
                start, end = 0, size - 1
                rng = self.headers.get("Range")
                if rng and rng.startswith("bytes="):
                    a, _, b = rng[6:].partition("-")
                    if a:
                        start = int(a)
                        end = min(int(b), size - 1) if b else size - 1
                    else:  # a suffix range: the last N bytes
                        start, end = max(0, size - int(b)), size - 1
                    if start >= size:
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{size}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
                else:
                    self.send_response(200)
                body = data[start:end + 1]
                self.send_header("Content-Type", "application/x-tar")
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if head:
                    return
                try:
                    if fault and fault.drop_after is not None:
                        self.wfile.write(body[:fault.drop_after])
                        self.wfile.flush()
                        self.connection.shutdown(socket.SHUT_RDWR)
                        self.close_connection = True
                        return
                    if fault and fault.trickle_bps:
                        self._trickle(body, fault.trickle_bps)
                        return
                    if fault and fault.stall_s:
                        self.wfile.write(body[:1024])
                        self.wfile.flush()
                        time.sleep(fault.stall_s)
                        body = body[1024:]
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.httpd = ThreadingHTTPServer((host, 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, name: str = "") -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def count(self, name: str) -> int:
        with self._lock:
            return self._counts.get(name, 0)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


_BOMBS: Dict[int, bytes] = {}


def _bomb(n: int) -> bytes:
    """``n`` zero bytes gzip-compressed (1000:1), written 1 MiB at a time: the bomb is never whole in memory."""
    if n not in _BOMBS:
        buf = io.BytesIO()
        with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=9) as f:
            zero = bytes(1 << 20)
            for _ in range(n >> 20):
                f.write(zero)
            f.write(bytes(n & ((1 << 20) - 1)))
        _BOMBS[n] = buf.getvalue()
    return _BOMBS[n]


def endless_zeros() -> Iterable[bytes]:
    """An endless body of zero bytes, 64 kB at a time (for ``Fault(body=endless_zeros)``)."""
    chunk = bytes(1 << 16)
    while True:
        yield chunk


def unused_port() -> int:
    """A port where nothing listens (for 'connection refused')."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def serve_forever(root, port_file) -> None:  # pragma: no cover - used by subprocess tests: python -m tests.http_server
    srv = ShardServer(root)
    with srv:
        Path(port_file).write_text(str(srv.port))
        while True:
            time.sleep(3600)


if __name__ == "__main__":  # pragma: no cover
    import sys

    serve_forever(sys.argv[1], sys.argv[2])

"""A real HTTP server on 127.0.0.1 for the data tests: serves a folder with Range support, and injects the faults
of the network edge on request (per path): a 404, a connection dropped after N bytes, a slow server, a body cut
short with a correct-looking Content-Length, a refused connection (an address where nothing listens).

    with ShardServer(folder) as srv:
        url = srv.url("train-000000.tar")          # http://127.0.0.1:<port>/train-000000.tar
        srv.faults["train-000001.tar"] = Fault(drop_after=50_000, times=1)   # the first request is dropped
        srv.requests                                # what was asked: [(path, range header)]

Plain ``http.server`` (standard library) with a Range-aware handler: nothing here is mocked; the client talks
TCP to a real server.
"""

import socket
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Dict, List, Optional, Tuple


@dataclass
class Fault:
    status: Optional[int] = None  # answer with this status (404, 500, 503) instead of the file
    drop_after: Optional[int] = None  # close the connection after this many body bytes
    truncate_to: Optional[int] = None  # serve only this many bytes of the file (Content-Length says so: a short file)
    delay_s: float = 0.0  # wait this long before the first byte
    stall_s: float = 0.0  # then stall this long after the first 1 KiB (a slow server)
    times: Optional[int] = None  # apply to the first `times` requests of the path only (None: always)


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

            def _serve(self, head: bool):
                name = self.path.split("?", 1)[0].lstrip("/")
                fault = self._fault(name)
                path = (server.root / name).resolve()
                if fault and fault.delay_s:
                    time.sleep(fault.delay_s)
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

"""A real HTTP/1.1 file server on 127.0.0.1 for the remote-data tests and benchmarks: it honours
single `Range: bytes=a-b` requests (206 + Content-Range), keeps connections alive, and can inject
faults into chosen GET requests: a dropped connection, HTTP 503, a slow answer, a truncated body."""
from __future__ import annotations

import random
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Dict, List, Optional, Sequence
from urllib.parse import unquote

FAULTS = ("drop", "503", "slow", "truncate")


class RangeServer:
    """`with RangeServer(root) as server:` serves `root` at `server.url`. From the `fault_after`-th GET
    on, each GET is answered with a fault with probability `rate` (drawn from a seeded generator),
    the faults taking turns in the order of `faults`; `slow_s` is how long a "slow" answer waits
    before its first byte. `rate=1` with one fault makes every GET fail that way."""

    def __init__(self, root: Path, faults: Sequence[str] = (), *, rate: float = 1.0, fault_after: int = 0,
                 slow_s: float = 1.0, seed: int = 0) -> None:
        for fault in faults:
            if fault not in FAULTS:
                raise ValueError(f"unknown fault {fault!r}")
        self.root, self.faults, self.fault_after, self.slow_s = Path(root), list(faults), fault_after, slow_s
        self.rate, self._random, self._turn = rate, random.Random(seed), 0
        self.gets = 0
        self.injected: Dict[str, int] = {f: 0 for f in FAULTS}
        self.bytes_sent = 0
        self.ranges: List[tuple] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._server.handle_error = lambda request, address: None  # a client that timed out and left
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/"

    def _next_fault(self) -> Optional[str]:
        with self._lock:
            self.gets += 1
            if not self.faults or self.gets <= self.fault_after or self._random.random() >= self.rate:
                return None
            fault = self.faults[self._turn % len(self.faults)]
            self._turn += 1
            self.injected[fault] += 1
            return fault

    def _handler(self) -> type:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # else each small answer waits ~40 ms for a delayed ACK

            def log_message(self, *args: object) -> None:
                pass

            def _file(self) -> Optional[Path]:
                path = (server.root / unquote(self.path.lstrip("/"))).resolve()
                if server.root.resolve() not in path.parents or not path.is_file():
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return None
                return path

            def do_HEAD(self) -> None:
                path = self._file()
                if path is not None:
                    self.send_response(200)
                    self.send_header("Content-Length", str(path.stat().st_size))
                    self.send_header("Accept-Ranges", "bytes")
                    self.end_headers()

            def do_GET(self) -> None:
                fault = server._next_fault()
                if fault == "drop":
                    self.close_connection = True
                    self.connection.close()
                    return
                if fault == "503":
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if fault == "slow":
                    time.sleep(server.slow_s)
                path = self._file()
                if path is None:
                    return
                size = path.stat().st_size
                header = self.headers.get("Range")
                start, end = 0, size - 1
                if header:
                    first, last = header.removeprefix("bytes=").split("-")
                    start, end = int(first), min(int(last), size - 1)
                with open(path, "rb") as f:
                    f.seek(start)
                    body = f.read(end - start + 1)
                self.send_response(206 if header else 200)
                if header:
                    self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if fault == "truncate":
                    body = body[: len(body) // 2]
                    self.close_connection = True
                self.wfile.write(body)
                with server._lock:
                    server.bytes_sent += len(body)
                    server.ranges.append((path.name, start, len(body)))

        return Handler

    def __enter__(self) -> "RangeServer":
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

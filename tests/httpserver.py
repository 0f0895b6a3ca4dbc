"""A local HTTP server for the remote-file tests: serves files with Range support, counts
requests and bytes, and can be told to misbehave (no ranges, an error status, failures before
success, a redirect, a stall). No network: it listens on 127.0.0.1."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit


@dataclass
class Seen:
    """One request as the server saw it."""

    path: str
    target: str  # the request line's target as sent
    range: str | None
    authorization: str | None
    status: int = 0
    sent: int = 0  # body bytes


@dataclass
class FileServer:
    files: dict[str, bytes | Path] = field(default_factory=dict)  # URL path -> content
    ranges: bool = True  # False: ignore Range, answer 200 with the whole file
    status: dict[str, int] = field(default_factory=dict)  # URL path -> fixed error status
    fail_first: list[int] = field(default_factory=list)  # statuses for the next requests
    redirects: dict[str, str] = field(default_factory=dict)  # URL path -> Location
    stall: float = 0.0  # seconds to wait before answering
    seen: list[Seen] = field(default_factory=list)
    port: int = 0
    release: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return self.base + path

    @property
    def requests(self) -> int:
        return len(self.seen)

    @property
    def bytes_sent(self) -> int:
        return sum(s.sent for s in self.seen)

    def reset(self) -> None:
        self.seen.clear()


@dataclass
class Window:
    """Bytes of a file on disk, read when sent."""

    path: Path
    start: int
    length: int

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, key: slice) -> Window:
        start, stop, _ = key.indices(self.length)
        return Window(self.path, self.start + start, max(0, stop - start))

    def pieces(self) -> Iterator[bytes]:
        with open(self.path, "rb") as f:
            f.seek(self.start)
            left = self.length
            while left > 0 and (piece := f.read(min(left, 1 << 20))):
                left -= len(piece)
                yield piece


def _handler(state: FileServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:  # quiet
            pass

        def _send(
            self, status: int, body: bytes | Window, headers: dict[str, str] | None = None
        ) -> None:
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self._seen.status = status
            if isinstance(body, bytes):
                self.wfile.write(body)
                self._seen.sent = len(body)
                return
            for piece in body.pieces():  # a file on disk: streamed (the benchmark's 7 GB)
                self.wfile.write(piece)
                self._seen.sent += len(piece)

        def do_GET(self) -> None:
            path = urlsplit(self.path).path  # also an absolute URL (as sent to a proxy)
            self._seen = Seen(
                path, self.path, self.headers.get("Range"), self.headers.get("Authorization")
            )
            with state.lock:
                state.seen.append(self._seen)
                fail = state.fail_first.pop(0) if state.fail_first else None
            if state.stall:
                state.release.wait(state.stall)
                if not state.release.is_set():
                    return  # the client has given up by now
            if fail is not None:
                self._send(fail, b"try again")
                return
            if path in state.redirects:
                self._send(302, b"", {"Location": state.redirects[path]})
                return
            if path in state.status:
                self._send(state.status[path], b"no")
                return
            content = state.files.get(path)
            data: bytes | Window | None = None
            if isinstance(content, Path):
                data = Window(content, 0, content.stat().st_size)
            elif content is not None:
                data = content
            if data is None:
                self._send(404, b"not found")
                return
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range") or "")
            if not state.ranges or m is None:
                self._send(200, data)
                return
            lo = int(m.group(1))
            hi = min(len(data) - 1, int(m.group(2)) if m.group(2) else len(data) - 1)
            if lo >= len(data):
                self._send(416, b"", {"Content-Range": f"bytes */{len(data)}"})
                return
            self._send(
                206,
                data[lo : hi + 1],
                {"Content-Range": f"bytes {lo}-{hi}/{len(data)}", "Accept-Ranges": "bytes"},
            )

    return Handler


@contextmanager
def serve(state: FileServer | None = None) -> Iterator[FileServer]:
    """Run a FileServer on a free port for the block."""
    state = state or FileServer()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    httpd.daemon_threads = True
    state.port = httpd.server_address[1]
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    try:
        yield state
    finally:
        state.release.set()
        httpd.shutdown()
        httpd.server_close()

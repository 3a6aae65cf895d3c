"""The sample server's wire side: replies, byte ranges, injected faults, and the request handler.

The server (tasks/sample_world/server.py) decides WHAT a request gets (`route` -> Reply); this
module decides HOW it goes out: Range (206 / 416), Content-Length, the request log, and the
faults tests queue with `FaultQueue.inject` (FAULTS lists them), down to a TCP reset mid-body.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any, NamedTuple
from urllib.parse import urlsplit

FAULTS = {
    "reset": "send the headers and about half the body (opts at=<bytes>), then close with a TCP reset",
    "truncate": "declare the full Content-Length, send part of the body (opts at=<bytes>), then close",
    "429": "429 {'error': 'Too Many Requests'}; opts retry_after=<s> (Retry-After), "
    "ratelimit_reset=<unix> (X-Ratelimit-Reset)",
    "500": "500 with a JSON error body",
    "503": "503 with a JSON error body",
    "404": "404 with a JSON error body",
    "corrupt": "200, the real bytes garbled after the first KB (same length)",
    "not_video": "200, Content-Type video/mp4, an HTML page as the body",
}
_STATUS_FAULTS = ("500", "503", "404", "429")  # answered instead of the route
_CUT_FAULTS = ("reset", "truncate")  # the route's answer, cut short
_NOT_VIDEO = (
    b"<!DOCTYPE html>\n<html><head><title>Just a moment...</title></head>"
    b"<body><p>Please enable cookies.</p></body></html>\n"
)


class LogEntry(NamedTuple):
    method: str
    path: str  # the request target, query string included
    status: int
    range: str | None  # the Range header, if any


@dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    rangeable: bool = False  # a file: Range applies


def json_reply(obj: Any, status: int = 200, headers: dict | None = None) -> Reply:
    return Reply(status, json.dumps(obj, indent=None).encode(), "application/json; charset=utf-8", dict(headers or {}))


def error_reply(status: int, message: str, headers: dict | None = None) -> Reply:
    return json_reply({"error": message}, status, headers)


class FaultQueue:
    """Faults queued per prefix of the request path (query excluded), consumed in order."""

    def __init__(self):
        self._lock = threading.Lock()
        self._queues: dict[str, deque] = {}

    def inject(self, path_prefix: str, fault: str, times: int = 1, **opts) -> None:
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}; expected one of {sorted(FAULTS)}")
        with self._lock:
            q = self._queues.setdefault(path_prefix, deque())
            for _ in range(times):
                q.append((fault, dict(opts)))

    def clear(self) -> None:
        with self._lock:
            self._queues.clear()

    def pending(self) -> int:
        with self._lock:
            return sum(len(q) for q in self._queues.values())

    def take(self, path: str) -> tuple[str, dict] | None:
        with self._lock:
            for prefix, q in self._queues.items():  # insertion order: the first matching prefix wins
                if q and path.startswith(prefix):
                    return q.popleft()
        return None


def parse_range(header: str | None, size: int) -> tuple[int, int] | None | str:
    """(start, end inclusive), None (no usable range: send all), or "unsatisfiable"."""
    if not header or not header.startswith("bytes=") or "," in header:
        return None
    spec = header[len("bytes=") :].strip()
    a, sep, b = spec.partition("-")
    if not sep:
        return None
    try:
        if a == "":
            n = int(b)
            if n <= 0:
                return "unsatisfiable"
            return max(0, size - n), size - 1
        start = int(a)
        end = int(b) if b else size - 1
    except ValueError:
        return None
    if start >= size:
        return "unsatisfiable"
    if start < 0 or end < start:
        return None
    return start, min(end, size - 1)


def _garble(data: bytes, keep: int = 1024) -> bytes:
    tail = bytearray(data[keep:])
    state = 0x9E3779B9
    for i in range(len(tail)):  # a cheap deterministic scramble (xorshift bytes)
        state ^= (state << 13) & 0xFFFFFFFF
        state ^= state >> 17
        state ^= (state << 5) & 0xFFFFFFFF
        tail[i] ^= (state & 0xFF) | 1
    return data[:keep] + bytes(tail)


def _status_fault(name: str, opts: dict) -> Reply:
    extra = dict(opts.get("headers") or {})
    if name != "429":
        return error_reply(int(name), f"injected {name}", extra)
    if opts.get("retry_after") is not None:
        extra["Retry-After"] = str(opts["retry_after"])
    if opts.get("ratelimit_reset") is not None:
        extra["X-Ratelimit-Reset"] = str(int(opts["ratelimit_reset"]))
    return error_reply(429, "Too Many Requests", extra)


def _with_range(resp: Reply, rng: str | None) -> tuple[int, bytes, dict[str, str]]:
    """(status, body, headers) after applying the Range header to a file's 200."""
    body, status, headers = resp.body, resp.status, dict(resp.headers)
    if resp.rangeable and status == 200:
        headers["Accept-Ranges"] = "bytes"
        r = parse_range(rng, len(body))
        if r == "unsatisfiable":
            status, body = 416, b""
            headers["Content-Range"] = f"bytes */{len(resp.body)}"
        elif r is not None:
            start, end = r
            status, body = 206, body[start : end + 1]
            headers["Content-Range"] = f"bytes {start}-{end}/{len(resp.body)}"
    return status, body, headers


class RequestHandler(BaseHTTPRequestHandler):
    """GET and HEAD for a server object with `faults` (FaultQueue), `route(method, target,
    headers) -> Reply` and `record(LogEntry)`; subclassed per server with `server_owner` set."""

    server_owner: Any
    protocol_version = "HTTP/1.1"
    timeout = 30  # an idle keep-alive connection is dropped after this
    server_version = "SoraFlowSample/1.0"

    def log_message(self, format: str, *args) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        self._serve(head=False)

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:
            pass

    def _reply(self, target: str, fault: tuple[str, dict] | None) -> Reply:
        owner = self.server_owner
        try:
            if fault is not None and fault[0] in _STATUS_FAULTS:
                return _status_fault(*fault)
            resp = owner.route(self.command, target, self.headers)
            if fault is not None and fault[0] == "not_video":
                return Reply(200, _NOT_VIDEO, "video/mp4", rangeable=False)
            if fault is not None and fault[0] == "corrupt":
                return Reply(200, _garble(resp.body), resp.content_type, dict(resp.headers), resp.rangeable)
            return resp
        except Exception as e:  # a bug in a route: answer 500 rather than dropping the connection
            return error_reply(500, f"server error: {type(e).__name__}: {e}")

    def _serve(self, head: bool) -> None:
        target = self.path
        rng = self.headers.get("Range")
        fault = self.server_owner.faults.take(urlsplit(target).path)
        resp = self._reply(target, fault)
        status, body, headers = _with_range(resp, rng)
        self.server_owner.record(LogEntry(self.command, target, status, rng))
        cut = None
        if fault is not None and fault[0] in _CUT_FAULTS:
            cut = int(fault[1].get("at", len(body) // 2))
            cut = max(0, min(cut, max(0, len(body) - 1)))
        try:
            self.send_response(status)
            self.send_header("Content-Type", resp.content_type)
            self.send_header("Content-Length", str(len(body)))
            for k, v in headers.items():
                self.send_header(k, v)
            if cut is not None or status >= 400:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            if head:
                return
            if cut is None:
                self.wfile.write(body)
                return
            self.wfile.write(body[:cut])
            self.wfile.flush()
            if fault[0] == "reset":
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.connection.close()  # RST instead of FIN
            self.close_connection = True
        except OSError:  # the client went away
            self.close_connection = True

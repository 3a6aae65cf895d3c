"""tasks/ingest/http.py against a tiny loopback server whose faults each test scripts.

No other project code is needed: the server is a plain http.server on 127.0.0.1 with
Range support and a queue of faults per path (reset, truncate, 429, 5xx, 4xx, ...).
Sleeps are recorded, never slept, so retries are instant.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from soraflow.configs.schema import HttpConfig
from soraflow.tasks.ingest.http import (
    BadInputError,
    TransientError,
    backoff_delay,
    get_json,
    rate_limit_wait,
    redact_url,
)
from soraflow.tasks.ingest.resumable_download import download_file

LOOPBACK = ["127.0.0.1"]  # the test servers are on loopback, which the URL policy refuses by default

BODY = os.urandom(300_000)
SHA = hashlib.sha256(BODY).hexdigest()
SECRET = "sk-test-SECRET-9f8e7d6c5b4a"


class ScriptedServer:
    """path -> body; per-path queue of faults consumed one request at a time; a request log."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.faults: dict[str, list[tuple[str, dict]]] = {}
        self.log: list[dict] = []
        self.lock = threading.Lock()
        self.no_validators = False  # True: answers carry no ETag (nothing to resume against)
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_GET(self):
                path = self.path.split("?", 1)[0]
                with outer.lock:
                    outer.log.append({"path": self.path, "headers": dict(self.headers)})
                    queue = outer.faults.get(path) or []
                    fault, opts = queue.pop(0) if queue else (None, {})
                outer._serve(self, path, fault, opts)

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):  # resets are on purpose
                pass

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    def inject(self, path: str, fault: str, times: int = 1, **opts):
        self.faults.setdefault(path, []).extend([(fault, opts)] * times)

    def requests_to(self, path: str) -> list[dict]:
        return [r for r in self.log if r["path"].split("?", 1)[0] == path]

    # ------------------------------------------------------------ responses

    @staticmethod
    def _send(h, code: int, body: bytes = b"", headers: dict | None = None, length: int | None = None):
        h.send_response(code)
        for k, v in (headers or {}).items():
            h.send_header(k, str(v))
        h.send_header("Content-Length", str(len(body) if length is None else length))
        h.end_headers()
        h.wfile.write(body)

    @staticmethod
    def _reset(h):
        h.wfile.flush()
        time.sleep(0.1)  # let the client drain what was sent: an RST drops unread data
        h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        h.connection.close()
        h.close_connection = True

    def _serve(self, h, path, fault, opts):
        if fault == "status":
            return self._send(h, opts["code"], b"nope", opts.get("headers"))
        if fault == "trickle":  # headers, then one byte every `every` seconds, for ever (bounded by `n`)
            h.send_response(200)
            h.send_header("Content-Length", str(opts.get("n", 10_000)))
            h.end_headers()
            for _ in range(opts.get("n", 10_000)):
                try:
                    h.wfile.write(b" ")
                    h.wfile.flush()
                except OSError:
                    return
                time.sleep(opts.get("every", 0.05))
            return
        if fault == "redirect":
            h.send_response(302)
            h.send_header("Location", opts["to"])
            h.send_header("Content-Length", "0")
            return h.end_headers()
        if path not in self.files:
            return self._send(h, 404, b"not found")
        body = self.files[path]
        if fault == "json_text":
            return self._send(h, 200, opts["text"].encode(), {"Content-Type": "application/json"})
        if fault == "gzip_json":
            import gzip

            return self._send(
                h, 200, gzip.compress(body), {"Content-Type": "application/json", "Content-Encoding": "gzip"}
            )
        if fault == "gzip_file":  # what many servers do with a CSV, whatever Accept-Encoding said
            import gzip

            headers = {"Content-Type": "text/csv", "Content-Encoding": "gzip", "ETag": f'"gz{len(body)}"'}
            return self._send(h, 200, gzip.compress(body), headers)
        if fault == "huge":  # declares more than any cap, sends little
            return self._send(h, 200, body[:10], length=10**12)
        if fault == "stream":  # no Content-Length: chunked, until `n` bytes
            h.send_response(200)
            h.send_header("Transfer-Encoding", "chunked")
            h.end_headers()
            data = (body * (opts["n"] // len(body) + 1))[: opts["n"]]
            for i in range(0, len(data), 65536):
                chunk = data[i : i + 65536]
                h.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            h.wfile.write(b"0\r\n\r\n")
            return
        rng = h.headers.get("Range")
        start = 0
        etag = f'"{hashlib.sha256(body).hexdigest()[:16]}"'  # strong validator of this version of the file
        if_range = h.headers.get("If-Range")
        if if_range is not None and if_range != etag:
            rng = None  # RFC 9110: a validator that does not match gets the whole (new) file
        if rng and fault != "ignore_range" and not opts.get("ignore_range"):
            start = int(rng.split("=")[1].split("-")[0])
            if start >= len(body):
                return self._send(h, 416, b"", {"Content-Range": f"bytes */{len(body)}"})
        part = body[start:]
        code = 206 if start else 200
        headers = {"Content-Type": opts.get("ctype", "application/octet-stream"), "Accept-Ranges": "bytes"}
        if not self.no_validators:
            headers["ETag"] = etag
        if start:
            headers["Content-Range"] = f"bytes {start}-{len(body) - 1}/{len(body)}"
        if fault in ("reset", "truncate"):
            cut = opts.get("at", len(part) // 2)
            h.send_response(code)
            for k, v in headers.items():
                h.send_header(k, v)
            h.send_header("Content-Length", str(len(part)))
            h.end_headers()
            h.wfile.write(part[:cut])
            if fault == "reset":
                return self._reset(h)
            h.wfile.flush()
            h.close_connection = True
            h.connection.shutdown(socket.SHUT_RDWR)
            return
        self._send(h, code, part, headers)


@pytest.fixture
def server():
    with ScriptedServer() as s:
        s.files["/f.bin"] = BODY
        s.files["/data.json"] = b'{"a": [1, 2, 3]}'
        yield s


@pytest.fixture
def cfg():
    return HttpConfig(
        timeout_s=5, max_retries=3, backoff_base_s=1.0, backoff_max_s=30.0, max_bytes=10_000_000, allow_hosts=LOOPBACK
    )


class Sleeps(list):
    def __call__(self, s: float) -> None:
        self.append(s)


def test_plain_download(server, cfg, tmp_path):
    sleeps = Sleeps()
    res = download_file(f"{server.base_url}/f.bin", tmp_path / "out" / "f.bin", cfg=cfg, sleep=sleeps)
    assert res.sha256 == SHA and res.bytes == len(BODY) and not res.resumed and res.attempts == 1
    assert (tmp_path / "out" / "f.bin").read_bytes() == BODY
    assert not (tmp_path / "out" / "f.bin.part").exists()
    assert sleeps == []
    assert server.log[0]["headers"]["User-Agent"] == cfg.user_agent


def test_reset_mid_file_resumes_with_range(server, cfg, tmp_path):
    server.inject("/f.bin", "reset", at=100_000)
    sleeps = Sleeps()
    res = download_file(f"{server.base_url}/f.bin", tmp_path / "f.bin", cfg=cfg, sleep=sleeps)
    assert res.sha256 == SHA and res.resumed and res.attempts == 2
    reqs = server.requests_to("/f.bin")
    assert "Range" not in reqs[0]["headers"]
    have = int(reqs[1]["headers"]["Range"].split("=")[1].rstrip("-"))
    assert 0 < have <= 100_000  # resumed from what had arrived, not from zero
    assert (tmp_path / "f.bin").read_bytes() == BODY
    assert len(sleeps) == 1


def test_truncated_body_resumes(server, cfg, tmp_path):
    server.inject("/f.bin", "truncate", times=2, at=50_000)
    res = download_file(f"{server.base_url}/f.bin", tmp_path / "f.bin", cfg=cfg, sleep=Sleeps())
    assert res.sha256 == SHA and res.resumed and res.attempts == 3
    ranges = [r["headers"].get("Range") for r in server.requests_to("/f.bin")]
    assert ranges[0] is None and ranges[1] == "bytes=50000-" and ranges[2] == "bytes=100000-"


def test_server_ignoring_range_restarts_from_zero(server, cfg, tmp_path):
    server.inject("/f.bin", "reset", at=70_000)
    server.inject("/f.bin", "ignore_range")  # answers 200 with the whole body
    res = download_file(f"{server.base_url}/f.bin", tmp_path / "f.bin", cfg=cfg, sleep=Sleeps())
    assert res.sha256 == SHA and not res.resumed
    assert "Range" in server.requests_to("/f.bin")[1]["headers"]


def _etag(body: bytes) -> str:
    return f'"{hashlib.sha256(body).hexdigest()[:16]}"'


def _leave_part(tmp_path, url: str, body: bytes, validator: str | None) -> None:
    """A part file as an earlier, killed download leaves it (with its validator sidecar)."""
    (tmp_path / "f.bin.part").write_bytes(body)
    if validator:
        (tmp_path / "f.bin.part.json").write_text(json.dumps({"url": url, "validator": validator}))


def test_existing_part_file_is_resumed(server, cfg, tmp_path):
    url = f"{server.base_url}/f.bin"
    _leave_part(tmp_path, url, BODY[:1234], _etag(BODY))
    res = download_file(url, tmp_path / "f.bin", cfg=cfg, sleep=Sleeps())
    assert res.sha256 == SHA and res.resumed
    assert server.requests_to("/f.bin")[0]["headers"]["Range"] == "bytes=1234-"
    assert server.requests_to("/f.bin")[0]["headers"]["If-Range"] == _etag(BODY)
    assert not (tmp_path / "f.bin.part.json").exists() and not (tmp_path / "f.bin.part").exists()


def test_part_without_validator_restarts_from_zero(server, cfg, tmp_path):
    url = f"{server.base_url}/f.bin"
    _leave_part(tmp_path, url, b"X" * 1234, None)  # nothing proves these bytes are this file's
    res = download_file(url, tmp_path / "f.bin", cfg=cfg, sleep=Sleeps())
    assert res.sha256 == SHA and not res.resumed
    assert "Range" not in server.requests_to("/f.bin")[0]["headers"]


def test_resume_after_the_file_changed_restarts_cleanly(server, cfg, tmp_path):
    """The file changed between attempts: If-Range does not match, the server sends the new
    file whole, and the result is the new file, never old prefix + new suffix."""
    url = f"{server.base_url}/f.bin"
    old = os.urandom(len(BODY))
    _leave_part(tmp_path, url, old[:100_000], _etag(old))
    res = download_file(url, tmp_path / "f.bin", cfg=cfg, sleep=Sleeps())
    assert res.sha256 == SHA and not res.resumed
    first = server.requests_to("/f.bin")[0]["headers"]
    assert first["Range"] == "bytes=100000-" and first["If-Range"] == _etag(old)
    assert (tmp_path / "f.bin").read_bytes() == BODY


def test_no_validator_server_restarts_after_a_reset(server, cfg, tmp_path):
    server.no_validators = True
    server.inject("/f.bin", "reset", at=100_000)
    res = download_file(f"{server.base_url}/f.bin", tmp_path / "f.bin", cfg=cfg, sleep=Sleeps())
    assert res.sha256 == SHA and not res.resumed and res.attempts == 2
    assert "Range" not in server.requests_to("/f.bin")[1]["headers"]


def test_range_ignoring_server_that_drops_is_bounded(server, tmp_path):
    """A server that ignores Range and drops every connection part-way: bounded bytes, a clear error."""
    c = HttpConfig(max_retries=3, backoff_base_s=0, allow_hosts=LOOPBACK, max_transfer_factor=3.0)
    server.inject("/f.bin", "reset", times=100, at=200_000, ignore_range=True)
    with pytest.raises(BadInputError, match="gave up"):
        download_file(f"{server.base_url}/f.bin", tmp_path / "f.bin", cfg=c, sleep=Sleeps())
    assert len(server.requests_to("/f.bin")) <= 5  # 3 x 300 kB at 200 kB a try, not 30 full refetches
    assert list(tmp_path.iterdir()) == []  # the refused file's part is gone


def test_complete_part_file_416(server, cfg, tmp_path):
    (tmp_path / "f.bin.part").write_bytes(BODY)
    res = download_file(f"{server.base_url}/f.bin", tmp_path / "f.bin", cfg=cfg, sleep=Sleeps())
    assert res.sha256 == SHA and res.bytes == len(BODY)


def test_5xx_retried_with_exponential_backoff(server, cfg, tmp_path, monkeypatch):
    monkeypatch.setattr("soraflow.tasks.ingest.http.random.random", lambda: 0.5)  # jitter factor 1.0
    server.inject("/f.bin", "status", code=500)
    server.inject("/f.bin", "status", code=503)
    server.inject("/f.bin", "status", code=502)
    sleeps = Sleeps()
    res = download_file(f"{server.base_url}/f.bin", tmp_path / "f.bin", cfg=cfg, sleep=sleeps)
    assert res.sha256 == SHA and res.attempts == 4
    assert sleeps == [1.0, 2.0, 4.0]


def test_persistent_5xx_gives_transient_error(server, cfg, tmp_path):
    server.inject("/f.bin", "status", times=10, code=503)
    sleeps = Sleeps()
    with pytest.raises(TransientError, match=r"f\.bin.*4 attempt.*503"):
        download_file(f"{server.base_url}/f.bin", tmp_path / "f.bin", cfg=cfg, sleep=sleeps)
    assert len(server.requests_to("/f.bin")) == cfg.max_retries + 1
    assert len(sleeps) == cfg.max_retries
    assert not (tmp_path / "f.bin").exists()


def test_429_honours_retry_after(server, cfg, tmp_path):
    server.inject("/f.bin", "status", code=429, headers={"Retry-After": "7"})
    sleeps = Sleeps()
    res = download_file(f"{server.base_url}/f.bin", tmp_path / "f.bin", cfg=cfg, sleep=sleeps)
    assert res.sha256 == SHA and sleeps == [7.0]


def test_429_honours_ratelimit_reset_capped(server, cfg, tmp_path):
    server.inject("/f.bin", "status", code=429, headers={"X-Ratelimit-Reset": str(int(time.time()) + 12)})
    server.inject("/f.bin", "status", code=429, headers={"X-Ratelimit-Reset": str(int(time.time()) + 100_000)})
    sleeps = Sleeps()
    download_file(f"{server.base_url}/f.bin", tmp_path / "f.bin", cfg=cfg, sleep=sleeps)
    assert 9 <= sleeps[0] <= 12.5
    assert sleeps[1] == cfg.backoff_max_s  # a monthly reset is capped


def test_429_without_headers_backs_off(server, cfg, tmp_path):
    server.inject("/f.bin", "status", times=2, code=429)
    sleeps = Sleeps()
    res = download_file(f"{server.base_url}/f.bin", tmp_path / "f.bin", cfg=cfg, sleep=sleeps)
    assert res.sha256 == SHA and len(sleeps) == 2
    assert 0.5 <= sleeps[0] < 1.5 and 1.0 <= sleeps[1] < 3.0


def test_404_is_bad_input_not_retried(server, cfg, tmp_path):
    sleeps = Sleeps()
    with pytest.raises(BadInputError) as ei:
        download_file(f"{server.base_url}/missing.bin", tmp_path / "m.bin", cfg=cfg, sleep=sleeps)
    assert "/missing.bin" in str(ei.value) and "404" in str(ei.value)
    assert len(server.requests_to("/missing.bin")) == 1 and sleeps == []
    assert isinstance(ei.value, ValueError)  # Prefect's retry condition treats it as bad input


@pytest.mark.parametrize("code", [400, 401, 403, 410])
def test_other_4xx_not_retried(server, cfg, tmp_path, code):
    server.inject("/f.bin", "status", code=code)
    with pytest.raises(BadInputError, match=str(code)):
        download_file(f"{server.base_url}/f.bin", tmp_path / "f.bin", cfg=cfg, sleep=Sleeps())
    assert len(server.requests_to("/f.bin")) == 1


@pytest.mark.parametrize(
    "url", ["file:///etc/passwd", "ftp://127.0.0.1/x", "gopher://x/", "/relative/path", "http:///nohost"]
)
def test_non_http_refused(cfg, tmp_path, url):
    with pytest.raises(BadInputError):
        download_file(url, tmp_path / "x", cfg=cfg, sleep=Sleeps())
    with pytest.raises(BadInputError):
        get_json(url, cfg=cfg, sleep=Sleeps())
    assert list(tmp_path.iterdir()) == []


def test_redirect_to_file_scheme_refused(server, cfg, tmp_path):
    server.inject("/f.bin", "redirect", to="file:///etc/passwd")
    with pytest.raises(BadInputError):
        download_file(f"{server.base_url}/f.bin", tmp_path / "f.bin", cfg=cfg, sleep=Sleeps())
    assert not (tmp_path / "f.bin").exists()


def test_redirect_followed(server, cfg, tmp_path):
    server.inject("/short", "redirect", to="/f.bin")
    res = download_file(f"{server.base_url}/short", tmp_path / "f.bin", cfg=cfg, sleep=Sleeps())
    assert res.sha256 == SHA


def test_size_cap_declared(server, cfg, tmp_path):
    server.inject("/f.bin", "huge")
    with pytest.raises(BadInputError, match="over the limit"):
        download_file(f"{server.base_url}/f.bin", tmp_path / "f.bin", cfg=cfg, sleep=Sleeps())
    assert len(server.requests_to("/f.bin")) == 1


def test_size_cap_streamed(server, tmp_path):
    small = HttpConfig(max_bytes=200_000, backoff_base_s=0, allow_hosts=LOOPBACK)
    server.inject("/f.bin", "stream", n=1_000_000)
    with pytest.raises(BadInputError, match="over the limit"):
        download_file(f"{server.base_url}/f.bin", tmp_path / "f.bin", cfg=small, sleep=Sleeps())
    assert list(tmp_path.iterdir()) == []  # neither the file nor its .part is left


def test_size_cap_on_resume_leaves_no_part(server, tmp_path):
    """A part from an earlier run, and the server now says the file is over the cap: refused, part removed."""
    small = HttpConfig(max_bytes=200_000, backoff_base_s=0, allow_hosts=LOOPBACK)
    url = f"{server.base_url}/f.bin"
    _leave_part(tmp_path, url, BODY[:150_000], _etag(BODY))
    with pytest.raises(BadInputError, match="declared size 300000 bytes is over the limit of 200000"):
        download_file(url, tmp_path / "f.bin", cfg=small, sleep=Sleeps())
    assert list(tmp_path.iterdir()) == []


def test_gzip_encoded_download_is_stored_decoded(server, cfg, tmp_path):
    """A CSV sent gzipped (10x smaller) though we asked for identity: stored decoded, not refused
    by the transfer budget (counted in bytes as sent), never resumed at encoded offsets."""
    csv = b"".join(b"videos/clip_%06d.mp4,a red circle moving left,%d\n" % (i, i % 97) for i in range(40_000))
    server.files["/train.csv"] = csv
    server.inject("/train.csv", "gzip_file")
    res = download_file(f"{server.base_url}/train.csv", tmp_path / "train.csv", cfg=cfg, sleep=Sleeps())
    assert (tmp_path / "train.csv").read_bytes() == csv and res.bytes == len(csv)
    assert res.sha256 == hashlib.sha256(csv).hexdigest() and not res.resumed
    assert server.requests_to("/train.csv")[0]["headers"]["Accept-Encoding"] == "identity"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.csv"]


def test_gzip_bomb_download_stops_at_the_cap(server, tmp_path):
    """30 MB in a ~30 kB gzip body: decoding stops one byte past max_bytes, and nothing is left."""
    c = HttpConfig(max_bytes=1_000_000, backoff_base_s=0, allow_hosts=LOOPBACK)
    server.files["/bomb.csv"] = b"0" * 30_000_000
    server.inject("/bomb.csv", "gzip_file")
    with pytest.raises(BadInputError, match=r"over the limit of 1000000 bytes \(after gzip decoding\)"):
        download_file(f"{server.base_url}/bomb.csv", tmp_path / "bomb.csv", cfg=c, sleep=Sleeps())
    assert len(server.requests_to("/bomb.csv")) == 1 and list(tmp_path.iterdir()) == []


def test_size_cap_expected_size(server, cfg, tmp_path):
    with pytest.raises(BadInputError, match="over the limit"):
        download_file(f"{server.base_url}/f.bin", tmp_path / "f.bin", cfg=cfg, expected_size=cfg.max_bytes + 1)
    assert server.log == []


def test_chunked_body_without_length(server, cfg, tmp_path):
    server.inject("/f.bin", "stream", n=500_000)
    res = download_file(f"{server.base_url}/f.bin", tmp_path / "f.bin", cfg=cfg, sleep=Sleeps())
    assert res.bytes == 500_000


def test_network_down_is_transient(cfg, tmp_path):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens here now
    sleeps = Sleeps()
    with pytest.raises(TransientError, match="still failing"):
        download_file(f"http://127.0.0.1:{port}/f.bin", tmp_path / "f.bin", cfg=cfg, sleep=sleeps)
    assert len(sleeps) == cfg.max_retries


def test_secret_never_logged_or_raised(server, cfg, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    headers = {"Authorization": SECRET}
    server.inject("/f.bin", "status", code=503)
    res = download_file(f"{server.base_url}/f.bin", tmp_path / "f.bin", cfg=cfg, headers=headers, sleep=Sleeps())
    assert server.log[0]["headers"]["Authorization"] == SECRET  # it is sent ...
    errors = []
    for url in (f"{server.base_url}/missing", f"{server.base_url}/f.bin"):
        server.inject("/f.bin", "status", times=10, code=500)
        with pytest.raises((BadInputError, TransientError)) as ei:
            download_file(url, tmp_path / "g.bin", cfg=cfg, headers=headers, sleep=Sleeps())
        errors.append(ei.value)
    server.faults.clear()
    server.inject("/data.json", "status", code=401, headers={"WWW-Authenticate": SECRET})
    with pytest.raises(BadInputError) as ei:
        get_json(
            f"{server.base_url}/data.json",
            cfg=cfg,
            headers={"X-Custom-Token": SECRET},
            redact=["X-Custom-Token"],
            sleep=Sleeps(),
        )
    errors.append(ei.value)
    assert caplog.records, "the retries should have logged something"
    text = caplog.text + " ".join(f"{e} {e!r} {e.args}" for e in errors) + repr(res)
    assert SECRET not in text  # ... but never shown
    assert "Bearer" not in text


def test_redact_url():
    assert SECRET not in redact_url(f"https://u:{SECRET}@h.example/p?api_key={SECRET}&page=2")
    assert "page=2" in redact_url(f"https://h.example/p?api_key={SECRET}&page=2")


def test_backoff_and_rate_limit_helpers():
    c = HttpConfig(backoff_base_s=2.0, backoff_max_s=10.0)
    assert backoff_delay(0, c, rng=lambda: 0.0) == 1.0
    assert backoff_delay(1, c, rng=lambda: 0.999) == pytest.approx(2 * 2 * 1.499)
    assert backoff_delay(10, c) == 10.0
    assert rate_limit_wait({"Retry-After": "3"}, c) == 3.0
    assert rate_limit_wait({"Retry-After": "3000"}, c) == 10.0
    assert rate_limit_wait({"X-Ratelimit-Reset": "1700000005"}, c, now=1_700_000_000.0) == 5.0
    assert rate_limit_wait({"X-Ratelimit-Reset": "4"}, c) == 4.0  # seconds to go, as some APIs send
    assert rate_limit_wait({"Retry-After": "Wed, 21 Oct 2015 07:28:05 GMT"}, c, now=1445412480.0) == 5.0
    assert rate_limit_wait({}, c) is None


# ---------------------------------------------------------------- get_json


def test_get_json_ok_and_headers(server, cfg):
    data, headers = get_json(f"{server.base_url}/data.json", cfg=cfg, params={"q": "x y"}, sleep=Sleeps())
    assert data == {"a": [1, 2, 3]} and headers["content-length"] == "16"
    assert server.log[0]["path"] == "/data.json?q=x+y"


def test_get_json_retries_then_succeeds(server, cfg):
    server.inject("/data.json", "status", code=503)
    server.inject("/data.json", "reset", at=3)
    server.inject("/data.json", "status", code=429)
    sleeps = Sleeps()
    data, _ = get_json(f"{server.base_url}/data.json", cfg=cfg, sleep=sleeps)
    assert data == {"a": [1, 2, 3]} and len(sleeps) == 3


def test_get_json_gzip(server, cfg):
    server.inject("/data.json", "gzip_json")
    assert get_json(f"{server.base_url}/data.json", cfg=cfg, sleep=Sleeps())[0] == {"a": [1, 2, 3]}


def test_get_json_invalid_is_bad_input(server, cfg):
    server.inject("/data.json", "json_text", text="{not json")
    with pytest.raises(BadInputError, match="not valid JSON"):
        get_json(f"{server.base_url}/data.json", cfg=cfg, sleep=Sleeps())


def test_get_json_404_and_size_cap(server):
    c = HttpConfig(max_bytes=5, allow_hosts=LOOPBACK)
    with pytest.raises(BadInputError, match="404"):
        get_json(f"{server.base_url}/nope.json", cfg=c, sleep=Sleeps())
    with pytest.raises(BadInputError, match="over the limit"):
        get_json(f"{server.base_url}/data.json", cfg=c, sleep=Sleeps())


# ---------------------------------------------------------------- URL policy, deadlines, caps, concurrency


def test_loopback_refused_without_allow_list(server, tmp_path):
    """The default policy refuses loopback (and every other non-public) target before connecting."""
    c = HttpConfig(backoff_base_s=0)
    with pytest.raises(BadInputError, match="loopback"):
        download_file(f"{server.base_url}/f.bin", tmp_path / "f.bin", cfg=c, sleep=Sleeps())
    with pytest.raises(BadInputError, match="loopback"):
        get_json(f"{server.base_url}/data.json", cfg=c, sleep=Sleeps())
    assert server.log == []  # nothing was fetched


@pytest.mark.parametrize("ips, allow, ok", [
    (["10.1.2.3"], [], False),
    (["93.184.216.34", "192.168.1.5"], [], False),  # one private answer among public ones is enough
    (["169.254.169.254"], [], False),  # the cloud metadata endpoint
    (["::ffff:127.0.0.1"], [], False),  # IPv4-mapped loopback
    (["fd00::1"], [], False),
    (["224.0.0.1"], [], False),
    (["0.0.0.0"], [], False),
    (["100.64.0.1"], [], False),  # shared address space
    (["93.184.216.34"], [], True),
    (["10.1.2.3"], ["10.0.0.0/8"], True),
    (["10.1.2.3"], ["internal.example"], True),
])
def test_url_policy_after_dns_resolution(ips, allow, ok):
    from soraflow.tasks.ingest.url_policy import UrlRefused, check_url

    c = HttpConfig(allow_hosts=allow)
    if ok:
        assert check_url("https://internal.example/x", c, resolve=lambda h, p: ips)
    else:
        with pytest.raises(UrlRefused, match="refused"):
            check_url("https://internal.example/x", c, resolve=lambda h, p: ips)


@pytest.mark.parametrize(
    "target",
    ["http://169.254.169.254/latest/meta-data", "http://10.0.0.1/admin", "http://[::1]:1/x", "http://0.0.0.0:1/"],
)
def test_redirect_from_allowed_host_to_refused_one(server, cfg, tmp_path, target):
    server.inject("/f.bin", "redirect", to=target)
    with pytest.raises(BadInputError, match="refused"):
        download_file(f"{server.base_url}/f.bin", tmp_path / "f.bin", cfg=cfg, sleep=Sleeps())
    server.inject("/data.json", "redirect", to=target)
    with pytest.raises(BadInputError, match="refused"):
        get_json(f"{server.base_url}/data.json", cfg=cfg, sleep=Sleeps())
    assert not (tmp_path / "f.bin").exists()


def test_secret_headers_dropped_on_cross_origin_redirect(server, tmp_path):
    """Authorization, X-API-Key and configured secret headers reach the first origin only."""
    c = HttpConfig(backoff_base_s=0, allow_hosts=LOOPBACK, secret_headers=["X-Custom-Secret"])
    headers = {"Authorization": SECRET, "X-API-Key": SECRET, "X-Custom-Secret": SECRET, "X-Plain": "kept"}
    with ScriptedServer() as other:
        other.files["/f.bin"] = BODY
        other.files["/data.json"] = b"[1]"
        server.inject("/f.bin", "redirect", to=f"{other.base_url}/f.bin")
        res = download_file(f"{server.base_url}/f.bin", tmp_path / "f.bin", cfg=c, headers=headers, sleep=Sleeps())
        server.inject("/data.json", "redirect", to=f"{other.base_url}/data.json")
        assert get_json(f"{server.base_url}/data.json", cfg=c, headers=headers, sleep=Sleeps())[0] == [1]
        assert res.sha256 == SHA
        for r in server.log:
            assert r["headers"]["X-API-Key"] == SECRET  # the first origin gets them
        assert len(other.log) == 2
        for r in other.log:
            sent = {k.lower(): v for k, v in r["headers"].items()}
            assert SECRET not in sent.values(), sent
            assert sent["x-plain"] == "kept"


def test_same_origin_redirect_keeps_headers(server, cfg, tmp_path):
    server.inject("/short", "redirect", to="/f.bin")
    download_file(
        f"{server.base_url}/short", tmp_path / "f.bin", cfg=cfg, headers={"X-API-Key": SECRET}, sleep=Sleeps()
    )
    assert server.requests_to("/f.bin")[0]["headers"]["X-API-Key"] == SECRET


def test_redirect_hops_are_bounded(server, tmp_path):
    c = HttpConfig(allow_hosts=LOOPBACK, max_redirects=3)
    for i in range(5):
        server.inject(f"/r{i}", "redirect", to=f"/r{i + 1}")
    with pytest.raises(BadInputError, match="more than 3 redirects"):
        download_file(f"{server.base_url}/r0", tmp_path / "f.bin", cfg=c, sleep=Sleeps())


def test_trickling_server_hits_the_total_deadline(server, tmp_path):
    """One byte every 50 ms never trips the per-read timeout; the total deadline ends it."""
    from soraflow.tasks.ingest.http import DeadlineError

    c = HttpConfig(timeout_s=5, deadline_s=0.6, listing_deadline_s=0.6, allow_hosts=LOOPBACK)
    server.inject("/f.bin", "trickle", n=2000)
    t0 = time.monotonic()
    with pytest.raises(DeadlineError, match="deadline"):
        download_file(f"{server.base_url}/f.bin", tmp_path / "f.bin", cfg=c, sleep=Sleeps())
    server.inject("/data.json", "trickle", n=2000)
    with pytest.raises(DeadlineError, match="deadline"):
        get_json(f"{server.base_url}/data.json", cfg=c, sleep=Sleeps())
    assert time.monotonic() - t0 < 4


def test_json_bomb_stops_at_the_json_cap(server, tmp_path):
    """30 MB of JSON in a ~30 kB gzip body: decompression stops at max_json_bytes."""
    import gzip

    c = HttpConfig(allow_hosts=LOOPBACK, max_json_bytes=1_000_000)
    server.files["/bomb.json"] = b"[" + b" " * 30_000_000 + b"]"
    server.inject("/bomb.json", "gzip_json")
    assert len(gzip.compress(server.files["/bomb.json"])) < 100_000
    with pytest.raises(BadInputError, match="over the limit"):
        get_json(f"{server.base_url}/bomb.json", cfg=c, sleep=Sleeps())
    with pytest.raises(BadInputError, match="over the limit"):  # plain, undeclared size: counted
        get_json(f"{server.base_url}/bomb.json", cfg=c, sleep=Sleeps())
    # a metadata file (HD-VG's is 234 MB) has its own, larger cap, bounded the same way
    big = HttpConfig(allow_hosts=LOOPBACK, max_json_bytes=1_000_000, max_metadata_bytes=40_000_000)
    assert get_json(f"{server.base_url}/bomb.json", cfg=big, sleep=Sleeps(), metadata_file=True)[0] == []
    server.inject("/bomb.json", "gzip_json")
    small_meta = HttpConfig(allow_hosts=LOOPBACK, max_metadata_bytes=2_000_000)
    with pytest.raises(BadInputError, match="over the limit of 2000000"):
        get_json(f"{server.base_url}/bomb.json", cfg=small_meta, sleep=Sleeps(), metadata_file=True)


def test_two_concurrent_downloads_of_one_file(server, cfg, tmp_path):
    """Two downloaders (two ingests on one root) of one file take turns: both end with the whole file."""
    server.inject("/f.bin", "reset", times=2, at=150_000)
    results, errors = [], []

    def fetch():
        try:
            results.append(
                download_file(f"{server.base_url}/f.bin", tmp_path / "f.bin", cfg=cfg, sleep=lambda s: time.sleep(0.05))
            )
        except Exception as e:  # noqa: BLE001 - the test reports it
            errors.append(e)

    threads = [threading.Thread(target=fetch) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == [] and [r.sha256 for r in results] == [SHA, SHA]
    assert (tmp_path / "f.bin").read_bytes() == BODY
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


def test_dns_outage_is_retried_not_bad_input(tmp_path, monkeypatch):
    """EAI_AGAIN is the network failing, so it is retried (TransientError), never a rejected row;
    a name that does not exist (EAI_NONAME) is bad input."""
    import socket as socket_module

    from soraflow.tasks.ingest import url_policy

    def again(host, port):
        raise socket_module.gaierror(socket_module.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(url_policy, "_resolve", again)
    monkeypatch.setattr(url_policy.check_url, "__defaults__", (again,))
    sleeps = Sleeps()
    c = HttpConfig(max_retries=2)
    with pytest.raises(TransientError, match="name resolution"):
        download_file("https://videos.example/f.bin", tmp_path / "f.bin", cfg=c, sleep=sleeps)
    assert len(sleeps) == 2

    def none(host, port):
        raise socket_module.gaierror(socket_module.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(url_policy.check_url, "__defaults__", (none,))
    with pytest.raises(BadInputError, match="does not resolve"):
        get_json("https://nowhere.example/x.json", cfg=c, sleep=Sleeps())


def test_dns_rebinding_caught_at_connect(server, tmp_path, monkeypatch):
    """The name resolved to a public address when checked, then to loopback when requests
    connected: the address actually reached is checked too, and refused."""
    import socket as socket_module

    from soraflow.tasks.ingest import url_policy

    real = socket_module.getaddrinfo
    port = int(server.base_url.rsplit(":", 1)[1])

    def rebinding(host, *a, **k):
        return real("127.0.0.1" if host == "rebind.example" else host, *a, **k)

    monkeypatch.setattr(url_policy.check_url, "__defaults__", (lambda h, p: ["93.184.216.34"],))
    monkeypatch.setattr(socket_module, "getaddrinfo", rebinding)
    with pytest.raises(BadInputError, match="loopback"):
        download_file(f"http://rebind.example:{port}/f.bin", tmp_path / "f.bin", cfg=HttpConfig(), sleep=Sleeps())
    assert not (tmp_path / "f.bin").exists()


def test_allow_list_entry_with_a_port_allows_that_port_only(server, tmp_path):
    """`127.0.0.1:<port>` (what the sample source allow-lists) does not open other local ports."""
    from soraflow.tasks.ingest.url_policy import UrlRefused, check_url

    hostport = server.base_url.split("://", 1)[1]
    c = HttpConfig(allow_hosts=[hostport], backoff_base_s=0)
    assert download_file(f"{server.base_url}/f.bin", tmp_path / "f.bin", cfg=c, sleep=Sleeps()).sha256 == SHA
    with pytest.raises(UrlRefused, match="loopback"):
        check_url("http://127.0.0.1:1/admin", c)
    server.inject("/data.json", "redirect", to="http://127.0.0.1:1/admin")
    with pytest.raises(BadInputError, match="loopback"):
        get_json(f"{server.base_url}/data.json", cfg=c, sleep=Sleeps())
    assert check_url("http://[::1]:8080/x", HttpConfig(allow_hosts=["[::1]:8080"]))

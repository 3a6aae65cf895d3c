"""tasks/download: HD-VG, Inter4k and Pexels downloaders.

The first half needs no server: frame-accurate span cuts, fetcher routing (a fake yt-dlp),
archive checks on hand-made evil zips, Pexels file choice. The second half runs the real
entry points against the loopback SampleServer with injected faults. Sleeps are recorded.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import stat
import zipfile
from pathlib import Path

import numpy as np
import pytest
from soraflow.configs.schema import HttpConfig, SourceConfig
from soraflow.storage.layout import DataRoot
from soraflow.storage.data.manifest import COLUMNS, validate_rows
from soraflow.storage.data.video_io import probe_video, read_frames, sha256_file, write_video
from soraflow.tasks.ingest.http import BadInputError
from soraflow.tasks.ingest.sources import (
    download_items,
    hdvg,
    inter4k,
    list_items,
    pexels,
)

KEY = "pexels-test-KEY-0a1b2c3d4e5f"


class Sleeps(list):
    def __call__(self, s: float) -> None:
        self.append(s)


def marked_frames(n: int, h: int = 64, w: int = 96) -> np.ndarray:
    """Frame k shows k in binary as 8 black/white bars, so a cut can be checked frame for frame."""
    f = np.zeros((n, h, w, 3), np.uint8)
    for k in range(n):
        for b in range(8):
            if (k >> b) & 1:
                f[k, :, b * 12 : (b + 1) * 12] = 255
    return f


def frame_index(frame: np.ndarray) -> int:
    return sum(1 << b for b in range(8) if frame[:, b * 12 + 2 : (b + 1) * 12 - 2].mean() > 128)


def files_under(path: Path) -> set[Path]:
    return {p for p in path.rglob("*") if p.is_file()}


@pytest.fixture
def http_cfg():
    return HttpConfig(timeout_s=5, max_retries=3, backoff_base_s=1.0, backoff_max_s=30.0, allow_hosts=["127.0.0.1"])


# ---------------------------------------------------------------- HD-VG: spans, routing, ids (no server)


@pytest.mark.parametrize("fps", [30.0, 30000 / 1001])
def test_cut_span_is_frame_accurate(tmp_path, fps):
    src = write_video(tmp_path / "src.mp4", marked_frames(90), fps)
    n = hdvg.cut_span(src, tmp_path / "span.mp4", 1.0, 2.0)
    ids = [frame_index(f) for f in read_frames(tmp_path / "span.mp4")]
    first = int(np.ceil(1.0 * fps - 1e-6))
    last = int(np.ceil(2.0 * fps - 1e-6)) - 1
    assert ids == list(range(first, last + 1)) and n == len(ids)
    assert probe_video(tmp_path / "span.mp4").fps == pytest.approx(fps, rel=1e-4)


def test_parse_timecode():
    assert hdvg.parse_timecode("00:01:46.479") == pytest.approx(106.479)
    assert hdvg.parse_timecode("01:00:00.000") == 3600.0
    with pytest.raises(BadInputError):
        hdvg.parse_timecode("1:2")


def test_fetcher_routing():
    assert hdvg.choose_fetcher("https://www.youtube.com/watch?v=abc", "auto") == "yt-dlp"
    assert hdvg.choose_fetcher("https://youtu.be/abc", "auto") == "yt-dlp"
    assert hdvg.choose_fetcher("https://m.youtube.com/watch?v=abc", "auto") == "yt-dlp"
    assert hdvg.choose_fetcher("http://127.0.0.1:8000/videos/abc.mp4", "auto") == "http"
    assert hdvg.choose_fetcher("https://notyoutube.com.evil/x.mp4", "auto") == "http"
    assert hdvg.choose_fetcher("https://www.youtube.com/watch?v=abc", "http") == "http"
    assert hdvg.choose_fetcher("http://127.0.0.1/x.mp4", "yt-dlp") == "yt-dlp"


def test_ytdlp_options(tmp_path):
    opts = hdvg.ytdlp_options(tmp_path / "v.mp4", HttpConfig())
    assert opts["outtmpl"] == {"default": str(tmp_path / "v.mp4")}
    assert opts["noplaylist"] is True and "height<=720" in opts["format"] and "mp4" in opts["format"]


def _hdvg_item(vid: str, url: str, clip_id: str | None = None) -> dict:
    return {
        "video_id": vid,
        "url": url,
        "clips": [
            {
                "name": f"{vid}.0.mp4",
                "span": ["00:00:00.500", "00:00:02.500"],
                "fps": 30.0,
                "scenes": [
                    {"scene_cut": [30, -1], "clip_id": clip_id or f"{vid}.0_1", "caption": "second"},
                    {"scene_cut": [0, 30], "clip_id": f"{vid}.0_0", "caption": "first"},
                ],
            }
        ],
    }


def test_auto_fetcher_uses_ytdlp_for_youtube(tmp_path, monkeypatch, http_cfg):
    calls = []

    def fake_ytdlp(url, dest, http, session, sleep):
        calls.append((url, Path(dest)))
        write_video(dest, marked_frames(90), 30.0)

    def no_http(*a, **k):
        raise AssertionError("the http fetcher must not be used for YouTube")

    monkeypatch.setitem(hdvg.FETCHERS, "yt-dlp", fake_ytdlp)
    monkeypatch.setitem(hdvg.FETCHERS, "http", no_http)
    root = DataRoot(tmp_path / "data")
    source = SourceConfig(kind="hdvg", url="http://127.0.0.1:1/hdvg_0.json", fetcher="auto")
    rows = download_items(
        source, [_hdvg_item("abcDEF_123", "https://www.youtube.com/watch?v=abcDEF_123")], root, http_cfg
    )
    assert [c[0] for c in calls] == ["https://www.youtube.com/watch?v=abcDEF_123"]
    assert calls[0][1].parent == root.tmp / "hdvg"
    assert [r["status"] for r in rows] == ["ok", "ok"]
    # one row per scene, in frame order, windows from scene_cut / fps (end -1 = to the span's end)
    assert [(r["clip_id"], r["start_s"], r["end_s"], r["text"]) for r in rows] == [
        ("abcDEF_123.0_0", 0.0, 1.0, "first"),
        ("abcDEF_123.0_1", 1.0, None, "second"),
    ]
    span = root.raw("hdvg", "abcDEF_123.0")
    assert all(r["path"] == str(span) and r["caption_source"] == "source" for r in rows)
    ids = [frame_index(f) for f in read_frames(span)]
    assert ids == list(range(15, 75))  # span 0.5 s .. 2.5 s at 30 fps
    assert not (root.tmp / "hdvg" / "abcDEF_123.mp4").exists()  # the full video is dropped once cut
    validate_rows(rows)
    # again: the span exists and probes, nothing is fetched
    assert (
        download_items(source, [_hdvg_item("abcDEF_123", "https://www.youtube.com/watch?v=abcDEF_123")], root, http_cfg)
        == rows
    )
    assert len(calls) == 1


def test_unsafe_ids_never_leave_the_root(tmp_path, monkeypatch, http_cfg):
    def fake(url, dest, http, session, sleep):
        write_video(dest, marked_frames(90), 30.0)

    monkeypatch.setitem(hdvg.FETCHERS, "http", fake)
    root = DataRoot(tmp_path / "data")
    source = SourceConfig(kind="hdvg", url="http://127.0.0.1:1/hdvg_0.json", fetcher="http")
    items = [
        _hdvg_item("../../evil", "http://127.0.0.1:1/videos/evil.mp4"),
        _hdvg_item("a/b", "http://127.0.0.1:1/videos/ab.mp4"),
        _hdvg_item("good", "http://127.0.0.1:1/videos/good.mp4", clip_id="../../escape"),
    ]
    before = files_under(tmp_path)
    rows = download_items(source, items, root, http_cfg)
    new = files_under(tmp_path) - before
    assert all(root.root in p.parents for p in new)
    assert not list(tmp_path.glob("evil*")) and not (tmp_path / "escape.mp4").exists()
    bad = [r for r in rows if r["status"] == "rejected"]
    assert [r["video_id"] for r in bad] == ["../../evil", "a/b", "good"]
    assert all("unsafe id" in r["error"] and r["path"] is None for r in bad)
    assert [r["clip_id"] for r in rows if r["status"] == "ok"] == ["good.0_0"]


# ---------------------------------------------------------------- Inter4k: archive checks (no server)


def _zip(entries: list[tuple], path: Path) -> Path:
    """entries: (name, data) or (name, data, unix_mode)."""
    with zipfile.ZipFile(path, "w") as zf:
        for e in entries:
            name, data = e[0], e[1]
            info = zipfile.ZipInfo(name)
            if len(e) > 2:
                info.external_attr = e[2] << 16
            info.create_system = 3
            zf.writestr(info, data)
    return path


@pytest.mark.parametrize(
    "entry, why",
    [
        (("Inter4K/60fps/UHD/../../../evil.mp4", b"x"), "'..'"),
        (("/etc/evil.mp4", b"x"), "absolute"),
        (("C:/evil.mp4", b"x"), "absolute"),
        (("Inter4K/60fps/UHD/link.mp4", b"/etc/passwd", stat.S_IFLNK | 0o777), "not a regular file"),
        (("Inter4K/60fps/UHD/fifo.mp4", b"", stat.S_IFIFO | 0o644), "not a regular file"),
        (("Inter4K/60fps/UHD/big.mp4", b"y" * 5000), "over the per-file limit"),
        (("Inter4K/notes/readme.txt", b"hi"), "outside the layout"),
        (("Inter4K\\60fps\\UHD\\3.mp4", b"x"), "backslash"),
    ],
)
def test_check_entries_refuses(tmp_path, entry, why):
    zpath = _zip([("Inter4K/60fps/UHD/1.mp4", b"ok"), entry], tmp_path / "a.zip")
    with zipfile.ZipFile(zpath) as zf, pytest.raises(BadInputError, match="refused archive entry") as ei:
        inter4k.check_entries(zf, member_cap=1000, total_cap=10_000)
    assert why in str(ei.value) and repr(entry[0])[1:-1][:20] in str(ei.value)


def test_check_entries_total_cap_and_order(tmp_path):
    zpath = _zip([(f"Inter4K/60fps/UHD/{n}.mp4", b"z" * 600) for n in (10, 2, 1)], tmp_path / "a.zip")
    with zipfile.ZipFile(zpath) as zf:
        assert [m["video_id"] for m in inter4k.check_entries(zf, 1000, 10_000)] == ["1", "2", "10"]
        with pytest.raises(BadInputError, match="total"):
            inter4k.check_entries(zf, 1000, 1500)


def test_extract_counts_bytes_not_only_declared_sizes(tmp_path):
    """A member whose header declares fewer bytes than it holds is refused while streaming."""
    zpath = _zip([("Inter4K/60fps/UHD/1.mp4", b"A" * 5000)], tmp_path / "a.zip")
    raw = bytearray(zpath.read_bytes())
    # Lie in the central directory: file_size 5000 -> 50 (offset 24 of the entry).
    cd = raw.rfind(b"PK\x01\x02")
    raw[cd + 24 : cd + 28] = (50).to_bytes(4, "little")
    zpath.write_bytes(bytes(raw))
    with zipfile.ZipFile(zpath) as zf:
        [m] = inter4k.check_entries(zf, 1000, 10_000)  # the declared size passes ...
        with pytest.raises(BadInputError):  # ... the bytes do not
            inter4k.extract_member(zf, m, tmp_path / "out" / "1.mp4", 1000, [10_000])
    assert not (tmp_path / "out" / "1.mp4").exists()


# ---------------------------------------------------------------- Pexels: file choice, key (no server)


def test_choose_file():
    files = [
        {"link": "sd", "quality": "sd", "width": 640, "height": 360, "size": 1000, "file_type": "video/mp4"},
        {"link": "hd", "quality": "hd", "width": 1280, "height": 720, "size": 5000, "file_type": "video/mp4"},
        {"link": "hd2", "quality": "hd", "width": 1920, "height": 1080, "size": 9000, "file_type": "video/mp4"},
        {"link": "uhd", "quality": "uhd", "width": 3840, "height": 2160, "size": 50_000, "file_type": "video/mp4"},
        {"link": "webm", "quality": "hd", "width": 4000, "height": 3000, "size": 10, "file_type": "video/webm"},
    ]
    assert pexels.choose_file(files, "hd", 100_000)["link"] == "hd2"
    assert pexels.choose_file(files, "hd", 6000)["link"] == "hd"
    assert pexels.choose_file(files, "uhd", 10_000)["link"] == "hd2"  # preferred too big: largest allowed
    assert pexels.choose_file(files, "sd", 100_000, min_width=1000)["link"] == "uhd"  # no sd that wide
    assert pexels.choose_file(files, "hd", 500)["link"] == "sd"  # nothing allowed: smallest
    assert pexels.choose_file([], "hd", 500) is None


def test_pexels_needs_key(tmp_path, monkeypatch, http_cfg):
    monkeypatch.delenv("PEXELS_API_KEY", raising=False)
    with pytest.raises(BadInputError, match="set PEXELS_API_KEY"):
        list_items(SourceConfig(kind="pexels", url="http://127.0.0.1:1"), http_cfg, DataRoot(tmp_path))


# ================================================================ against a loopback source server
#
# MiniSource serves the three sources' routes (HD-VG metadata + videos, the Inter4K redirect +
# zip, the Pexels API + files) with Range support, faults injected per path prefix (reset,
# truncate, 429, 500, 503, 404, corrupt, not_video) and a log of every request.

import socket  # noqa: E402
import struct  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from urllib.parse import parse_qs, urlsplit  # noqa: E402

from soraflow.tasks.ingest.http import TransientError  # noqa: E402
from loopback import LoopbackServer  # noqa: E402


def _mp4(frames: int = 90, fps: float = 30.0, offset: int = 0) -> bytes:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        p = write_video(Path(d) / "v.mp4", marked_frames(frames + offset)[offset:], fps)
        return p.read_bytes()


class MiniSource:
    def __init__(self, api_key: str = KEY, request_budget: int | None = None, refill_after: int = 1):
        self.files: dict[str, tuple[bytes, str]] = {}
        self.redirects: dict[str, str] = {}
        self.pexels_videos: list[dict] = []
        self.api_key = api_key
        self.budget, self.refill_after, self._budget0, self._denied = request_budget, refill_after, request_budget, 0
        self.ratelimit_remaining: int | None = None  # when set, sent (and counted down) on API 200s
        self.faults: list[list] = []  # [prefix, fault, times_left, opts]
        self.requests_log: list[dict] = []
        self.lock = threading.Lock()
        self.server = LoopbackServer(self._handle)
        self.httpd, self.base_url = self.server.httpd, self.server.base_url

    def __enter__(self):
        self.server.start()
        return self

    def __exit__(self, *exc):
        self.server.stop()

    def inject(self, path_prefix: str, fault: str, times: int = 1, **opts):
        self.faults.append([path_prefix, fault, times, opts])

    def log_for(self, prefix: str) -> list[dict]:
        return [r for r in self.requests_log if r["path"].startswith(prefix)]

    # ------------------------------------------------------------ content

    def add_hdvg(self, vid: str, clips: dict, frames: int = 150, fps: float = 30.0) -> None:
        self.files[f"/videos/{vid}.mp4"] = (_mp4(frames, fps), "video/mp4")
        meta = json.loads(self.files.get("/metafiles/hdvg_0.json", (b"{}", ""))[0])
        meta[vid] = {"url": f"{self.base_url}/videos/{vid}.mp4", "clip": clips}
        self.files["/metafiles/hdvg_0.json"] = (json.dumps(meta).encode(), "application/json")

    def add_pexels(self, vid: int, slug: str, frames: int = 30) -> None:
        body = _mp4(frames, 30.0, offset=vid % 7)
        files = []
        for q, w, h in (("sd", 48, 32), ("hd", 96, 64)):
            path = f"/files/{vid}_{q}.mp4"
            self.files[path] = (body, "video/mp4")
            files.append(
                {
                    "id": vid * 10 + len(files),
                    "quality": q,
                    "file_type": "video/mp4",
                    "width": w,
                    "height": h,
                    "fps": 30,
                    "link": self.base_url + path,
                    "size": len(body),
                }
            )
        self.pexels_videos.append(
            {
                "id": vid,
                "width": 96,
                "height": 64,
                "duration": 1,
                "url": f"https://www.pexels.com/video/{slug}-{vid}/",
                "video_files": files,
            }
        )

    # ------------------------------------------------------------ serving

    def _fault_for(self, path: str):
        with self.lock:
            for f in self.faults:
                if path.startswith(f[0]) and f[2] > 0:
                    f[2] -= 1
                    return f[1], f[3]
        return None, {}

    @staticmethod
    def _send(h, code: int, body: bytes = b"", headers: dict | None = None, ctype: str = "application/octet-stream"):
        h.send_response(code)
        h.send_header("Content-Type", ctype)
        for k, v in (headers or {}).items():
            h.send_header(k, str(v))
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def _handle(self, h):
        path = urlsplit(h.path).path
        with self.lock:
            self.requests_log.append({"path": h.path, "headers": dict(h.headers)})
        fault, opts = self._fault_for(path)
        if fault in ("404", "500", "503"):
            return self._send(h, int(fault), b"injected")
        if fault == "429":
            return self._send(h, 429, b"slow down", opts.get("headers"))
        if path in self.redirects:
            h.send_response(302)
            h.send_header("Location", self.redirects[path])
            h.send_header("Content-Length", "0")
            return h.end_headers()
        if path.startswith("/videos/search") or path.startswith("/videos/popular"):
            return self._api(h, parse_qs(urlsplit(h.path).query))
        if path not in self.files:
            return self._send(h, 404, b"not found")
        body, ctype = self.files[path]
        if fault == "not_video":
            body, ctype = b"<html><body>This video is unavailable</body></html>", "text/html"
        if fault == "corrupt":
            body = bytes(len(body) // 2) + body[len(body) // 2 :]  # the header boxes are zeros
        start = 0
        rng = h.headers.get("Range")
        etag = f'"{hashlib.sha256(body).hexdigest()[:16]}"'
        if rng and h.headers.get("If-Range", etag) == etag:  # a changed file is sent whole
            start = int(rng.split("=")[1].split("-")[0])
        part = body[start:]
        headers = {"Accept-Ranges": "bytes", "ETag": etag}
        if start:
            headers["Content-Range"] = f"bytes {start}-{len(body) - 1}/{len(body)}"
        if fault in ("reset", "truncate"):
            h.send_response(206 if start else 200)
            h.send_header("Content-Type", ctype)
            for k, v in headers.items():
                h.send_header(k, v)
            h.send_header("Content-Length", str(len(part)))
            h.end_headers()
            h.wfile.write(part[: len(part) // 2])
            h.wfile.flush()
            time.sleep(0.1)
            if fault == "reset":
                h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                h.connection.close()
            else:
                h.connection.shutdown(socket.SHUT_RDWR)
            h.close_connection = True
            return
        self._send(h, 206 if start else 200, part, headers, ctype)

    def _api(self, h, q):
        if h.headers.get("Authorization") != self.api_key:
            return self._send(h, 401, b'{"error": "Unauthorized"}', ctype="application/json")
        with self.lock:
            if self.budget is not None:
                if self.budget <= 0:
                    self._denied += 1
                    if self._denied >= self.refill_after:  # the window passes after a while
                        self.budget, self._denied = self._budget0, 0
                    return self._send(h, 429, b"Too Many Requests")
                self.budget -= 1
        page, per_page = int(q.get("page", ["1"])[0]), int(q.get("per_page", ["15"])[0])
        videos = self.pexels_videos
        chunk = videos[(page - 1) * per_page : page * per_page]
        data = {"page": page, "per_page": per_page, "total_results": len(videos), "videos": chunk}
        endpoint = urlsplit(h.path).path
        if page * per_page < len(videos):
            extra = f"&query={q['query'][0]}" if "query" in q else ""
            data["next_page"] = (
                f"{self.next_base or self.base_url}{endpoint}?page={page + 1}&per_page={per_page}{extra}"
            )
        headers = {}
        if self.ratelimit_remaining is not None:
            self.ratelimit_remaining = max(0, self.ratelimit_remaining - 1)
            headers = {
                "X-Ratelimit-Limit": 20000,
                "X-Ratelimit-Remaining": self.ratelimit_remaining,
                "X-Ratelimit-Reset": int(time.time()) + 5,
            }
        self._send(h, 200, json.dumps(data).encode(), headers, "application/json")

    next_base: str | None = None


def _fast_http(**kw) -> HttpConfig:
    kw.setdefault("allow_hosts", ["127.0.0.1"])  # the test server is on loopback
    return HttpConfig(timeout_s=5, max_retries=3, backoff_base_s=1.0, backoff_max_s=30.0, **kw)


HDVG_CLIPS = {
    "vidA.0.mp4": {
        "span": ["00:00:00.500", "00:00:03.500"],
        "fps": 30.0,
        "scene_split": [  # not in order, as in the real file
            {"scene_cut": [45, -1], "clip_id": "vidA.0_1", "caption": "a blue square moving up"},
            {"scene_cut": [0, 45], "clip_id": "vidA.0_0", "caption": "a red circle moving left"},
        ],
    },
    "vidA.1.mp4": {
        "span": ["00:00:04.000", "00:00:05.000"],
        "fps": 30.0,
        "scene_split": [{"scene_cut": [0, -1], "clip_id": "vidA.1_0", "caption": "a green triangle moving down"}],
    },
}


@pytest.fixture
def src():
    with MiniSource() as s:
        s.add_hdvg("vidA", HDVG_CLIPS)
        s.add_hdvg(
            "vidB",
            {
                "vidB.0.mp4": {
                    "span": ["00:00:01.000", "00:00:02.000"],
                    "fps": 30.0,
                    "scene_split": [{"scene_cut": [0, -1], "clip_id": "vidB.0_0", "caption": "b"}],
                }
            },
        )
        s.add_hdvg(
            "vidC",
            {
                "vidC.0.mp4": {
                    "span": ["00:00:00.000", "00:00:01.000"],
                    "fps": 30.0,
                    "scene_split": [{"scene_cut": [0, 10], "clip_id": "vidC.0_0", "caption": "c"}],
                }
            },
        )
        yield s


def _hdvg_source(s: MiniSource, **kw) -> SourceConfig:
    return SourceConfig(kind="hdvg", url=f"{s.base_url}/metafiles/hdvg_0.json", fetcher="http", **kw)


def test_hdvg_rows_one_per_scene(src, tmp_path):
    root, sleeps = DataRoot(tmp_path / "data"), Sleeps()
    source = _hdvg_source(src)
    items = list_items(source, _fast_http(), root, sleep=sleeps)
    assert [i["video_id"] for i in items] == ["vidA", "vidB", "vidC"]
    json.dumps(items)  # work items are JSON
    rows = download_items(source, items, root, _fast_http(), sleep=sleeps)
    validate_rows(rows)
    assert set(rows[0]) == set(COLUMNS)
    got = [(r["video_id"], r["clip_id"], r["start_s"], r["end_s"], r["text"], Path(r["path"]).name) for r in rows]
    assert got == [
        ("vidA", "vidA.0_0", 0.0, 1.5, "a red circle moving left", "vidA.0.mp4"),
        ("vidA", "vidA.0_1", 1.5, None, "a blue square moving up", "vidA.0.mp4"),
        ("vidA", "vidA.1_0", 0.0, None, "a green triangle moving down", "vidA.1.mp4"),
        ("vidB", "vidB.0_0", 0.0, None, "b", "vidB.0.mp4"),
        ("vidC", "vidC.0_0", 0.0, 10 / 30, "c", "vidC.0.mp4"),
    ]
    for r in rows:
        assert r["status"] == "ok" and r["source"] == "hdvg" and r["caption_source"] == "source"
        assert r["source_url"] == f"{src.base_url}/videos/{r['video_id']}.mp4"
        assert r["sha256"] == sha256_file(r["path"]) and Path(r["path"]).parent == root.raw_dir("hdvg")
    span0 = root.raw("hdvg", "vidA.0")
    assert [frame_index(f) for f in read_frames(span0)] == list(range(15, 105))  # 0.5 s .. 3.5 s at 30 fps
    assert (rows[0]["num_frames"], rows[0]["fps"], rows[0]["height"], rows[0]["width"]) == (90, 30.0, 64, 96)
    assert [frame_index(f) for f in read_frames(root.raw("hdvg", "vidA.1"))] == list(range(120, 150))
    assert sleeps == []
    assert not list((root.tmp / "hdvg").glob("*"))  # full videos dropped after cutting

    # Re-running fetches nothing and gives the same rows.
    n = len(src.log_for("/videos/"))
    assert download_items(source, items, root, _fast_http(), sleep=sleeps) == rows
    assert len(src.log_for("/videos/")) == n == 3


def test_hdvg_max_videos(src, tmp_path):
    items = list_items(_hdvg_source(src, max_videos=2), _fast_http(), DataRoot(tmp_path))
    assert [i["video_id"] for i in items] == ["vidA", "vidB"]


def test_hdvg_404_is_a_rejected_row_while_others_succeed(src, tmp_path):
    root = DataRoot(tmp_path / "data")
    source = _hdvg_source(src)
    items = list_items(source, _fast_http(), root, sleep=Sleeps())
    src.inject("/videos/vidB.mp4", "404")
    rows = download_items(source, items, root, _fast_http(), sleep=Sleeps())
    by_vid = {}
    for r in rows:
        by_vid.setdefault(r["video_id"], []).append(r["status"])
    assert by_vid == {"vidA": ["ok", "ok", "ok"], "vidB": ["rejected"], "vidC": ["ok"]}
    bad = [r for r in rows if r["status"] == "rejected"][0]
    assert f"{src.base_url}/videos/vidB.mp4" in bad["error"] and "404" in bad["error"] and bad["clip_id"] == "vidB.0_0"
    assert len(src.log_for("/videos/vidB.mp4")) == 1  # a 404 is not retried


@pytest.mark.parametrize("fault", ["corrupt", "not_video"])
def test_hdvg_unreadable_video_rejected(src, tmp_path, fault):
    root = DataRoot(tmp_path / "data")
    source = _hdvg_source(src)
    items = list_items(source, _fast_http(), root, sleep=Sleeps())
    src.inject("/videos/vidC.mp4", fault)
    rows = download_items(source, items, root, _fast_http(), sleep=Sleeps())
    bad = [r for r in rows if r["status"] == "rejected"]
    assert [r["video_id"] for r in bad] == ["vidC"] and "not a readable video" in bad[0]["error"]
    assert "/videos/vidC.mp4" in bad[0]["error"]
    assert not root.raw("hdvg", "vidC.0").exists() and not (root.tmp / "hdvg" / "vidC.mp4").exists()
    assert sum(r["status"] == "ok" for r in rows) == 4


def test_hdvg_network_faults_retry_then_succeed(src, tmp_path):
    root, sleeps = DataRoot(tmp_path / "data"), Sleeps()
    source = _hdvg_source(src)
    src.inject("/metafiles/", "503")
    items = list_items(source, _fast_http(), root, sleep=sleeps)
    src.inject("/videos/vidA.mp4", "reset")
    src.inject("/videos/vidB.mp4", "truncate")
    src.inject("/videos/vidC.mp4", "500", times=2)
    rows = download_items(source, items, root, _fast_http(), sleep=sleeps)
    assert all(r["status"] == "ok" for r in rows)
    assert len(sleeps) == 5
    for vid in ("vidA", "vidB"):
        assert "Range" in src.log_for(f"/videos/{vid}.mp4")[1]["headers"]  # resumed, not restarted


def test_outage_raises_transient(src, tmp_path):
    root = DataRoot(tmp_path / "data")
    source = _hdvg_source(src)
    items = list_items(source, _fast_http(), root, sleep=Sleeps())
    src.inject("/videos/vidA.mp4", "503", times=100)
    with pytest.raises(TransientError, match="vidA"):
        download_items(source, items, root, _fast_http(), sleep=Sleeps())


# ---------------------------------------------------------------- Inter4k over HTTP


def _inter4k_zip(entries: list[tuple]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for e in entries:
            info = zipfile.ZipInfo(e[0])
            info.create_system = 3
            info.external_attr = (e[2] if len(e) > 2 else stat.S_IFREG | 0o644) << 16
            zf.writestr(info, e[1])
    return buf.getvalue()


@pytest.fixture
def i4k():
    with MiniSource() as s:
        good = [("Inter4K/", b"", stat.S_IFDIR | 0o755)] + [
            (f"Inter4K/60fps/UHD/{n}.mp4", _mp4(20, 60.0, offset=n)) for n in (1, 2, 3)
        ]
        s.files["/Inter4K.zip"] = (_inter4k_zip(good), "application/zip")
        s.redirects["/inter4KUHD"] = "/Inter4K.zip"
        evil = {
            "dotdot": [("Inter4K/60fps/UHD/../../../../escape.mp4", b"x")],
            "absolute": [("/tmp/escape.mp4", b"x")],
            "symlink": [("Inter4K/60fps/UHD/9.mp4", b"/etc/passwd", stat.S_IFLNK | 0o777)],
            "oversized": [("Inter4K/60fps/UHD/9.mp4", b"\0" * 300_000)],
            "stray": [("Inter4K/60fps/UHD/1.mp4", good[1][1]), ("evil.sh", b"#!/bin/sh")],
        }
        for name, entries in evil.items():
            s.files[f"/evil/{name}.zip"] = (_inter4k_zip(entries), "application/zip")
        yield s


def test_inter4k_redirect_extract_and_rows(i4k, tmp_path):
    root = DataRoot(tmp_path / "data")
    source = SourceConfig(kind="inter4k", url=f"{i4k.base_url}/inter4KUHD", max_videos=2)
    i4k.inject("/Inter4K.zip", "reset")
    items = list_items(source, _fast_http(), root, sleep=Sleeps())
    assert [i["video_id"] for i in items] == ["1", "2"]
    assert "Range" in i4k.log_for("/Inter4K.zip")[1]["headers"]  # the zip download resumed
    rows = download_items(source, items, root, _fast_http())
    assert [(r["video_id"], r["status"], r["fps"], r["num_frames"]) for r in rows] == [
        ("1", "ok", 60.0, 20),
        ("2", "ok", 60.0, 20),
    ]
    assert rows[0]["source_url"] == f"{i4k.base_url}/inter4KUHD#Inter4K/60fps/UHD/1.mp4"
    assert [frame_index(f) for f in read_frames(rows[1]["path"])] == list(range(2, 22))
    assert not root.raw("inter4k", "3").exists()  # beyond max_videos

    # Listing all of them reuses the kept zip; listing again reuses the extracted files.
    n = len(i4k.log_for("/Inter4K.zip"))
    everything = SourceConfig(kind="inter4k", url=f"{i4k.base_url}/inter4KUHD")
    assert [i["video_id"] for i in list_items(everything, _fast_http(), root)] == ["1", "2", "3"]
    assert [i["video_id"] for i in list_items(everything, _fast_http(), root)] == ["1", "2", "3"]
    assert len(i4k.log_for("/Inter4K.zip")) == n
    assert not list((root.tmp / "inter4k").glob("*.zip"))  # deleted once fully extracted


@pytest.mark.parametrize(
    "name, entry",
    [
        ("dotdot", "../"),
        ("absolute", "/tmp/escape"),
        ("symlink", "9.mp4"),
        ("oversized", "9.mp4"),
        ("stray", "evil.sh"),
    ],
)
def test_inter4k_evil_archives_refused(i4k, tmp_path, name, entry):
    root = DataRoot(tmp_path / "data")
    source = SourceConfig(kind="inter4k", url=f"{i4k.base_url}/evil/{name}.zip", max_file_bytes=100_000)
    before = files_under(tmp_path)
    with pytest.raises(BadInputError, match="refused archive entry") as ei:
        list_items(source, _fast_http(), root)
    assert entry in str(ei.value)
    assert not (root.raw_dir("inter4k").exists() and any(root.raw_dir("inter4k").iterdir()))
    new = files_under(tmp_path) - before
    assert all(root.root in p.parents for p in new)
    assert not Path("/tmp/escape.mp4").exists() and not (tmp_path / "escape.mp4").exists()


# ---------------------------------------------------------------- Pexels over HTTP


@pytest.fixture
def px(monkeypatch):
    monkeypatch.setenv("PEXELS_API_KEY", KEY)
    with MiniSource() as s:
        for i in range(1, 8):
            s.add_pexels(100 + i, f"a-red-circle-moving-left-{i}")
        yield s


def test_pexels_pagination_stops_at_max_videos(px, tmp_path):
    root = DataRoot(tmp_path / "data")
    source = SourceConfig(kind="pexels", url=px.base_url, query="circle", per_page=2, max_videos=5)
    items = list_items(source, _fast_http(), root, sleep=Sleeps())
    assert [i["video_id"] for i in items] == ["101", "102", "103", "104", "105"]
    pages = px.log_for("/videos/search")
    assert len(pages) == 3  # 2 + 2 + 1 of page 3; page 4 never asked for
    assert "query=circle" in pages[0]["path"] and "page=3" in pages[2]["path"]
    assert all(r["headers"]["Authorization"] == KEY for r in pages)
    assert items[0]["file"]["quality"] == "hd" and items[0]["page_url"].startswith("https://www.pexels.com/video/")
    popular = list_items(SourceConfig(kind="pexels", url=px.base_url, per_page=3), _fast_http(), root)
    assert len(popular) == 7 and len(px.log_for("/videos/popular")) == 3  # all pages, up to the last


def test_pexels_download_rows_resume_and_idempotent(px, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    root, sleeps = DataRoot(tmp_path / "data"), Sleeps()
    source = SourceConfig(kind="pexels", url=px.base_url, query="circle", per_page=3, max_videos=4)
    items = list_items(source, _fast_http(), root, sleep=sleeps)
    px.inject("/files/101_hd", "reset")
    px.inject("/files/102_hd", "429", headers={"Retry-After": "3"})
    px.inject("/files/103_hd", "not_video")
    px.inject("/files/104_hd", "404")
    rows = download_items(source, items, root, _fast_http(), sleep=sleeps)
    validate_rows(rows)
    assert [r["status"] for r in rows] == ["ok", "ok", "rejected", "rejected"]
    ok = rows[0]
    assert ok["sha256"] == hashlib_sha(px.files["/files/101_hd.mp4"][0])  # the served file, byte for byte
    assert ok["source_url"] == "https://www.pexels.com/video/a-red-circle-moving-left-1-101/" and ok["text"] is None
    assert ok["path"] == str(root.raw("pexels", "101")) and (ok["height"], ok["width"]) == (64, 96)
    assert "Range" in px.log_for("/files/101_hd")[1]["headers"]
    assert 3.0 in sleeps
    assert (
        "not a readable video" in rows[2]["error"]
        and "404" in rows[3]["error"]
        and "/files/104_hd.mp4" in rows[3]["error"]
    )
    assert not any("Authorization" in r["headers"] for r in px.log_for("/files/"))  # the key stays with the API
    n = len(px.log_for("/files/"))
    again = download_items(source, items, root, _fast_http(), sleep=sleeps)
    assert [r["status"] for r in again] == ["ok", "ok", "ok", "ok"]
    assert len(px.log_for("/files/")) == n + 2  # only the two that had failed
    everything = caplog.text + json.dumps(rows + again) + json.dumps(items)
    assert KEY not in everything


def hashlib_sha(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def test_pexels_rate_limit_remaining_zero_waits_for_reset(px, tmp_path):
    px.ratelimit_remaining = 2
    sleeps = Sleeps()
    source = SourceConfig(kind="pexels", url=px.base_url, per_page=2, max_videos=6)
    items = list_items(source, _fast_http(), DataRoot(tmp_path), sleep=sleeps)
    assert len(items) == 6
    # Remaining hits 0 on page 2: wait for the reset before page 3; page 3 ends the listing, so no wait after it.
    assert len(sleeps) == 1 and 3.0 <= sleeps[0] <= 5.5


def test_pexels_budget_exhausted_429_waits_and_retries(monkeypatch, tmp_path):
    monkeypatch.setenv("PEXELS_API_KEY", KEY)
    with MiniSource(request_budget=2, refill_after=2) as s:
        for i in range(1, 8):
            s.add_pexels(100 + i, f"clip-{i}")
        sleeps = Sleeps()
        items = list_items(
            SourceConfig(kind="pexels", url=s.base_url, per_page=2), _fast_http(), DataRoot(tmp_path), sleep=sleeps
        )
        assert len(items) == 7
        statuses = len(s.log_for("/videos/popular"))
        assert statuses == 4 + 2  # 4 pages + two 429s (no headers) in between
        assert len(sleeps) == 2 and 0.5 <= sleeps[0] < 1.5 and 1.0 <= sleeps[1] < 3.0  # exponential backoff


def test_pexels_wrong_key_and_foreign_next_page(px, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("PEXELS_API_KEY", KEY + "-wrong")
    with pytest.raises(BadInputError, match="401") as ei:
        list_items(SourceConfig(kind="pexels", url=px.base_url), _fast_http(), DataRoot(tmp_path))
    assert KEY not in str(ei.value) and KEY not in repr(ei.value)
    monkeypatch.setenv("PEXELS_API_KEY", KEY)
    with MiniSource() as other:
        px.next_base = other.base_url
        with pytest.raises(BadInputError, match="another host") as ei:
            list_items(SourceConfig(kind="pexels", url=px.base_url, per_page=2), _fast_http(), DataRoot(tmp_path))
        assert other.requests_log == []  # the key was never sent there
    assert KEY not in caplog.text + str(ei.value)


def test_pexels_unsafe_id_rejected(px, tmp_path):
    root = DataRoot(tmp_path / "data")
    items = list_items(SourceConfig(kind="pexels", url=px.base_url, max_videos=1), _fast_http(), root)
    items[0]["video_id"] = "../../../outside"
    before = files_under(tmp_path)
    [row] = download_items(SourceConfig(kind="pexels", url=px.base_url), items, root, _fast_http())
    assert row["status"] == "rejected" and "unsafe id" in row["error"] and row["path"] is None
    assert files_under(tmp_path) == before and px.log_for("/files/") == []


# ---------------------------------------------------------------- hostile metadata, failure isolation, duplicates


def _raw_hdvg_meta(s: MiniSource, text: str) -> None:
    """Serve `text` verbatim as the HD-VG metadata (numbers JSON allows but floats do not hold)."""
    s.files["/metafiles/hdvg_0.json"] = (text.encode(), "application/json")


def test_hdvg_overflowing_numbers_reject_only_their_rows(src, tmp_path):
    """1e400 (inf), 10**400 (no float holds it), absurd fps and timecodes: those rows are rejected
    with the reason; every other video of the file still gives its ok rows."""
    for vid in ("vidX", "vidY", "vidZ", "vidW"):
        src.add_hdvg(vid, {})
    meta = json.loads(src.files["/metafiles/hdvg_0.json"][0])

    def clip(vid, cut="[0, -1]", fps="30.0", span='["00:00:00.000", "00:00:01.000"]'):
        return (
            f'{{"{vid}.0.mp4": {{"span": {span}, "fps": {fps}, '
            f'"scene_split": [{{"scene_cut": {cut}, "clip_id": "{vid}.0_0", "caption": "x"}}]}}}}'
        )

    entries = {vid: json.dumps(meta[vid]).replace('"clip": {}', '"clip": %s') for vid in meta}
    text = "{" + ", ".join([
        f'"vidA": {json.dumps(meta["vidA"])}',
        f'"vidX": {entries["vidX"] % clip("vidX", cut="[1e400, -1]")}',
        f'"vidY": {entries["vidY"] % clip("vidY", cut="[" + "9" * 400 + ", -1]")}',
        f'"vidZ": {entries["vidZ"] % clip("vidZ", fps="1e400")}',
        f'"vidW": {entries["vidW"] % clip("vidW", span=chr(91) + "0, 1e400" + chr(93))}',
    ]) + "}"
    _raw_hdvg_meta(src, text)
    root = DataRoot(tmp_path / "data")
    source = _hdvg_source(src)
    items = list_items(source, _fast_http(), root, sleep=Sleeps())
    rows = download_items(source, items, root, _fast_http(), sleep=Sleeps())
    by_vid = {}
    for r in rows:
        by_vid.setdefault(r["video_id"], []).append(r)
    validate_rows(rows)
    assert set(by_vid) == {"vidA", "vidX", "vidY", "vidZ", "vidW"}
    assert [r["status"] for r in by_vid["vidA"]] == ["ok"] * 3
    assert "bad scene_cut" in by_vid["vidX"][0]["error"] and by_vid["vidX"][0]["status"] == "rejected"
    assert "bad scene_cut" in by_vid["vidY"][0]["error"] and len(by_vid["vidY"][0]["error"]) < 400
    assert "fps" in by_vid["vidZ"][0]["error"] and "out of range" in by_vid["vidZ"][0]["error"]
    assert "out of range" in by_vid["vidW"][0]["error"]


def test_any_error_in_one_item_is_its_rejection(src, tmp_path, monkeypatch):
    """An error of no expected kind (here a RuntimeError in the cutter) rejects that item only."""
    real = hdvg.cut_span

    def flaky(s, dest, a, b, crf=18):
        if "vidB" in str(s):
            raise RuntimeError("cutter crashed")
        return real(s, dest, a, b, crf)

    monkeypatch.setattr(hdvg, "cut_span", flaky)
    root = DataRoot(tmp_path / "data")
    source = _hdvg_source(src)
    rows = download_items(source, list_items(source, _fast_http(), root), root, _fast_http(), sleep=Sleeps())
    bad = [r for r in rows if r["video_id"] == "vidB"]
    assert len(bad) == 1 and bad[0]["status"] == "rejected" and "RuntimeError: cutter crashed" in bad[0]["error"]
    assert all(r["status"] == "ok" for r in rows if r["video_id"] != "vidB")


@pytest.mark.parametrize("fault", [
    lambda: OSError(28, "No space left on device"),
    lambda: __import__("av").error.FFmpegError(28, "No space left on device"),  # how PyAV reports it
    lambda: OSError(5, "Input/output error"),
    lambda: MemoryError(),
])
def test_machine_faults_are_never_rejected_rows(src, tmp_path, monkeypatch, fault):
    from soraflow.storage.faults import EnvironmentFault

    def full(*a, **k):
        raise fault()

    monkeypatch.setattr(hdvg, "cut_span", full)
    root = DataRoot(tmp_path / "data")
    source = _hdvg_source(src)
    items = list_items(source, _fast_http(), root)
    with pytest.raises(EnvironmentFault, match="environment fault"):
        download_items(source, items, root, _fast_http(), sleep=Sleeps())


def test_failing_source_listing_is_one_rejected_row(src, tmp_path):
    from soraflow.tasks.ingest.sources import list_items_or_error

    root = DataRoot(tmp_path / "data")
    bad = SourceConfig(kind="hdvg", url=f"{src.base_url}/metafiles/missing.json", fetcher="http")
    good = _hdvg_source(src)
    rows = []
    for source in (bad, good):
        rows += download_items(
            source, list_items_or_error(source, _fast_http(), root, sleep=Sleeps()), root, _fast_http(), sleep=Sleeps()
        )
    assert (
        rows[0]["status"] == "rejected"
        and "listing the source failed" in rows[0]["error"]
        and "404" in rows[0]["error"]
    )
    assert rows[0]["video_id"] == "hdvg-source"
    assert len(rows) == 6 and all(r["status"] == "ok" for r in rows[1:])


def test_duplicates_end_as_one_ok_row(src, px, tmp_path):
    """The same Pexels video on two pages is listed once; a duplicate HD-VG clip_id is rejected at the merge."""
    from soraflow.storage.data.manifest import mark_duplicates

    px.pexels_videos.insert(3, dict(px.pexels_videos[0]))  # video 101 again, on page 2
    root = DataRoot(tmp_path / "data")
    items = list_items(SourceConfig(kind="pexels", url=px.base_url, query="circle", per_page=2), _fast_http(), root)
    ids = [i["video_id"] for i in items]
    assert sorted(ids) == sorted(set(ids)) and len(ids) == 7

    clips = {"vidD.0.mp4": {"span": ["00:00:00.000", "00:00:02.000"], "fps": 30.0, "scene_split": [
        {"scene_cut": [0, 20], "clip_id": "vidD.0_0", "caption": "first"},
        {"scene_cut": [20, -1], "clip_id": "vidD.0_0", "caption": "same id again"}]}}
    src.add_hdvg("vidD", clips)
    source = _hdvg_source(src)
    rows = download_items(source, list_items(source, _fast_http(), root), root, _fast_http(), sleep=Sleeps())
    rows, n = mark_duplicates(rows)
    d = [r for r in rows if r["video_id"] == "vidD"]
    assert n == 1 and [r["status"] for r in d] == ["ok", "rejected"] and "duplicate" in d[1]["error"]


def test_unsafe_ids_with_newlines_or_control_characters(tmp_path):
    from soraflow.storage.layout import UnsafePathError, safe_id

    for bad in ("77\n", "a\tb", "x\x00", "ok\r", None, "..", "a/b"):
        with pytest.raises(UnsafePathError):
            safe_id(bad)
    assert safe_id("77") == "77" and safe_id(77) == "77"

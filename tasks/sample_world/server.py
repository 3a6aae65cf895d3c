"""SampleServer: the synthetic sample source on 127.0.0.1, speaking the real sources' formats.

    with SampleServer(root_dir, cfg) as server:        # cfg: configs.schema.SampleSourceConfig
        server.base_url                                 # "http://127.0.0.1:<port>"

Routes (GET and HEAD):

  HD-VG     /metafiles/hdvg_0.json       {video_id: {"url", "clip": {"<vid>.0.mp4": {"span", "fps", "scene_split"}}}}
            /videos/<vid>.mp4            the full video: 0.5 s plain padding, the scenes, 0.5 s padding
  Inter4k   /inter4KUHD                  302 -> /Inter4K.zip (Inter4K/60fps/UHD/<n>.mp4: the scenes back to
                                         back, no padding, no captions; at the config's fps, not 60)
            /evil/<kind>.zip             hostile archives for extractor tests (EVIL_ZIPS)
  Pexels    /videos/search?query=..      (also /v1/videos/...) paged listings, `Authorization: <api_key>`
            /videos/popular              page (default 1), per_page (default 15, max 80)
            /videos/videos/<id>          one Video object
            /video-files/<id>/<id>-<quality>_<w>_<h>_<fps>fps.mp4   sd (the config's size), hd (2x), uhd (4x)

HD-VG metadata: each video has ONE span clip "<vid>.0.mp4" whose span covers exactly its scenes
(span start = end of the leading padding, timecodes floored to the millisecond). scene_cut
[start, end] are frame indices relative to the span's first frame with `end` EXCLUSIVE: the real
data's end semantics are ambiguous (official cutters write frames start+1 .. end-1), here frames
start .. end-1 are the scene. scene_split is listed in reverse order, as the real file is not
sorted. fps is the video's frame rate.

Pexels: 200 API responses carry X-Ratelimit-Limit/-Remaining/-Reset; once `request_budget`
authorised API requests were answered, every API request gets 429 {"error": "Too Many Requests"}
without those headers (with Retry-After if `retry_after` is set). A missing or wrong key is 401,
a search without `query` 400, an unknown id 404, all as {"error": "..."} JSON.

Files (every route that serves bytes) honour `Range: bytes=a-b | a- | -n` (206 + Content-Range;
416 + `Content-Range: bytes */size` when the start is past the end) and always send Content-Length.

Tests: `inject(path_prefix, fault, times=1, **opts)` queues faults per prefix of the request path
(query excluded), consumed in order (FAULTS describes each), `requests_log` lists every request
as (method, target, status, range_header) with the query string in `target`, `add_hdvg_entry`,
`add_pexels_video` and `add_file` add odd listings or files, `set_zip` replaces Inter4K.zip.

Generated files go to root_dir/<config hash>/ and are reused when they exist.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import socket
import stat
import struct
import threading
import time
import zipfile
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import parse_qs, urlencode, urlsplit

from soraflow.storage.layout import atomic_write_bytes, safe_id
from soraflow.tasks.sample_world.scenes import plan_videos, render_video, scale_spec

PAD_SECONDS = 0.5  # plain frames before and after the scenes of an HD-VG video
GENERATOR_VERSION = 2  # part of the cache folder's name: bump when the generated files change
PEXELS_QUALITIES = (("sd", 1), ("hd", 2), ("uhd", 4))  # quality -> scale of the config's size
PEXELS_MAX_PER_PAGE = 80
PEXELS_DEFAULT_PER_PAGE = 15
DEFAULT_RATE_LIMIT = 20_000
FAULTS = {
    "reset": "send the headers and about half the body (opts at=<bytes>), then close with a TCP reset",
    "truncate": "declare the full Content-Length, send part of the body (opts at=<bytes>), then close",
    "429": "429 {'error': 'Too Many Requests'}; opts retry_after=<s> (Retry-After), ratelimit_reset=<unix> (X-Ratelimit-Reset)",
    "500": "500 with a JSON error body",
    "503": "503 with a JSON error body",
    "404": "404 with a JSON error body",
    "corrupt": "200, the real bytes garbled after the first KB (same length)",
    "not_video": "200, Content-Type video/mp4, an HTML page as the body",
}
EVIL_ZIPS = {
    "dotdot": "a member '../evil.mp4' (and '../../Inter4K/60fps/UHD/2.mp4')",
    "absolute": "a member '/abs/evil.mp4'",
    "symlink": "Inter4K/60fps/UHD/8.mp4 is a symlink (S_IFLNK) to /etc/passwd",
    "bomb": "Inter4K/60fps/UHD/9.mp4 inflates to 64 MiB of zeros (declared file_size 64 MiB)",
    "all": "all of the above in one archive",
}
_NOT_VIDEO = b"<!DOCTYPE html>\n<html><head><title>Just a moment...</title></head><body><p>Please enable cookies.</p></body></html>\n"


class LogEntry(NamedTuple):
    method: str
    path: str  # the request target, query string included
    status: int
    range: str | None  # the Range header, if any


@dataclass
class _Resp:
    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    rangeable: bool = False  # a file: Range applies


def timecode(seconds: float) -> str:
    """Seconds -> "HH:MM:SS.mmm", floored to the millisecond (so a frame at exactly t stays inside)."""
    ms = int(math.floor(seconds * 1000 + 1e-6))
    h, rest = divmod(ms, 3_600_000)
    m, rest = divmod(rest, 60_000)
    s, ms = divmod(rest, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}.{ms:03d}"


def _fps_label(fps: float) -> str:
    return str(int(fps)) if float(fps).is_integer() else f"{fps:.2f}".rstrip("0")


def _json(obj: Any, status: int = 200, headers: dict | None = None) -> _Resp:
    return _Resp(status, json.dumps(obj, indent=None).encode(), "application/json; charset=utf-8", dict(headers or {}))


def _error(status: int, message: str, headers: dict | None = None) -> _Resp:
    return _json({"error": message}, status, headers)


def _zip_bytes(members: list[tuple[str | zipfile.ZipInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, data in members:
            zf.writestr(name, data)
    return buf.getvalue()


def _symlink_info(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=(2021, 11, 1, 0, 0, 0))
    info.create_system = 3  # unix, so external_attr carries the mode
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


class SampleServer:
    """The loopback sample source; a context manager. See the module docstring for the routes."""

    def __init__(
        self,
        root_dir: str | Path,
        cfg,
        api_key: str = "test-key",
        request_budget: int | None = None,
        retry_after: float | None = None,
        rate_limit: int | None = None,
        port: int = 0,
    ):
        self.cfg = cfg
        self.port = port  # preferred port (0 = any free one); a busy one falls back to any
        self.api_key = api_key
        self.request_budget = request_budget
        self.retry_after = retry_after
        self.rate_limit = rate_limit if rate_limit is not None else (request_budget if request_budget is not None else DEFAULT_RATE_LIMIT)
        key = json.dumps(cfg.model_dump() if hasattr(cfg, "model_dump") else vars(cfg), sort_keys=True, default=str)
        fields = {k: v for k, v in json.loads(key).items() if k != "enabled"}
        digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]
        self.dir = Path(root_dir) / f"v{GENERATOR_VERSION}-{digest}"
        self.requests_log: list[LogEntry] = []
        self.api_requests = 0  # authorised Pexels API requests answered (the budget counts these)
        self._lock = threading.Lock()
        self._faults: dict[str, deque] = {}
        self._extra_hdvg: dict[str, Any] = {}
        self._extra_pexels: list[dict] = []
        self._files: dict[str, tuple[Path | bytes, str]] = {}  # route path -> (file or bytes, content type)
        self._zip_override: bytes | None = None
        self._evil_cache: dict[str, bytes] = {}
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._base_url: str | None = None
        self._reset_at = int(time.time()) + 3600
        self.fps = float(cfg.fps)
        self.pad = max(1, int(round(PAD_SECONDS * self.fps)))
        self.hdvg = plan_videos(cfg, "hdvg")
        self.pexels = plan_videos(cfg, "pexels")
        self.inter4k = plan_videos(cfg, "inter4k")

    # ------------------------------------------------------------ lifecycle

    @property
    def base_url(self) -> str:
        if self._base_url is None:
            raise RuntimeError("SampleServer is not running; use it as a context manager")
        return self._base_url

    def __enter__(self) -> "SampleServer":
        self.generate()
        owner = self

        class Handler(_Handler):
            server_owner = owner

        try:
            httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        except OSError:  # the preferred port is taken
            httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        httpd.daemon_threads = True
        self._httpd = httpd
        self._base_url = f"http://127.0.0.1:{httpd.server_address[1]}"
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="SampleServer", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._base_url = None

    # ------------------------------------------------------------ files

    def hdvg_path(self, vid: str) -> Path:
        return self.dir / "hdvg" / f"{safe_id(vid)}.mp4"

    def inter4k_path(self, vid: str) -> Path:
        return self.dir / "inter4k" / f"{safe_id(vid)}.mp4"

    def pexels_file_name(self, vid: int, quality: str) -> str:
        k = dict(PEXELS_QUALITIES)[quality]
        return f"{vid}-{quality}_{self.cfg.width * k}_{self.cfg.height * k}_{_fps_label(self.fps)}fps.mp4"

    def pexels_path(self, vid: int, quality: str) -> Path:
        return self.dir / "pexels" / str(vid) / self.pexels_file_name(vid, quality)

    @property
    def zip_path(self) -> Path:
        return self.dir / "Inter4K.zip"

    def generate(self) -> None:
        """Write every video (and the Inter4k zip) that is not on disk yet."""
        w, h = self.cfg.width, self.cfg.height
        for plan in self.hdvg:
            path = self.hdvg_path(plan.video_id)
            if not path.exists():
                self._write(path, render_video(plan.scenes, w, h, (self.pad, self.pad)))
        for plan in self.inter4k:  # no padding: these go through scene detection whole
            path = self.inter4k_path(plan.video_id)
            if not path.exists():
                self._write(path, render_video(plan.scenes, w, h))
        for plan in self.pexels:
            for quality, k in PEXELS_QUALITIES:
                path = self.pexels_path(plan.video_id, quality)
                if not path.exists():
                    self._write(path, render_video([scale_spec(s, k) for s in plan.scenes], w * k, h * k))
        if not self.zip_path.exists():
            members = [(f"Inter4K/60fps/UHD/{p.video_id}.mp4", self.inter4k_path(p.video_id).read_bytes()) for p in self.inter4k]
            atomic_write_bytes(self.zip_path, _zip_bytes([("Inter4K/", b""), ("Inter4K/60fps/", b""), ("Inter4K/60fps/UHD/", b""), *members]))

    def _write(self, path: Path, frames) -> None:
        from soraflow.storage.video_io import write_video

        write_video(path, frames, self.fps)

    # ------------------------------------------------------------ listings

    def span_frames(self, plan) -> tuple[int, int]:
        """(first, end exclusive) frame of the scenes inside the full HD-VG video."""
        return self.pad, self.pad + plan.n_frames

    def hdvg_metadata(self) -> dict:
        """The hdvg_0.json object (section 1.2 of docs/data-sources.md)."""
        meta: dict[str, Any] = {}
        for plan in self.hdvg:
            vid = plan.video_id
            a, b = self.span_frames(plan)
            scenes, start = [], 0
            for k, s in enumerate(plan.scenes):
                scenes.append({"scene_cut": [start, start + s.n_frames], "clip_id": f"{vid}.0_{k}", "caption": s.caption})
                start += s.n_frames
            meta[vid] = {
                "url": f"{self.base_url}/videos/{vid}.mp4",
                "clip": {f"{vid}.0.mp4": {"span": [timecode(a / self.fps), timecode(b / self.fps)], "fps": self.fps, "scene_split": scenes[::-1]}},
            }
        with self._lock:
            meta.update(self._extra_hdvg)
        return meta

    def truth(self) -> dict[str, str]:
        """clip_id / Pexels id -> true caption, for every generated scene."""
        out = {f"{p.video_id}.0_{k}": s.caption for p in self.hdvg for k, s in enumerate(p.scenes)}
        out.update({str(p.video_id): p.scenes[0].caption for p in self.pexels})
        return out

    def pexels_video(self, plan) -> dict:
        vid = plan.video_id
        slug = plan.scenes[0].caption.replace(" ", "-")
        files = []
        for n, (quality, k) in enumerate(PEXELS_QUALITIES):
            path = self.pexels_path(vid, quality)
            files.append(
                {
                    "id": vid * 10 + n,
                    "quality": quality,
                    "file_type": "video/mp4",
                    "width": self.cfg.width * k,
                    "height": self.cfg.height * k,
                    "fps": int(self.fps) if self.fps.is_integer() else self.fps,
                    "link": f"{self.base_url}/video-files/{vid}/{path.name}",
                    "size": path.stat().st_size,
                }
            )
        files = [files[1], files[0], files[2]]  # the real API does not sort them
        big = PEXELS_QUALITIES[-1][1]
        return {
            "id": vid,
            "width": self.cfg.width * big,
            "height": self.cfg.height * big,
            "url": f"https://www.pexels.com/video/{slug}-{vid}/",
            "image": f"{self.base_url}/images/{vid}.jpeg",
            "full_res": None,
            "tags": [],
            "duration": max(1, int(round(plan.n_frames / self.fps))),
            "avg_color": None,
            "user": {"id": 500 + vid % 7, "name": f"Sample Maker {vid % 7}", "url": f"https://www.pexels.com/@sample-maker-{vid % 7}"},
            "video_files": files,
            "video_pictures": [],
        }

    def pexels_videos(self) -> list[dict]:
        with self._lock:
            extra = list(self._extra_pexels)
        return [self.pexels_video(p) for p in self.pexels] + extra

    # ------------------------------------------------------------ test hooks

    def inject(self, path_prefix: str, fault: str, times: int = 1, **opts) -> None:
        """Answer the next `times` requests whose path starts with `path_prefix` with `fault` (FAULTS)."""
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}; expected one of {sorted(FAULTS)}")
        with self._lock:
            q = self._faults.setdefault(path_prefix, deque())
            for _ in range(times):
                q.append((fault, dict(opts)))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def pending_faults(self) -> int:
        with self._lock:
            return sum(len(q) for q in self._faults.values())

    def _take_fault(self, path: str) -> tuple[str, dict] | None:
        with self._lock:
            for prefix, q in self._faults.items():  # insertion order: the first matching prefix wins
                if q and path.startswith(prefix):
                    return q.popleft()
        return None

    def reset_log(self) -> None:
        with self._lock:
            self.requests_log.clear()

    def hits(self, prefix: str) -> list[LogEntry]:
        """The logged requests whose target starts with `prefix`."""
        with self._lock:
            return [e for e in self.requests_log if e.path.startswith(prefix)]

    def _log(self, entry: LogEntry) -> None:
        with self._lock:
            self.requests_log.append(entry)

    def add_hdvg_entry(self, video_id: str, entry: dict) -> None:
        """List an extra (possibly hostile) video in hdvg_0.json, or replace a generated one."""
        with self._lock:
            self._extra_hdvg[video_id] = entry

    def add_pexels_video(self, video: dict) -> None:
        """List an extra (possibly hostile) Video object in every Pexels listing and by id."""
        with self._lock:
            self._extra_pexels.append(video)

    def add_file(self, path: str, data: bytes | Path, content_type: str = "application/octet-stream") -> str:
        """Serve `data` at route `path` (with Range and faults); returns the full URL once running."""
        if not path.startswith("/"):
            raise ValueError(f"route {path!r} must start with '/'")
        with self._lock:
            self._files[path] = (data, content_type)
        return f"{self._base_url}{path}" if self._base_url else path

    def set_zip(self, members: list[tuple[str | zipfile.ZipInfo, bytes]] | bytes | None) -> None:
        """Serve these members (or these raw bytes) as /Inter4K.zip from now on; None restores the real one."""
        with self._lock:
            self._zip_override = None if members is None else members if isinstance(members, bytes) else _zip_bytes(members)

    def evil_zip_route(self, kind: str) -> str:
        """The URL of a hostile Inter4k-style archive (EVIL_ZIPS); each also holds one good member 1.mp4."""
        if kind not in EVIL_ZIPS:
            raise ValueError(f"unknown evil zip {kind!r}; expected one of {sorted(EVIL_ZIPS)}")
        return f"{self.base_url}/evil/{kind}.zip"

    def evil_zip_bytes(self, kind: str) -> bytes:
        with self._lock:
            if kind in self._evil_cache:
                return self._evil_cache[kind]
        good = self._good_member()
        parts = {
            "dotdot": [("../evil.mp4", good), ("Inter4K/60fps/UHD/../../../Inter4K/60fps/UHD/2.mp4", good)],
            "absolute": [("/abs/evil.mp4", good)],
            "symlink": [(_symlink_info("Inter4K/60fps/UHD/8.mp4"), b"/etc/passwd")],
            "bomb": [("bomb", b"")],
        }
        chosen = [m for k in (parts if kind == "all" else [kind]) for m in parts[k]]
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
            zf.writestr("Inter4K/60fps/UHD/1.mp4", good)
            for name, data in chosen:
                if name == "bomb":
                    info = zipfile.ZipInfo("Inter4K/60fps/UHD/9.mp4", date_time=(2021, 11, 1, 0, 0, 0))
                    info.compress_type = zipfile.ZIP_DEFLATED
                    with zf.open(info, "w", force_zip64=True) as f:
                        zero = bytes(1 << 20)
                        for _ in range(64):
                            f.write(zero)
                else:
                    zf.writestr(name, data)
        data = buf.getvalue()
        with self._lock:
            self._evil_cache[kind] = data
        return data

    def _good_member(self) -> bytes:
        if self.inter4k:
            return self.inter4k_path(self.inter4k[0].video_id).read_bytes()
        if self.pexels:
            return self.pexels_path(self.pexels[0].video_id, "sd").read_bytes()
        if self.hdvg:
            return self.hdvg_path(self.hdvg[0].video_id).read_bytes()
        return b"\x00\x00\x00\x18ftypmp42"

    # ------------------------------------------------------------ routing

    def route(self, method: str, target: str, headers) -> _Resp:
        parts = urlsplit(target)
        path, query = parts.path, parse_qs(parts.query, keep_blank_values=True)
        with self._lock:
            extra = self._files.get(path)
        if extra is not None:
            data, ctype = extra
            return _Resp(200, data.read_bytes() if isinstance(data, Path) else data, ctype, rangeable=True)
        if path.startswith("/metafiles/"):
            if path == "/metafiles/hdvg_0.json":
                return _json(self.hdvg_metadata())
            return _error(404, f"no such metafile {path}")
        if path in ("/inter4KUHD", "/interUHD"):
            return _Resp(302, b"", "text/html", {"Location": f"{self.base_url}/Inter4K.zip"})
        if path == "/Inter4K.zip":
            with self._lock:
                data = self._zip_override
            return _Resp(200, data if data is not None else self.zip_path.read_bytes(), "application/zip", rangeable=True)
        if path.startswith("/evil/") and path.endswith(".zip"):
            kind = path[len("/evil/") : -len(".zip")]
            if kind in EVIL_ZIPS:
                return _Resp(200, self.evil_zip_bytes(kind), "application/zip", rangeable=True)
            return _error(404, f"no such archive {path}")
        if path.startswith("/video-files/"):
            return self._pexels_file(path)
        api = path[len("/v1") :] if path.startswith("/v1/videos/") else path
        if api.startswith("/videos/") and api.endswith(".mp4"):
            vid = api[len("/videos/") : -len(".mp4")]
            plan = next((p for p in self.hdvg if p.video_id == vid), None)
            if plan is None:
                return _error(404, f"no such video {vid!r}")
            return _Resp(200, self.hdvg_path(vid).read_bytes(), "video/mp4", rangeable=True)
        if api.rstrip("/") in ("/videos/search", "/videos/popular") or api.startswith("/videos/videos/"):
            return self._pexels_api(api.rstrip("/"), query, headers, target)
        return _error(404, f"no route {path}")

    def _pexels_file(self, path: str) -> _Resp:
        bits = path.split("/")  # ["", "video-files", "<id>", "<name>"]
        if len(bits) == 4:
            for plan in self.pexels:
                if bits[2] == str(plan.video_id):
                    for quality, _ in PEXELS_QUALITIES:
                        if bits[3] == self.pexels_file_name(plan.video_id, quality):
                            return _Resp(200, self.pexels_path(plan.video_id, quality).read_bytes(), "video/mp4", rangeable=True)
        return _error(404, f"no such file {path}")

    def _pexels_api(self, api: str, query: dict, headers, target: str) -> _Resp:
        if headers.get("Authorization") != self.api_key:
            return _error(401, "Unauthorized: missing or invalid API key (header 'Authorization: <key>')")
        with self._lock:
            if self.request_budget is not None and self.api_requests >= self.request_budget:
                extra = {} if self.retry_after is None else {"Retry-After": str(int(math.ceil(self.retry_after)))}
                return _error(429, "Too Many Requests", extra)
            self.api_requests += 1
            remaining = max(0, self.rate_limit - self.api_requests)
        limits = {"X-Ratelimit-Limit": str(self.rate_limit), "X-Ratelimit-Remaining": str(remaining), "X-Ratelimit-Reset": str(self._reset_at)}
        videos = self.pexels_videos()
        if api.startswith("/videos/videos/"):
            vid = api[len("/videos/videos/") :]
            video = next((v for v in videos if str(v.get("id")) == vid), None)
            if video is None:
                return _error(404, f"no video with id {vid!r}")
            return _json(video, 200, limits)

        def one(name: str, default: int) -> int:
            values = query.get(name)
            if not values or values[-1] == "":
                return default
            return int(values[-1])

        try:
            page = max(1, one("page", 1))
            per_page = min(PEXELS_MAX_PER_PAGE, max(1, one("per_page", PEXELS_DEFAULT_PER_PAGE)))
        except ValueError:
            return _error(400, "page and per_page must be integers")
        params: dict[str, Any] = {}
        if api == "/videos/search":
            q = (query.get("query") or [""])[-1].strip()
            if not q:
                return _error(400, "query is required")
            params["query"] = q
            videos = _search(videos, q)
        total = len(videos)
        chosen = videos[(page - 1) * per_page : page * per_page]
        body: dict[str, Any] = {
            "page": page,
            "per_page": per_page,
            "total_results": total,
            "url": f"{self.base_url}{target}",
            "videos": chosen,
        }
        if page * per_page < total:
            body["next_page"] = f"{self.base_url}{api}?{urlencode({**params, 'page': page + 1, 'per_page': per_page})}"
        if page > 1:
            body["prev_page"] = f"{self.base_url}{api}?{urlencode({**params, 'page': page - 1, 'per_page': per_page})}"
        return _json(body, 200, limits)


def _search(videos: list[dict], q: str) -> list[dict]:
    """Videos whose page slug holds every vocabulary word of the query; a query without any
    vocabulary word ("shapes", "nature") matches everything."""
    from soraflow.tasks.sample_world.scenes import COLORS, DIRECTIONS, SHAPES

    vocab = set(COLORS) | set(SHAPES) | set(DIRECTIONS)
    words = {w for w in q.lower().replace("-", " ").split() if w in vocab}
    if not words:
        return videos
    out = []
    for v in videos:
        slug = str(v.get("url", "")).lower().replace("/", "-").split("-")
        if words <= set(slug):
            out.append(v)
    return out


def _parse_range(header: str | None, size: int) -> tuple[int, int] | None | str:
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


class _Handler(BaseHTTPRequestHandler):
    server_owner: SampleServer
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

    def _serve(self, head: bool) -> None:
        owner = self.server_owner
        target = self.path
        rng = self.headers.get("Range")
        path = urlsplit(target).path
        fault = owner._take_fault(path)
        try:
            if fault is not None and fault[0] in ("500", "503", "404", "429"):
                name, opts = fault
                extra = dict(opts.get("headers") or {})
                if name == "429":
                    if opts.get("retry_after") is not None:
                        extra["Retry-After"] = str(opts["retry_after"])
                    if opts.get("ratelimit_reset") is not None:
                        extra["X-Ratelimit-Reset"] = str(int(opts["ratelimit_reset"]))
                    resp = _error(429, "Too Many Requests", extra)
                else:
                    resp = _error(int(name), f"injected {name}", extra)
            else:
                resp = owner.route(self.command, target, self.headers)
                if fault is not None and fault[0] == "not_video":
                    resp = _Resp(200, _NOT_VIDEO, "video/mp4", rangeable=False)
                elif fault is not None and fault[0] == "corrupt":
                    resp = _Resp(200, _garble(resp.body), resp.content_type, dict(resp.headers), resp.rangeable)
        except Exception as e:  # a bug in a route: answer 500 rather than dropping the connection
            resp = _error(500, f"server error: {type(e).__name__}: {e}")
        body = resp.body
        status = resp.status
        headers = dict(resp.headers)
        if resp.rangeable and status == 200:
            headers["Accept-Ranges"] = "bytes"
            r = _parse_range(rng, len(body))
            if r == "unsatisfiable":
                status, body = 416, b""
                headers["Content-Range"] = f"bytes */{len(resp.body)}"
            elif r is not None:
                start, end = r
                status, body = 206, body[start : end + 1]
                headers["Content-Range"] = f"bytes {start}-{end}/{len(resp.body)}"
        owner._log(LogEntry(self.command, target, status, rng))
        cut = None
        if fault is not None and fault[0] in ("reset", "truncate"):
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

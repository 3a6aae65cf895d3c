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
(query excluded), consumed in order (handler.FAULTS describes each), `requests_log` lists every request
as (method, target, status, range_header) with the query string in `target`, `add_hdvg_entry`,
`add_pexels_video` and `add_file` add odd listings or files, `set_zip` replaces Inter4K.zip.

Generated files go to root_dir/<config hash>/ and are reused when they exist.

The formats are built in tasks/sample_world/formats.py, and answered on the wire (Range, faults,
the request log) by tasks/sample_world/handler.py; this module holds the server's state and routes.
"""
from __future__ import annotations

import hashlib
import json
import math
import threading
import time
import zipfile
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from soraflow.storage.layout import atomic_write_bytes, safe_id
from soraflow.tasks.sample_world.formats import (
    EVIL_ZIPS,
    PEXELS_MAX_PER_PAGE,
    PEXELS_QUALITIES,
    evil_zip,
    hdvg_entry,
    inter4k_zip,
    pexels_file_name,
    pexels_listing,
    pexels_video,
    timecode,
    zip_bytes,
)
from soraflow.tasks.sample_world.handler import (
    FAULTS,
    FaultQueue,
    LogEntry,
    Reply,
    RequestHandler,
    error_reply,
    json_reply,
)
from soraflow.tasks.sample_world.scenes import plan_videos, render_video, scale_spec

# Importers (tests, the ingest tests' fault lists) read these from here too.
__all__ = ["SampleServer", "EVIL_ZIPS", "FAULTS", "LogEntry", "PEXELS_MAX_PER_PAGE", "timecode"]

PAD_SECONDS = 0.5  # plain frames before and after the scenes of an HD-VG video
GENERATOR_VERSION = 2  # part of the cache folder's name: bump when the generated files change
DEFAULT_RATE_LIMIT = 20_000


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
        fallback = request_budget if request_budget is not None else DEFAULT_RATE_LIMIT
        self.rate_limit = rate_limit if rate_limit is not None else fallback
        key = json.dumps(cfg.model_dump() if hasattr(cfg, "model_dump") else vars(cfg), sort_keys=True, default=str)
        fields = {k: v for k, v in json.loads(key).items() if k != "enabled"}
        digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]
        self.dir = Path(root_dir) / f"v{GENERATOR_VERSION}-{digest}"
        self.requests_log: list[LogEntry] = []
        self.api_requests = 0  # authorised Pexels API requests answered (the budget counts these)
        self.faults = FaultQueue()
        self._lock = threading.Lock()
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

        class Handler(RequestHandler):
            server_owner = owner

        try:
            httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        except OSError:  # the preferred port is taken
            httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        httpd.daemon_threads = True
        self._httpd = httpd
        self._base_url = f"http://127.0.0.1:{httpd.server_address[1]}"
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="SampleServer", daemon=True
        )
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
        return pexels_file_name(vid, quality, self.cfg.width, self.cfg.height, self.fps)

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
            members = [(p.video_id, self.inter4k_path(p.video_id).read_bytes()) for p in self.inter4k]
            atomic_write_bytes(self.zip_path, inter4k_zip(members))

    def _write(self, path: Path, frames) -> None:
        from soraflow.storage.data.video_io import write_video

        write_video(path, frames, self.fps)

    # ------------------------------------------------------------ listings

    def span_frames(self, plan) -> tuple[int, int]:
        """(first, end exclusive) frame of the scenes inside the full HD-VG video."""
        return self.pad, self.pad + plan.n_frames

    def hdvg_metadata(self) -> dict:
        """The hdvg_0.json object: the generated videos, then the entries tests added."""
        meta: dict[str, Any] = {
            p.video_id: hdvg_entry(p, self.base_url, self.fps, self.span_frames(p)) for p in self.hdvg
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
        sizes = {q: self.pexels_path(plan.video_id, q).stat().st_size for q, _ in PEXELS_QUALITIES}
        return pexels_video(plan, self.base_url, self.cfg.width, self.cfg.height, self.fps, sizes)

    def pexels_videos(self) -> list[dict]:
        with self._lock:
            extra = list(self._extra_pexels)
        return [self.pexels_video(p) for p in self.pexels] + extra

    # ------------------------------------------------------------ test hooks

    def inject(self, path_prefix: str, fault: str, times: int = 1, **opts) -> None:
        """Answer the next `times` requests whose path starts with `path_prefix` with `fault` (FAULTS)."""
        self.faults.inject(path_prefix, fault, times, **opts)

    def clear_faults(self) -> None:
        self.faults.clear()

    def pending_faults(self) -> int:
        return self.faults.pending()

    def reset_log(self) -> None:
        with self._lock:
            self.requests_log.clear()

    def hits(self, prefix: str) -> list[LogEntry]:
        """The logged requests whose target starts with `prefix`."""
        with self._lock:
            return [e for e in self.requests_log if e.path.startswith(prefix)]

    def record(self, entry: LogEntry) -> None:
        """Log one answered request (the handler calls this)."""
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
            self._zip_override = (
                None if members is None else members if isinstance(members, bytes) else zip_bytes(members)
            )

    def evil_zip_route(self, kind: str) -> str:
        """The URL of a hostile Inter4k-style archive (EVIL_ZIPS); each also holds one good member 1.mp4."""
        if kind not in EVIL_ZIPS:
            raise ValueError(f"unknown evil zip {kind!r}; expected one of {sorted(EVIL_ZIPS)}")
        return f"{self.base_url}/evil/{kind}.zip"

    def evil_zip_bytes(self, kind: str) -> bytes:
        with self._lock:
            if kind in self._evil_cache:
                return self._evil_cache[kind]
        data = evil_zip(kind, self._good_member())
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

    def route(self, method: str, target: str, headers) -> Reply:
        parts = urlsplit(target)
        path, query = parts.path, parse_qs(parts.query, keep_blank_values=True)
        with self._lock:
            extra = self._files.get(path)
        if extra is not None:
            data, ctype = extra
            return Reply(200, data.read_bytes() if isinstance(data, Path) else data, ctype, rangeable=True)
        if path.startswith("/metafiles/"):
            if path == "/metafiles/hdvg_0.json":
                return json_reply(self.hdvg_metadata())
            return error_reply(404, f"no such metafile {path}")
        if path in ("/inter4KUHD", "/interUHD"):
            return Reply(302, b"", "text/html", {"Location": f"{self.base_url}/Inter4K.zip"})
        if path == "/Inter4K.zip":
            with self._lock:
                data = self._zip_override
            return Reply(
                200, data if data is not None else self.zip_path.read_bytes(), "application/zip", rangeable=True
            )
        if path.startswith("/evil/") and path.endswith(".zip"):
            kind = path[len("/evil/") : -len(".zip")]
            if kind in EVIL_ZIPS:
                return Reply(200, self.evil_zip_bytes(kind), "application/zip", rangeable=True)
            return error_reply(404, f"no such archive {path}")
        if path.startswith("/video-files/"):
            return self._pexels_file(path)
        api = path[len("/v1") :] if path.startswith("/v1/videos/") else path
        if api.startswith("/videos/") and api.endswith(".mp4"):
            vid = api[len("/videos/") : -len(".mp4")]
            plan = next((p for p in self.hdvg if p.video_id == vid), None)
            if plan is None:
                return error_reply(404, f"no such video {vid!r}")
            return Reply(200, self.hdvg_path(vid).read_bytes(), "video/mp4", rangeable=True)
        if api.rstrip("/") in ("/videos/search", "/videos/popular") or api.startswith("/videos/videos/"):
            return self._pexels_api(api.rstrip("/"), query, headers, target)
        return error_reply(404, f"no route {path}")

    def _pexels_file(self, path: str) -> Reply:
        bits = path.split("/")  # ["", "video-files", "<id>", "<name>"]
        if len(bits) == 4:
            for plan in self.pexels:
                if bits[2] == str(plan.video_id):
                    for quality, _ in PEXELS_QUALITIES:
                        if bits[3] == self.pexels_file_name(plan.video_id, quality):
                            return Reply(
                                200, self.pexels_path(plan.video_id, quality).read_bytes(), "video/mp4", rangeable=True
                            )
        return error_reply(404, f"no such file {path}")

    def _pexels_api(self, api: str, query: dict, headers, target: str) -> Reply:
        """Key check and request budget (429 without rate headers once spent), then one Video
        object by id or a listing page, with the X-Ratelimit-* headers."""
        if headers.get("Authorization") != self.api_key:
            return error_reply(401, "Unauthorized: missing or invalid API key (header 'Authorization: <key>')")
        with self._lock:
            if self.request_budget is not None and self.api_requests >= self.request_budget:
                extra = {} if self.retry_after is None else {"Retry-After": str(int(math.ceil(self.retry_after)))}
                return error_reply(429, "Too Many Requests", extra)
            self.api_requests += 1
            remaining = max(0, self.rate_limit - self.api_requests)
        limits = {"X-Ratelimit-Limit": str(self.rate_limit), "X-Ratelimit-Remaining": str(remaining),
                  "X-Ratelimit-Reset": str(self._reset_at)}
        videos = self.pexels_videos()
        if api.startswith("/videos/videos/"):
            vid = api[len("/videos/videos/") :]
            video = next((v for v in videos if str(v.get("id")) == vid), None)
            if video is None:
                return error_reply(404, f"no video with id {vid!r}")
            return json_reply(video, 200, limits)
        status, body = pexels_listing(videos, api, query, self.base_url, target)
        return json_reply(body, status, limits if status == 200 else None)

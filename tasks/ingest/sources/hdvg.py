"""HD-VG-130M: metadata file -> full videos -> frame-accurate span files -> one row per scene.

The metadata (`hdvg_<k>.json`, HD-VG-130M's metafiles) is an object keyed by video id:

    {"<vid>": {"url": "https://www.youtube.com/watch?v=<vid>",
               "clip": {"<vid>.<n>.mp4": {"span": ["HH:MM:SS.mmm", "HH:MM:SS.mmm"], "fps": 30.0,
                        "scene_split": [{"scene_cut": [a, b], "clip_id": "<vid>.<n>_<k>", "caption": "..."}]}}}}

Per video: fetch the full video (HTTP or yt-dlp, see `choose_fetcher`) to tmp/hdvg/<vid>.mp4,
cut each span with re-encoding (PyAV: seek to the keyframe before, decode, keep the frames
with start <= t < end, libx264) to raw/hdvg/<vid>.<n>.mp4, then emit one row per scene:
path = the span file, start_s/end_s = scene_cut / fps (end -1 = None: to the span's end),
text = the BLIP-2 caption (caption_source "source"), clip_id = the metadata clip_id. The
scene-split stage cuts each row's [start_s, end_s) window. The full video is deleted once
all its spans are cut.
"""

from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

import av
import requests
from soraflow.configs.schema import HttpConfig, SourceConfig
from soraflow.storage.faults import raise_if_environment
from soraflow.storage.layout import (
    DataRoot,
    UnsafePathError,
    atomic_output,
    file_lock,
    path_lock_file,
    safe_id,
    safe_join,
)
from soraflow.storage.data.manifest import new_row, reject
from soraflow.storage.data.video_io import VideoError, VideoInfo, first_video_stream, stream_reformatter
from soraflow.tasks.ingest.http import (
    BadInputError,
    TransientError,
    check_url,
    get_json,
)
from soraflow.tasks.ingest.resumable_download import download_file
from soraflow.tasks.ingest.sources import (
    describe,
    probe_downloaded,
    probe_or_none,
    video_row,
)

log = logging.getLogger(__name__)

KIND = "hdvg"
MAX_SECONDS = 7 * 24 * 3600.0  # no span of a real video is longer; bigger numbers are malformed metadata
MAX_FPS = 1000.0
MAX_FRAME = int(MAX_SECONDS * MAX_FPS)
_TIMECODE = re.compile(r"^(\d+):([0-5]?\d):([0-5]?\d(?:\.\d+)?)$")
_YOUTUBE_HOSTS = ("youtube.com", "youtu.be", "youtube-nocookie.com")


# ---------------------------------------------------------------- listing


def list_items(source: SourceConfig, http: HttpConfig, root: DataRoot, *, session=None, sleep=time.sleep) -> list[dict]:
    """One item per video of the metadata file, in file order (at most source.max_videos)."""
    data, _ = get_json(source.url, cfg=http, session=session, sleep=sleep, metadata_file=True)  # 234 MB for hdvg_0.json
    if not isinstance(data, dict):
        raise BadInputError(
            f"{source.url}: HD-VG metadata must be an object keyed by video id, got {type(data).__name__}"
        )
    items = []
    for vid, entry in data.items():
        if source.max_videos is not None and len(items) >= source.max_videos:
            break
        items.append(_item(str(vid), entry))
    return items


def _item(vid: str, entry: Any) -> dict:
    """Normalise one metadata entry; a malformed one keeps an `error` (it becomes a rejected row)."""
    if not isinstance(entry, dict) or not isinstance(entry.get("clip"), dict):
        url = entry.get("url") if isinstance(entry, dict) else None
        return {"video_id": vid, "url": url, "clips": [], "error": "metadata entry has no 'clip' object"}
    clips = []
    for name, clip in entry["clip"].items():
        clip = clip if isinstance(clip, dict) else {}
        clips.append(
            {
                "name": str(name),
                "span": clip.get("span"),
                "fps": clip.get("fps"),
                "scenes": clip.get("scene_split") if isinstance(clip.get("scene_split"), list) else [],
            }
        )
    return {"video_id": vid, "url": entry.get("url"), "clips": clips}


# ---------------------------------------------------------------- fetchers


def choose_fetcher(url: str, setting: str) -> str:
    """'http' or 'yt-dlp' for a video URL: the configured one, or by host for 'auto'."""
    if setting in ("http", "yt-dlp"):
        return setting
    if setting != "auto":
        raise BadInputError(f"unknown HD-VG fetcher {setting!r}")
    host = (urlsplit(str(url)).hostname or "").lower()
    youtube = any(host == h or host.endswith("." + h) for h in _YOUTUBE_HOSTS)
    return "yt-dlp" if youtube else "http"


def http_fetch(url: str, dest: Path, http: HttpConfig, session: requests.Session | None, sleep: Callable) -> None:
    download_file(url, dest, cfg=http, session=session, sleep=sleep)


def ytdlp_options(dest: Path, http: HttpConfig) -> dict:
    """yt-dlp options: one mp4 (video stream, no merge needed) of at most 720p, no playlists."""
    return {
        "outtmpl": {"default": str(dest)},
        "format": "bestvideo[height<=720][ext=mp4]/best[height<=720][ext=mp4]/best[height<=720]",
        "noplaylist": True,
        "quiet": True,
        "no_warnings": True,
        "noprogress": True,
        "continuedl": True,  # resume dest.part
        "retries": http.max_retries,
        "fragment_retries": http.max_retries,
        "socket_timeout": http.timeout_s,
        "http_headers": {"User-Agent": http.user_agent},
        "max_filesize": http.max_bytes,
        "overwrites": True,
    }


_YTDLP_TRANSIENT = re.compile(
    r"(HTTP Error 429|HTTP Error 5\d\d|timed out|Connection|Temporary failure|Network is unreachable)", re.I
)


def ytdlp_fetch(url: str, dest: Path, http: HttpConfig, session=None, sleep=None) -> None:
    """Fetch one video with the yt_dlp Python API into `dest`."""
    import yt_dlp

    check_url(url, http)  # yt-dlp fetches by itself: at least the page URL goes through the URL policy
    try:
        with yt_dlp.YoutubeDL(ytdlp_options(dest, http)) as ydl:
            ydl.download([url])
    except yt_dlp.utils.DownloadError as e:
        msg = str(e)[:300]
        if _YTDLP_TRANSIENT.search(msg):
            raise TransientError(f"{url}: yt-dlp: {msg}") from None
        raise BadInputError(f"{url}: yt-dlp: {msg}") from None  # unavailable, private, removed, ...
    if not dest.exists():
        raise BadInputError(f"{url}: yt-dlp finished without writing {dest.name} (file over max_bytes?)")


FETCHERS: dict[str, Callable[..., None]] = {"http": http_fetch, "yt-dlp": ytdlp_fetch}


def fetch_video(url: str, dest: Path, source: SourceConfig, http: HttpConfig, session, sleep) -> None:
    which = choose_fetcher(url, source.fetcher)
    FETCHERS[which](url, dest, http, session, sleep)


# ---------------------------------------------------------------- cutting


def parse_timecode(value: Any) -> float:
    """'HH:MM:SS.mmm' (or a number of seconds) -> seconds."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = finite_number(value, "timecode", 0, MAX_SECONDS)
    else:
        m = _TIMECODE.fullmatch(str(value).strip()[:40])
        if not m or len(m.group(1)) > 6:
            raise BadInputError(f"bad timecode {str(value)[:40]!r} (expected HH:MM:SS.mmm)")
        seconds = int(m.group(1)) * 3600 + int(m.group(2)) * 60 + float(m.group(3))
    if not 0 <= seconds <= MAX_SECONDS:
        raise BadInputError(f"timecode {str(value)[:40]!r} is out of range (0 .. {MAX_SECONDS:g} s)")
    return seconds


def finite_number(value: Any, what: str, lo: float, hi: float) -> float:
    """`value` as a float if it is a real, finite number in [lo, hi], else BadInputError naming it.

    JSON gives 1e400 as inf and 10**400 as an int no float holds: both are refused here, before
    any arithmetic can overflow."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadInputError(f"{what} must be a number, got {str(value)[:40]!r}")
    try:
        x = float(value)
    except OverflowError:
        raise BadInputError(f"{what} {str(value)[:40]}... is out of range") from None
    if not math.isfinite(x) or not lo <= x <= hi:
        raise BadInputError(f"{what} {str(value)[:40]} is out of range ({lo:g} .. {hi:g})")
    return x


def cut_span(src: Path, dest: Path, start_s: float, end_s: float, crf: int = 18) -> int:
    """Frames with start_s <= t < end_s of `src`, re-encoded (H.264) to `dest` atomically -> frame count.

    Frame-accurate: seek to the keyframe at or before start_s, decode forward, keep frames by
    their own timestamps. The output is constant-rate at the source's average frame rate.
    """
    eps = 1e-3  # timecodes have millisecond precision
    try:
        with av.open(str(src)) as inp:
            vs = first_video_stream(inp, src)
            rate = vs.average_rate or vs.guessed_rate
            if not rate:
                raise VideoError(f"{src}: unknown frame rate")
            width, height = vs.codec_context.width, vs.codec_context.height
            width, height = width - width % 2, height - height % 2  # yuv420p needs even sizes
            if start_s > 0 and vs.time_base:
                inp.seek(max(0, int(start_s / vs.time_base)), stream=vs, backward=True, any_frame=False)
            n = 0
            with atomic_output(dest) as tmp:
                with av.open(str(tmp), mode="w", format="mp4") as out:
                    out_rate = Fraction(rate).limit_denominator(1001)
                    ostream = out.add_stream("libx264", rate=out_rate)
                    ostream.width, ostream.height = width, height
                    ostream.pix_fmt = "yuv420p"
                    ostream.options = {"crf": str(crf), "preset": "veryfast"}
                    to_yuv = stream_reformatter()
                    for frame in inp.decode(vs):
                        t = frame.time
                        if t is None:
                            continue
                        if t < start_s - eps:
                            continue
                        if t >= end_s - eps:
                            break
                        f = to_yuv.reformat(frame, width=width, height=height, format="yuv420p")
                        f.pts, f.time_base = n, 1 / out_rate  # constant rate: frame n at n / rate
                        f.pict_type = av.video.frame.PictureType.NONE
                        for packet in ostream.encode(f):
                            out.mux(packet)
                        n += 1
                    for packet in ostream.encode():
                        out.mux(packet)
                if n == 0:
                    raise VideoError(f"{src}: no frames between {start_s:.3f} s and {end_s:.3f} s")
    except (av.error.FFmpegError, ValueError, OSError) as e:
        raise_if_environment(e, f"cutting {src.name} to {dest}")  # disk full is not a bad video
        if isinstance(e, VideoError):
            raise
        raise VideoError(f"{src}: cutting {start_s:.3f}-{end_s:.3f} s failed: {e}") from e
    return n


# ---------------------------------------------------------------- download


@dataclass
class _Span:
    name: str
    fps: float | None
    scenes: list[Any]
    path: Path | None = None
    start_s: float = 0.0
    end_s: float = 0.0
    error: str | None = None  # the span itself is unusable
    info: VideoInfo | None = None
    rows: list[dict] = field(default_factory=list)


def _plan_span(vid: str, clip: Any, root: DataRoot) -> _Span:
    clip = clip if isinstance(clip, dict) else {}
    name = str(clip.get("name"))
    fps = clip.get("fps")
    span = _Span(name=name[:200], fps=None, scenes=list(clip.get("scenes") or []))
    try:
        stem = name[: -len(".mp4")] if name.endswith(".mp4") else name
        if not stem.startswith(vid + "."):
            raise BadInputError(f"clip name {name!r} is not '<video id>.<n>.mp4' of video {vid!r}")
        span.path = root.raw(KIND, safe_id(stem, "clip name"), "mp4")
        s = clip.get("span")
        if not isinstance(s, (list, tuple)) or len(s) != 2:
            raise BadInputError(f"clip {name!r}: 'span' must be [start, end], got {s!r}")
        span.start_s, span.end_s = parse_timecode(s[0]), parse_timecode(s[1])
        if span.end_s <= span.start_s:
            raise BadInputError(f"clip {name!r}: span ends before it starts: {s!r}")
        if fps is not None:
            span.fps = finite_number(fps, f"clip {name!r}: fps", 1e-3, MAX_FPS)
    except (BadInputError, UnsafePathError) as e:
        span.error = describe(e)
    if not span.scenes:
        span.scenes = [{}]  # still one row, so the span's failure (or emptiness) is visible
    return span


def _scene_row(vid: str, url: str | None, span: _Span, scene: Any) -> dict:
    """The row of one scene of a cut span (ok, or rejected naming the scene)."""
    scene = scene if isinstance(scene, dict) else {}
    caption = scene.get("caption")
    base = new_row(
        source=KIND,
        video_id=vid,
        source_url=url,
        text=caption if isinstance(caption, str) and caption else None,
        caption_source="source" if isinstance(caption, str) and caption else None,
    )
    where = f"{url or vid}: clip {span.name}"
    try:
        clip_id = safe_id(scene.get("clip_id"), "clip id")
    except UnsafePathError as e:
        return reject(base, f"{where}: {describe(e)}")
    base["clip_id"] = clip_id
    if span.error:
        return reject(base, f"{where}: {span.error}")
    cut = scene.get("scene_cut")
    ok_cut = (
        isinstance(cut, (list, tuple))
        and len(cut) == 2
        and all(isinstance(x, int) and not isinstance(x, bool) and -1 <= x <= MAX_FRAME for x in cut)
        and cut[0] >= 0
        and (cut[1] == -1 or cut[1] > cut[0])
    )
    if not ok_cut:
        shown = str(cut)[:80]
        return reject(base, f"{where}: scene {clip_id}: bad scene_cut {shown} "
                            f"(expected [start, end] frames in 0 .. {MAX_FRAME}, end -1 = to the end)")
    assert span.info is not None and span.path is not None
    fps = span.fps or span.info.fps
    row = video_row(
        KIND, vid, url, span.path, span.info, clip_id=clip_id, text=base["text"], caption_source=base["caption_source"]
    )
    row["start_s"] = cut[0] / fps
    row["end_s"] = None if cut[1] == -1 else cut[1] / fps
    return row


def _scene_order(scene: Any) -> tuple:
    cut = scene.get("scene_cut") if isinstance(scene, dict) else None
    starts_at_frame = isinstance(cut, (list, tuple)) and cut and type(cut[0]) is int  # bool is no frame number
    first = cut[0] if starts_at_frame else 1 << 62
    return (first, str(scene.get("clip_id") if isinstance(scene, dict) else ""))


def download_item(
    source: SourceConfig, item: dict, root: DataRoot, http: HttpConfig, *, session=None, sleep=time.sleep
) -> list[dict]:
    """One video -> one row per scene of each of its spans."""
    vid = safe_id(item.get("video_id"), "video id")  # UnsafePathError -> a rejected row ("unsafe id")
    url = item.get("url")
    if item.get("error"):
        raise BadInputError(f"{url or vid}: {item['error']}")
    spans = [_plan_span(vid, clip, root) for clip in item.get("clips") or []]
    if not spans:
        raise BadInputError(f"{url or vid}: metadata lists no clips")

    full = safe_join(root.tmp, KIND, f"{vid}.mp4")
    # One process at a time per video: another ingest on this root waits here instead of
    # cutting the same spans, or deleting the full video while this one still cuts it.
    with file_lock(path_lock_file(f"{full}#video"), what=f"HD-VG video {vid}"):
        _fetch_and_cut(vid, url, spans, full, source, http, session, sleep)
    rows = []
    for s in spans:
        for scene in sorted(s.scenes, key=_scene_order):
            rows.append(_scene_row(vid, url, s, scene))
    return rows


def _fetch_and_cut(
    vid: str, url: Any, spans: list[_Span], full: Path, source: SourceConfig, http: HttpConfig, session, sleep
) -> None:
    """Cut every usable span that is not on disk yet (fetching the full video if needed); drop
    the full video once every span is cut. Failures are recorded on the spans."""
    usable = [s for s in spans if not s.error]
    for s in usable:  # idempotent: a span file that exists and probes is kept
        s.info = probe_or_none(s.path)
    todo = [s for s in usable if s.info is None]
    if todo:
        try:
            if not isinstance(url, str) or not url:
                raise BadInputError(f"{vid}: metadata has no video url")
            if probe_or_none(full) is None:
                full.unlink(missing_ok=True)
                fetch_video(url, full, source, http, session, sleep)
                probe_downloaded(full, url)
        except (BadInputError, VideoError) as e:
            for s in todo:
                s.error = describe(e)
        else:
            for s in todo:
                try:
                    cut_span(full, s.path, s.start_s, s.end_s)
                    s.info = probe_downloaded(s.path, f"{url} span {s.name}")
                except VideoError as e:
                    s.error = f"cutting the span failed: {e}"
    if all(s.info is not None for s in usable):
        full.unlink(missing_ok=True)  # every span is cut: the full video is no longer needed

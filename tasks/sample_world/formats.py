"""The real sources' formats, as the sample server emits them: HD-VG metadata, Pexels API
objects and listings, Inter4k zip archives (good and hostile).

Plain functions over the seeded plan (tasks/sample_world/scenes.py) and the server's URL; the
server (tasks/sample_world/server.py) routes requests to them. The formats themselves are
described in the server's module docstring.
"""

from __future__ import annotations

import io
import math
import stat
import zipfile
from typing import Any
from urllib.parse import urlencode

from soraflow.tasks.sample_world.scenes import COLORS, DIRECTIONS, SHAPES

PEXELS_QUALITIES = (("sd", 1), ("hd", 2), ("uhd", 4))  # quality -> scale of the config's size
PEXELS_MAX_PER_PAGE = 80
PEXELS_DEFAULT_PER_PAGE = 15
EVIL_ZIPS = {
    "dotdot": "a member '../evil.mp4' (and '../../Inter4K/60fps/UHD/2.mp4')",
    "absolute": "a member '/abs/evil.mp4'",
    "symlink": "Inter4K/60fps/UHD/8.mp4 is a symlink (S_IFLNK) to /etc/passwd",
    "bomb": "Inter4K/60fps/UHD/9.mp4 inflates to 64 MiB of zeros (declared file_size 64 MiB)",
    "all": "all of the above in one archive",
}
INTER4K_DIRS = ("Inter4K/", "Inter4K/60fps/", "Inter4K/60fps/UHD/")


def timecode(seconds: float) -> str:
    """Seconds -> "HH:MM:SS.mmm", floored to the millisecond (so a frame at exactly t stays inside)."""
    ms = int(math.floor(seconds * 1000 + 1e-6))
    h, rest = divmod(ms, 3_600_000)
    m, rest = divmod(rest, 60_000)
    s, ms = divmod(rest, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}.{ms:03d}"


def fps_label(fps: float) -> str:
    return str(int(fps)) if float(fps).is_integer() else f"{fps:.2f}".rstrip("0")


# ---------------------------------------------------------------- HD-VG


def hdvg_entry(plan, base_url: str, fps: float, span_frames: tuple[int, int]) -> dict:
    """One video of hdvg_0.json (the layout of HD-VG-130M's metafiles): its URL and ONE span clip
    "<vid>.0.mp4" whose scene_split lists the scenes in reverse order (the real file is not sorted)."""
    vid = plan.video_id
    a, b = span_frames
    scenes, start = [], 0
    for k, s in enumerate(plan.scenes):
        scenes.append({"scene_cut": [start, start + s.n_frames], "clip_id": f"{vid}.0_{k}", "caption": s.caption})
        start += s.n_frames
    return {
        "url": f"{base_url}/videos/{vid}.mp4",
        "clip": {
            f"{vid}.0.mp4": {"span": [timecode(a / fps), timecode(b / fps)], "fps": fps, "scene_split": scenes[::-1]}
        },
    }


# ---------------------------------------------------------------- Pexels


def pexels_file_name(vid: int, quality: str, width: int, height: int, fps: float) -> str:
    """"<id>-<quality>_<w>_<h>_<fps>fps.mp4" at the quality's scale of the config's width x height."""
    k = dict(PEXELS_QUALITIES)[quality]
    return f"{vid}-{quality}_{width * k}_{height * k}_{fps_label(fps)}fps.mp4"


def pexels_video(plan, base_url: str, width: int, height: int, fps: float, sizes: dict[str, int]) -> dict:
    """One Pexels Video object; `sizes` is quality -> file size in bytes."""
    vid = plan.video_id
    slug = plan.scenes[0].caption.replace(" ", "-")
    files = []
    for n, (quality, k) in enumerate(PEXELS_QUALITIES):
        files.append(
            {
                "id": vid * 10 + n,
                "quality": quality,
                "file_type": "video/mp4",
                "width": width * k,
                "height": height * k,
                "fps": int(fps) if fps.is_integer() else fps,
                "link": f"{base_url}/video-files/{vid}/{pexels_file_name(vid, quality, width, height, fps)}",
                "size": sizes[quality],
            }
        )
    files = [files[1], files[0], files[2]]  # the real API does not sort them
    big = PEXELS_QUALITIES[-1][1]
    return {
        "id": vid,
        "width": width * big,
        "height": height * big,
        "url": f"https://www.pexels.com/video/{slug}-{vid}/",
        "image": f"{base_url}/images/{vid}.jpeg",
        "full_res": None,
        "tags": [],
        "duration": max(1, int(round(plan.n_frames / fps))),
        "avg_color": None,
        "user": {
            "id": 500 + vid % 7,
            "name": f"Sample Maker {vid % 7}",
            "url": f"https://www.pexels.com/@sample-maker-{vid % 7}",
        },
        "video_files": files,
        "video_pictures": [],
    }


def pexels_listing(videos: list[dict], api: str, query: dict, base_url: str, target: str) -> tuple[int, Any]:
    """(status, body) of /videos/search or /videos/popular: one page of `videos`, with
    next_page / prev_page links; 400 {"error"} for bad paging or a search without a query."""

    def one(name: str, default: int) -> int:
        values = query.get(name)
        if not values or values[-1] == "":
            return default
        return int(values[-1])

    try:
        page = max(1, one("page", 1))
        per_page = min(PEXELS_MAX_PER_PAGE, max(1, one("per_page", PEXELS_DEFAULT_PER_PAGE)))
    except ValueError:
        return 400, {"error": "page and per_page must be integers"}
    params: dict[str, Any] = {}
    if api == "/videos/search":
        q = (query.get("query") or [""])[-1].strip()
        if not q:
            return 400, {"error": "query is required"}
        params["query"] = q
        videos = search(videos, q)
    total = len(videos)
    chosen = videos[(page - 1) * per_page : page * per_page]
    body: dict[str, Any] = {
        "page": page,
        "per_page": per_page,
        "total_results": total,
        "url": f"{base_url}{target}",
        "videos": chosen,
    }
    if page * per_page < total:
        body["next_page"] = f"{base_url}{api}?{urlencode({**params, 'page': page + 1, 'per_page': per_page})}"
    if page > 1:
        body["prev_page"] = f"{base_url}{api}?{urlencode({**params, 'page': page - 1, 'per_page': per_page})}"
    return 200, body


def search(videos: list[dict], q: str) -> list[dict]:
    """Videos whose page slug holds every vocabulary word of the query; a query without any
    vocabulary word ("shapes", "nature") matches everything."""
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


# ---------------------------------------------------------------- Inter4k archives


def zip_bytes(members: list[tuple[str | zipfile.ZipInfo, bytes]]) -> bytes:
    """A stored (uncompressed) zip of these members."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, data in members:
            zf.writestr(name, data)
    return buf.getvalue()


def inter4k_zip(videos: list[tuple[str, bytes]]) -> bytes:
    """Inter4K.zip: the folder entries, then Inter4K/60fps/UHD/<id>.mp4 per (id, mp4 bytes)."""
    return zip_bytes(
        [*((d, b"") for d in INTER4K_DIRS), *((f"Inter4K/60fps/UHD/{vid}.mp4", data) for vid, data in videos)]
    )


def _symlink_info(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=(2021, 11, 1, 0, 0, 0))
    info.create_system = 3  # unix, so external_attr carries the mode
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


def evil_zip(kind: str, good: bytes) -> bytes:
    """A hostile Inter4k-style archive (EVIL_ZIPS); it also holds one good member 1.mp4 (`good`)."""
    if kind not in EVIL_ZIPS:
        raise ValueError(f"unknown evil zip {kind!r}; expected one of {sorted(EVIL_ZIPS)}")
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
    return buf.getvalue()

"""Pexels videos through the official API (https://www.pexels.com/api/documentation/#videos).

Listing: GET <url>/videos/search?query=...&per_page=... (source.query) or <url>/videos/popular,
with the header `Authorization: <key>` (the key comes from $PEXELS_API_KEY), following
`next_page` until source.max_videos videos are listed or the pages end. `next_page` must stay
on the API's own scheme and host, so the key is never sent anywhere else. When a response says
`X-Ratelimit-Remaining: 0`, the next call waits until `X-Ratelimit-Reset` (capped by
http.backoff_max_s); a 429 is retried by tasks.http.

One item per video, with the chosen file: the preferred quality (source.quality) among files
no larger than source.max_file_bytes and at least source.min_width wide (the largest such),
else the largest allowed file, else the smallest file. Videos narrower than min_width are
not listed. Downloads go to raw/pexels/<id>.mp4 without the key (file links are public);
source_url is the video's page URL, whose slug the caption stage reads; text stays None.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any
from urllib.parse import urlsplit

from soraflow.configs.schema import HttpConfig, SourceConfig
from soraflow.storage.layout import DataRoot, file_lock, path_lock_file, safe_id
from soraflow.tasks.ingest.http import BadInputError, get_json, rate_limit_wait
from soraflow.tasks.ingest.resumable_download import download_file
from soraflow.tasks.ingest.sources import probe_downloaded, probe_or_none, video_row

log = logging.getLogger(__name__)

KIND = "pexels"
ENV_KEY = "PEXELS_API_KEY"
MAX_PAGES = 10_000  # a server whose next_page never ends still stops


def api_key() -> str:
    key = os.environ.get(ENV_KEY, "").strip()
    if not key:
        raise BadInputError(f"set {ENV_KEY} to a Pexels API key to list Pexels videos")
    return key


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme.lower(), parts.netloc.lower()


def _area(f: dict) -> int:
    w, h = f.get("width"), f.get("height")
    return (w if isinstance(w, int) else 0) * (h if isinstance(h, int) else 0)


def _size(f: dict) -> int | None:
    s = f.get("size")
    return s if isinstance(s, int) and not isinstance(s, bool) and s >= 0 else None


def choose_file(files: Any, quality: str, max_bytes: int, min_width: int = 0) -> dict | None:
    """The file to fetch: preferred quality among the allowed (<= max_bytes, >= min_width wide;
    the largest such), else the largest allowed, else the smallest file; None if there is none."""
    usable = [
        f
        for f in (files if isinstance(files, list) else [])
        if isinstance(f, dict) and isinstance(f.get("link"), str) and f.get("file_type") in (None, "video/mp4")
    ]
    if not usable:
        return None
    allowed = [f for f in usable if (_size(f) is None or _size(f) <= max_bytes) and (f.get("width") or 0) >= min_width]
    preferred = [f for f in allowed if f.get("quality") == quality]
    if preferred:
        return max(preferred, key=_area)
    if allowed:
        return max(allowed, key=_area)
    return min(usable, key=lambda f: (_size(f) if _size(f) is not None else 1 << 62, _area(f)))


def _item(v: dict, source: SourceConfig) -> dict:
    f = choose_file(v.get("video_files"), source.quality, source.max_file_bytes, source.min_width)
    item = {
        "video_id": str(v.get("id")),
        "page_url": v.get("url") if isinstance(v.get("url"), str) else None,
        "width": v.get("width"),
        "height": v.get("height"),
        "duration": v.get("duration"),
        "file": None,
    }
    if f is None:
        item["error"] = "no mp4 file with a link in video_files"
    else:
        item["file"] = {k: f.get(k) for k in ("id", "link", "quality", "width", "height", "fps", "size", "file_type")}
    return item


def list_items(source: SourceConfig, http: HttpConfig, root: DataRoot, *, session=None, sleep=time.sleep) -> list[dict]:
    """One item per video from search (source.query) or popular, following next_page."""
    headers = {"Authorization": api_key()}
    base = source.url.rstrip("/")
    if source.query:
        url, params = f"{base}/videos/search", {"query": source.query, "per_page": source.per_page, "page": 1}
    else:
        url, params = f"{base}/videos/popular", {"per_page": source.per_page, "page": 1}
    origin = _origin(url)
    limit = source.max_videos
    items: list[dict] = []
    seen_pages: set[str] = set()
    seen_ids: set[str] = set()
    duplicates = 0
    for _ in range(MAX_PAGES):
        data, resp_headers = get_json(url, cfg=http, headers=headers, params=params, session=session, sleep=sleep)
        if not isinstance(data, dict):
            raise BadInputError(f"{url}: expected a JSON object with 'videos'")
        videos = data.get("videos") if isinstance(data.get("videos"), list) else []
        for v in videos:
            if not isinstance(v, dict):
                continue
            if source.min_width and isinstance(v.get("width"), int) and v["width"] < source.min_width:
                continue
            vid = str(v.get("id"))
            if vid in seen_ids:  # the same video on two pages: listed once, counted
                duplicates += 1
                continue
            seen_ids.add(vid)
            items.append(_item(v, source))
            if limit is not None and len(items) >= limit:
                break
        if limit is not None and len(items) >= limit:
            break
        nxt = data.get("next_page")
        if not isinstance(nxt, str) or not nxt or not videos:
            break
        if _origin(nxt) != origin:
            raise BadInputError(
                f"{url}: next_page points at another host ({urlsplit(nxt).netloc!r}); the key is not sent there"
            )
        if nxt in seen_pages:
            break
        seen_pages.add(nxt)
        _respect_rate_limit(resp_headers, http, sleep)
        url, params = nxt, None
    if duplicates:
        log.warning("Pexels listing: %d duplicate video(s) across pages listed once", duplicates)
    return items


def _respect_rate_limit(headers, http: HttpConfig, sleep) -> None:
    """Before the next call: wait for the reset when the budget is spent (capped)."""
    if str(headers.get("X-Ratelimit-Remaining", "")).strip() == "0":
        wait = rate_limit_wait({"X-Ratelimit-Reset": headers.get("X-Ratelimit-Reset", "")}, http)
        wait = http.backoff_max_s if wait is None else wait
        log.info("Pexels rate limit spent; waiting %.1f s for the reset", wait)
        sleep(wait)


def download_item(
    source: SourceConfig, item: dict, root: DataRoot, http: HttpConfig, *, session=None, sleep=time.sleep
) -> list[dict]:
    """Fetch the chosen file of one video (no key sent) -> one row."""
    vid = safe_id(item.get("video_id"), "video id")
    page = item.get("page_url")
    f = item.get("file") if isinstance(item.get("file"), dict) else None
    if item.get("error") or not f or not isinstance(f.get("link"), str):
        raise BadInputError(f"{page or vid}: {item.get('error') or 'no file link'}")
    dest = root.raw(KIND, vid)
    # One fetch per file at a time: the same video listed twice, or another ingest on this root,
    # waits and then finds the file done instead of fetching it again.
    with file_lock(path_lock_file(f"{dest}#item"), what=f"Pexels video {vid}"):
        info = probe_or_none(dest)  # idempotent: a file that exists and probes is kept
        if info is None:
            size = _size(f)
            cap = max(source.max_file_bytes, size or 0)  # the smallest-file fallback may be larger
            cfg = http.model_copy(update={"max_bytes": min(http.max_bytes, cap)})
            dest.unlink(missing_ok=True)
            download_file(f["link"], dest, cfg=cfg, session=session, sleep=sleep)  # a listed size is only a hint
            info = probe_downloaded(dest, f["link"])
    return [video_row(KIND, vid, page, dest, info)]

"""Data acquisition: ask a source what it has, then fetch it into raw/<source>/.

    list_items(source, http, root)            -> [item, ...]   JSON-serialisable work items
    download_items(source, items, root, http) -> [row, ...]    manifest rows, ok or rejected

One module per source kind (hdvg, inter4k, pexels), each with the same two functions; this
package dispatches on `source.kind`. All network traffic goes through tasks.http.

* A single item that fails (404, unsafe id, not a video, malformed metadata, or any other
  error while handling it) becomes a rejected row whose `error` names the URL or id and what
  is wrong; it never fails the shard.
* A source whose listing fails becomes one rejected row naming the source (`list_items_or_error`);
  the other sources go on.
* A network outage that outlasts the retries (TransientError) raises: Prefect retries the shard.
* A fault of the machine (disk full, I/O error, out of memory: storage.faults) raises
  EnvironmentFault: never a rejected row, never cached.
* Idempotent: a raw file that exists and probes is not fetched again; partial files resume.
* Ids from the source are checked with storage.layout.safe_id before they name a file.
"""

from __future__ import annotations

import importlib
import logging
import time
from pathlib import Path
from typing import Any, Callable

import requests
from soraflow.configs.schema import HttpConfig, SourceConfig
from soraflow.storage.faults import raise_if_environment
from soraflow.storage.layout import DataRoot, LockHeldError, UnsafePathError
from soraflow.storage.data.manifest import new_row, reject
from soraflow.storage.redact import redact_text, redact_url
from soraflow.storage.data.video_io import VideoError, VideoInfo, probe_video, sha256_file
from soraflow.tasks.ingest.http import BadInputError, TransientError

__all__ = ["list_items", "list_items_or_error", "download_items"]

log = logging.getLogger(__name__)

_KINDS = {
    "hdvg": "hdvg",
    "inter4k": "inter4k",
    "pexels": "pexels",
    "folder": "folder",
    "csv": "listfile",
    "parquet": "listfile",
}
LISTING_ERROR = "listing_error"  # the key of the one item a failed listing leaves


def _module(kind: str):
    if kind not in _KINDS:
        raise BadInputError(f"unknown source kind {kind!r} (expected one of {tuple(_KINDS)})")
    return importlib.import_module(f"soraflow.tasks.ingest.sources.{_KINDS[kind]}")


def list_items(source: SourceConfig, http: HttpConfig, root: DataRoot, *, session: requests.Session | None = None,
               sleep: Callable[[float], None] = time.sleep) -> list[dict]:
    """The source's work items (at most source.max_videos), as JSON-serialisable dicts."""
    mod = _module(source.kind)
    with _session(session) as sess:
        items = mod.list_items(source, http, root, session=sess, sleep=sleep)
    if source.max_videos is not None:
        items = items[: source.max_videos]
    log.info("%s: %d item(s) listed", source.kind, len(items))
    return items


def list_items_or_error(source: SourceConfig, http: HttpConfig, root: DataRoot, **kw: Any) -> list[dict]:
    """list_items, or, when listing the source fails for any reason but a machine fault, one
    item that download_items turns into a rejected row naming the source and the reason."""
    try:
        return list_items(source, http, root, **kw)
    except Exception as e:  # noqa: BLE001 - any failure of one source is reported, the others go on
        raise_if_environment(e, f"listing {source.kind} source {redact_url(source.url)}")
        reason = redact_text(
            describe(e)
            if isinstance(e, (BadInputError, TransientError, UnsafePathError))
            else f"{type(e).__name__}: {e}"
        )
        log.warning("%s source %s could not be listed: %s", source.kind, redact_url(source.url), reason)
        return [
            {
                "video_id": f"{source.kind}-source",
                "source_url": redact_url(source.url),
                LISTING_ERROR: f"listing the source failed: {reason}",
            }
        ]


def download_items(source: SourceConfig, items: list[dict], root: DataRoot, http: HttpConfig, *,
                   session: requests.Session | None = None, sleep: Callable[[float], None] = time.sleep) -> list[dict]:
    """Fetch every item -> manifest rows (one or more per item; failures are rejected rows)."""
    mod = _module(source.kind)
    rows: list[dict] = []
    with _session(session) as sess:
        for item in items:
            if isinstance(item, dict) and item.get(LISTING_ERROR):
                rows.append(item_error_row(source.kind, item, str(item[LISTING_ERROR])))
                continue
            try:
                rows.extend(mod.download_item(source, item, root, http, session=sess, sleep=sleep))
            except (TransientError, LockHeldError):
                raise  # the network, or another run holding this file: not this item's fault; the shard is retried
            except Exception as e:  # noqa: BLE001 - one item's failure is its row's rejection
                raise_if_environment(e, f"{source.kind} item {_item_name(item)}")
                rows.append(item_error_row(source.kind, item, e))
    return rows


def _item_name(item: Any) -> str:
    return str(item.get("video_id"))[:80] if isinstance(item, dict) else "?"


# ---------------------------------------------------------------- helpers shared by the source modules


class _session:
    """The caller's session, or a fresh one closed on exit."""

    def __init__(self, session: requests.Session | None):
        self.given, self.own = session, None

    def __enter__(self) -> requests.Session:
        if self.given is not None:
            return self.given
        self.own = requests.Session()
        return self.own

    def __exit__(self, *exc) -> None:
        if self.own is not None:
            self.own.close()


def describe(e: BaseException) -> str:
    """An error for a row: 'unsafe id: ...' for ids that could escape the data root; errors of
    no expected kind (a bug, or input nobody foresaw) keep their type name."""
    if isinstance(e, UnsafePathError):
        return f"unsafe id: {e}"
    if isinstance(e, (BadInputError, VideoError, TransientError)):
        return str(e)
    return f"{type(e).__name__}: {e}"


def item_error_row(kind: str, item: Any, e: BaseException | str, **extra: Any) -> dict:
    """A rejected row for an item that failed as a whole."""
    item = item if isinstance(item, dict) else {}
    video_id = "".join(c if c.isprintable() else "?" for c in str(item.get("video_id") or "unknown"))[:200] or "unknown"
    url = item.get("page_url") or item.get("source_url") or item.get("url")
    base = new_row(source=kind, video_id=video_id, source_url=redact_url(str(url)) if url else None, **extra)
    return reject(base, redact_text(e if isinstance(e, str) else describe(e)))


def probe_or_none(path: Path) -> VideoInfo | None:
    """The probe of an existing file, or None when it is missing or not a readable video."""
    if not path.exists():
        return None
    try:
        return probe_video(path)
    except VideoError as e:
        raise_if_environment(e, f"probing {path}")
        return None


def video_row(kind: str, video_id: str, source_url: str | None, path: Path, info: VideoInfo, **extra: Any) -> dict:
    """An ok row for a probed file."""
    return new_row(
        source=kind,
        video_id=video_id,
        source_url=redact_url(source_url) if source_url else None,
        path=str(path),
        sha256=sha256_file(path),
        num_frames=info.num_frames,
        fps=info.fps,
        height=info.height,
        width=info.width,
        status="ok",
        **extra,
    )


def probe_downloaded(path: Path, url: str) -> VideoInfo:
    """Probe a file just fetched; one that does not probe is removed and reported as bad input."""
    try:
        return probe_video(path)
    except VideoError as e:
        raise_if_environment(e, f"probing {path}")
        path.unlink(missing_ok=True)
        reason = str(e).replace(f"{path}: ", "")
        raise VideoError(f"{url}: not a readable video ({reason})") from None

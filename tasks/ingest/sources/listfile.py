"""Video lists: `kind: csv` / `kind: parquet`, a local file (`path`) or a remote one (`url`).

Each row names a local video (`path` column) or a remote one (`url` column) and may carry a
caption (`text`, else `caption`; `source.caption_column` picks another). The defaults read,
as they are:

* Open-Sora's CSV: `path,text,num_frames,...` with a header (v1.1+), or v1.0's headerless
  `path, caption, num_frames` (tools/datasets/README.md), recognised by a first row that
  names neither the path nor the url column; what `soraflow export --format opensora-csv` writes;
* video2dataset's url lists: `url,caption` (csv or parquet).

Relative paths are relative to the list's own folder (Open-Sora's `root`). A remote list may
only name URLs: a local path that came over the network is refused, never opened. Remote
videos are fetched through tasks.ingest.http (its retries, size limit and URL policy) into
raw/<kind>/. Every row ends as an ok row or a rejected one naming the list, the row and why.
"""

from __future__ import annotations

import csv
import hashlib
import re
import time
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

from soraflow.configs.schema import HttpConfig, SourceConfig
from soraflow.storage.layout import DataRoot, safe_join
from soraflow.tasks.ingest.http import BadInputError
from soraflow.tasks.ingest.resumable_download import download_file
from soraflow.tasks.ingest.sources import probe_downloaded, probe_or_none, video_row
from soraflow.tasks.ingest.sources.folder import VIDEO_EXTENSIONS, quick_probe

HEADERLESS = ("path", "text", "num_frames")  # Open-Sora v1.0's column order
_EXT = re.compile(r"^\.[A-Za-z0-9]{1,5}$")


def row_video_id(value: str) -> str:
    """A file-name-safe id unique per listed path or URL: '<stem>-<hash10>'."""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "-", PurePosixPath(urlsplit(value).path).stem).strip("-")[:60] or "video"
    return f"{stem}-{hashlib.sha256(value.encode()).hexdigest()[:10]}"


def fetch_list(source: SourceConfig, http: HttpConfig, root: DataRoot, session, sleep) -> Path:
    """The list file: the local `path`, or `url` fetched afresh into tmp/<kind>/."""
    if source.path:
        p = Path(source.path).expanduser()
        if not p.is_file():
            raise BadInputError(f"source kind {source.kind!r}: path {str(p)!r}: no such file")
        return p.resolve()
    dest = safe_join(root.tmp, source.kind, f"{hashlib.sha256(source.url.encode()).hexdigest()[:16]}.{source.kind}")
    dest.unlink(missing_ok=True)  # a scheduled re-ingest must see the list as it is today
    download_file(source.url, dest, cfg=http, session=session, sleep=sleep)
    return dest


def read_table(path: Path, source: SourceConfig) -> tuple[list[str], list[dict]]:
    """(column names, rows as dicts) of a csv or parquet list; BadInputError when unreadable."""
    where = source.url or str(path)
    if source.kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except (pa.ArrowException, OSError) as e:
            raise BadInputError(f"{where}: not a readable Parquet file: {e}") from None
        return table.column_names, table.to_pylist()
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            records = list(csv.reader(f))
    except (UnicodeDecodeError, csv.Error) as e:
        raise BadInputError(f"{where}: not a readable CSV file: {e}") from None
    if not records:
        return [], []
    first = [c.strip() for c in records[0]]
    if (
        Path(first[0]).suffix.lower() in VIDEO_EXTENSIONS
        and source.path_column not in first
        and source.url_column not in first
    ):
        # Open-Sora v1.0: no header, the first row is already path, caption[, num_frames]
        return list(HEADERLESS), [dict(zip(HEADERLESS, r)) for r in records]
    return first, [dict(zip(first, r)) for r in records[1:]]


def list_items(source: SourceConfig, http: HttpConfig, root: DataRoot, *, session=None, sleep=time.sleep) -> list[dict]:
    """One item per row of the list (rows that cannot be used carry their error)."""
    path = fetch_list(source, http, root, session, sleep)
    where = source.url or str(path)
    columns, rows = read_table(path, source)
    if rows and source.path_column not in columns and source.url_column not in columns:
        raise BadInputError(f"{where}: neither a {source.path_column!r} nor a {source.url_column!r} column "
                            f"(columns: {', '.join(columns)}); set path_column / url_column of the source")
    caption_col = source.caption_column or next((c for c in ("text", "caption") if c in columns), None)
    if source.caption_column and source.caption_column not in columns:
        raise BadInputError(f"{where}: no caption column {source.caption_column!r} (columns: {', '.join(columns)})")
    items = []
    for i, row in enumerate(rows):
        local = str(row.get(source.path_column) or "").strip()
        remote = str(row.get(source.url_column) or "").strip()
        text = " ".join(str(row.get(caption_col) or "").split()) if caption_col else ""
        ref = f"{where}#row={i}"
        item = {"video_id": row_video_id(remote or local or ref), "row": i, "list": where, "text": text or None}
        if remote:
            item["url"] = item["source_url"] = remote
        elif local and source.url:
            item["source_url"] = ref
            item["error"] = (
                f"{ref}: local path {local[:200]!r} in a remote list: not opened (remote lists may only name URLs)"
            )
        elif local:
            p = Path(local).expanduser()
            item["path"] = str(p if p.is_absolute() else path.parent / p)
            item["source_url"] = Path(item["path"]).absolute().as_uri()
        else:
            item["source_url"] = ref
            item["error"] = f"{ref}: empty {source.path_column!r} and {source.url_column!r}"
        items.append(item)
    return items


def download_item(
    source: SourceConfig, item: dict, root: DataRoot, http: HttpConfig, *, session=None, sleep=time.sleep
) -> list[dict]:
    """A listed local file probed in place, or a listed URL fetched into raw/<kind>/ -> one row."""
    ref = f"{item.get('list')}#row={item.get('row')}"
    if item.get("error"):
        raise BadInputError(item["error"])
    vid = item["video_id"]
    if item.get("path"):
        p = Path(item["path"])
        if not p.is_file():
            raise BadInputError(f"{ref}: {p}: no such file")
        return [video_row(source.kind, vid, item["source_url"], p, quick_probe(p), text=item.get("text"))]
    url = item["url"]
    ext = PurePosixPath(urlsplit(url).path).suffix.lower()
    dest = root.raw(source.kind, vid, ext[1:] if _EXT.match(ext) else "mp4")
    info = probe_or_none(dest)  # idempotent: a fetched file that probes is not fetched again
    if info is None:
        download_file(url, dest, cfg=http, session=session, sleep=sleep)
        info = probe_downloaded(dest, url)
    return [video_row(source.kind, vid, url, dest, info, text=item.get("text"))]

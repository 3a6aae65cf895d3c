"""Parquet manifests: the table every stage reads and writes.

Columns keep Open-Sora's names (path, text, num_frames, height, width, aspect_ratio,
resolution, fps, aes, flow, match) so its loaders and filters apply unchanged, plus
SoraFlow's own (clip_id, video_id, source, source_url, start_s, end_s, caption_source,
sha256, status, error). Lineage lives in the Parquet schema metadata under b"soraflow".
A manifest is immutable and named by its content hash, which is the dataset version.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq
from soraflow.storage.layout import DataRoot, atomic_output
from soraflow.storage.redact import redact_config

STATUSES = ("ok", "rejected")

SCHEMA = pa.schema(
    [
        ("path", pa.string()),  # the file this row is about (raw video or clip)
        ("text", pa.string()),  # caption
        ("num_frames", pa.int64()),
        ("height", pa.int64()),
        ("width", pa.int64()),
        ("aspect_ratio", pa.float64()),  # height / width
        ("resolution", pa.int64()),  # height * width
        ("fps", pa.float64()),
        ("aes", pa.float64()),  # aesthetic score
        ("flow", pa.float64()),  # motion score (mean optical-flow magnitude)
        ("match", pa.float64()),  # text-video match score
        ("clip_id", pa.string()),
        ("video_id", pa.string()),
        ("source", pa.string()),  # hdvg | inter4k | pexels
        ("source_url", pa.string()),
        # Time range in seconds. Download rows: the window of `path` that split must cut (None =
        # the whole file). Clip rows: where the clip was cut from in its source (lineage).
        ("start_s", pa.float64()),
        ("end_s", pa.float64()),
        ("caption_source", pa.string()),  # source | llava
        ("sha256", pa.string()),  # of the file at `path`
        ("status", pa.string()),  # ok | rejected
        ("error", pa.string()),  # why a row was rejected
    ]
)
COLUMNS = tuple(SCHEMA.names)
_INT = {f.name for f in SCHEMA if pa.types.is_integer(f.type)}
_FLOAT = {f.name for f in SCHEMA if pa.types.is_floating(f.type)}
_REQUIRED = ("video_id", "source", "status")


class ManifestError(ValueError):
    """A manifest file or row that does not fit the schema; names the column and row."""


def new_row(**values: Any) -> dict[str, Any]:
    """A full manifest row: every column present, unknown keys refused, derived columns filled."""
    unknown = set(values) - set(COLUMNS)
    if unknown:
        raise ManifestError(f"unknown manifest column(s): {sorted(unknown)}")
    row = {c: None for c in COLUMNS}
    row.update(values)
    row.setdefault("status", "ok")
    if row["status"] is None:
        row["status"] = "ok"
    h, w = row.get("height"), row.get("width")
    if h and w:
        row["aspect_ratio"] = row["aspect_ratio"] if row["aspect_ratio"] is not None else h / w
        row["resolution"] = row["resolution"] if row["resolution"] is not None else h * w
    return row


def reject(row: dict[str, Any], error: str) -> dict[str, Any]:
    """A copy of `row` marked rejected with the reason; nothing else about it is lost."""
    out = dict(row)
    out["status"] = "rejected"
    out["error"] = str(error)[:2000]
    return out


def validate_rows(rows: list[dict[str, Any]], source: str = "manifest") -> None:
    """Raise ManifestError naming the row and column of the first bad value."""
    for i, row in enumerate(rows):
        for col in _REQUIRED:
            if not row.get(col):
                raise ManifestError(f"{source}: row {i}: column '{col}' is empty")
        if row["status"] not in STATUSES:
            raise ManifestError(f"{source}: row {i}: column 'status' is {row['status']!r}, expected one of {STATUSES}")
        if row["status"] == "rejected" and not row.get("error"):
            raise ManifestError(f"{source}: row {i}: rejected row has no 'error'")
        if row["status"] == "ok" and not row.get("path"):
            raise ManifestError(f"{source}: row {i}: ok row has no 'path'")
        for col in _INT:
            v = row.get(col)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
                raise ManifestError(f"{source}: row {i}: column '{col}' must be a non-negative integer, got {v!r}")
        for col in _FLOAT:
            v = row.get(col)
            if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or math.isnan(float(v))):
                raise ManifestError(f"{source}: row {i}: column '{col}' must be a number, got {v!r}")


def to_table(rows: list[dict[str, Any]], lineage: dict[str, Any] | None = None) -> pa.Table:
    full = [new_row(**r) for r in rows]
    validate_rows(full)
    cols = {c: [r[c] for r in full] for c in COLUMNS}
    for c in _FLOAT:
        cols[c] = [None if v is None else float(v) for v in cols[c]]
    table = pa.Table.from_pydict(cols, schema=SCHEMA)
    meta = {b"soraflow": json.dumps(lineage or {}, sort_keys=True, default=str).encode()}
    return table.replace_schema_metadata(meta)


def content_hash(table: pa.Table) -> str:
    """The dataset version: a hash of the rows only (not of lineage or creation time)."""
    return rows_hash(table.select(list(COLUMNS)).to_pylist())


def rows_hash(rows: list[dict[str, Any]]) -> str:
    """content_hash of the rows a table holds (read_rows' list), without the table."""
    h = hashlib.sha256()
    for row in rows:
        h.update(json.dumps(row, sort_keys=True, default=str).encode())
        h.update(b"\n")
    return h.hexdigest()[:16]


def write_manifest(
    rows: list[dict[str, Any]],
    stage: str,
    root: DataRoot,
    inputs: Iterable[str | Path] = (),
    config_hash: str | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write rows as manifests/<stage>/<hash>.parquet (atomically) and return the path.

    The same rows give the same file, so re-running a stage never duplicates a manifest.
    """
    from soraflow.storage import code_version

    lineage = {
        "stage": stage,
        "inputs": [str(p) for p in inputs],
        "config_hash": config_hash,
        "code_version": code_version(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **(extra or {}),
    }
    table = to_table(rows, redact_config(lineage))  # lineage is readable by anyone with the file
    version = content_hash(table)
    path = root.manifest_dir(stage) / f"{version}.parquet"
    if path.exists():
        return path
    with atomic_output(path) as tmp:
        pq.write_table(table, tmp)
    return path


def mark_duplicates(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """Rows with every ok row after the first of its (source, video_id, clip_id) rejected as a
    duplicate of that first one -> (rows, how many were marked). Order and count are kept."""
    first: dict[tuple, int] = {}
    out, n = [], 0
    for i, row in enumerate(rows):
        key = (row.get("source"), row.get("video_id"), row.get("clip_id"))
        if row.get("status") == "ok" and key in first:
            out.append(
                reject(row, f"duplicate: same source, video id and clip id as row {first[key]} ({key[1]}, {key[2]})")
            )
            n += 1
            continue
        if row.get("status") == "ok":
            first[key] = i
        out.append(row)
    return out, n


def read_manifest(path: str | Path) -> pa.Table:
    path = Path(path)
    if not path.exists():
        raise ManifestError(f"{path}: no such manifest")
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise ManifestError(f"{path}: not a readable Parquet file: {e}") from e
    missing = [c for c in COLUMNS if c not in table.column_names]
    if missing:
        raise ManifestError(f"{path}: missing column(s) {missing}")
    return table


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    rows = read_manifest(path).select(list(COLUMNS)).to_pylist()
    validate_rows(rows, str(path))
    return rows


def read_rows_range(path: str | Path, start: int, stop: int) -> list[dict[str, Any]]:
    """Rows [start, stop) of a manifest, validated: what one shard task reads.

    Converting and validating only the shard's rows keeps a stage's cost linear in its rows;
    `read_rows(path)[start:stop]` in every shard made it quadratic (each of the N/size shards
    turned all N rows into Python dicts).
    """
    table = read_manifest(path).select(list(COLUMNS))
    start = max(0, min(int(start), table.num_rows))
    rows = table.slice(start, max(0, min(int(stop), table.num_rows) - start)).to_pylist()
    validate_rows(rows, f"{path} rows [{start}, {stop})")
    return rows


def ok_rows(path_or_rows: str | Path | list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = read_rows(path_or_rows) if isinstance(path_or_rows, (str, Path)) else path_or_rows
    return [r for r in rows if r["status"] == "ok"]


def lineage(path: str | Path) -> dict[str, Any]:
    meta = read_manifest(path).schema.metadata or {}
    return json.loads(meta.get(b"soraflow", b"{}"))


def dataset_version(path: str | Path) -> str:
    """The content hash of a manifest (its file stem when written by write_manifest)."""
    return content_hash(read_manifest(path))


def shard_ranges(n: int, size: int) -> list[tuple[int, int]]:
    """[start, stop) row ranges of at most `size` rows covering n rows: the shards a stage maps over."""
    size = max(1, int(size))
    return [(i, min(i + size, n)) for i in range(0, n, size)]


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Statistics for an artifact or a summary table."""
    ok = [r for r in rows if r["status"] == "ok"]
    rejected = [r for r in rows if r["status"] == "rejected"]
    by_source: dict[str, int] = {}
    by_caption: dict[str, int] = {}
    reasons: dict[str, int] = {}
    for r in ok:
        by_source[r["source"]] = by_source.get(r["source"], 0) + 1
        key = r["caption_source"] or "none"
        by_caption[key] = by_caption.get(key, 0) + 1
    for r in rejected:
        reason = (r["error"] or "").split(":")[0][:60]
        reasons[reason] = reasons.get(reason, 0) + 1
    return {
        "rows": len(rows),
        "ok": len(ok),
        "rejected": len(rejected),
        "videos": len({(r["source"], r["video_id"]) for r in rows}),
        "ok_by_source": by_source,
        "caption_sources": by_caption,
        "reject_reasons": reasons,
        "total_frames": sum(r["num_frames"] or 0 for r in ok),
    }

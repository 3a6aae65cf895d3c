"""The ingest stages as Prefect tasks: one shard in, one shard manifest out.

Each task wraps a plain stage function (tasks/ingest/sources, scene_split, caption, score) and
takes the validated config section it needs (SourceConfig, HttpConfig, SplitConfig, ...:
validated once, when the flow loaded the config) plus paths; it returns the manifest path. A
retry repeats one shard; bad input never retries (it is already a rejected row); outputs are
content-addressed manifests, so a task is cached across runs on its inputs and source.

Results are persisted as JSON (the path strings the tasks return), never pickled. Only
completed shards are cached: a shard that failed (a machine fault such as a full disk, a
network outage after the retries) leaves no cache record, so a rerun does it again. A cached
result expires after STAGE_CACHE_EXPIRATION, and `checked_result` reruns a shard whose cached
manifest, or any file its ok rows point at, is gone.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from prefect import task
from soraflow.configs.schema import (
    CaptionConfig,
    HttpConfig,
    ScoreConfig,
    SourceConfig,
    SplitConfig,
)
from soraflow.storage.layout import DataRoot, atomic_write_text
from soraflow.storage.data.manifest import (
    ManifestError,
    mark_duplicates,
    read_rows,
    read_rows_range,
    write_manifest,
)
from soraflow.tasks.task_policy import (
    RETRY_DELAYS,
    RETRY_JITTER,
    STAGE_CACHE_EXPIRATION,
    retry_unless_bad_input,
    stage_cache_key,
)

_task_options = dict(
    retries=3,
    retry_delay_seconds=RETRY_DELAYS,
    retry_jitter_factor=RETRY_JITTER,
    retry_condition_fn=retry_unless_bad_input,
    cache_key_fn=stage_cache_key,
    cache_expiration=STAGE_CACHE_EXPIRATION,
    persist_result=True,
    result_serializer="json",
)


def outputs_intact(manifest: str) -> bool:
    """The manifest exists and so does every file its ok rows point at."""
    try:
        return all(Path(r["path"]).exists() for r in read_rows(manifest) if r["status"] == "ok")
    except ManifestError:
        return False


def checked_result(task_obj, future, *args) -> str:
    """The shard's manifest; a cached one whose files are gone is made again (cache refreshed)."""
    out = future.result()
    if outputs_intact(out):
        return out
    return task_obj.with_options(refresh_cache=True)(*args)


def listing_path(root: DataRoot, items: list[dict]) -> Path:
    blob = json.dumps(items, sort_keys=True).encode()
    return root.manifest_dir("listing") / f"{hashlib.sha256(blob).hexdigest()[:16]}.json"


@task(name="list-source", retries=3, retry_delay_seconds=RETRY_DELAYS, retry_jitter_factor=RETRY_JITTER,
      retry_condition_fn=retry_unless_bad_input, result_serializer="json")
def list_source(source: SourceConfig, http: HttpConfig, data_root: str) -> str:
    """Ask one source what it has (metadata file, zip, or API pages) and store the listing.

    A source that cannot be listed gives a one-item listing that becomes a rejected row naming
    it (the other sources go on). Never cached across runs: a scheduled re-ingest must see what
    the source holds today."""
    from soraflow.tasks.ingest.sources import list_items_or_error

    items = list_items_or_error(source, http, DataRoot(data_root))
    path = listing_path(DataRoot(data_root), items)
    if not path.exists():
        atomic_write_text(path, json.dumps(items, indent=1, sort_keys=True))
    return str(path)


def listing_len(path: str) -> int:
    return len(json.loads(Path(path).read_text()))


@task(name="download-shard", **_task_options)
def download_shard(source: SourceConfig, listing: str, start: int, stop: int, http: HttpConfig, data_root: str) -> str:
    """Download items [start, stop) of a listing; failures of single items become rejected rows."""
    from soraflow.tasks.ingest.sources import download_items

    items = json.loads(Path(listing).read_text())[start:stop]
    rows = download_items(source, items, DataRoot(data_root), http)
    return str(write_manifest(rows, "download-shards", DataRoot(data_root), inputs=[listing]))


@task(name="split-shard", **_task_options)
def split_shard(manifest: str, start: int, stop: int, split: SplitConfig, data_root: str) -> str:
    """Detect scenes and cut clips for rows [start, stop) of a manifest."""
    from soraflow.tasks.ingest.scene_split import split_rows

    rows = read_rows_range(manifest, start, stop)
    out = split_rows(rows, DataRoot(data_root), split)
    return str(write_manifest(out, "split-shards", DataRoot(data_root), inputs=[manifest]))


@task(name="caption-shard", **_task_options)
def caption_shard(manifest: str, start: int, stop: int, caption: CaptionConfig, data_root: str) -> str:
    """Caption rows [start, stop) with the configured captioners, in order."""
    from soraflow.tasks.ingest.caption import caption_rows

    rows = read_rows_range(manifest, start, stop)
    out = caption_rows(rows, caption)
    return str(write_manifest(out, "caption-shards", DataRoot(data_root), inputs=[manifest]))


@task(name="score-shard", **_task_options)
def score_shard(manifest: str, start: int, stop: int, score: ScoreConfig, data_root: str) -> str:
    """Motion (and aesthetic, when configured) scores and threshold filters for rows [start, stop)."""
    from soraflow.tasks.ingest.score import score_rows

    rows = read_rows_range(manifest, start, stop)
    out, notes = score_rows(rows, score)
    return str(write_manifest(out, "score-shards", DataRoot(data_root), inputs=[manifest], extra={"notes": notes}))


@task(name="merge-shards", **_task_options)
def merge_shards(shards: list[str], stage: str, inputs: list[str], config_hash: str, data_root: str) -> str:
    """Concatenate shard manifests (in order) into the stage's manifest."""
    from soraflow.storage.data.manifest import lineage

    rows, notes = [], []
    for path in shards:
        rows.extend(read_rows(path))
        notes.extend(n for n in lineage(path).get("notes", []) if n not in notes)
    rows, duplicates = mark_duplicates(rows)
    if duplicates:
        notes.append(f"{duplicates} duplicate row(s) rejected (same source, video id and clip id as an earlier ok row)")
    extra = {"notes": notes} if notes else None
    return str(write_manifest(rows, stage, DataRoot(data_root), inputs=inputs, config_hash=config_hash, extra=extra))


SHARD_TASKS = {"split": split_shard, "caption": caption_shard, "score": score_shard}

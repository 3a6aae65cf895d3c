"""Your own footage: every video file under a local folder (recursive), captioned by sidecars.

    source.path/                      items (one per video file, sorted by relative path)
      a.mp4, a.txt       ->  a.mp4 with text "<a.txt>"
      trip/b.MOV         ->  b.MOV with no text: the captioners in caption.captioners decide
      notes.md           ->  (not a video extension: not an input)
      link.mp4 -> /etc/x ->  rejected: a symlink out of the folder is never followed

Files are used where they are (nothing is copied into raw/); each row records the file's
hash. A file whose extension says video but that does not probe (a text file named .mp4, an
audio-only file) becomes a rejected row saying why; so does a symlink (file or folder) that
leads out of the folder. Items carry the size and mtime of the file, so a changed file
changes the listing and therefore the cache keys of the stages after it.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from pathlib import Path

from soraflow.configs.schema import HttpConfig, SourceConfig
from soraflow.storage.layout import DataRoot
from soraflow.storage.data.video_io import VideoError, VideoInfo, probe_video
from soraflow.tasks.ingest.http import BadInputError
from soraflow.tasks.ingest.sources import video_row

KIND = "folder"
# The containers Open-Sora's loaders take (mp4, avi, mov, mkv) and what cameras and phones write.
VIDEO_EXTENSIONS = frozenset(
    {".mp4", ".m4v", ".mov", ".mkv", ".avi", ".webm", ".mpg", ".mpeg", ".wmv", ".flv", ".ts", ".mts", ".m2ts", ".3gp"}
)


def file_video_id(rel: str) -> str:
    """A file-name-safe id from a relative path, unique per path: 'trip/b c.MOV' -> 'trip-b-c-<hash8>'."""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "-", rel.rsplit(".", 1)[0]).strip("-")[:80] or "video"
    return f"{stem}-{hashlib.sha256(rel.encode()).hexdigest()[:8]}"


def read_sidecar(video: Path) -> str | None:
    """The caption in `<stem>.txt` beside the video (whitespace collapsed), or None."""
    side = video.with_suffix(".txt")
    if not side.is_file():
        return None
    text = " ".join(side.read_text(encoding="utf-8", errors="replace").split())
    return text or None


def quick_probe(path: Path) -> VideoInfo:
    """Probe from the header (no full decode: a long 4K file costs milliseconds), counting
    frames by decoding only when the container does not say how many it holds."""
    try:
        return probe_video(path, count_frames=False)
    except VideoError:
        return probe_video(path)


def folder_of(source: SourceConfig) -> Path:
    folder = Path(source.path or "").expanduser()
    if not folder.is_dir():
        raise BadInputError(
            f"source kind 'folder': path {str(folder)!r} is not a folder "
            "(set ingest.sources[].path to your videos' folder)"
        )
    return folder.resolve()


def list_items(source: SourceConfig, http: HttpConfig, root: DataRoot, *, session=None, sleep=time.sleep) -> list[dict]:
    """Walk the folder (symlinks not followed) -> one item per video file or refused symlink."""
    folder = folder_of(source)
    items = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames.sort()
        here = Path(dirpath)
        for name in dirnames:
            if (here / name).is_symlink():  # os.walk does not descend; say so rather than skip silently
                rel = (here / name).relative_to(folder).as_posix()
                items.append({"video_id": file_video_id(rel), "rel": rel, "source_url": (here / name).as_uri(),
                              "error": f"{here / name}: symlinked folder, not followed"})
        for name in sorted(filenames):
            p = here / name
            if p.suffix.lower() not in VIDEO_EXTENSIONS:
                continue
            rel = p.relative_to(folder).as_posix()
            item = {"video_id": file_video_id(rel), "rel": rel, "source_url": p.as_uri()}
            if p.is_symlink():
                target = p.resolve()
                if folder not in target.parents:
                    item["error"] = f"{p}: symlink to {target}, outside the folder {folder}: not followed"
            if "error" not in item:
                st = p.stat()
                item.update(size=st.st_size, mtime_ns=st.st_mtime_ns)
            items.append(item)
    items.sort(key=lambda it: it["rel"])
    return items


def download_item(
    source: SourceConfig, item: dict, root: DataRoot, http: HttpConfig, *, session=None, sleep=time.sleep
) -> list[dict]:
    """Probe the file in place -> one ok row (with the sidecar caption, if any)."""
    if item.get("error"):
        raise BadInputError(item["error"])
    folder = folder_of(source)
    path = (folder / item["rel"]).resolve()
    if folder not in path.parents:  # the listing is ours, but a symlink may have changed since
        raise BadInputError(f"{folder / item['rel']}: leads outside the folder {folder}: not followed")
    if not path.is_file():
        raise BadInputError(f"{path}: no longer there (list the source again)")
    try:
        info = quick_probe(path)
    except VideoError as e:
        raise VideoError(f"{path}: not a readable video ({str(e).replace(f'{path}: ', '')})") from None
    return [video_row(KIND, item["video_id"], item["source_url"], path, info, text=read_sidecar(path))]

"""Inter4K: one zip (`tinyurl.com/inter4KUHD` redirects to Inter4K.zip), checked, then extracted safely.

Listing downloads the zip (resumable, through tasks.http), refuses the whole archive if any
entry is unsafe, and extracts the first `max_videos` members with its own copy loop:

* refused: absolute names, drive letters, backslashes, any '..' component, symlinks and other
  non-regular files (mode in external_attr >> 16), encrypted entries, duplicate stems, names
  outside the layout `[Inter4K/]60fps/UHD/<stem>.mp4`, members declared or streamed over
  `source.max_file_bytes`, a total over `http.max_bytes` (declared sizes and bytes counted);
* each member is streamed to raw/inter4k/<stem>.mp4 via atomic_output (never extractall).

After a complete extraction the zip is deleted and an index of its members is kept in
tmp/inter4k/, so listing again reuses the extracted files without downloading the zip.
Items carry no path: download_items rebuilds it from the (checked) id and probes the file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import stat
import time
import zipfile
from pathlib import Path

from soraflow.configs.schema import HttpConfig, SourceConfig
from soraflow.storage.layout import (
    DataRoot,
    atomic_output,
    atomic_write_text,
    safe_id,
    safe_join,
)
from soraflow.tasks.ingest.http import BadInputError
from soraflow.tasks.ingest.resumable_download import download_file
from soraflow.tasks.ingest.sources import probe_or_none, video_row

log = logging.getLogger(__name__)

KIND = "inter4k"
LAYOUT = re.compile(r"^(?:Inter4K/)?60fps/UHD/([A-Za-z0-9][A-Za-z0-9_-]{0,100})\.mp4$")
LAYOUT_DIRS = {"Inter4K/", "Inter4K/60fps/", "Inter4K/60fps/UHD/", "60fps/", "60fps/UHD/"}
_COPY_CHUNK = 1 << 20


def _natural(stem: str) -> tuple:
    return (0, int(stem), "") if stem.isdigit() else (1, 0, stem)


def _zip_paths(source: SourceConfig, root: DataRoot) -> tuple[Path, Path]:
    key = hashlib.sha256(source.url.encode()).hexdigest()[:16]
    return safe_join(root.tmp, KIND, f"{key}.zip"), safe_join(root.tmp, KIND, f"{key}.members.json")


def check_entries(zf: zipfile.ZipFile, member_cap: int, total_cap: int) -> list[dict]:
    """Every entry checked (BadInputError naming the first refused one) -> the mp4 members, in order."""
    members: dict[str, dict] = {}
    total = 0
    for info in zf.infolist():
        name = info.filename

        def refuse(why: str) -> BadInputError:
            return BadInputError(f"refused archive entry {name!r}: {why}")

        parts = name.split("/")
        if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
            raise refuse("absolute path")
        if "\\" in name or "\x00" in name:
            raise refuse("backslash or NUL in the name")
        if ".." in parts or "." in parts:
            raise refuse("'..' or '.' component")
        mode = info.external_attr >> 16
        if mode and stat.S_IFMT(mode) and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise refuse(f"not a regular file (mode {stat.filemode(mode)}: symlink or special file)")
        if info.flag_bits & 0x1:
            raise refuse("encrypted")
        if info.is_dir() or (mode and stat.S_ISDIR(mode)):
            if name.rstrip("/") + "/" not in LAYOUT_DIRS:
                raise refuse("folder outside the layout [Inter4K/]60fps/UHD/")
            continue
        m = LAYOUT.match(name)
        if not m:
            raise refuse("outside the layout [Inter4K/]60fps/UHD/<n>.mp4")
        stem = safe_id(m.group(1), "member name")
        if stem in members:
            raise refuse(f"second entry for video {stem!r}")
        if info.file_size > member_cap:
            raise refuse(f"{info.file_size} bytes is over the per-file limit of {member_cap}")
        total += info.file_size
        if total > total_cap:
            raise refuse(f"the archive's total of {total}+ bytes is over the limit of {total_cap}")
        members[stem] = {"video_id": stem, "member": name, "size": info.file_size, "crc": info.CRC}
    return [members[s] for s in sorted(members, key=_natural)]


def extract_member(zf: zipfile.ZipFile, member: dict, dest: Path, member_cap: int, budget: list[int]) -> int:
    """Stream one member to `dest` atomically, counting bytes against its size and the total budget."""
    info = zf.getinfo(member["member"])
    n = 0
    try:
        with zf.open(info) as src, atomic_output(dest) as tmp:
            with open(tmp, "wb") as out:
                while chunk := src.read(_COPY_CHUNK):
                    n += len(chunk)
                    budget[0] -= len(chunk)
                    if n > info.file_size or n > member_cap:
                        raise BadInputError(
                            f"refused archive entry {info.filename!r}: more bytes than its declared {info.file_size}"
                        )
                    if budget[0] < 0:
                        raise BadInputError(
                            f"refused archive entry {info.filename!r}: the archive expands past the total limit"
                        )
                    out.write(chunk)
            if n != info.file_size:
                raise BadInputError(f"refused archive entry {info.filename!r}: {n} bytes, declared {info.file_size}")
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, RuntimeError, EOFError) as e:
        raise BadInputError(f"archive entry {info.filename!r} could not be read: {e}") from None
    return n


def _extracted(root: DataRoot, member: dict) -> bool:
    path = root.raw(KIND, safe_id(member["video_id"], "video id"))
    return path.exists() and path.stat().st_size == member["size"]


def list_items(source: SourceConfig, http: HttpConfig, root: DataRoot, *, session=None, sleep=time.sleep) -> list[dict]:
    """Download (resumable) and check the zip, extract the first max_videos members -> one item each."""
    zpath, index = _zip_paths(source, root)
    limit = source.max_videos
    if index.exists():  # an earlier listing extracted these; reuse them if they are all still there
        members = json.loads(index.read_text())
        chosen = members[:limit] if limit is not None else members
        if all(_extracted(root, m) for m in chosen):
            return [_item(source, m) for m in chosen]
    if not (zpath.exists() and zipfile.is_zipfile(zpath)):
        zpath.unlink(missing_ok=True)
        download_file(source.url, zpath, cfg=http, session=session, sleep=sleep)
    member_cap = min(source.max_file_bytes, http.max_bytes)
    try:
        with zipfile.ZipFile(zpath) as zf:
            members = check_entries(zf, member_cap, http.max_bytes)
            chosen = members[:limit] if limit is not None else members
            budget = [http.max_bytes]
            for m in chosen:
                if _extracted(root, m):  # idempotent: already extracted with the declared size
                    budget[0] -= m["size"]
                    continue
                extract_member(zf, m, root.raw(KIND, m["video_id"]), member_cap, budget)
    except zipfile.BadZipFile as e:
        zpath.unlink(missing_ok=True)  # a damaged download: fetch it again next time
        raise BadInputError(f"{source.url}: not a readable zip archive: {e}") from None
    atomic_write_text(index, json.dumps(members))
    if len(chosen) == len(members):
        zpath.unlink(missing_ok=True)  # everything is extracted and indexed
    log.info("%s: %d of %d member(s) extracted", source.url, len(chosen), len(members))
    return [_item(source, m) for m in chosen]


def _item(source: SourceConfig, member: dict) -> dict:
    return {
        "video_id": member["video_id"],
        "member": member["member"],
        "size": member["size"],
        "source_url": f"{source.url}#{member['member']}",
    }


def download_item(
    source: SourceConfig, item: dict, root: DataRoot, http: HttpConfig, *, session=None, sleep=time.sleep
) -> list[dict]:
    """The listing already extracted the file: check and probe it -> one row."""
    vid = safe_id(item.get("video_id"), "video id")
    url = item.get("source_url")
    path = root.raw(KIND, vid)
    if not path.exists():
        raise BadInputError(f"{url or vid}: {path} is missing (the listing extracts it; list the source again)")
    info = probe_or_none(path)
    if info is None:
        raise BadInputError(f"{url or vid}: not a readable video ({path})")
    return [video_row(KIND, vid, url, path, info)]

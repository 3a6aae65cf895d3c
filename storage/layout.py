"""Where things live under the data root, and the guards for names that come from outside.

    raw/<source>/<video_id>.<ext>            downloaded originals
    clips/<source>/<split>/<video_id>/<clip_id>.mp4  scene clips (<split>: hash of the split settings)
    locks/<name>.lock                        who holds an activity on this root (flock)
    manifests/<stage>/<hash>.parquet         every stage output, immutable
    cache/<key>/...                          VAE latents + text embeddings
    runs/<run-name>/                         Ray Train storage, checkpoints
    registry/                                MLflow backend (sqlite) + artifacts
    models/                                  tiny models built or fitted locally
    outputs/samples/                         generated videos

Ids from downloaded data (video ids, clip ids, archive entries) are never trusted:
`safe_id` and `safe_join` refuse anything that could leave the root.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Iterator

_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # used with fullmatch: no trailing newline


class UnsafePathError(ValueError):
    """An id or path from untrusted input that would escape its folder or is not a plain name."""


def safe_id(value: object, what: str = "id") -> str:
    """Return `value` if it is a plain file-name-safe id, else raise UnsafePathError naming it."""
    s = str(value)
    if not isinstance(value, (str, int)) or isinstance(value, bool) or not _SAFE_ID.fullmatch(s) or ".." in s:
        raise UnsafePathError(
            f"unsafe {what} {s!r}: ids may hold only letters, digits, '.', '_' and '-' (no '..', max 128)"
        )
    return s


def safe_join(base: str | Path, *parts: str) -> Path:
    """Join `parts` under `base` and make sure the result stays inside `base`."""
    base_r = Path(base).resolve()
    target = base_r.joinpath(*parts).resolve()
    if target != base_r and base_r not in target.parents:
        raise UnsafePathError(f"path {'/'.join(parts)!r} escapes {base_r}")
    return target


@contextlib.contextmanager
def atomic_output(path: str | Path, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path in the same folder; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=suffix or path.suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:  # the bytes reach the disk before the name does
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)  # and the rename itself survives a crash
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


class LockHeldError(RuntimeError):
    """Another process holds a lock this one needs; the message says which PID and since when."""


def _holder(path: Path) -> str:
    try:
        text = path.read_text().strip()
    except OSError:
        text = ""
    return text or "another process (no PID recorded)"


@contextlib.contextmanager
def file_lock(path: str | Path, wait_s: float | None = None, what: str | None = None) -> Iterator[Path]:
    """Hold an exclusive flock on `path` (created if missing) for the block.

    wait_s=None waits as long as it takes; otherwise LockHeldError after wait_s seconds, naming
    the holder ("held by PID 123 on host since 2026-...") that wrote itself into the file. The
    kernel releases the lock when its holder dies (kill -9 included): no stale locks to clean.
    The file is never deleted (deleting a lock file others wait on would let two hold it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        start = time.monotonic()
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                if wait_s is not None and time.monotonic() - start >= wait_s:
                    raise LockHeldError(
                        f"{what or path} is held by {_holder(path)}; "
                        f"wait for it to finish or stop it (lock file {path})"
                    ) from None
                time.sleep(0.05)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"PID {os.getpid()} on {os.uname().nodename} since {stamp}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)  # closing the descriptor releases the flock


def path_lock_file(path: str | Path) -> Path:
    """The lock file that guards writes to `path`: outside the data folders (no litter there),
    one per absolute path, shared by every process on this machine."""
    key = hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()[:32]
    return Path(tempfile.gettempdir()) / f"soraflow-locks-{os.getuid()}" / f"{key}.lock"


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


class DataRoot:
    """The on-disk layout of one SoraFlow data root (default ./data, or $SORAFLOW_HOME)."""

    def __init__(self, root: str | Path | None = None):
        root = root or os.environ.get("SORAFLOW_HOME") or "./data"
        self.root = Path(root).resolve()

    def __repr__(self) -> str:
        return f"DataRoot({str(self.root)!r})"

    def _dir(self, *parts: str) -> Path:
        return safe_join(self.root, *parts)

    def raw(self, source: str, video_id: str, ext: str = "mp4") -> Path:
        return self._dir(
            "raw", safe_id(source, "source"), f"{safe_id(video_id, 'video id')}.{safe_id(ext, 'extension')}"
        )

    def raw_dir(self, source: str) -> Path:
        return self._dir("raw", safe_id(source, "source"))

    def clip(self, source: str, video_id: str, clip_id: str, variant: str | None = None) -> Path:
        """clips/<source>[/<variant>]/<video_id>/<clip_id>.mp4; `variant` names what made the clip
        (a hash of the split settings), so clips cut with other settings never overwrite these."""
        parts = [safe_id(source, "source")] + ([safe_id(variant, "clip variant")] if variant else [])
        return self._dir("clips", *parts, safe_id(video_id, "video id"), f"{safe_id(clip_id, 'clip id')}.mp4")

    def lock(self, name: str) -> Path:
        """The lock file of one activity on this root (locks/<name>.lock)."""
        return self._dir("locks", f"{safe_id(name, 'lock name')}.lock")

    def manifest_dir(self, stage: str) -> Path:
        return self._dir("manifests", safe_id(stage, "stage"))

    def cache_dir(self, key: str) -> Path:
        return self._dir("cache", safe_id(key, "cache key"))

    def run_dir(self, name: str) -> Path:
        return self._dir("runs", safe_id(name, "run name"))

    @property
    def runs(self) -> Path:
        return self._dir("runs")

    @property
    def registry(self) -> Path:
        return self._dir("registry")

    @property
    def models(self) -> Path:
        return self._dir("models")

    @property
    def samples(self) -> Path:
        return self._dir("outputs", "samples")

    @property
    def tmp(self) -> Path:
        return self._dir("tmp")

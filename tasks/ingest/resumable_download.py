"""Resumable file downloads over the one HTTP layer (tasks/ingest/http.py: URL policy, retries).

    download_file(url, dest, cfg=...) -> DownloadResult(path, bytes, sha256, resumed, attempts)

A download streams to `<dest>.part` in the same folder, under an flock on the destination
(storage.layout.path_lock_file): two processes fetching one file take turns instead of sharing
the part.
It resumes only when the part's validator is known (a strong ETag, else Last-Modified, kept in
`<dest>.part.json`): `Range` + `If-Range`, so a file that changed answers 200 and restarts from
zero; a server that ignores Range restarts from zero. Bounded per file: `deadline_s` of wall
time, `max_attempts` requests, `max_transfer_factor` x its size in bytes received. The file is
renamed onto `dest` only when complete. A body sent with Content-Encoding gzip or deflate (though
we ask for identity) is stored decoded, with the size cap on the decoded bytes (decoded with an
output bound, so a gzip bomb stops at the cap) and the transfer budget on the bytes as sent; such
a body restarts from zero rather than resuming. A refused file leaves no part behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping

import requests
from soraflow.configs.schema import HttpConfig
from soraflow.storage.layout import atomic_write_text, file_lock, path_lock_file
from soraflow.tasks.ingest.http import (
    _CHUNK,
    _NETWORK_ERRORS,
    BadInputError,
    _body_chunks,
    _check_first,
    _decoder,
    _Ctx,
    _Deadline,
    _get,
    _request_headers,
    _Retry,
    _run_with_retries,
    _status_check,
)


@dataclass(frozen=True)
class DownloadResult:
    path: Path
    bytes: int
    sha256: str
    resumed: bool  # some bytes came from an earlier attempt (Range request answered 206)
    attempts: int  # HTTP requests made


def _parse_content_range(value: str | None) -> tuple[int | None, int | None]:
    """'bytes 100-199/1000' -> (100, 1000); 'bytes */1000' -> (None, 1000)."""
    m = re.match(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)", value or "")
    if not m:
        return None, None
    start = int(m.group(1)) if m.group(1) is not None else None
    total = int(m.group(2)) if m.group(2) != "*" else None
    return start, total


def validator_of(headers: Mapping[str, str]) -> str | None:
    """What If-Range can carry for this response: a strong ETag, else Last-Modified, else None."""
    etag = (headers.get("ETag") or "").strip()
    if etag and not etag.startswith("W/"):  # If-Range needs a strong validator (RFC 9110 13.1.5)
        return etag
    return (headers.get("Last-Modified") or "").strip() or None


class _Part:
    """`<dest>.part` and its sidecar `<dest>.part.json` {url, validator}: what may be resumed."""

    def __init__(self, dest: Path, url: str):
        self.path = dest.with_name(dest.name + ".part")
        self.meta = dest.with_name(dest.name + ".part.json")
        self.url = url

    def size(self) -> int:
        return self.path.stat().st_size if self.path.exists() else 0

    def validator(self) -> str | None:
        try:
            meta = json.loads(self.meta.read_text())
        except (OSError, ValueError):
            return None
        return meta.get("validator") if isinstance(meta, dict) and meta.get("url") == self.url else None

    def restart(self, validator: str | None) -> None:
        """Start the part from zero, remembering the validator of the body about to be written."""
        self.path.unlink(missing_ok=True)
        if validator:
            atomic_write_text(self.meta, json.dumps({"url": self.url, "validator": validator}))
        else:
            self.meta.unlink(missing_ok=True)

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)
        self.meta.unlink(missing_ok=True)


def download_file(
    url: str,
    dest: str | Path,
    *,
    cfg: HttpConfig,
    headers: Mapping[str, str] | None = None,
    session: requests.Session | None = None,
    sleep: Callable[[float], None] = time.sleep,
    expected_size: int | None = None,
    redact: Iterable[str] = (),
) -> DownloadResult:
    """Stream `url` to `dest` (via `dest.part`, resumable), retrying per the module policy."""
    ctx = _Ctx(url, headers, redact, cfg)
    deadline = _Deadline(cfg.deadline_s, ctx)
    _check_first(url, cfg)
    dest = Path(dest)
    if expected_size is not None and expected_size > cfg.max_bytes:
        raise BadInputError(f"{ctx.url}: listed size {expected_size} bytes is over the limit of {cfg.max_bytes}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = _Part(dest, url)
    own = session is None
    sess = session or requests.Session()
    state = {"resumed": False, "received": 0}

    def refuse(text: str) -> BadInputError:
        """This file will not be stored: its part (and sidecar) must not linger for a resume."""
        part.discard()
        return BadInputError(text)

    def attempt(n: int) -> int:
        have, validator = part.size(), part.validator()
        if have and (validator is None or (expected_size is not None and have > expected_size)):
            part.discard()  # nothing proves these bytes belong to the file the server has now
            have = 0
        req = _request_headers(cfg, headers)
        req["Accept-Encoding"] = "identity"  # byte offsets for Range must be the file's
        if have:
            req["Range"], req["If-Range"] = f"bytes={have}-", validator
        resp = _get(sess, url, ctx, cfg, deadline, req)
        with resp:
            if resp.status_code == 416 and have:
                # If-Range matched (else the answer is 200), and no byte is left: the part is complete.
                _, total = _parse_content_range(resp.headers.get("Content-Range"))
                if total == have and (expected_size is None or expected_size == have):
                    return have
                part.discard()
                raise _Retry("HTTP 416 for the resume offset; restarting from zero", wait=0.0)
            _status_check(resp, ctx, cfg)
            declared = resp.headers.get("Content-Length")
            length = int(declared) if declared and declared.isdigit() else None
            # A server may gzip the body although we asked for identity (CSV and metadata files often
            # are): it is stored decoded, so its Range offsets (of the encoded bytes) cannot resume it.
            decoder = _decoder(resp.headers.get("Content-Encoding", ""), ctx, what="a file download")
            if decoder and resp.status_code == 206:
                part.discard()
                raise _Retry("server resumed an encoded body, which is stored decoded; restarting from zero", wait=0.0)
            if resp.status_code == 206 and have:
                start, total = _parse_content_range(resp.headers.get("Content-Range"))
                now = validator_of(resp.headers)
                if start != have or (now is not None and now != validator):
                    part.discard()
                    raise _Retry(
                        f"server resumed at byte {start} of validator {now!r}, asked for {have} of {validator!r}; "
                        "restarting from zero",
                        wait=0.0,
                    )
                mode, offset = "ab", have
                state["resumed"] = True
                full = total if total is not None else (have + length if length is not None else None)
            else:  # 200 (changed file, Range ignored, or a fresh start): the whole body from byte zero
                mode, offset = "wb", 0
                full = length
                if resp.status_code == 206:
                    start, full = _parse_content_range(resp.headers.get("Content-Range"))
                    if start not in (0, None):
                        raise refuse(f"{ctx.url}: server sent a partial body (from byte {start}) "
                                     "that was not asked for")
                part.restart(None if decoder else validator_of(resp.headers))
            if full is not None and full > cfg.max_bytes:
                raise refuse(f"{ctx.url}: declared size {full} bytes is over the limit of {cfg.max_bytes}")
            if full is not None and not decoder and expected_size is not None and full != expected_size:
                raise refuse(f"{ctx.url}: server says {full} bytes, the listing said {expected_size}")
            # Bytes as sent count against the transfer budget; bytes as stored against the size cap.
            budget = cfg.max_transfer_factor * (full or expected_size or cfg.max_bytes)
            written = raw = 0
            try:
                with open(part.path, mode) as f:
                    for chunk in _body_chunks(resp, deadline, decode=False):
                        raw += len(chunk)
                        state["received"] += len(chunk)
                        if decoder:  # at most one byte past the cap, however small the bomb
                            chunk = decoder.decompress(chunk, cfg.max_bytes + 1 - offset - written)
                        if offset + written + len(chunk) > cfg.max_bytes:
                            raise refuse(f"{ctx.url}: body is over the limit of {cfg.max_bytes} bytes"
                                         + (" (after gzip decoding)" if decoder else ""))
                        f.write(chunk)
                        written += len(chunk)
                        if state["received"] > budget:
                            raise refuse(f"{ctx.url}: gave up: {state['received']} bytes received over {n} "
                                         f"attempts, more than {cfg.max_transfer_factor:g} x the file's size, "
                                         "without completing it")
            except zlib.error as e:
                raise refuse(f"{ctx.url}: body does not decode as its Content-Encoding says ({e})") from None
            except _NETWORK_ERRORS as e:
                raise _Retry(f"{ctx.describe(e)} after {offset + written} bytes", progressed=written > 0) from None
            got = offset + written
            if length is not None and raw < length:
                raise _Retry(f"truncated body: {raw} of {length} bytes", progressed=raw > 0)
            if decoder and not decoder.eof:
                raise _Retry(f"truncated body: the encoded stream ends unfinished after {raw} bytes",
                             progressed=raw > 0)
            if expected_size is not None and got < expected_size:
                raise _Retry(f"truncated body: {got} of {expected_size} bytes", progressed=written > 0)
            if expected_size is not None and got > expected_size:
                raise refuse(f"{ctx.url}: got {got} bytes, the listing said {expected_size}")
            return got

    lock = path_lock_file(dest)
    try:
        with file_lock(lock, wait_s=max(0.0, deadline.remaining()), what=f"download of {dest.name}"):
            size, attempts = _run_with_retries(attempt, ctx, cfg, sleep, deadline)
            digest = hashlib.sha256()
            with open(part.path, "rb") as f:
                while block := f.read(_CHUNK):
                    digest.update(block)
            os.replace(part.path, dest)
            part.meta.unlink(missing_ok=True)
    finally:
        if own:
            sess.close()
    return DownloadResult(path=dest, bytes=size, sha256=digest.hexdigest(), resumed=state["resumed"], attempts=attempts)

"""One HTTP layer for every downloader: resumable file downloads and JSON calls, one retry policy.

    download_file(url, dest, cfg=...)  -> DownloadResult(path, bytes, sha256, resumed, attempts)
    get_json(url, cfg=...)             -> (data, response headers)

Retry policy (both functions):
* retried: connection errors and resets, timeouts, truncated bodies (fewer bytes than
  Content-Length), HTTP 5xx, 408 and 429. The wait is `backoff_base_s * 2**attempt` times a
  jitter in [0.5, 1.5), capped by `backoff_max_s`; a 429 that says when to come back
  (`Retry-After` seconds or HTTP date, or `X-Ratelimit-Reset` unix time) is honoured, capped too.
  After `max_retries` retries without progress: TransientError (the shard fails, Prefect retries it).
* never retried: BadInputError, a ValueError, for a bad scheme or URL, any other 4xx, a body
  over `max_bytes` (declared or counted while streaming), invalid JSON.

A download streams to `<dest>.part` in the same folder, resumes with `Range: bytes=<have>-`
(a 200 answer restarts from zero), and is renamed onto `dest` only when complete.

Secrets: the values of the Authorization header (and of any header named in `redact`) never
appear in log records, exception messages or reprs; URLs are logged with user info and
key-like query values masked.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import requests
import urllib3

from soraflow.configs.schema import HttpConfig

log = logging.getLogger(__name__)

REDACT_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie", "x-api-key", "api-key"})
_SECRET_QUERY = re.compile(r"(key|token|secret|signature|sig|password|auth)", re.I)
_CHUNK = 1 << 16  # a failed read loses at most this much progress
_RETRY_STATUS = {408, 429}
_NETWORK_ERRORS = (
    requests.exceptions.ConnectionError,  # includes resets and connect timeouts
    requests.exceptions.Timeout,
    requests.exceptions.ChunkedEncodingError,  # includes bodies shorter than Content-Length
    requests.exceptions.ContentDecodingError,
    urllib3.exceptions.HTTPError,  # body reads: ProtocolError (reset, IncompleteRead), ReadTimeoutError
    ConnectionError,  # builtin: resets surfacing outside the libraries' wrappers
    TimeoutError,
)
_BAD_REQUEST_ERRORS = (
    requests.exceptions.InvalidSchema,
    requests.exceptions.InvalidURL,
    requests.exceptions.MissingSchema,
    requests.exceptions.InvalidHeader,
    requests.exceptions.TooManyRedirects,
)


class BadInputError(ValueError):
    """Retrying cannot help: bad scheme/URL, a 4xx other than 408/429, too large, not a video."""


class TransientError(RuntimeError):
    """Still failing after the retries (network down, 5xx, 429): the shard fails and is retried."""


@dataclass(frozen=True)
class DownloadResult:
    path: Path
    bytes: int
    sha256: str
    resumed: bool  # some bytes came from an earlier attempt (Range request answered 206)
    attempts: int  # HTTP requests made


# ---------------------------------------------------------------- redaction


def redact_url(url: str) -> str:
    """The URL with a password in its user info and the values of key-like query parameters masked."""
    try:
        parts = urlsplit(str(url))
    except ValueError:
        return "<unparsable url>"
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, "***" if _SECRET_QUERY.search(k) else v) for k, v in pairs], safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact_headers(headers: Mapping[str, str] | None, redact: Iterable[str] = ()) -> dict[str, str]:
    """A copy of `headers` that is safe to log: secret header values replaced by '***'."""
    names = REDACT_HEADERS | {h.lower() for h in redact}
    return {k: ("***" if k.lower() in names else v) for k, v in (headers or {}).items()}


def _secret_values(headers: Mapping[str, str] | None, redact: Iterable[str]) -> list[str]:
    names = REDACT_HEADERS | {h.lower() for h in redact}
    values = [str(v) for k, v in (headers or {}).items() if k.lower() in names and v]
    # Also mask the bare token of "Bearer <token>"-style values.
    values += [v.split(None, 1)[1] for v in list(values) if " " in v.strip()]
    return sorted({v for v in values if len(v) >= 4}, key=len, reverse=True)


def _scrub(text: str, secrets: list[str]) -> str:
    for s in secrets:
        text = text.replace(s, "***")
    return text


class _Ctx:
    """What one call needs to describe itself without leaking secrets."""

    def __init__(self, url: str, headers: Mapping[str, str] | None, redact: Iterable[str]):
        self.secrets = _secret_values(headers, redact)
        self.url = _scrub(redact_url(url), self.secrets)

    def msg(self, text: str) -> str:
        return _scrub(text, self.secrets)

    def describe(self, exc: BaseException) -> str:
        return self.msg(f"{type(exc).__name__}: {exc}")[:300]


# ---------------------------------------------------------------- policy


def check_url(url: str) -> str:
    """Refuse anything that is not an absolute http(s) URL with a host."""
    try:
        parts = urlsplit(str(url))
    except ValueError as e:
        raise BadInputError(f"{redact_url(url)}: not a valid URL ({e})") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise BadInputError(f"{redact_url(url)}: only http and https URLs are fetched, not {parts.scheme or 'a relative URL'!r}")
    if not parts.hostname:
        raise BadInputError(f"{redact_url(url)}: URL has no host")
    return str(url)


def backoff_delay(attempt: int, cfg: HttpConfig, rng: Callable[[], float] | None = None) -> float:
    """base * 2**attempt, times a jitter in [0.5, 1.5), capped by backoff_max_s."""
    rng = rng or random.random
    return max(0.0, min(cfg.backoff_max_s, cfg.backoff_base_s * (2**attempt) * (0.5 + rng())))


def rate_limit_wait(headers: Mapping[str, str], cfg: HttpConfig, now: float | None = None) -> float | None:
    """Seconds a 429 asks us to wait (Retry-After or X-Ratelimit-Reset), capped; None if it does not say."""
    now = time.time() if now is None else now
    retry_after = headers.get("Retry-After")
    wait: float | None = None
    if retry_after:
        try:
            wait = float(retry_after)
        except ValueError:
            try:
                wait = parsedate_to_datetime(retry_after).timestamp() - now
            except (TypeError, ValueError, IndexError):
                wait = None
    if wait is None and headers.get("X-Ratelimit-Reset"):
        try:
            reset = float(headers["X-Ratelimit-Reset"])
        except ValueError:
            reset = None
        if reset is not None:
            wait = reset - now if reset > 1e9 else reset  # unix time, or (some APIs) seconds to go
    if wait is None:
        return None
    return max(0.0, min(cfg.backoff_max_s, wait))


class _Retry(Exception):
    """Internal: this attempt failed in a way worth retrying."""

    def __init__(self, reason: str, wait: float | None = None, progressed: bool = False):
        super().__init__(reason)
        self.reason, self.wait, self.progressed = reason, wait, progressed


def _status_check(resp: requests.Response, ctx: _Ctx, cfg: HttpConfig) -> None:
    code = resp.status_code
    if code == 429:
        raise _Retry("HTTP 429 Too Many Requests", wait=rate_limit_wait(resp.headers, cfg))
    if code >= 500 or code in _RETRY_STATUS:
        raise _Retry(f"HTTP {code} {resp.reason or ''}".strip())
    if code >= 300:
        raise BadInputError(ctx.msg(f"{ctx.url}: HTTP {code} {resp.reason or ''}".strip()))


def _run_with_retries(attempt_fn: Callable[[int], Any], ctx: _Ctx, cfg: HttpConfig, sleep: Callable[[float], None]) -> tuple[Any, int]:
    """Call attempt_fn(n) until it returns -> (its value, attempts made).

    A _Retry is retried after a backoff; more than max_retries consecutive failures that made
    no progress (no new bytes) give TransientError.
    """
    failures = 0  # consecutive failed attempts that made no progress
    total = 0
    hard_cap = 10 * (cfg.max_retries + 1)  # a server that trickles a few bytes per attempt still ends
    while True:
        total += 1
        try:
            return attempt_fn(total), total
        except _Retry as r:
            failures = 0 if r.progressed else failures + 1
            if failures > cfg.max_retries or total >= hard_cap:
                raise TransientError(ctx.msg(f"{ctx.url}: still failing after {total} attempt(s): {r.reason}")) from None
            wait = r.wait if r.wait is not None else backoff_delay(max(0, failures - 1), cfg)
            log.warning("%s: attempt %d failed (%s); retrying in %.2f s", ctx.url, total, ctx.msg(r.reason), wait)
            sleep(wait)


def _request_headers(cfg: HttpConfig, headers: Mapping[str, str] | None) -> dict[str, str]:
    out = {"User-Agent": cfg.user_agent}
    out.update(headers or {})
    return out


def _body_chunks(resp: requests.Response) -> Iterable[bytes]:
    """The body as it arrives (read1: whatever is there, up to _CHUNK), so a failure loses nothing read."""
    while True:
        chunk = resp.raw.read1(_CHUNK, decode_content=True)
        if not chunk:
            return
        yield chunk


def _get(session: requests.Session, url: str, ctx: _Ctx, cfg: HttpConfig, **kw: Any) -> requests.Response:
    try:
        return session.get(url, timeout=cfg.timeout_s, stream=True, **kw)
    except _BAD_REQUEST_ERRORS as e:
        raise BadInputError(ctx.msg(f"{ctx.url}: bad request: {ctx.describe(e)}")) from None
    except _NETWORK_ERRORS as e:
        raise _Retry(ctx.describe(e)) from None


# ---------------------------------------------------------------- download_file


def _parse_content_range(value: str | None) -> tuple[int | None, int | None]:
    """'bytes 100-199/1000' -> (100, 1000); 'bytes */1000' -> (None, 1000)."""
    m = re.match(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)", value or "")
    if not m:
        return None, None
    start = int(m.group(1)) if m.group(1) is not None else None
    total = int(m.group(2)) if m.group(2) != "*" else None
    return start, total


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
    ctx = _Ctx(url, headers, redact)
    check_url(url)
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    if expected_size is not None and expected_size > cfg.max_bytes:
        raise BadInputError(f"{ctx.url}: listed size {expected_size} bytes is over the limit of {cfg.max_bytes}")
    own = session is None
    sess = session or requests.Session()
    state = {"resumed": False}

    def attempt(n: int) -> int:
        have = part.stat().st_size if part.exists() else 0
        if expected_size is not None and have > expected_size:
            part.unlink()
            have = 0
        req = _request_headers(cfg, headers)
        req["Accept-Encoding"] = "identity"  # byte offsets for Range must be the file's
        if have:
            req["Range"] = f"bytes={have}-"
        resp = _get(sess, url, ctx, cfg, headers=req)
        with resp:
            if resp.status_code == 416 and have:
                _, total = _parse_content_range(resp.headers.get("Content-Range"))
                if total == have and (expected_size is None or expected_size == have):
                    return have  # the part file was already complete
                part.unlink()
                raise _Retry("HTTP 416 for the resume offset; restarting from zero", wait=0.0)
            _status_check(resp, ctx, cfg)
            declared = resp.headers.get("Content-Length")
            length = int(declared) if declared and declared.isdigit() else None
            if resp.status_code == 206 and have:
                start, total = _parse_content_range(resp.headers.get("Content-Range"))
                if start != have:
                    part.unlink()
                    raise _Retry(f"server resumed at byte {start}, asked for {have}; restarting from zero", wait=0.0)
                mode, offset = "ab", have
                state["resumed"] = True
                full = total if total is not None else (have + length if length is not None else None)
            else:  # 200 (or a 206 we did not ask for): the whole body from byte zero
                mode, offset = "wb", 0
                full = length
                if resp.status_code == 206:
                    start, full = _parse_content_range(resp.headers.get("Content-Range"))
                    if start not in (0, None):
                        raise BadInputError(f"{ctx.url}: server sent a partial body (from byte {start}) that was not asked for")
            if full is not None and full > cfg.max_bytes:
                raise BadInputError(f"{ctx.url}: declared size {full} bytes is over the limit of {cfg.max_bytes}")
            if full is not None and expected_size is not None and full != expected_size:
                raise BadInputError(f"{ctx.url}: server says {full} bytes, the listing said {expected_size}")
            encoded = resp.headers.get("Content-Encoding", "identity").lower() not in ("", "identity")
            written = 0
            try:
                with open(part, mode) as f:
                    for chunk in _body_chunks(resp):
                        if not chunk:
                            continue
                        if offset + written + len(chunk) > cfg.max_bytes:
                            f.close()
                            part.unlink()
                            raise BadInputError(f"{ctx.url}: body is over the limit of {cfg.max_bytes} bytes")
                        f.write(chunk)
                        written += len(chunk)
            except _NETWORK_ERRORS as e:
                raise _Retry(f"{ctx.describe(e)} after {offset + written} bytes", progressed=written > 0) from None
            got = offset + written
            if length is not None and not encoded and written < length:
                raise _Retry(f"truncated body: {written} of {length} bytes", progressed=written > 0)
            if expected_size is not None and got < expected_size:
                raise _Retry(f"truncated body: {got} of {expected_size} bytes", progressed=written > 0)
            if expected_size is not None and got > expected_size:
                part.unlink()
                raise BadInputError(f"{ctx.url}: got {got} bytes, the listing said {expected_size}")
            return got

    try:
        size, attempts = _run_with_retries(attempt, ctx, cfg, sleep)
    finally:
        if own:
            sess.close()
    digest = hashlib.sha256()
    with open(part, "rb") as f:
        while block := f.read(_CHUNK):
            digest.update(block)
    os.replace(part, dest)
    return DownloadResult(path=dest, bytes=size, sha256=digest.hexdigest(), resumed=state["resumed"], attempts=attempts)


# ---------------------------------------------------------------- get_json


def get_json(
    url: str,
    *,
    cfg: HttpConfig,
    headers: Mapping[str, str] | None = None,
    params: Mapping[str, Any] | None = None,
    session: requests.Session | None = None,
    sleep: Callable[[float], None] = time.sleep,
    redact: Iterable[str] = (),
) -> tuple[Any, requests.structures.CaseInsensitiveDict]:
    """GET `url` and parse its JSON body, retrying per the module policy -> (data, response headers)."""
    ctx = _Ctx(url, headers, redact)
    check_url(url)
    own = session is None
    sess = session or requests.Session()

    def attempt(n: int) -> tuple[Any, Any]:
        req = _request_headers(cfg, headers)
        req.setdefault("Accept", "application/json")
        resp = _get(sess, url, ctx, cfg, headers=req, params=params)
        with resp:
            _status_check(resp, ctx, cfg)
            declared = resp.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > cfg.max_bytes:
                raise BadInputError(f"{ctx.url}: declared size {declared} bytes is over the limit of {cfg.max_bytes}")
            body = bytearray()
            try:
                for chunk in _body_chunks(resp):
                    body += chunk
                    if len(body) > cfg.max_bytes:
                        raise BadInputError(f"{ctx.url}: body is over the limit of {cfg.max_bytes} bytes")
            except _NETWORK_ERRORS as e:
                raise _Retry(f"{ctx.describe(e)} after {len(body)} bytes") from None
            encoded = resp.headers.get("Content-Encoding", "identity").lower() not in ("", "identity")
            if declared and declared.isdigit() and not encoded and len(body) < int(declared):
                raise _Retry(f"truncated body: {len(body)} of {declared} bytes")
            try:
                data = json.loads(bytes(body))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise BadInputError(f"{ctx.url}: not valid JSON ({ctx.describe(e)})") from None
            return data, resp.headers

    try:
        return _run_with_retries(attempt, ctx, cfg, sleep)[0]
    finally:
        if own:
            sess.close()

"""One HTTP layer for every downloader: resumable file downloads and JSON calls, one retry policy.

    get_json(url, cfg=...)             -> (data, response headers)
    download_file(url, dest, cfg=...)  -> DownloadResult  (tasks/ingest/resumable_download.py)

URL policy (tasks/ingest/url_policy.py): http(s) only, public addresses only unless the host is
in `http.allow_hosts`; redirects are followed here (never by requests), at most
`max_redirects` hops, each hop checked again; secret headers (Authorization, Cookie, X-API-Key,
the ones named in `http.secret_headers` or `redact`) are dropped when a hop changes origin.

Retry policy (both functions):
* retried: connection errors and resets, timeouts, truncated bodies (fewer bytes than
  Content-Length), HTTP 5xx, 408 and 429. The wait is `backoff_base_s * 2**attempt` times a
  jitter in [0.5, 1.5), capped by `backoff_max_s`; a 429 that says when to come back
  (`Retry-After` seconds or HTTP date, or `X-Ratelimit-Reset` unix time) is honoured, capped too.
  After `max_retries` retries without progress: TransientError (the shard fails, Prefect retries it).
* never retried: BadInputError, a ValueError, for a refused URL, any other 4xx, a body over
  `max_bytes` (JSON: `max_json_bytes` after decompression, decompressed with a bound), invalid
  JSON, a total deadline passed (`deadline_s` per download, `listing_deadline_s` per JSON call:
  a server trickling bytes ends too), more than `max_attempts` requests or
  `max_transfer_factor` x the file's size received for one file.

Resumable file downloads (`download_file`) live in tasks/ingest/resumable_download.py and use
this module's request, retry and deadline machinery.

Secrets: the values of secret headers never appear in log records, exception messages or
reprs; URLs are logged with user info and key-like query values masked.
"""

from __future__ import annotations

import json
import logging
import random
import time
import zlib
from email.utils import parsedate_to_datetime
from typing import Any, Callable, Iterable, Mapping
from urllib.parse import urljoin

import requests
import urllib3
from soraflow.configs.schema import HttpConfig
from soraflow.storage.redact import redact_url
from soraflow.tasks.ingest import url_policy
from soraflow.tasks.ingest.url_policy import SECRET_HEADERS as REDACT_HEADERS

log = logging.getLogger(__name__)

_CHUNK = 1 << 16  # a failed read loses at most this much progress
_RETRY_STATUS = {408, 429}
_REDIRECTS = {301, 302, 303, 307, 308}
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
)


class BadInputError(ValueError):
    """Retrying cannot help: bad scheme/URL, a 4xx other than 408/429, too large, not a video."""


class TransientError(RuntimeError):
    """Still failing after the retries (network down, 5xx, 429): the shard fails and is retried."""


class DeadlineError(BadInputError):
    """The total deadline of one download or listing passed (a server too slow, or trickling)."""


class _Deadline:
    def __init__(self, seconds: float, ctx: "_Ctx"):
        self.seconds, self.ctx = seconds, ctx
        self.end = time.monotonic() + seconds

    def remaining(self) -> float:
        return self.end - time.monotonic()

    def check(self, doing: str = "") -> float:
        left = self.remaining()
        if left <= 0:
            raise DeadlineError(
                self.ctx.msg(f"{self.ctx.url}: not finished within the deadline of {self.seconds:g} s{doing}")
            )
        return left


# ---------------------------------------------------------------- redaction


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

    def __init__(self, url: str, headers: Mapping[str, str] | None, redact: Iterable[str], cfg: HttpConfig):
        self.names = url_policy.secret_names(cfg, redact)
        self.secrets = _secret_values(headers, self.names)
        self.url = _scrub(redact_url(url), self.secrets)

    def msg(self, text: str) -> str:
        return _scrub(text, self.secrets)

    def describe(self, exc: BaseException) -> str:
        return self.msg(f"{type(exc).__name__}: {exc}")[:300]


# ---------------------------------------------------------------- policy


def check_url(url: str, cfg: HttpConfig) -> str:
    """`url` if the URL policy allows it (module docstring), else BadInputError naming why.

    A resolver that fails for now raises url_policy.DnsUnavailable (a ConnectionError): the
    request loop retries it as a network fault."""
    try:
        return url_policy.check_url(url, cfg)
    except url_policy.UrlRefused as e:
        raise BadInputError(str(e)) from None


def _check_first(url: str, cfg: HttpConfig) -> None:
    """The early check before any file is touched; a DNS outage is left to the retried request loop."""
    try:
        check_url(url, cfg)
    except url_policy.DnsUnavailable:
        pass


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


def _run_with_retries(
    attempt_fn: Callable[[int], Any], ctx: _Ctx, cfg: HttpConfig, sleep: Callable[[float], None], deadline: _Deadline
) -> tuple[Any, int]:
    """Call attempt_fn(n) until it returns -> (its value, attempts made).

    A _Retry is retried after a backoff; more than max_retries consecutive failures that made
    no progress (no new bytes) give TransientError; more than max_attempts attempts in all, or
    a wait past the deadline, give BadInputError (this server will not deliver this file).
    """
    failures = 0  # consecutive failed attempts that made no progress
    total = 0
    while True:
        total += 1
        deadline.check()
        try:
            return attempt_fn(total), total
        except _Retry as r:
            failures = 0 if r.progressed else failures + 1
            if failures > cfg.max_retries:
                raise TransientError(
                    ctx.msg(f"{ctx.url}: still failing after {total} attempt(s): {r.reason}")
                ) from None
            if total >= cfg.max_attempts:
                why = f"{ctx.url}: gave up after {total} attempts (max_attempts), each failing part-way: {r.reason}"
                raise BadInputError(ctx.msg(why)) from None
            wait = r.wait if r.wait is not None else backoff_delay(max(0, failures - 1), cfg)
            if wait >= deadline.remaining():
                deadline.check(
                    f" (the next attempt would start after {wait:.1f} s more; last error: {ctx.msg(r.reason)})"
                )
                why = f"the deadline of {deadline.seconds:g} s would pass before the next attempt ({r.reason})"
                raise DeadlineError(ctx.msg(f"{ctx.url}: {why}"))
            log.warning("%s: attempt %d failed (%s); retrying in %.2f s", ctx.url, total, ctx.msg(r.reason), wait)
            sleep(wait)


def _request_headers(cfg: HttpConfig, headers: Mapping[str, str] | None) -> dict[str, str]:
    out = {"User-Agent": cfg.user_agent}
    out.update(headers or {})
    return out


def _body_chunks(resp: requests.Response, deadline: _Deadline, decode: bool = True) -> Iterable[bytes]:
    """The body as it arrives (read1: whatever is there, up to _CHUNK), so a failure loses nothing
    read; past the deadline it stops with DeadlineError however steadily the bytes trickle."""
    while True:
        deadline.check(" (body still arriving)")
        chunk = resp.raw.read1(_CHUNK, decode_content=decode)
        if not chunk:
            return
        yield chunk


def _peer_ip(resp: requests.Response) -> str | None:
    """The address the response came from (None when the connection is no longer at hand)."""
    for get in (lambda: resp.raw.connection.sock, lambda: resp.raw._fp.fp.raw._sock):  # urllib3 2.x, http.client
        try:
            sock = get()
            if sock is not None:
                return sock.getpeername()[0]
        except (AttributeError, OSError):
            continue
    return None


def _get(session: requests.Session, url: str, ctx: _Ctx, cfg: HttpConfig, deadline: _Deadline,
         headers: dict[str, str], params: Mapping[str, Any] | None = None) -> requests.Response:
    """GET with the URL policy on every hop: redirects followed here, secrets kept to their origin."""
    current, hdrs = url, dict(headers)
    for _hop in range(cfg.max_redirects + 1):
        try:
            check_url(current, cfg)
        except url_policy.DnsUnavailable as e:
            raise _Retry(ctx.msg(str(e))) from None
        left = deadline.check()
        timeout = min(cfg.timeout_s, left)
        try:
            resp = session.get(
                current, headers=hdrs, params=params, timeout=(timeout, timeout), stream=True, allow_redirects=False
            )
        except _BAD_REQUEST_ERRORS as e:
            raise BadInputError(ctx.msg(f"{ctx.url}: bad request: {ctx.describe(e)}")) from None
        except _NETWORK_ERRORS as e:
            raise _Retry(ctx.describe(e)) from None
        peer = _peer_ip(resp)
        _, host, port = url_policy.origin(current)
        why = peer and url_policy.peer_allowed(peer, host, cfg, port)
        if why:  # the name resolved differently at connect time than when it was checked
            resp.close()
            raise BadInputError(ctx.msg(f"{redact_url(current)}: refused: {why}"))
        if resp.status_code not in _REDIRECTS or not resp.headers.get("Location"):
            return resp
        target = urljoin(resp.url, resp.headers["Location"])
        resp.close()
        if not url_policy.same_origin(current, target):
            hdrs = url_policy.strip_secrets(hdrs, ctx.names)
        log.info("%s: redirected to %s", ctx.url, ctx.msg(redact_url(target)))
        current, params = target, None
    raise BadInputError(ctx.msg(f"{ctx.url}: more than {cfg.max_redirects} redirects"))


# ---------------------------------------------------------------- get_json


def _decoder(encoding: str, ctx: _Ctx, what: str = "JSON"):
    """A zlib decompressor for the body's Content-Encoding (None: identity). Ours rather than
    urllib3's, so that callers bound the output (max_length) and a small bomb stops at the cap."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return None
    if encoding in ("gzip", "x-gzip"):
        return zlib.decompressobj(16 + zlib.MAX_WBITS)
    if encoding == "deflate":
        return zlib.decompressobj()
    raise BadInputError(f"{ctx.url}: unsupported Content-Encoding {encoding!r} for {what}")


def get_json(
    url: str,
    *,
    cfg: HttpConfig,
    headers: Mapping[str, str] | None = None,
    params: Mapping[str, Any] | None = None,
    session: requests.Session | None = None,
    sleep: Callable[[float], None] = time.sleep,
    redact: Iterable[str] = (),
    metadata_file: bool = False,
) -> tuple[Any, requests.structures.CaseInsensitiveDict]:
    """GET `url` and parse its JSON body, retrying per the module policy -> (data, response headers).

    The body is capped at max_json_bytes (a metadata file: max_metadata_bytes), and max_bytes,
    both as sent and as decompressed; the decompression is ours (zlib with an output bound), so a
    small gzip bomb stops at the cap. Deadline: listing_deadline_s (a metadata file: deadline_s)."""
    ctx = _Ctx(url, headers, redact, cfg)
    deadline = _Deadline(cfg.deadline_s if metadata_file else cfg.listing_deadline_s, ctx)
    _check_first(url, cfg)
    cap = min(cfg.max_bytes, cfg.max_metadata_bytes if metadata_file else cfg.max_json_bytes)
    own = session is None
    sess = session or requests.Session()

    def over() -> BadInputError:
        return BadInputError(f"{ctx.url}: body is over the limit of {cap} bytes for JSON")

    def attempt(n: int) -> tuple[Any, Any]:
        req = _request_headers(cfg, headers)
        req.setdefault("Accept", "application/json")
        req["Accept-Encoding"] = "gzip, deflate"  # only what _decoder undoes with a bound
        resp = _get(sess, url, ctx, cfg, deadline, req, params=params)
        with resp:
            _status_check(resp, ctx, cfg)
            declared = resp.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > cap:
                raise BadInputError(f"{ctx.url}: declared size {declared} bytes is over the limit of {cap} for JSON")
            decoder = _decoder(resp.headers.get("Content-Encoding", ""), ctx)
            raw_n, body = 0, bytearray()
            try:
                for chunk in _body_chunks(resp, deadline, decode=False):
                    raw_n += len(chunk)
                    body += decoder.decompress(chunk, cap + 1 - len(body)) if decoder else chunk
                    if raw_n > cap or len(body) > cap:
                        raise over()
                if decoder:
                    body += decoder.flush()
                    if len(body) > cap:
                        raise over()
            except zlib.error as e:
                raise BadInputError(f"{ctx.url}: body does not decompress ({e})") from None
            except _NETWORK_ERRORS as e:
                raise _Retry(f"{ctx.describe(e)} after {raw_n} bytes") from None
            if declared and declared.isdigit() and raw_n < int(declared):
                raise _Retry(f"truncated body: {raw_n} of {declared} bytes")
            try:
                data = json.loads(bytes(body))
            except (UnicodeDecodeError, ValueError, RecursionError) as e:  # ValueError: also ints over the digit limit
                raise BadInputError(f"{ctx.url}: not valid JSON ({ctx.describe(e)})") from None
            return data, resp.headers

    try:
        return _run_with_retries(attempt, ctx, cfg, sleep, deadline)[0]
    finally:
        if own:
            sess.close()

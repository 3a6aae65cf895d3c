"""Secrets out of everything SoraFlow logs or stores: URLs, header maps and whole configs.

    redact_url(url)        -> the URL with user info and key-like query values masked
    redact_config(mapping) -> a deep copy with secret-named keys and credentials in URLs masked

One place, so the manifest lineage, logs, MLflow params and `soraflow.json` all mask the same
things: a value under a key named like key/token/secret/password/credential/auth/cookie, a
password in a URL's user info (`https://user:pass@host`), and the values of key-like query
parameters (`?api_key=...`, `&token=...`, `&sig=...`).
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

MASK = "***"
# Names of config keys, query parameters and headers whose values are secrets.
SECRET_NAME = re.compile(r"(key|token|secret|passw|pwd|credential|auth|cookie|signature|^sig$|session)", re.I)
# Config keys that match SECRET_NAME but hold no secret (a path to a key file is not the key).
_NOT_SECRET = re.compile(r"(_path|_dir|_file|_s|_bytes|_headers|_hosts)$|^(max|min)_", re.I)
_URL_IN_TEXT = re.compile(r"\b[a-z][a-z0-9+.-]*://[^\s'\"<>]+", re.I)


def redact_url(url: str) -> str:
    """The URL with the user info and the values of key-like query parameters masked."""
    try:
        parts = urlsplit(str(url))
    except ValueError:
        return "<unparsable url>"
    netloc = parts.netloc
    if "@" in netloc:
        netloc = MASK + "@" + netloc.rsplit("@", 1)[1]
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, MASK if SECRET_NAME.search(k) else v) for k, v in pairs], safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact_text(text: str) -> str:
    """Every URL inside a free text redacted (an error message, a log line)."""
    return _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)), str(text))


def is_secret_name(name: str) -> bool:
    return bool(SECRET_NAME.search(name)) and not _NOT_SECRET.search(name)


def redact_config(value: Any) -> Any:
    """A deep copy of a config (dicts, lists, scalars) that is safe to log or store.

    Values under secret-named keys become '***' (None stays None, so "not set" stays visible);
    strings everywhere else have the credentials in their URLs masked."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if (
                isinstance(k, str) and is_secret_name(k) and isinstance(v, str) and v
            ):  # secrets are strings; numbers stay
                out[k] = MASK
            else:
                out[k] = redact_config(v)
        return out
    if isinstance(value, (list, tuple)):
        return type(value)(redact_config(v) for v in value)
    if isinstance(value, str) and "://" in value:
        return redact_text(value)
    return value

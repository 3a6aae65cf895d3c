"""Which URLs the HTTP layer may fetch, and which headers may follow a redirect.

    check_url(url, cfg, resolve=...)  -> url, or BadInputError naming the URL and the reason
    peer_allowed(ip, host, cfg)       -> the address a connection actually reached is allowed
    same_origin(a, b)                 -> scheme, host and port equal
    strip_secrets(headers, names)     -> headers without the secret ones (for another origin)

The policy: http and https only, a host, and every address the host resolves to must be a
public one. Loopback, private (RFC 1918, fc00::/7), link-local (169.254/16, fe80::/10, the
cloud metadata endpoints), multicast, reserved, unspecified and shared (100.64/10) addresses
are refused unless the host is listed in `http.allow_hosts`: a name, an IP or a CIDR network the
resolved addresses fall in, any port; or `host:port` for that port only (the sample source
allow-lists exactly its own `127.0.0.1:<port>`). Checked for the first URL and again for every redirect hop;
the address a connection reached is checked too (a DNS answer that changed between the check
and the connect).
"""

from __future__ import annotations

import ipaddress
import re
import socket
from typing import Callable, Iterable, Mapping
from urllib.parse import urlsplit

from soraflow.configs.schema import HttpConfig
from soraflow.storage.redact import redact_url

# Secret headers whatever the config says; HttpConfig.secret_headers adds more.
SECRET_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie", "x-api-key", "api-key"})


class UrlRefused(ValueError):
    """The URL (or a redirect target) is outside the policy; retrying cannot help."""


class DnsUnavailable(ConnectionError):
    """The resolver failed for now (EAI_AGAIN): a network fault, retried like one, never bad input."""


def _resolve(host: str, port: int) -> list[str]:
    return sorted({info[4][0] for info in socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)})


def _non_public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why `ip` is not a public address, or None when it is."""
    mapped = getattr(ip, "ipv4_mapped", None) or getattr(ip, "sixtofour", None)
    if mapped is not None:
        return _non_public(mapped)
    for what in ("loopback", "link_local", "multicast", "unspecified", "reserved", "private"):
        if getattr(ip, f"is_{what}"):
            return what.replace("_", "-")
    if not ip.is_global:
        return "non-global"
    return None


def _entries(cfg: HttpConfig, port: int | None) -> list[str]:
    """The allow_hosts entries that apply to `port`: 'host' (any port) or 'host:port' / '[v6]:port'."""
    out = []
    for entry in cfg.allow_hosts:
        e = entry.strip().lower()
        m = re.fullmatch(r"(\[[^\]]+\]|[^:\[\]]+):(\d+)", e)
        if m:
            if port is not None and int(m.group(2)) == port:
                out.append(m.group(1).strip("[]"))
        else:
            out.append(e.strip("[]"))
    return out


def _allowed(host: str, ips: Iterable[str], cfg: HttpConfig, port: int | None) -> bool:
    names = _entries(cfg, port)
    if host.lower().strip("[]") in names:
        return True
    nets = []
    for h in names:
        try:
            nets.append(ipaddress.ip_network(h, strict=False))
        except ValueError:
            continue
    addrs = [ipaddress.ip_address(a.split("%", 1)[0]) for a in ips]
    return bool(addrs) and all(any(a in n for n in nets) for a in addrs)


def peer_allowed(ip: str, host: str, cfg: HttpConfig, port: int | None = None) -> str | None:
    """None if a connection to `ip` (for `host`, on `port`) is allowed, else the reason it is not."""
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    why = _non_public(addr)
    if why is None or _allowed(host, [ip], cfg, port):
        return None
    return f"{host} resolves to {ip}, a {why} address (add it, or host:port, to http.allow_hosts to allow it)"


def check_url(url: str, cfg: HttpConfig, resolve: Callable[[str, int], list[str]] = _resolve) -> str:
    """`url` if it is an http(s) URL whose host resolves to allowed addresses only."""
    shown = redact_url(url)
    try:
        parts = urlsplit(str(url))
        port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
    except ValueError as e:
        raise UrlRefused(f"{shown}: not a valid URL ({e})") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise UrlRefused(f"{shown}: only http and https URLs are fetched, not {parts.scheme or 'a relative URL'!r}")
    host = parts.hostname
    if not host:
        raise UrlRefused(f"{shown}: URL has no host")
    if any(ord(c) < 33 for c in host):
        raise UrlRefused(f"{shown}: control character or space in the host")
    try:
        literal = ipaddress.ip_address(host.split("%", 1)[0])
        ips = [str(literal)]
    except ValueError:
        try:
            ips = resolve(host, port)
        except socket.gaierror as e:
            if e.errno == socket.EAI_AGAIN:
                raise DnsUnavailable(f"{shown}: name resolution failed for now ({e})") from None
            raise UrlRefused(
                f"{shown}: host {host!r} does not resolve ({e})"
            ) from None  # no such host: the source is wrong
        except UnicodeError as e:
            raise UrlRefused(f"{shown}: host {host!r} is not a valid name ({e})") from None
    for ip in ips:
        why = peer_allowed(ip, host, cfg, port)
        if why:
            raise UrlRefused(f"{shown}: refused: {why}")
    return str(url)


def origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(str(url))
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").lower(), parts.port or {"http": 80, "https": 443}.get(scheme)


def same_origin(a: str, b: str) -> bool:
    return origin(a) == origin(b)


def secret_names(cfg: HttpConfig, extra: Iterable[str] = ()) -> frozenset[str]:
    return SECRET_HEADERS | {h.lower() for h in cfg.secret_headers} | {h.lower() for h in extra}


def strip_secrets(headers: Mapping[str, str], names: Iterable[str]) -> dict[str, str]:
    names = {n.lower() for n in names}
    return {k: v for k, v in headers.items() if k.lower() not in names}

"""Which sources a server may fetch (an SSRF guard): schemes, local files, and the addresses a
host resolves to.

A source URL's host is resolved (stdlib `socket.getaddrinfo`, so odd spellings such as 127.1,
2130706433 or 0x7f.1 resolve as the connection would) and every address it resolves to must be
public: loopback, private, shared (100.64/10), link-local (cloud metadata 169.254.169.254 among
them), multicast, unspecified, reserved and documentation ranges are refused, IPv4 and IPv6 alike,
IPv4 inside IPv6 (v4-mapped, v4-compatible, NAT64, 6to4, Teredo) judged as the IPv4 address it
carries. `allow_private` lifts the address check (tests, local demos); `allow_networks` lets
chosen networks through (a camera VLAN). Refusals are `SourceRefusedError`, before anything is
connected; their texts never depend on whether a port is open.

The check is made where the connection is made as well: pipeline/source_guard.py proxies every
HTTP(S) request FFmpeg makes for a source (redirects, HLS segments and reconnects included) and
pipeline/rtsp_guard.py relays every RTSP connection (refusing RTSP redirects); both re-check each
one, connect to the very address they checked (no DNS rebinding) and count the source's bytes and
time against `max_bytes` and `max_seconds`, which the decode loop checks again.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from pipeline.errors import SourceRefusedError

SCHEMES = ("http", "https", "rtsp")  # HLS and DASH come over http(s)
DEFAULT_PORTS = {"http": 80, "https": 443, "rtsp": 554}
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_V4_COMPATIBLE = ipaddress.ip_network("::/96")


@dataclass(frozen=True)
class SourcePolicy:
    allow_private: bool = False  # loopback, private, link-local ... addresses allowed (tests, local demos)
    allow_files: bool = False  # local paths and file:// URLs
    max_bytes: int | None = 16 * 2**30  # bytes read from one source's hosts, reconnects included
    max_seconds: float | None = None  # wall time a source may stay connected (None: a live stream may run on)
    allow_networks: tuple[str, ...] = ()  # CIDRs allowed although not public (e.g. "10.20.0.0/16")

    def __post_init__(self):
        for cidr in self.allow_networks:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise SourceRefusedError(f"allow_networks: {cidr!r} is not a network") from None


@dataclass(frozen=True)
class CheckedURL:
    """A network source URL that passed the policy, with the address to connect to."""

    url: str
    scheme: str
    host: str
    port: int
    address: str  # the checked address the connection must go to


def check_source(source: str, policy: SourcePolicy) -> str | CheckedURL:
    """A local path (when files are allowed) or the checked URL; raises SourceRefusedError."""
    parts = urlsplit(source)
    scheme = parts.scheme.lower()
    if scheme == "file" or not scheme or (len(scheme) == 1 and source[1:3] in (":\\", ":/")):
        if not policy.allow_files:
            raise SourceRefusedError(f"local files are not allowed as sources here (allowed schemes: {', '.join(SCHEMES)})")
        return str(Path(parts.path if scheme == "file" else source))
    if scheme not in SCHEMES:
        raise SourceRefusedError(f"source scheme {scheme!r} not allowed (allowed: {', '.join(SCHEMES)})")
    return check_url(source, policy)


def check_url(url: str, policy: SourcePolicy) -> CheckedURL:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise SourceRefusedError(f"source scheme {scheme!r} not allowed (allowed: {', '.join(SCHEMES)})")
    try:
        host, port = parts.hostname, parts.port or DEFAULT_PORTS[scheme]
    except ValueError:
        raise SourceRefusedError("the source URL has an invalid port") from None
    if not host:
        raise SourceRefusedError("the source URL has no host")
    address = check_host(host, port, policy)
    return CheckedURL(url, scheme, host, port, address)


def check_host(host: str, port: int, policy: SourcePolicy) -> str:
    """The address to connect to for host:port: every address the host resolves to must be
    allowed (one refused address refuses the host: a resolver may answer either)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, ValueError):
        raise SourceRefusedError(f"the source host {host!r} does not resolve") from None
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    for address in addresses:
        reason = refusal(ipaddress.ip_address(address.split("%", 1)[0]), policy)
        if reason:
            raise SourceRefusedError(f"the source host {host!r} resolves to {reason} address {address}; "
                                     "this server fetches public addresses only")
    return addresses[0]


def refusal(ip: IPAddress, policy: SourcePolicy) -> str | None:
    """Why an address is refused ("a loopback", ...), or None when it is allowed."""
    if policy.allow_private or any(ip in ipaddress.ip_network(n, strict=False) for n in policy.allow_networks):
        return None
    inner = embedded_ipv4(ip)
    if inner is not None:
        return refusal(inner, policy)
    for kind, flag in (("a loopback", ip.is_loopback), ("an unspecified", ip.is_unspecified),
                       ("a link-local", ip.is_link_local), ("a multicast", ip.is_multicast),
                       ("a private", ip.is_private), ("a reserved", ip.is_reserved)):
        if flag:
            return kind
    return None if ip.is_global else "a non-public"


def embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries (v4-mapped, v4-compatible, NAT64, 6to4, Teredo)."""
    if ip.version != 6:
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if ip in _NAT64 or (ip in _V4_COMPATIBLE and int(ip) > 1):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None

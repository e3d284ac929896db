"""Callback URLs are tenant input: refuse private, loopback, link-local, multicast and reserved targets (SSRF).

Checked when a URL is registered or submitted (the API) and again at every send (the worker), where the request
then goes to the address that was checked, so a DNS answer that changes in between (rebinding) cannot redirect it.
Redirects are never followed. Development mode (DISPATCHER_DEV_MODE=1, set by `dispatcher dev`) allows private
targets and plain http, so a receiver on localhost works.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit


class UnsafeUrl(ValueError):
    """The URL may not be called: the message says why (no address is echoed back)."""


@dataclass(frozen=True)
class Target:
    url: str  # the URL to request, with the checked IP address in place of the host name
    host_header: str  # the original host[:port], for the Host header
    sni_hostname: str | None  # for TLS: the name the certificate must match


# IPv6 prefixes whose addresses carry an IPv4 address that a gateway or tunnel relays to (RFC 6052 NAT64 well-known
# and local-use prefixes, the deprecated IPv4-compatible form): the embedded address decides.
_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
_TEREDO = ipaddress.ip_network("2001::/32")
_SIXTOFOUR = ipaddress.ip_network("2002::/16")
_COMPATIBLE = ipaddress.ip_network("::/96")


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address embeds: IPv4-mapped, IPv4-compatible, NAT64, 6to4, Teredo (server and client)."""
    found: list[ipaddress.IPv4Address] = []
    if ip.ipv4_mapped is not None:
        found.append(ip.ipv4_mapped)
    low32 = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip in _COMPATIBLE and int(ip) > 1:  # ::a.b.c.d (not :: and ::1, which are judged as IPv6)
        found.append(low32)
    if ip in _NAT64[0]:
        found.append(low32)
    if ip in _NAT64[1]:
        # RFC 6052 with a /48 prefix: the IPv4 address is bits 48-63 and 72-87 (bits 64-71 are the zero "u" octet).
        value = int(ip)
        found.append(ipaddress.IPv4Address((((value >> 64) & 0xFFFF) << 16) | ((value >> 40) & 0xFFFF)))
    if ip.sixtofour is not None:
        found.append(ip.sixtofour)
    if ip.teredo is not None:
        found.extend(ip.teredo)
    return found


def _is_public(address: str) -> bool:
    """Whether an address (IPv4 or IPv6, maybe with a %zone) is a public unicast one. An IPv6 address that embeds an
    IPv4 address (NAT64, 6to4, Teredo, IPv4-mapped or -compatible) is public only if every embedded one is; the
    NAT64, 6to4 and Teredo ranges are not globally routable destinations of their own otherwise."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(ip)
        if embedded:
            return all(v4.is_global and not v4.is_multicast for v4 in embedded)
        if any(ip in net for net in (*_NAT64, _TEREDO, _SIXTOFOUR)):
            return False
    return ip.is_global and not ip.is_multicast


def _split(url: str) -> Any:
    try:
        return urlsplit(url)
    except ValueError:  # e.g. an unclosed IPv6 bracket, or a full-width '#' that NFKC-normalizes into the host
        raise UnsafeUrl("callback URL is not a well-formed URL") from None


def check_syntax(url: str, *, allow_private: bool) -> tuple[str, str, int]:
    parts = _split(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise UnsafeUrl("callback URLs must be http(s) URLs with a host")
    if parts.scheme == "http" and not allow_private:
        raise UnsafeUrl("callback URLs must use https")
    if parts.username or parts.password or parts.fragment:
        raise UnsafeUrl("callback URLs must not carry credentials or a fragment")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise UnsafeUrl("callback URL has an invalid port") from None
    return parts.scheme, parts.hostname, port


async def resolve_host(host: str, port: int, *, allow_private: bool, what: str = "callback URL") -> str:
    """Resolves a host and checks every address it has; returns the one to connect to. Raises UnsafeUrl.
    (Also the provider endpoints' check: a WhatsApp base_url, an SMTP host; `what` names the thing in the message.)"""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, ValueError):  # ValueError: a name that cannot be encoded (UnicodeError, NUL)
        raise UnsafeUrl(f"{what}'s host does not resolve") from None
    addresses = sorted({str(info[4][0]) for info in infos})
    if not addresses:
        raise UnsafeUrl(f"{what}'s host does not resolve")
    if not allow_private and not all(_is_public(a) for a in addresses):
        raise UnsafeUrl(f"{what}s must not point to private, loopback, link-local or reserved addresses")
    return addresses[0]


async def resolve(url: str, *, allow_private: bool) -> Target:
    """Resolves the URL's host and checks every address; returns where to send. Raises UnsafeUrl."""
    scheme, host, port = check_syntax(url, allow_private=allow_private)
    address = await resolve_host(host, port, allow_private=allow_private, what="callback URL")
    parts = _split(url)
    literal = f"[{address}]" if ":" in address else address
    pinned = urlunsplit((scheme, f"{literal}:{port}", parts.path or "/", parts.query, ""))
    return Target(url=pinned, host_header=parts.netloc, sni_hostname=host if scheme == "https" else None)

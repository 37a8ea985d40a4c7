"""Destination policy (SSRF guard): which addresses a worker may connect to, decided before connecting."""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
SCHEMES = ("http", "https")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_SHARED = ipaddress.ip_network("100.64.0.0/10")


class Refused(Exception):
    """A destination the policy does not allow; the message says why and how to allow it."""


@dataclass(frozen=True)
class Policy:
    allow_private: bool = False
    allow_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    resolve: tuple[tuple[str, int, str], ...] = ()  # curl-style host:port:address overrides

    @classmethod
    def from_settings(cls, allow_private: bool, allow_networks: tuple[str, ...], resolve: tuple[str, ...]) -> Policy:
        nets = tuple(ipaddress.ip_network(n, strict=False) for n in allow_networks)
        overrides = []
        for entry in resolve:  # checked at start by config.validate
            host, _, rest = entry.partition(":")
            port, _, addr = rest.partition(":")  # the address may be IPv6: split at the first two colons only
            overrides.append((host.lower(), int(port), addr.strip("[]")))
        return cls(allow_private, nets, tuple(overrides))


def embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address hidden in an IPv6 form (mapped, compatible, NAT64, 6to4), if any."""
    if ip.version == 4:
        return None
    assert isinstance(ip, ipaddress.IPv6Address)
    if ip.ipv4_mapped:
        return ip.ipv4_mapped
    if ip.sixtofour:
        return ip.sixtofour
    if ip in _NAT64 or int(ip) >> 32 == 0:  # NAT64 well-known prefix, or deprecated ::a.b.c.d
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def is_public(ip: IPAddress) -> bool:
    """True only for globally routable unicast addresses, looking through IPv6 forms of IPv4."""
    inner = embedded_ipv4(ip)
    if inner is not None and not is_public(inner):
        return False
    if inner is not None and ip in _NAT64:  # DNS64 networks: judged by the IPv4 address it translates to
        return True
    if ip.version == 6 and ip.teredo:  # type: ignore[union-attr]
        return False
    return not (
        not ip.is_global
        or ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
        or (ip.version == 4 and ip in _SHARED)
    )


def refusal(ip: IPAddress, policy: Policy) -> str | None:
    """None if the policy allows connecting to `ip`; otherwise the one-line reason."""
    if policy.allow_private or is_public(ip):
        return None
    candidates = [ip] + ([inner] if (inner := embedded_ipv4(ip)) else [])
    if any(c.version == n.version and c in n for c in candidates for n in policy.allow_networks):
        return None
    return f"refused: {ip} is not a public address (set FLEETFETCH_ALLOW_NETWORKS to allow)"


def check_scheme(url: str) -> None:
    scheme = urlsplit(url).scheme.lower()
    if scheme not in SCHEMES:
        raise Refused(f"refused: scheme {scheme or '(none)'!r} is not http or https")


# The resolver's answer that the name has no address (not that it could not ask): another attempt gets the same.
NO_SUCH_NAME = frozenset({socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)})


class NoSuchHost(LookupError):
    """The DNS answered that the host name does not exist (or has no address): not worth another attempt."""


def resolve(host: str, port: int, policy: Policy) -> str:
    """Resolve `host` once and return an address to connect to; every resolved address must be allowed."""
    for name, p, addr in policy.resolve:
        if name == host.lower() and p in (0, port):
            infos = [addr]
            break
    else:
        try:
            found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            why = f"cannot resolve host {host!r}: {getattr(exc, 'strerror', None) or exc}"
            if getattr(exc, "errno", None) in NO_SUCH_NAME:
                raise NoSuchHost(why) from None
            raise LookupError(why) from None
        infos = list(dict.fromkeys(str(info[4][0]) for info in found))
    for addr in infos:
        reason = refusal(ipaddress.ip_address(addr.split("%", 1)[0]), policy)
        if reason:
            raise Refused(reason)
    return infos[0]

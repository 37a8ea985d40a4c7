"""The destination policy as a pure function: classification only, no traffic.

No address outside loopback is written here: samples are generated across the whole IPv4 space and judged
against the standard `ipaddress` properties the policy is specified by.
"""

import ipaddress

import pytest

from tasks.guard import Policy, Refused, check_scheme, is_public, refusal, resolve

pytestmark = pytest.mark.fast  # the fast tier (tests/conftest.py)

V4, V6 = ipaddress.IPv4Address, ipaddress.IPv6Address
SAMPLES = [V4((first << 24) | (second << 16) | (third << 8) | 1)
           for first in range(256) for second in (0, 1, 16, 64, 88, 99, 100, 127, 168, 254, 255) for third in (0, 2)]


def globally_routable_unicast(ip: V4) -> bool:
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_private or ip.is_loopback
                                 or ip.is_link_local or ip.is_unspecified)


def test_ipv4_is_public_exactly_when_globally_routable_unicast():
    for ip in SAMPLES:
        assert is_public(ip) == globally_routable_unicast(ip), ip
    assert sum(map(is_public, SAMPLES)) > len(SAMPLES) // 2  # the samples include plenty of public space
    assert sum(not is_public(ip) for ip in SAMPLES) > 50  # ...and every kind of special range
    assert any(ip.is_link_local for ip in SAMPLES) and any(ip.is_private for ip in SAMPLES)
    assert any(ip.is_multicast for ip in SAMPLES) and any(ip in ipaddress.ip_network("100.64.0.0/10")
                                                          for ip in SAMPLES)


def test_ipv6_forms_of_ipv4_never_hide_a_non_public_address():
    for v4 in SAMPLES:
        n = int(v4)
        mapped, compatible = V6((0xFFFF << 32) | n), V6(n)
        nat64 = V6((0x64FF9B << 96) | n)
        sixtofour = V6((0x2002 << 112) | (n << 80) | 1)
        assert not is_public(mapped) and not is_public(compatible)  # never legitimate in DNS answers
        assert is_public(nat64) == is_public(v4), nat64  # DNS64 networks: judged by the translated address
        if not is_public(v4):
            assert not is_public(sixtofour), sixtofour


def test_special_ipv6_ranges_are_refused():
    for text in ("::1", "::", "fe80::1", "fc00::1", "fd12:3456::1", "ff02::1", "2001:db8::1", "2001::1"):
        assert not is_public(ipaddress.ip_address(text)), text


def test_refusal_names_the_address_and_the_opt_out():
    reason = refusal(V4("127.0.0.2"), Policy())
    assert reason == "refused: 127.0.0.2 is not a public address (set FLEETFETCH_ALLOW_NETWORKS to allow)"


def test_allow_list_admits_only_listed_networks():
    policy = Policy.from_settings(False, ("127.0.0.1/32", "127.0.1.0/24"), ())
    assert refusal(V4("127.0.0.1"), policy) is None
    assert refusal(V6("::ffff:127.0.0.1"), policy) is None
    assert refusal(V4("127.0.1.77"), policy) is None
    assert refusal(V4("127.0.0.2"), policy) is not None
    assert refusal(V6("::1"), policy) is not None


def test_allow_private_admits_everything():
    assert all(refusal(ip, Policy(allow_private=True)) is None for ip in SAMPLES)


def test_numeric_host_forms_resolve_to_the_address_they_mean():
    """Decimal, hex, octal and short forms are resolved, then the address is checked (no traffic)."""
    policy = Policy.from_settings(False, ("127.0.0.1/32",), ())
    for host in ("2130706434", "0x7f000002", "0177.0.0.2", "127.2"):
        with pytest.raises(Refused, match="127.0.0.2 is not a public address"):
            resolve(host, 80, policy)
    assert resolve("2130706433", 80, policy) == "127.0.0.1"


def test_resolve_override_is_checked_too():
    policy = Policy.from_settings(False, ("127.0.0.1/32",), ("files.test:80:127.0.0.2", "ok.test:80:127.0.0.1"))
    with pytest.raises(Refused):
        resolve("files.test", 80, policy)
    assert resolve("ok.test", 80, policy) == "127.0.0.1"


def test_only_http_and_https():
    check_scheme("https://x/")
    for url in ("ftp://x/", "file:///etc/passwd", "gopher://x/", "x"):
        with pytest.raises(Refused):
            check_scheme(url)

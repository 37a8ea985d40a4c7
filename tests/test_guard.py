"""The destination policy as a pure function: classification only, no traffic."""

import ipaddress

import pytest

from tasks.guard import Policy, Refused, check_scheme, is_public, refusal, resolve

ip = ipaddress.ip_address

REFUSED = ["127.0.0.1", "127.0.0.2", "10.0.0.1", "172.16.5.4", "192.168.1.1", "169.254.169.254",
           "100.64.0.1", "0.0.0.0", "224.0.0.1", "240.0.0.1", "255.255.255.255", "192.0.2.1", "198.18.0.1",
           "::1", "::", "fe80::1", "fc00::1", "ff02::1", "::ffff:127.0.0.1", "::ffff:169.254.169.254",
           "::ffff:10.0.0.1", "::127.0.0.1", "64:ff9b::a9fe:a9fe", "64:ff9b::7f00:1", "2002:7f00:1::1",
           "2002:a9fe:a9fe::1", "2001:db8::1", "2001::1"]
PUBLIC = ["8.8.8.8", "1.1.1.1", "93.184.216.34", "2606:4700:4700::1111", "64:ff9b::808:808"]


@pytest.mark.parametrize("addr", REFUSED)
def test_non_public_addresses_are_refused(addr):
    assert not is_public(ip(addr))
    reason = refusal(ip(addr), Policy())
    assert reason == f"refused: {ip(addr)} is not a public address (set FLEETFETCH_ALLOW_NETWORKS to allow)"


@pytest.mark.parametrize("addr", PUBLIC)
def test_public_addresses_are_allowed(addr):
    assert is_public(ip(addr))
    assert refusal(ip(addr), Policy()) is None


def test_allow_list_admits_only_listed_networks():
    policy = Policy.from_settings(False, ("127.0.0.1/32", "10.1.0.0/16"), ())
    assert refusal(ip("127.0.0.1"), policy) is None
    assert refusal(ip("::ffff:127.0.0.1"), policy) is None
    assert refusal(ip("10.1.2.3"), policy) is None
    assert refusal(ip("127.0.0.2"), policy) is not None
    assert refusal(ip("10.2.0.1"), policy) is not None


def test_allow_private_admits_everything():
    assert refusal(ip("169.254.169.254"), Policy(allow_private=True)) is None


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

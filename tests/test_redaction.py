"""Redaction by parsing: secrets with any URL-legal punctuation are masked wherever a URL is shown."""

from __future__ import annotations

import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tasks.redact import MASK, mask_password, redact_text, redact_url

pytestmark = pytest.mark.fast  # the fast tier (tests/conftest.py)

# RFC 3986 userinfo: unreserved / pct-encoded / sub-delims / ":"
USERINFO_PUNCT = "-._~!$&'()*+,;=:%"
_secret = st.text(alphabet=string.ascii_letters + string.digits + USERINFO_PUNCT, min_size=1, max_size=12)
_wrappers = ["{}", "'{}'", "({})", "<{}>", '"{}"', "[{}]", "{}.", "{}:", "{},"]


def test_a_password_with_a_parenthesis_is_masked_in_text():
    url = "http://user:pa)ss(w0rd@127.0.0.1:8000/f.pdf?page=1"
    assert "w0rd" not in redact_text(f"failed {url}: 404") and "pa)ss" not in redact_text(f"({url})")
    assert redact_url(url) == "http://****@127.0.0.1:8000/f.pdf?page=1"


def test_only_secret_parts_change():
    url = "https://u:p@h/a%20b/f.pdf?X-Amz-Signature=s3&page=2&q=a+b#access_token=t0k&x=1"
    assert redact_url(url) == "https://****@h/a%20b/f.pdf?X-Amz-Signature=****&page=2&q=a+b#access_token=****&x=1"
    assert redact_url("http://h/f?page=2") == "http://h/f?page=2"
    assert redact_text("no url here") == "no url here"
    assert mask_password("redis://:p)w@host:6379/0") == "redis://:****@host:6379/0"
    assert mask_password("redis://host:6379/0") == "redis://host:6379/0"


@settings(max_examples=500)
@given(_secret, st.sampled_from(_wrappers), st.sampled_from(["", "/f.pdf", "/a/b?x=1", "?page=2#top"]))
def test_any_url_legal_password_is_masked_in_any_text(secret, wrapper, rest):
    password = f"S3c{secret}rT9"
    url = f"http://user:{password}@127.0.0.1:8080{rest}"
    for text in (wrapper.format(url), f"redirect loop at {wrapper.format(url)} (hop 3)",
                 f"invalid URL {url!r}: No host supplied", repr(RuntimeError(url))):
        shown = redact_text(text)
        assert password not in shown and MASK in shown
    assert password not in redact_url(url)
    assert password not in mask_password(url)


@settings(max_examples=300)
@given(_secret, st.sampled_from(["token", "X-Amz-Signature", "sig", "api_key", "Password"]))
def test_any_sensitive_parameter_value_is_masked(secret, param):
    value = f"V4l{secret.replace('&', '').replace('#', '')}uE"
    url = f"http://127.0.0.1/f?page=1&{param}={value}"
    assert value not in redact_text(f"failed ({url}): 404")
    assert "page=1" in redact_url(url)


def test_jwt_and_semicolon_separated_parameters_are_masked():
    url = "https://objects.example/asset?sp=r&jwt=eyJhbGciOi.secret;token=t0k;page=2#a=1;sig=s1g"
    assert redact_url(url) == "https://objects.example/asset?sp=r&jwt=****;token=****;page=2#a=1;sig=****"

"""Pure policies: retry timing, URL-line validation, redaction."""

import re
import time
from email.utils import formatdate

import pytest

from producer.urls import check_line
from tasks.redact import mask_password, redact_text, redact_url
from tasks.retry import backoff, countdown, parse_retry_after

pytestmark = pytest.mark.fast  # the fast tier (tests/conftest.py)

HEX = "ab" * 32


def test_retry_after_seconds_and_http_date():
    assert parse_retry_after("2") == 2.0
    now = time.time()
    assert 9 <= parse_retry_after(formatdate(now + 10, usegmt=True), now=now) <= 11
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None


def test_backoff_is_full_jitter_under_the_cap():
    for attempt in range(1, 12):
        assert 0 <= backoff(attempt, 1.0, 60.0) <= min(60.0, 2 ** (attempt - 1))


def test_countdown_honours_retry_after_but_stays_below_visibility_timeout():
    assert countdown(1, 30, base=1, cap=1, max_wait=300, visibility_timeout=7200) >= 30
    assert countdown(1, 10_000, base=1, cap=1, max_wait=300, visibility_timeout=7200) <= 300
    assert countdown(1, 10_000, base=1, cap=1, max_wait=10_000, visibility_timeout=100) <= 50


@pytest.mark.parametrize("line,reason", [
    ("ftp://x/f", "not an http(s) URL"),
    ("www.irs.gov/f.pdf", "not an http(s) URL"),
    ("http://", "not an http(s) URL"),
    ("http://h:99999/x", "not a valid URL"),
    ("http://h/f extra", "unexpected text after the URL"),
    ("http://h/f sha256=abc", "invalid digest"),
    ("http://h/f sha256=" + "zz" * 32, "unexpected text"),
])
def test_bad_lines_name_the_problem(line, reason):
    with pytest.raises(ValueError, match=re.escape(reason)):
        check_line(line)


def test_good_lines():
    assert check_line("https://h/f.pdf") == ("https://h/f.pdf", None)
    assert check_line(f"https://h/f.pdf  sha256={HEX.upper()}") == ("https://h/f.pdf", HEX)


def test_redaction_of_userinfo_and_signed_parameters():
    url = "https://user:hunter2@h/f.pdf?X-Amz-Signature=s3cr3t&token=tok&page=2"
    red = redact_url(url)
    assert "hunter2" not in red and "s3cr3t" not in red and "tok&" not in red
    assert "page=2" in red and red.startswith("https://****@h/f.pdf")
    assert "hunter2" not in redact_text(f"failed {url}: 404")
    assert mask_password("redis://:pw@host:6379/0") == "redis://:****@host:6379/0"
    assert mask_password("redis://user:pw@host:6379/0") == "redis://user:****@host:6379/0"


def test_settings_from_environment_with_typed_defaults():
    from tasks.config import Settings

    s = Settings.from_env({"FLEETFETCH_TIME_LIMIT": "5000", "FLEETFETCH_NO_FSYNC": "1",
                           "FLEETFETCH_ALLOW_NETWORKS": "127.0.0.1/32, 127.0.1.0/24",
                           "CELERY_BROKER_URL": "redis://:pw@h:6379/0"})
    assert s.time_limit == 5000 and s.visibility_timeout == 10_000  # always above the time limit
    assert s.no_fsync is True and s.allow_networks == ("127.0.0.1/32", "127.0.1.0/24")
    assert s.backend == "redis://:pw@h:6379/1"  # defaults to the broker's Redis, db 1
    default = Settings.from_env({})
    assert default.visibility_timeout == 7200 and default.per_host == 50 and default.broker_url is None
    with pytest.raises(SystemExit, match="FLEETFETCH_PER_HOST='x' is not a whole number"):
        Settings.from_env({"FLEETFETCH_PER_HOST": "x"})

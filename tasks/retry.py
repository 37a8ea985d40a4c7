"""Retry policy: which failures are transient, and how long to wait before the next attempt."""

from __future__ import annotations

import random
import time
from email.utils import parsedate_to_datetime

RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


class DownloadError(Exception):
    """A failed attempt; `reason` is the one-line text that ends up in the record."""

    transient = False

    def __init__(self, reason: str, *, retry_after: float | None = None, status: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after
        self.status = status


class TransientError(DownloadError):
    """Worth another attempt: connection trouble, timeouts, a cut body, 408/425/429/5xx."""

    transient = True


class PermanentError(DownloadError):
    """Not worth another attempt: 404, refused destination, bad digest, too large..."""


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP-date); None if absent or invalid."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():  # "²".isdigit() is True, float("²") fails
        return float(value)
    try:
        when = parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return max(0.0, when - (time.time() if now is None else now))


def backoff(attempt: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Exponential backoff with full jitter: uniform(0, min(cap, base * 2**(attempt-1)))."""
    ceiling = min(cap, base * (2 ** max(0, attempt - 1)))
    return (rng or random).uniform(0, ceiling)


def countdown(
    attempt: int, retry_after: float | None, *, base: float, cap: float, max_wait: float, visibility_timeout: float
) -> float:
    """Seconds until the next attempt. A server's Retry-After wins over backoff, capped at max_wait.

    It must also stay well below the broker's visibility timeout: a worker holds a task waiting for its
    countdown unacknowledged, and Redis re-delivers it to another worker once that timeout passes, which
    would run the same download twice.
    """
    wait = backoff(attempt, base, cap)
    if retry_after is not None:
        wait = max(wait, min(retry_after, max_wait))
    return min(wait, visibility_timeout * 0.5)

"""Retry policy, pure: which answers are worth another attempt, how long to wait, when to pause a host.

One backoff serves every caller: the wait before a URL's next attempt (with jitter) and a host's pause.
"""

from __future__ import annotations

import random
import re
import time
from email.utils import parsedate_to_datetime

RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
THROTTLE_STATUS = frozenset({429, 503})  # the server asks every client to slow down
_SECONDS = re.compile(r"[0-9]{1,10}")


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP-date); None if absent or invalid."""
    if not value:
        return None
    value = value.strip()
    if _SECONDS.fullmatch(value):
        return float(value)
    try:
        when = parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return max(0.0, when - (time.time() if now is None else now))


def ceiling(n: int, base: float, cap: float) -> float:
    """The n-th step of exponential backoff: base, 2 x base, 4 x base ... at most cap."""
    return min(cap, base * (2 ** max(0, n - 1)))


def backoff(attempt: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Exponential backoff with full jitter: uniform(0, ceiling(attempt))."""
    return (rng or random).uniform(0, ceiling(attempt, base, cap))


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


def host_pause(status: int | None, retry_after: float | None, attempt: int, streak: int, *, threshold: int,
               base: float, cap: float, max_wait: float) -> float:
    """Seconds every worker leaves a host alone after this answer; 0 for no pause.

    429/503: the server's Retry-After, else the backoff of this attempt (at most max_wait). Other 5xx: once
    `threshold` of them came in a row (`streak`, from any worker), base, then doubling with each further one."""
    if status in THROTTLE_STATUS:
        return min(retry_after if retry_after is not None else ceiling(attempt, base, cap), max_wait)
    if status is not None and status >= 500 and threshold > 0 and streak >= threshold:
        return ceiling(streak - threshold + 1, base, cap)
    return 0.0

"""Local mode's look at a list's hosts before it starts anything: a list whose every host the workers' destination
policy refuses (loopback without FLEETFETCH_ALLOW_NETWORKS, the usual first try) fails at once, with the reason."""

from __future__ import annotations

import contextlib
import ipaddress
from collections import Counter
from collections.abc import Iterable
from urllib.parse import urlsplit

from tasks import guard
from tasks.config import settings
from tasks.message import Entry


def _judged_here(host: str, policy: guard.Policy) -> bool:
    """Whether the host can be judged without asking the DNS (which could hold up local mode's start): an address,
    localhost, or a name FLEETFETCH_RESOLVE gives."""
    with contextlib.suppress(ValueError):
        ipaddress.ip_address(host)
        return True
    name = host.lower().rstrip(".")
    return name == "localhost" or name.endswith(".localhost") or any(name == n for n, _, _ in policy.resolve)


def every_host_refused(entries: Iterable[Entry]) -> str | None:
    """The refusals, grouped ("5 × refused: ..."), when the policy refuses every host of the list; None as soon as
    one host is allowed or cannot be judged here (a name only the DNS knows: the workers will say)."""
    policy = guard.Policy.from_settings(settings.allow_private, settings.allow_networks, settings.resolve)
    judged: dict[tuple[str, int], str] = {}
    reasons: Counter[str] = Counter()
    for entry in entries:
        parts = urlsplit(entry.url)
        try:
            where = (parts.hostname or "", parts.port or (443 if parts.scheme.lower() == "https" else 80))
        except ValueError:
            return None
        if where not in judged:
            if not _judged_here(where[0], policy):
                return None
            try:
                guard.resolve(*where, policy)
                return None
            except guard.Refused as exc:
                judged[where] = str(exc)
            except (LookupError, ValueError, UnicodeError):
                return None
        reasons[judged[where]] += 1
    return "; ".join(f"{n} × {reason}" for reason, n in reasons.most_common()) or None

"""The versions of the libraries fleetfetch runs on, checked when a worker or the producer starts.

pip enforces pyproject.toml's ranges at install time, but not for an environment assembled otherwise
(`pip install --no-deps`, a distribution's packages, a pinned image): there an old kombu or requests would fail
every job with an AttributeError. `check()` turns that into one line naming the package and what to install.
A version above a range's top is left to the fenced modules (tasks/kombu_redis.py, tasks/urllib3_hooks.py),
which fall back to the libraries' own paths."""

from __future__ import annotations

import re
import sys
from typing import Any

# The lowest version of each that works, as pyproject.toml declares them (tests/test_dependencies.py keeps the two
# in step), with what needs it.
FLOORS = {
    "celery": ("5.7", "the release that runs on kombu 5.7"),
    "kombu": ("5.7", "Producer.batch, and the Redis transport internals tasks/kombu_redis.py knows"),
    "redis": ("6.4", "kombu 5.7's Redis transport"),
    "requests": ("2.32.3", "HTTPAdapter.build_connection_pool_key_attributes"),
    "urllib3": ("2.2", "HTTPResponse.read1"),
}


def _release(version: str) -> tuple[int, ...]:
    """(5, 7, 0) of '5.7.0rc1': the numeric release part, which is all the floors compare."""
    match = re.match(r"\d+(?:\.\d+)*", version)
    return tuple(int(p) for p in match.group().split(".")) if match else ()


def too_old(installed: dict[str, str]) -> list[str]:
    """One line for each package in `installed` (name -> version) below its floor."""
    lines = []
    for name, (floor, why) in FLOORS.items():
        version = installed.get(name)
        if version is not None and _release(version) < _release(floor):
            lines.append(f"error: fleetfetch needs {name}>={floor} ({why}), but {name} {version} is installed: "
                         f"pip install '{name}>={floor}' (or pip install -e . to take pyproject.toml's ranges)")
    return lines


def unfit(package: str, version: str, known: tuple[str, ...], used: dict[Any, tuple[str, ...]]) -> str | None:
    """Why a module that overrides `package`'s internals must leave it alone: `version` is not a minor release it
    `known`s, or an owner in `used` lacks a name it overrides or calls (None: it may go ahead)."""
    if ".".join(version.split(".")[:2]) not in known:
        span = known[0] if len(known) == 1 else f"{known[0]} to {known[-1]}"
        return f"{package} {version} is not a version fleetfetch knows ({span})"
    for owner, names in used.items():
        missing = [n for n in names if not hasattr(owner, n)]
        if missing:
            return f"{package} {version}: {getattr(owner, '__qualname__', owner)} has no {', '.join(missing)}"
    return None


def check(*modules: Any) -> None:
    """Exit 2 with one line per library among `modules` that is too old, before anything runs on it. Each process
    checks what it imports (the producer never imports requests: its start would pay for it)."""
    lines = too_old({m.__name__: m.__version__ for m in modules})
    if lines:
        print("\n".join(lines), file=sys.stderr, flush=True)
        raise SystemExit(2)

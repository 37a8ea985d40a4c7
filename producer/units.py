"""Sizes as people type them (`500K`, `2M`, `10G`) and as they read them (`1.9 MB`, `640 kB/s`)."""

from __future__ import annotations

import re

_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?", re.I)
_FACTOR = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """`500K` -> 512000: bytes, with curl's and wget's suffixes K, M, G, T (powers of 1024); ValueError if not."""
    match = _SIZE.fullmatch(text.strip())
    if not match:
        raise ValueError(f"{text!r} is not a size: give bytes, or a number with K, M, G or T (e.g. 500K, 2M, 10G)")
    return int(float(match.group(1)) * _FACTOR[match.group(2).lower()])


def human_bytes(n: float) -> str:
    """`1234567` -> `1.2 MB` (decimal units, as download tools print them), scaling from B to TB."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def human_rate(nbytes: float, seconds: float) -> str:
    return human_bytes(nbytes / max(seconds, 1e-9)) + "/s"

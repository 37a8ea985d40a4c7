"""A job's rows and final records as Redis keeps them: pure functions, no Redis.

A URL's row is one JSON line `[url, name, sha256|null(, the URL's own options)]`, BLOCK rows to a zlib block of
`urls`. A final record is stored compact (`compact`: without what the ledger knows already) and, for a download,
packed (`pack`: 49 bytes where the JSON was ~200); `expand` and `unpack` give it back whole.
"""

from __future__ import annotations

import json
import re
import struct
import zlib
from collections.abc import Callable
from typing import Any, cast

from ..redact import redact_url
from .keys import COUNTERS
from .states import STARTED, STATES

BLOCK = 1000  # URLs per compressed block of `urls` (the ledger's BATCH is a multiple: a batch reads whole blocks)
Row = tuple[int, str, str, str | None, dict[str, Any]]  # index, url, name, sha256, the URL's own options


def counts_in(meta: dict[str, Any]) -> dict[str, int]:
    """The counters of a job from its meta fields (`meta` or `counts`): state -> URLs, bytes, published. `started`
    is not kept (the scripts spare its HINCRBY at each start and end): every URL with a state has one, so it is
    `published` less the other states."""
    counts = {f.removeprefix("n:"): int(meta.get(f) or 0) for f in COUNTERS}
    counts[STARTED] = max(0, counts["published"] - sum(n for s, n in counts.items() if s in _KEPT))
    return counts


_KEPT = {s for s in STATES if s != STARTED}  # the states with a counter of their own


def compact(record: dict[str, Any], state: str, name: str | None = None) -> dict[str, Any]:
    """The record as stored: without what the ledger knows already (the URL is in `urls`, the status in `state`,
    a final URL equal to the URL, a path equal to the URL's name) and without empty fields. One record per URL:
    at 10^7 URLs each byte is 10 MB."""
    url = record.get("url")
    return {k: v for k, v in record.items() if v is not None and not (
        (k == "url") or (k == "status" and v == state) or (k == "final_url" and v == url)
        or (k == "path" and v == name) or (k, v) in _USUAL)}


def expand(stored: dict[str, Any], url: str, state: str, name: str = "") -> dict[str, Any]:
    """The record as `compact` stored it, whole again: URL (redacted), status, path (every record has one: where the
    file is or would have been), and the final URL of a download."""
    shown = redact_url(url)
    record: dict[str, Any] = {"url": shown, "status": state, "attempts": 1, **({"path": name} if name else {})}
    if "sha256" in stored:  # a download's record
        record.update(final_url=shown, http_status=200)
    return record | stored


_USUAL = {("attempts", 1), ("http_status", 200)}  # left out of a stored record, put back by `expand`

# A download's record packed: a marker (JSON never starts with it), the numbers of its worker and content type
# (0: none) in the job's `names`, elapsed ms (NO_MS: none), bytes and the SHA-256 itself; any other field follows
# as JSON. 49 bytes where the JSON was ~200.
PACKED = struct.Struct(">cHHIQ32s")
MARK, NO_MS = b"\x01", 0xFFFFFFFF
_HEX64 = re.compile(r"[0-9a-f]{64}")


def pack(stored: dict[str, Any], number: Callable[[str, str], int]) -> bytes:
    """A compact record as stored: packed when it is a download's (`number(kind, value)` numbers names), JSON
    otherwise."""
    sha, size, worker = stored.get("sha256"), stored.get("bytes"), stored.get("worker")
    ms = round(stored["elapsed_s"] * 1000) if isinstance(stored.get("elapsed_s"), int | float) else NO_MS
    if (not isinstance(sha, str) or not _HEX64.fullmatch(sha) or not isinstance(size, int) or not 0 <= size < 2**64
            or not isinstance(worker, str) or not 0 <= ms <= NO_MS):
        return json.dumps(stored, separators=(",", ":")).encode()
    ctype = stored.get("content_type")
    w, c = number("w", worker), number("c", ctype) if isinstance(ctype, str) else 0
    if w > 0xFFFF or c > 0xFFFF:  # more names in one job than the numbers hold: JSON then
        return json.dumps(stored, separators=(",", ":")).encode()
    rest = {k: v for k, v in stored.items() if k not in ("sha256", "bytes", "worker", "elapsed_s")
            and not (k == "content_type" and c)}
    tail = json.dumps(rest, separators=(",", ":")).encode() if rest else b""
    return PACKED.pack(MARK, w, c, ms, size, bytes.fromhex(sha)) + tail


def unpack(raw: bytes, names: dict[int, str]) -> dict[str, Any]:
    """A stored record (`pack`) as a dict; `names`: the job's numbered names."""
    if raw[:1] != MARK:
        return cast(dict[str, Any], json.loads(raw))
    _, w, c, ms, size, sha = PACKED.unpack_from(raw)
    out: dict[str, Any] = {"worker": names.get(w, "?"), "bytes": size, "sha256": sha.hex()}
    if ms != NO_MS:
        out["elapsed_s"] = ms / 1000
    if c:
        out["content_type"] = names.get(c, "?")
    if len(raw) > PACKED.size:
        out.update(json.loads(raw[PACKED.size:]))
    return out


def block_rows(packed: bytes | None) -> list[bytes]:
    """The stored rows (JSON lines) of one block of `urls`; none for a block that is not there."""
    return zlib.decompress(packed).split(b"\n") if packed else []


def parse_row(raw: bytes | str) -> tuple[str, str, str | None, dict[str, Any]]:
    url, name, digest, *own = json.loads(raw)
    return url, name, digest, (own[0] if own else {})

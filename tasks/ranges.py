"""A big file's ranges as pure data: pieces planned for several connections, the map of what is complete, and
whether a range answer is exactly the bytes asked for (tasks/segments.py fetches them)."""

from __future__ import annotations

from dataclasses import dataclass, field

import requests

MIN_PIECE = 1 << 20  # no range is cut smaller than this
# Nor is one asked for in pieces larger than this (aria2c's -k): a connection that is done takes the next piece, so
# the slowest connection holds the file up by one piece at most, and a range map loses little to a kill.
PIECE = 4 << 20


class BadRange(Exception):
    """A range answer that must not be spliced in: 200, a wrong Content-Range, another validator, extra bytes."""


@dataclass
class Piece:
    start: int
    end: int  # exclusive
    pos: int = -1  # written up to here

    def __post_init__(self) -> None:
        self.pos = self.start if self.pos < 0 else self.pos


@dataclass
class RangeMap:
    """The temp file's range map: which bytes are complete, for which URL and version of the file."""

    url: str
    size: int
    validator: str
    done: list[list[int]] = field(default_factory=list)

    def missing(self) -> list[tuple[int, int]]:
        gaps, at = [], 0
        for a, b in sorted(self.done):
            if a > at:
                gaps.append((at, a))
            at = max(at, b)
        if at < self.size:
            gaps.append((at, self.size))
        return gaps


def merge(ranges: list[list[int]]) -> list[list[int]]:
    """Overlapping or touching [start, end) ranges joined, in order; empty ones dropped."""
    out: list[list[int]] = []
    for a, b in sorted(r for r in ranges if r[1] > r[0]):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


def contiguous(ranges: list[list[int]], size: int) -> int:
    """How far from byte 0 the ranges cover the file without a hole."""
    at = 0
    for a, b in merge(ranges):
        if a > at:
            break
        at = max(at, b)
    return min(at, size)


def plan(ranges: list[tuple[int, int]], count: int) -> list[Piece]:
    """Cut `ranges` into pieces for `count` connections: each at most PIECE (and at least MIN_PIECE), the first
    and the last round in halves. The first: each piece served gives its slot back as a download the host kept up
    with, so the host's window grows sooner (as TCP's slow start); the last: a connection that starts its last
    piece late does not finish long after the others."""
    total = sum(max(0, b - a) for a, b in ranges)
    step = max(MIN_PIECE, min(PIECE, -(-total // max(1, count))))
    pieces = [Piece(at, min(at + step, end)) for start, end in ranges for at in range(start, end, step)]
    if count <= 1:
        return pieces
    edge = {*range(count), *range(max(0, len(pieces) - count), len(pieces))}
    out: list[Piece] = []
    for i, p in enumerate(pieces):
        mid = p.start + (p.end - p.start) // 2
        halve = i in edge and p.end - p.start >= 2 * MIN_PIECE
        out += [Piece(p.start, mid), Piece(mid, p.end)] if halve else [p]
    return out


def validator_of(response: requests.Response) -> str | None:
    """What If-Range may carry: a strong ETag (a weak one never matches a range), else Last-Modified."""
    etag = response.headers.get("etag", "").strip()
    if etag and not etag.startswith("W/"):
        return etag
    return response.headers.get("last-modified", "").strip() or None


def splittable(response: requests.Response, split: int, min_split_size: int) -> int | None:
    """The body's size when it may be fetched in ranges and is big enough to be worth it; None otherwise."""
    h = response.headers
    length = h.get("content-length", "").strip()
    if split < 2 or response.status_code != 200 or not length.isascii() or not length.isdecimal():
        return None
    if "bytes" not in h.get("accept-ranges", "").lower() or h.get("content-encoding", "identity") != "identity":
        return None
    size = int(length)
    return size if size >= max(min_split_size, 2 * MIN_PIECE) and validator_of(response) else None


def range_headers(start: int, end: int, validator: str) -> dict[str, str]:
    """The request for bytes start..end-1 of the file this validator names (a changed file answers 200 whole)."""
    return {"Range": f"bytes={start}-{end - 1}", "If-Range": validator}


def checked_range(response: requests.Response, start: int, end: int, size: int, validator: str) -> requests.Response:
    """`response` if it is exactly that range of that file; else it is closed and BadRange says why."""
    problem = range_problem(response, start, end, size, validator)
    if problem:
        response.close()
        raise BadRange(problem)
    return response


def range_problem(response: requests.Response, start: int, end: int, size: int, validator: str) -> str | None:
    """Why this answer is not exactly bytes start..end-1 of the file of `size` bytes and this validator; None if
    it is."""
    if response.status_code != 206:
        return f"{response.status_code} to a range request"
    expected = f"bytes {start}-{end - 1}/{size}"
    got = response.headers.get("content-range", "").strip()
    if got != expected:
        return f"Content-Range {got!r} instead of {expected!r}"
    now = validator_of(response)
    if now is not None and now != validator:
        return "the file changed on the server"
    return None

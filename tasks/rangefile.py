"""The temp file of a big file fetched in ranges: its range map kept on the file itself (an extended attribute, so it
travels with the file to the next attempt, even after a SIGKILL), the file hashed in order as ranges complete, and
the connections fetching it (Crew)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import requests

from . import fetch, storage
from .errors import CutShort, PermanentError, TransientError
from .pace import Pace
from .ranges import BadRange, Piece, RangeMap, contiguous, merge

if TYPE_CHECKING:
    from .shared import Shared

MAP_XATTR = "user.fleetfetch.ranges"


def fill(piece: Piece, response: requests.Response, write: Callable[[bytes, int], None], read_timeout: float,
         deadline: float, pace: Pace, go_on: Callable[[], bool] = lambda: True) -> None:
    """Stream a range's answer into its place from `piece.pos` (`write(chunk, offset)`), paced, `piece.pos`
    following it; stops early, quietly, when `go_on()` turns false. BadRange on more bytes than the range,
    TransientError when the body ends before it. Closes the response."""
    try:
        for chunk in fetch.body_chunks(response, read_timeout, deadline):
            if not go_on():
                return
            if piece.pos + len(chunk) > piece.end:
                raise BadRange("more bytes than the range asked for")
            write(chunk, piece.pos)
            piece.pos += len(chunk)
            pace.wait(len(chunk), deadline)
    except CutShort:
        pass
    finally:
        response.close()
    if piece.pos != piece.end:
        raise TransientError(f"range cut short: {piece.pos - piece.start} of {piece.end - piece.start} bytes")
_NO_XATTR = {errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM, errno.ENOSPC, errno.E2BIG}


@dataclass
class Crew:
    """The connections fetching one file's ranges, and what the coordinating thread knows of them."""

    pieces: list[Piece]
    slots: list[Any]  # segments.Slot
    pace: Pace
    first_end: int  # where the first stream stops (0: no first stream; all pieces are the connections')
    todo: list[Piece] = field(default_factory=list)
    mine: set[int] = field(default_factory=set)  # shared: pieces this task has claimed and is fetching
    opened: int = 0  # the piece a connection's opened response belongs to
    threads: list[threading.Thread] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)
    wake: threading.Event = field(default_factory=threading.Event)
    saved: int = 0
    saved_at: float = field(default_factory=time.monotonic)
    renewed: float = field(default_factory=time.monotonic)


class RangeFile:
    """Run's side that keeps the map and the hash (tasks/segments.py)."""

    part: storage.PartFile
    url: str
    map: RangeMap | None
    kept: bool
    _hashed: int
    _shared: Shared | None

    def _hash(self, pieces: list[Piece], size: int, budget: int) -> None:
        """Hash the file in order as far as it is contiguous (at most `budget` bytes now)."""
        end = self._contiguous(pieces, size)
        stop = min(end, self._hashed + budget)
        while self._hashed < stop:
            chunk = os.pread(self.part.fd, min(fetch.CHUNK, stop - self._hashed), self._hashed)
            if not chunk:
                raise PermanentError("the temp file shrank while it was written (changed by someone else?)")
            self.part.hash.update(chunk)
            self._hashed += len(chunk)

    def _contiguous(self, pieces: list[Piece], size: int) -> int:
        kept = self.map.done if self.map else []
        return contiguous([*kept, [0, self.part.size], *([p.start, p.pos] for p in pieces)], size)

    def _read_map(self) -> RangeMap | None:
        try:
            found = RangeMap(**json.loads(os.getxattr(self.part.fd, MAP_XATTR)))
        except (OSError, ValueError, TypeError):
            return None
        if found.url != storage.url_key(self.url) or os.fstat(self.part.fd).st_size != found.size:
            self._drop_map()
            return None
        found.done = merge([[max(0, a), min(found.size, b)] for a, b in found.done])
        return found

    def _save_map(self, pieces: list[Piece]) -> None:
        """Record what is complete (durable files: the bytes reach the disk before the map claims them)."""
        if self.map is None:
            return
        self.map.done = merge([*self.map.done, [0, self.part.size], *([p.start, p.pos] for p in pieces)])
        try:
            if self.part.durable:
                os.fdatasync(self.part.fd)
            os.setxattr(self.part.fd, MAP_XATTR, json.dumps(vars(self.map), separators=(",", ":")).encode())
        except OSError as exc:
            if exc.errno not in _NO_XATTR:
                raise PermanentError(f"cannot record the ranges of the temp file: {exc.strerror}") from None
            self.kept = False  # no map: a later attempt could not tell complete ranges from holes

    def _drop_map(self) -> None:
        with contextlib.suppress(OSError):
            os.removexattr(self.part.fd, MAP_XATTR)
        self.map = None
        if self._shared is not None:
            self._shared.board.drop()  # helpers find no plan and stop

    def _preallocate(self, size: int) -> None:
        try:
            self.part.preallocate(size)
        except OSError as exc:
            raise PermanentError(storage.describe_os_error(exc, self.part.shown)) from None


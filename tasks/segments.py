"""Segmented downloads of big files: several byte ranges at once, each on its own connection (aria2c's -s).

A download starts as one stream (tasks/transfer.py). When its response shows the body can be fetched in ranges
(Content-Length, `Accept-Ranges: bytes`, no content coding, a validator for If-Range) and the file is at least
`min_split_size`, the stream runs for PROBE_S; if the rest would still take longer than SLOW_S at the rate seen, it
stops there and the rest is fetched as up to `split` ranges, one connection each (each takes a slot of the host's
cluster-wide window: a busy host gets fewer), written at their offsets into the one locked temp file. The file is
hashed in order while the ranges arrive. Which ranges are complete is kept on the temp file (an extended attribute,
MAP_XATTR), so an attempt that dies or fails loses only unfinished ranges: the next one fetches the missing ones
with If-Range. A server that answers a range with 200, with a wrong Content-Range or with another validator never
gets its bytes spliced in: the download starts over as one stream, and the record says so.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import requests

from . import fetch, shared, storage
from .credentials import Credentials
from .errors import PermanentError, TransientError
from .pace import Pace
from .rangefile import Crew, RangeFile, fill
from .ranges import (
    MIN_PIECE,
    PIECE,
    BadRange,
    Piece,
    RangeMap,
    checked_range,
    plan,
    range_headers,
    splittable,
    validator_of,
)
from .shared_owner import SharedOwner

_Piece, _Map, _PIECE = Piece, RangeMap, PIECE  # names tests/test_segments.py imports (as PIECE)

MIN_SPLIT_SIZE = 20 << 20  # aria2c's --min-split-size default: smaller files are one stream
SPLIT = 8  # connections per big file by default: the first window a host gets (hostlimit.START), as browsers' 6
PROBE_S = 0.2  # the first stream runs this long before its rate decides whether to split
SLOW_S = 2.0  # split only when the rest would take longer than this on one stream
FAST = 100 << 20  # bytes/s: a stream this fast is bound by the disk and the CPU, not the connection: never split
SAVE_EVERY = 8 << 20  # the range map is written each time this many more bytes are complete,
SAVE_S = 0.5  # or this long after it was last written: a killed attempt loses at most that much of every range
HASH_STEP = 64 << 20  # the coordinator hashes at most this much between two looks at the ranges
OWN_PAUSE_S = 0.1  # between the first stream's close and its slot's next request (the server sees it go first)
TICK_S = 0.2  # how often the coordinator looks at the ranges, the job's cancellation and the slots' leases


ChunkHook = Callable[[int, int | None], None]  # after each chunk written: (bytes so far, the file's size or None)
OneStream = Callable[[requests.Response, ChunkHook | None], None]  # streams a response into the temp file


class Slot(Protocol):
    """A slot of the host's cluster-wide window held by one extra connection."""

    def renew(self) -> None: ...

    def release(self, answered: bool) -> None: ...


@dataclass
class Config:
    split: int = 1  # most connections for one file; 1: never split
    min_split_size: int = MIN_SPLIT_SIZE
    take_slot: Callable[[], Slot | None] | None = None  # one more slot of the host now, or None (no waiting)
    slot_lease_s: float = 60.0  # extra slots are renewed well within this
    shared: shared.Shared | None = None  # workers share the volume: the file's pieces are spread over them


class _Split(Exception):
    """Raised from the first stream's chunk hook: stop it here, the rest goes to ranges."""


class Run(SharedOwner, RangeFile):
    """The segment side of one attempt: resume a kept range map, or split a slow first stream."""

    def __init__(self, cfg: Config | None, part: storage.PartFile, url: str, headers: dict[str, str],
                 credentials: Credentials | None, limits: fetch.Limits, deadline: float, limit_rate: int,
                 on_chunk: ChunkHook | None) -> None:
        self.cfg, self.part, self.url, self.headers = cfg, part, url, headers
        self.credentials, self.limits, self.deadline = credentials, limits, deadline
        self.limit_rate, self.on_chunk = limit_rate, on_chunk
        self.notes: dict[str, Any] = {}  # what the record says about segments
        self.kept = False  # the temp file carries a range map worth resuming from (keep it on failure)
        self.finished = False  # the whole body is in the temp file, hashed
        self.map: RangeMap | None = None
        self._hashed = 0  # the file is hashed in order up to here
        self._crew: Crew | None = None
        self._prober_error: BaseException | None = None
        self._shared = cfg.shared if cfg is not None else None
        self._gen = ""  # shared: the generation of the plan published for the file
        self._done_by: dict[int, str] = {}  # shared: piece -> who fetched it

    # -- resume --------------------------------------------------------------------------------------------------
    def resume(self) -> requests.Response | None:
        """Fetch the ranges a kept map lacks; returns the first range's response with the body complete, or a 200
        that starts the file over (the file changed, or ranges are refused), or None (no map: the usual path)."""
        if self._shared is not None:
            kept = self._resume_shared()
            if kept is not None:
                return kept
        found = self._read_map() if self.cfg is not None else None
        if found is None:
            return None
        pieces = plan(found.missing(), max(1, self.cfg.split if self.cfg else 1))
        if not pieces:
            self._drop_map()
            return None
        self.map, self.kept = found, True
        first = pieces[0]
        try:
            response = self._open_range(first)
        except BadRange as exc:
            return self._start_over(f"resume refused ({exc}): started over as one stream")
        except PermanentError as exc:
            if exc.status != 416:
                raise
            return self._start_over("resume refused (416): started over as one stream")
        self.notes["resumed_bytes"] = sum(b - a for a, b in found.done)
        try:
            self._fetch(pieces, response, found.size)
        except BadRange as exc:
            return self._start_over(f"a range was refused on resume ({exc}): started over as one stream")
        return response

    def _start_over(self, why: str) -> requests.Response:
        self._drop_map()
        self._restart_file()
        self.notes["segments_note"] = why
        return self._open({})

    # -- split ---------------------------------------------------------------------------------------------------
    def stream(self, response: requests.Response,
               one_stream: OneStream) -> requests.Response:
        """Stream `response` (one_stream(response, hook)); when it is slow, the rest is split into ranges on extra
        connections while this stream goes on with the first of them. Returns the response describing the file.
        The decision is a thread's, PROBE_S after the start: a throttled stream may not deliver a chunk for a
        second, and this one waits for them."""
        if self.finished:
            return response
        size = splittable(response, self.cfg.split, self.cfg.min_split_size) if self.cfg is not None else None
        if size is None:
            one_stream(response, self.on_chunk)
            return response
        streamed = threading.Event()
        prober = threading.Thread(target=self._prober, args=(response, size, streamed), daemon=True, name="segments")
        prober.start()
        try:
            one_stream(response, self._hook)
        except _Split:
            response.close()
            self._own_slot_joins()
        except BadRange as exc:
            self._join(prober, streamed)
            return self._one_stream_after(exc, one_stream)
        except BaseException:
            self._join(prober, streamed)
            self._end_crew(failed=True)
            raise
        self._join(prober, streamed)
        if self.part.size >= size:  # the whole body came on this stream before any range was needed
            self._end_crew(failed=False)
            self._drop_map()
            self.kept = False
            return response
        try:
            self._finish_crew(size)
        except BadRange as exc:
            return self._one_stream_after(exc, one_stream)
        return response

    def _own_slot_joins(self) -> None:
        """The first stream reached its piece's end (and is closed): the task's own slot takes pieces like the
        others, after OWN_PAUSE_S, so the server has seen the first connection go before it sees the next."""
        crew = self._crew
        if self._shared is not None and crew is not None:
            self._shared.board.finish(self._gen, 0, f"{self._shared.who}/first")  # the first stream's piece
            crew.mine.discard(0)
        if crew is not None and (crew.todo or self._shared) and not crew.stop.is_set():
            self._add_connection(crew, None, None, delay=OWN_PAUSE_S)

    def _join(self, prober: threading.Thread, streamed: threading.Event) -> None:
        streamed.set()
        prober.join()
        if self._prober_error is not None:
            self._end_crew(failed=True)
            raise self._prober_error

    def _hook(self, size: int, expected: int | None) -> None:
        """The first stream's chunk hook: a failed range stops it, and so does the first range's end."""
        if self.on_chunk is not None:
            self.on_chunk(size, expected)
        crew = self._crew
        if crew is not None:
            if crew.errors:
                raise crew.errors[0]
            if self.part.size >= crew.first_end:
                raise _Split()

    def _prober(self, response: requests.Response, size: int, streamed: threading.Event) -> None:
        """PROBE_S into the first stream, decide whether to split; then look after the crew until the first stream
        ends (the downloading thread takes over)."""
        try:
            at_start, began = self.part.size, time.monotonic()
            if streamed.wait(PROBE_S) or not self._split_now(response, size, at_start, began):
                return
            while not streamed.wait(TICK_S):
                self._tick(hashing=False)
        except BaseException as exc:  # noqa: BLE001 - raised in the downloading thread
            self._prober_error = exc

    def _one_stream_after(self, exc: BadRange, one_stream: OneStream) -> requests.Response:
        """Ranges refused: nothing of them is kept; the file starts over as one stream."""
        self._end_crew(failed=True)
        self._drop_map()
        self._restart_file()
        self.kept = False
        self.notes.update(segments=1, connections=1, segments_note=f"ranges refused ({exc}): one stream")
        response = self._open({})
        one_stream(response, self.on_chunk)
        return response

    def _split_now(self, response: requests.Response, size: int, at_start: int, began: float) -> bool:
        """Split the rest into ranges if the first stream is slow and the host has a slot for another connection."""
        pos = self.part.size
        rate = (pos - at_start) / max(1e-6, time.monotonic() - began)
        self.notes.update(segments=1, connections=1)  # decided: one stream unless split below
        if rate >= FAST or size - pos <= max(rate * SLOW_S, 2 * MIN_PIECE):
            return False
        if self.limit_rate and rate >= self.limit_rate / 2:
            return False  # one stream nearly reaches --limit-rate already
        split = self.cfg.split if self.cfg else 1
        # The first stream keeps only a short first piece: it already spent the burst a server may grant a new
        # request, and a long piece on it would be the last to finish. Its slot then serves pieces like the others.
        first = min(size, pos + MIN_PIECE)
        pieces = [Piece(pos, first), *plan([(first, size)], split)]
        # Shared: one connection per participant; the others are helper tasks, on any worker.
        slots = [] if self._shared else self._take_slots(min(split, len(pieces)) - 1)
        if not slots and not self._shared:
            return False  # the host's window is full: no extra connection
        self.map, self.kept = RangeMap(storage.url_key(self.url), size, validator_of(response) or "", [[0, pos]]), True
        try:
            self._preallocate(size)
        except BaseException:
            for s in slots:
                s.release(False)
            raise
        rest = max(1, self.limit_rate - int(rate)) if self.limit_rate else 0
        if self._shared is not None:
            self._share(pieces, [[0, pos]], held=[0])
        self._start_crew(pieces, None, rest, slots, first_streamed=True)
        return True

    # -- the ranges ----------------------------------------------------------------------------------------------
    def _fetch(self, pieces: list[Piece], first: requests.Response | None, size: int) -> None:
        """Fetch `pieces` (the first may come with its response open) on as many connections as the host gives."""
        wanted = min(len(pieces), self.cfg.split if self.cfg else 1) - 1
        if self._shared is not None and self.map is not None:
            self._share(pieces, self.map.done, held=[0])
            wanted = 0
        self._start_crew(pieces, first, self.limit_rate, self._take_slots(wanted), first_streamed=False)
        self._finish_crew(size)

    def _start_crew(self, pieces: list[Piece], first: requests.Response | None, rate: int, slots: list[Slot],
                    first_streamed: bool, opened: int = 0) -> None:
        """Connections for the pieces: the first piece is this thread's stream (`first_streamed`) or an open
        response (for piece `opened`) handed to the first connection; one more connection per extra slot."""
        crew = self._crew = Crew(pieces, [], Pace(rate, fetch.CHUNK), pieces[0].end if first_streamed else 0)
        # Shared: pieces are claimed from the plan in Redis instead (_next_piece), one connection per participant.
        crew.todo = [] if self._shared else list(pieces[1:] if first_streamed else pieces)
        crew.opened = opened
        if self._shared is not None and (first_streamed or first is not None):
            crew.mine.add(opened)  # claimed already
        self.notes.update(segments=len(pieces), connections=1)
        if not first_streamed:
            self._add_connection(crew, None, first)  # on the task's own slot
        for slot in slots:
            self._add_connection(crew, slot, None)

    def _add_connection(self, crew: Crew, slot: Slot | None, opened: requests.Response | None,
                        delay: float = 0.0) -> None:
        with crew.lock:
            if slot is not None:
                crew.slots.append(slot)
            name = f"segment-{len(crew.threads)}"
            self.notes["connections"] = max(self.notes["connections"], 1 + len(crew.slots))
        t = threading.Thread(target=self._connection, args=(crew, slot, opened, delay), daemon=True, name=name)
        crew.threads.append(t)
        t.start()

    def _connection(self, crew: Crew, slot: Slot | None, opened: requests.Response | None,
                    delay: float = 0.0) -> None:
        """One connection: pieces one after another. Between two, its slot is given back as a download the host
        served and taken again: the host's window may grow (tasks/hostlimit.py), or be taken by another task,
        and then this connection ends."""
        failed = False
        try:
            crew.stop.wait(delay)
            while not crew.stop.is_set():
                piece = self._next_piece(crew, opened is not None, slot is None)
                if piece is None:
                    return
                self._fill(piece, opened, crew.stop, crew.pace)
                opened = None
                self._piece_done(crew, piece)
                if slot is not None and crew.todo:
                    slot = self._cycle(crew, slot)
                    if slot is None:
                        return
        except BaseException as exc:  # noqa: BLE001 - handed to the coordinating thread, which raises it
            failed = True
            crew.errors.append(exc)
            crew.stop.set()
        finally:
            if slot is not None:
                self._give_back(crew, slot, not failed)
            fetch.forget_session()
            crew.wake.set()

    def _cycle(self, crew: Crew, slot: Slot) -> Slot | None:
        self._give_back(crew, slot, True)
        again = self.cfg.take_slot() if self.cfg is not None and self.cfg.take_slot is not None else None
        if again is not None:
            with crew.lock:
                crew.slots.append(again)
        return again

    def _give_back(self, crew: Crew, slot: Slot, answered: bool) -> None:
        with crew.lock:
            if slot in crew.slots:
                crew.slots.remove(slot)
        slot.release(answered)

    def _grow(self, crew: Crew) -> None:
        """More connections while pieces are left and the host's window has room (it grows as pieces are served)."""
        split = self.cfg.split if self.cfg is not None else 1
        if self._shared is not None:
            self._grow_shared(crew, split)
            return
        while crew.todo and not crew.stop.is_set() and 1 + len(crew.slots) < split:
            slot = self._take_slots(1)
            if not slot:
                return
            self._add_connection(crew, slot[0], None)

    def _finish_crew(self, size: int) -> None:
        """Wait for every connection, hashing the file in order meanwhile; then the body is complete."""
        crew = self._crew
        assert crew is not None
        self._hashed = self.part.size if crew.first_end else 0
        try:
            while any(t.is_alive() for t in crew.threads) and not crew.stop.is_set():
                crew.wake.wait(TICK_S)
                crew.wake.clear()
                if self.on_chunk is not None:  # bytes so far: every piece's written part
                    self.on_chunk(sum(p.pos - p.start for p in crew.pieces), size)
                self._tick(hashing=True)
        except BaseException:
            self._end_crew(failed=True)
            raise
        self._end_crew(failed=bool(crew.errors))
        if crew.errors:
            raise crew.errors[0]
        if self._shared is not None:
            self._sync_shared(crew)
            self.notes.update(shared.who_fetched(self._done_by))
        self._hash(crew.pieces, size, size)
        if self._hashed != size:  # never a file with a hole: what is complete is kept for the next attempt
            self._save_map(crew.pieces)
            raise TransientError(f"ranges left unfetched after byte {self._hashed}")
        self._drop_map()
        self.part.size, self.finished, self.kept = size, True, False

    def _tick(self, hashing: bool) -> None:
        """The coordinating thread's look at the crew: what is contiguous is hashed, the map saved, the slots renewed,
        connections added. (A connection's error stops the crew; the downloading thread raises it.)"""
        crew = self._crew
        assert crew is not None
        if self._shared is not None:
            self._sync_shared(crew)
        if hashing:
            self._hash(crew.pieces, self.map.size if self.map else 0, HASH_STEP)
        now, done = time.monotonic(), self.part.size + sum(p.pos - p.start for p in crew.pieces)
        if done - crew.saved >= SAVE_EVERY or (done > crew.saved and now - crew.saved_at >= SAVE_S):
            self._save_map(crew.pieces)
            crew.saved, crew.saved_at = done, now
        if now - crew.renewed > (self.cfg.slot_lease_s if self.cfg else 60.0) / 3:
            with crew.lock:
                held = list(crew.slots)
            for s in held:
                s.renew()
            crew.renewed = now
        self._grow(crew)

    def _end_crew(self, failed: bool) -> None:
        """Stop and join every connection (none may write once the file is closed), give the slots back and,
        after a failure, record what is complete."""
        crew = self._crew
        if crew is None:
            return
        crew.stop.set()
        for t in crew.threads:
            t.join()  # each gives its slot back
        self._crew = None
        if self._shared is not None:
            for i in crew.mine:
                self._shared.board.give_back(self._gen, i)
        if failed:
            self._save_map(crew.pieces)

    def _take_slots(self, wanted: int) -> list[Slot]:
        """Extra connections: as many slots as the host's window has free now, up to `wanted`."""
        take = self.cfg.take_slot if self.cfg is not None else None
        slots: list[Slot] = []
        while take is not None and len(slots) < wanted:
            slot = take()
            if slot is None:
                break
            slots.append(slot)
        return slots

    def _fill(self, piece: Piece, opened: requests.Response | None, stop: threading.Event, pace: Pace) -> None:
        """Fetch one piece into its place; BadRange if the answer is not exactly that range of this file."""
        response = opened if opened is not None else self._open_range(piece)
        fill(piece, response, self.part.pwrite, self.limits.read_timeout, self.deadline, pace,
             lambda: not stop.is_set())

    def _open(self, extra: dict[str, str]) -> requests.Response:
        per_host = self.credentials.headers_for if self.credentials else None
        proxy = self.credentials.proxy if self.credentials else None
        return fetch.open_response(self.url, {**self.headers, **extra}, self.limits, self.deadline, per_host, proxy)

    def _open_range(self, piece: Piece) -> requests.Response:
        assert self.map is not None
        response = self._open(range_headers(piece.pos, piece.end, self.map.validator))
        return checked_range(response, piece.pos, piece.end, self.map.size, self.map.validator)

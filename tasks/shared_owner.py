"""The owner's side of a big file spread over workers that share the volume (tasks/shared.py): its pieces
published with their plan, claimed from it by this task's connection, the others' progress followed, and the plan
taken over by a redelivered owner."""

from __future__ import annotations

import os
import threading
import time
from typing import TYPE_CHECKING, Any

import requests

from . import shared, storage
from .ranges import BadRange, Piece, RangeMap

if TYPE_CHECKING:
    from .rangefile import Crew
    from .segments import Config

GROW_AFTER_S = 2.0  # helpers get this long to start before the owner adds connections of its own
TICK_S = 0.2  # a connection that finds every piece claimed looks again this often (a lapsed claim is taken over)


class SharedOwner:
    """Run's shared-volume side (tasks/segments.py)."""

    cfg: Config | None
    part: storage.PartFile
    url: str
    map: RangeMap | None
    kept: bool
    limit_rate: int
    notes: dict[str, Any]
    _shared: shared.Shared | None
    _gen: str
    _done_by: dict[int, str]

    if TYPE_CHECKING:
        def _open_range(self, piece: Piece) -> requests.Response: ...

        def _start_over(self, why: str) -> requests.Response: ...

        def _start_crew(self, pieces: list[Piece], first: requests.Response | None, rate: int, slots: list[Any],
                        first_streamed: bool, opened: int = 0) -> None: ...

        def _finish_crew(self, size: int) -> None: ...

        def _take_slots(self, wanted: int) -> list[Any]: ...

        def _add_connection(self, crew: Crew, slot: Any, opened: requests.Response | None,
                            delay: float = 0.0) -> None: ...

    def _share(self, pieces: list[Piece], kept: list[list[int]], held: list[int]) -> None:
        """Publish the plan of the file's pieces and the helper tasks that will claim them with this task."""
        assert self._shared is not None and self.map is not None and self.cfg is not None
        self._gen = shared.new_gen()
        plan = shared.Plan(self._gen, self.map.url, self.map.size, self.map.validator, self._shared.subdir,
                           self.part.part, os.fstat(self.part.fd).st_ino, [[p.start, p.end] for p in pieces], kept)
        self._shared.board.publish(plan, {}, held)
        self._shared.published = time.monotonic()
        self._shared.helpers(self._gen, min(self.cfg.split - 1, len(pieces) - len(held)))

    def _resume_shared(self) -> requests.Response | None:
        """A redelivered owner takes over the plan its predecessor published (the helpers never stop): only the
        unfinished pieces are fetched. None: no plan for this very temp file."""
        assert self._shared is not None and self.cfg is not None
        board, st = self._shared.board, os.fstat(self.part.fd)
        plan = board.load()
        if plan is None or board.refused() or (plan.url, plan.inode, plan.size) != (
                storage.url_key(self.url), st.st_ino, st.st_size):
            if plan is not None:
                board.drop()
            return None
        self._gen, self.kept = plan.gen, True
        self._shared.published = time.monotonic()
        pieces = [Piece(a, b) for a, b in plan.pieces]
        self.map = RangeMap(plan.url, plan.size, plan.validator, plan.kept)
        done = board.done()
        for i in done:
            pieces[i].pos = pieces[i].end
        self.notes["resumed_bytes"] = sum(b - a for a, b in plan.kept) + sum(p.pos - p.start for p in pieces)
        self._shared.helpers(self._gen, min(self.cfg.split - 1, len(pieces) - len(done) - 1))
        first = board.claim(self._gen)
        try:  # the server's version checked on the first piece, or on one byte when the helpers did them all
            response = self._open_range(pieces[first] if first >= 0 else Piece(0, 1))
        except BadRange as exc:
            return self._start_over(f"resume refused ({exc}): started over as one stream")
        if first < 0:
            response.close()
        self._start_crew(pieces, response if first >= 0 else None, self.limit_rate, [], False, max(0, first))
        try:
            self._finish_crew(plan.size)
        except BadRange as exc:
            return self._start_over(f"a range was refused on resume ({exc}): started over as one stream")
        return response

    def _next_piece(self, crew: Crew, opened: bool, own: bool = True) -> Piece | None:
        """The connection's next piece: the one its open response is for, the next to do, or (shared) one
        claimed from the plan; None when there is none left (for an extra connection: none to claim now)."""
        if self._shared is None:
            with crew.lock:
                return crew.todo.pop(0) if crew.todo else None
        if opened:
            return crew.pieces[crew.opened]
        while not crew.stop.is_set():
            i = self._shared.board.claim(self._gen)
            if i >= 0:
                with crew.lock:
                    crew.mine.add(i)
                    crew.pieces[i].pos = crew.pieces[i].start
                return crew.pieces[i]
            if i == shared.DONE:
                return None
            if i == shared.GONE:
                raise BadRange(self._shared.board.refused() or "the shared plan was dropped")
            if not own:
                return None  # an extra connection gives its slot back rather than wait
            crew.stop.wait(TICK_S)  # every piece claimed: wait, and take over one whose claim lapses
        return None

    def _piece_done(self, crew: Crew, piece: Piece) -> None:
        if self._shared is None:
            return
        i = crew.pieces.index(piece)
        os.fdatasync(self.part.fd)  # before the plan says so: another machine may read it next
        self._shared.board.finish(self._gen, i, f"{self._shared.who}/{threading.current_thread().name}")
        with crew.lock:
            crew.mine.discard(i)

    def _sync_shared(self, crew: Crew) -> None:
        """What the other participants did: pieces done (hashed in order here), a refusal of the server's ranges;
        and this task's claims renewed."""
        assert self._shared is not None
        board = self._shared.board
        self._done_by = board.done()
        fresh = []
        with crew.lock:
            for i in self._done_by:
                p = crew.pieces[i] if i < len(crew.pieces) else None
                if p is not None and i not in crew.mine and p.pos != p.end:
                    p.pos = p.end
                    fresh.append(p)
            mine = list(crew.mine)
        for p in fresh:  # written by another worker (machine): hashed from the file, not from pages cached here
            os.posix_fadvise(self.part.fd, p.start, p.end - p.start, os.POSIX_FADV_DONTNEED)
        why = board.refused()
        if why and not crew.errors:
            crew.errors.append(BadRange(why))
            crew.stop.set()
        if time.monotonic() - self._shared.renewed > self._shared.lease_s / 3:
            self._shared.renewed = time.monotonic()
            for i in mine:
                board.renew(self._gen, i)

    def _grow_shared(self, crew: Crew, split: int) -> None:
        """Helpers that do not come (their workers are busy, or the volume is not shared after all): GROW_AFTER_S
        after the plan, the owner adds a connection of its own while fewer than `split` pieces are being fetched."""
        sh = self._shared
        if (sh is None or crew.stop.is_set() or time.monotonic() - sh.published < GROW_AFTER_S
                or 1 + len(crew.slots) >= split):
            return
        claimed, unclaimed = sh.board.pending()
        if claimed < split and unclaimed:
            slots = self._take_slots(1)
            if slots:
                self._add_connection(crew, slots[0], None)

    def _restart_file(self) -> None:
        """Start the file over; shared, in a new file: a helper still writing the old one cannot splice it."""
        self.part.fresh() if self._shared is not None else self.part.restart()

    def abandon(self) -> None:
        """The attempt failed for good (or was cancelled): helpers stop."""
        if self._shared is not None:
            self._shared.board.drop()


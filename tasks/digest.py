"""SHA-256 of a body while it is written, off the read path for big files."""

from __future__ import annotations

import hashlib
import queue
import threading

INLINE = 8 << 20  # bytes hashed in the downloading thread; a smaller file never starts a thread
BACKLOG = 4  # chunks (of up to 1 MiB) waiting for the hashing thread: a download's memory stays bounded


class Sha256:
    """`hashlib.sha256` whose updates past the first INLINE bytes run in a thread of their own. hashlib releases
    the GIL while it hashes a large buffer, so a big file is hashed on one core while the next chunk is read and
    written on another, instead of read, write and hash taking turns. A small file hashes inline: starting a
    thread would cost more than it saves. `close()` (also done by `hexdigest()`) ends the thread."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self._inline = INLINE
        self._queue: queue.Queue[bytes | None] | None = None
        self._thread: threading.Thread | None = None

    def update(self, data: bytes) -> None:
        if self._queue is not None:
            self._queue.put(data)
        elif len(data) <= self._inline:
            self._inline -= len(data)
            self._hash.update(data)
        else:
            self._queue = queue.Queue(BACKLOG)
            self._thread = threading.Thread(target=self._run, args=(self._queue,), name="sha256", daemon=True)
            self._thread.start()
            self._queue.put(data)

    def _run(self, chunks: queue.Queue[bytes | None]) -> None:
        while (data := chunks.get()) is not None:
            self._hash.update(data)

    def hexdigest(self) -> str:
        self.close()
        return self._hash.hexdigest()

    def close(self) -> None:
        """Wait for the chunks handed to the thread, and end it. Safe to call twice."""
        if self._queue is not None and self._thread is not None:
            self._queue.put(None)
            self._thread.join()
        self._queue = self._thread = None

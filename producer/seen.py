"""What a list has had so far (its URLs, the names they took) in bounded memory, however long the list.

Up to IN_MEMORY keys live in a set; past that they move to a SQLite table in a temporary file (the page cache
bounds what stays in memory), so a list of 10^7 lines costs the producer about as much memory as one of 10^6.
Keys are kept as 16-byte BLAKE2b digests: two different keys agree with a chance of about 2^-128 per pair.
"""

from __future__ import annotations

import hashlib
import shutil
import sqlite3
import tempfile
from pathlib import Path

IN_MEMORY = 1 << 18  # keys held in a set before moving to disk (~25 MB)


def _digest(key: str) -> bytes:
    return hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=16).digest()


class Seen:
    """`claim(key)`: True the first time a key is claimed, False after; `key in seen` only looks. Use as a context
    manager."""

    def __init__(self, in_memory: int | None = None) -> None:
        self._set: set[bytes] | None = set()
        self._limit = IN_MEMORY if in_memory is None else in_memory
        self._dir: Path | None = None
        self._db: sqlite3.Connection | None = None

    def __contains__(self, key: str) -> bool:
        """Whether `key` was claimed, without claiming it."""
        digest = _digest(key)
        if self._set is not None:
            return digest in self._set
        assert self._db is not None
        return self._db.execute("SELECT 1 FROM seen WHERE k = ?", (digest,)).fetchone() is not None

    def claim(self, key: str) -> bool:
        digest = _digest(key)
        if self._set is not None:
            if digest in self._set:
                return False
            self._set.add(digest)
            if len(self._set) > self._limit:
                self._spill()
            return True
        assert self._db is not None
        return self._db.execute("INSERT OR IGNORE INTO seen VALUES (?)", (digest,)).rowcount == 1

    @property
    def on_disk(self) -> bool:
        return self._db is not None

    def _spill(self) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix="fleetfetch-seen-"))
        db = sqlite3.connect(self._dir / "seen.db", isolation_level=None)
        for pragma in ("journal_mode=OFF", "synchronous=OFF", "cache_size=-16000", "temp_store=FILE"):
            db.execute(f"PRAGMA {pragma}")
        db.execute("CREATE TABLE seen (k BLOB PRIMARY KEY) WITHOUT ROWID")
        db.execute("BEGIN")  # one transaction for the whole list: nothing here has to survive the process
        db.executemany("INSERT INTO seen VALUES (?)", ((d,) for d in sorted(self._set or ())))
        self._db, self._set = db, None

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        self._set = set()

    def __enter__(self) -> Seen:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

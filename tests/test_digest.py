"""The body's SHA-256 moves to a thread past the inline size: the digest is the same, the thread always ends."""

from __future__ import annotations

import hashlib
import os
import threading

import pytest

from tasks.digest import INLINE, Sha256

pytestmark = pytest.mark.fast  # the fast tier (tests/conftest.py)


def _threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name == "sha256")


@pytest.mark.parametrize("sizes", [[], [1], [INLINE], [INLINE, 1], [1 << 20] * 20, [7, INLINE * 2, 3, 1 << 20]])
def test_the_digest_is_hashlibs_whether_hashed_inline_or_in_the_thread(sizes):
    chunks = [os.urandom(n) for n in sizes]
    digest = Sha256()
    for chunk in chunks:
        digest.update(chunk)
    threaded = sum(sizes) > INLINE
    assert _threads() == (1 if threaded else 0)  # a small body never starts a thread
    assert digest.hexdigest() == hashlib.sha256(b"".join(chunks)).hexdigest()
    assert _threads() == 0


def test_close_ends_the_thread_of_an_abandoned_body():
    digest = Sha256()
    for _ in range(12):
        digest.update(b"x" * (1 << 20))
    assert _threads() == 1
    digest.close()
    digest.close()
    assert _threads() == 0

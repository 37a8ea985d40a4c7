"""A URL's states in a job, and the one-byte codes the `state` string keeps them as (ledger/lua/states.lua)."""

QUEUED, STARTED, RETRYING = "queued", "started", "retrying"
DONE, UNCHANGED, FAILED, CANCELLED = "done", "unchanged", "failed", "cancelled"
FINAL = (DONE, UNCHANGED, FAILED, CANCELLED)
STATES = (QUEUED, STARTED, RETRYING, *FINAL)
CODES = {b"q": QUEUED, b"s": STARTED, b"r": RETRYING, b"d": DONE, b"u": UNCHANGED, b"f": FAILED, b"c": CANCELLED}

"""The job ledger in Redis: the URLs of a job, each URL's state, its one final record, and counters.

    producer ──create/mark_queued/cancel/counts/records──┐
    task ─────transition/hold/renew/running──────────────┼──► Ledger ──► Lua scripts (ledger/lua/*.lua)
    reconciler ─live/overdue/requeue/mark_finished───────┘     keys (ledger/keys.py), records (ledger/records.py)

Keys share the hash tag `{JOB}` (Redis Cluster keeps them on one node):
  ff:{JOB}:meta   hash   job settings + counters n:<state>, bytes, published
  ff:{JOB}:urls   hash   block (index // BLOCK) -> zlib of the block's rows, one JSON line each:
                         [url, name, sha256|null(, the URL's own options)]  (written once; what `resume` re-enqueues)
  ff:{JOB}:state  string one byte per URL, at its index: q s r d u f c (queued ... cancelled), NUL = no state yet
  ff:{JOB}:rec    hash   index -> final record, compact (`compact`): a download's packed (`pack`), others JSON
  ff:{JOB}:names  hash   worker names and content types of packed records <-> their small numbers
  ff:{JOB}:due    zset   index -> time (ms) by which a worker must be heard of again: the lease of a running URL,
                         the countdown of a retrying one (+ the lease); a final state removes it
  ff:jobs         zset   job id -> creation time
  ff:{JOB}:ended  (a channel, not a key) "1" is published when the job's last URL reaches its final state
State changes run as one Lua script, so counters always match the states and a URL gets at most one
final record, however many times its task is delivered. A done URL costs about 100 bytes of Redis: its state
byte, its share of a compressed block of URLs and a record of 49 bytes plus the hash's own entry.
"""

from .base import BATCH, JobGone
from .clients import client_for, for_thread
from .keys import CANCELLED_AT, COUNTERS, CREDENTIALS, FED, FEED_CHANNEL, JOBS_KEY, LIVE_KEY, SECRET_HEADERS, JobKeys
from .records import BLOCK, MARK, NO_MS, PACKED, Row, compact, counts_in, expand, pack, unpack
from .states import CANCELLED, DONE, FAILED, FINAL, QUEUED, RETRYING, STARTED, STATES, UNCHANGED
from .store import Ledger
from .watch import EndWatch

__all__ = [
    "BATCH", "BLOCK", "CANCELLED", "CANCELLED_AT", "COUNTERS", "CREDENTIALS", "DONE", "FAILED", "FED", "FEED_CHANNEL",
    "FINAL",
    "JOBS_KEY", "LIVE_KEY", "MARK", "NO_MS", "PACKED", "QUEUED", "RETRYING", "SECRET_HEADERS", "STARTED", "STATES",
    "UNCHANGED", "EndWatch", "JobGone", "JobKeys", "Ledger", "Row", "client_for", "compact", "counts_in", "expand",
    "for_thread", "pack", "unpack",
]

"""Every Redis key and meta field of the job ledger, named once. The hash tag `{JOB}` keeps a job's keys on one
Redis Cluster node:

  ff:jobs              zset   job id -> creation time
  ff:live              set    jobs not finished yet: what the reconciler looks at
  ff:{JOB}:meta        hash   job settings (JSON) + counters n:<state>, bytes, published (`COUNTERS`)
  ff:{JOB}:urls        hash   block (index // BLOCK) -> zlib of the block's rows (ledger/records.py)
  ff:{JOB}:state       string one byte per URL at its index (ledger/states.py CODES); NUL = no state yet
  ff:{JOB}:rec         hash   index -> final record, packed (ledger/records.py); and KEEP
  ff:{JOB}:names       hash   worker names and content types of packed records <-> their small numbers
  ff:{JOB}:due         zset   index -> server time (ms) by which a worker must be heard of again; and KEEP (+inf)
  ff:{JOB}:redelivered hash   index -> times the reconciler published the URL again
  ff:{JOB}:flight      hash   index -> bytes so far of a running download (and its size)
  ff:{JOB}:suspect     set    queued URLs that had no message at the last sweep
  ff:{JOB}:feeding     string the feeder's lock
  ff:{JOB}:ended       (a channel) "1" when the job's last URL reaches its final state
  ff:feed              (a channel) a job's id when its messages out fell to half the window (feed.Sweeper)
"""

from __future__ import annotations

from dataclasses import dataclass

from .states import STATES

JOBS_KEY = "ff:jobs"
# A member of `rec` and `due` written with the job: the keys never empty, so they keep the expiry set at `create`
# and no transition has to look at their TTL (two commands per URL). Never an index.
KEEP = "-"
LIVE_KEY = "ff:live"
FEED_CHANNEL = "ff:feed"  # named in lua/states.lua too
# Meta fields besides the job's settings.
CANCELLED_AT = "cancelled"  # when `cancel` stopped the job (absent: not cancelled)
CREDENTIALS = "credentials"  # the job's netrc logins and cookies (tasks.credentials), read by workers
SECRET_HEADERS = "secret_headers"  # the job's secret headers (JSON pairs), read by the workers
FED = "fed"  # URLs below this index have been offered to the broker (feed.Feeder); absent: all were
COUNTERS = [f"n:{s}" for s in STATES] + ["bytes", "published"]  # kept by the Lua scripts


@dataclass(frozen=True)
class JobKeys:
    """The Redis keys of one job; the hash tag `{JOB}` keeps them on one Redis Cluster node."""

    job: str

    def _key(self, part: str) -> str:
        return f"ff:{{{self.job}}}:{part}"

    @property
    def meta(self) -> str:
        return self._key("meta")

    @property
    def urls(self) -> str:
        return self._key("urls")

    @property
    def state(self) -> str:
        return self._key("state")

    @property
    def rec(self) -> str:
        return self._key("rec")

    @property
    def names(self) -> str:
        """hash 'w:<worker>' / 'c:<content type>' -> number, '#<number>' -> the name (packed records use numbers)."""
        return self._key("names")

    @property
    def due(self) -> str:
        """zset index -> server time (ms) by which a worker must be heard of again for a non-final URL."""
        return self._key("due")

    @property
    def ended(self) -> str:
        """The channel on which the ledger's scripts publish when the job's last URL has ended (not a key)."""
        return self._key("ended")

    @property
    def redelivered(self) -> str:
        """hash index -> times the reconciler published the URL again."""
        return self._key("redelivered")

    @property
    def flight(self) -> str:
        """hash index -> "BYTES [SIZE]": a running download's bytes so far (and its size, when announced), as its
        worker last published them (`Ledger.running`), for the producer's progress."""
        return self._key("flight")

    @property
    def feeding(self) -> str:
        """The lock of whoever tops up the job's messages now (feed.Feeder)."""
        return self._key("feeding")

    @property
    def suspect(self) -> str:
        """set of queued URLs that had no message at the last sweep (lost if still so at the next)."""
        return self._key("suspect")

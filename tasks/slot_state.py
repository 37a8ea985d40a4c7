"""A download's host slot and its URL's ledger state, changed together in one script run each.

At the start, the slot taken and the URL marked started (with its lease); at the end, the final state and the slot
given back. One script (not two in a round trip, `connection.together`) is one EVALSHA fewer for Redis to run per
URL, and atomic: no worker killed between the two leaves a started URL without its slot or a slot held for a URL
that is over. Each half keeps the text and the KEYS/ARGV of its own script (hostlimit.py, ledger/lua/transition.lua):
it runs as a Lua function whose parameters KEYS and ARGV shadow the script's, given its share of both.
"""

from __future__ import annotations

from typing import Any

from . import hostlimit, ledger
from .ledger.scripts import body

# ARGV[1] how many of KEYS are the first half's, ARGV[2] how many of the rest of ARGV are; then the first half's
# arguments, then the second's. (unpack copies in C what a Lua loop copied element by element.)
_SPLIT = """
local nk, na = tonumber(ARGV[1]), tonumber(ARGV[2])
local k1, k2 = {unpack(KEYS, 1, nk)}, {unpack(KEYS, nk + 1)}
local a1, a2 = {unpack(ARGV, 3, na + 2)}, {unpack(ARGV, na + 3)}
"""


def _function(name: str, text: str) -> str:
    return f"local function {name}(KEYS, ARGV)\n{text}\nend\n"


_LIBRARIES = hostlimit.PRELUDE + body("states")  # states' now_ms (one TIME per run) comes last: it is the one used
# Each script defines only the parts it runs: a function defined is a closure made at every run.
_TRANSITION = _function("transition", body("transition"))

# The slot, then the state: no slot, no change (the acquire's reply alone). Returns {acquire's reply, transition's}.
START = _LIBRARIES + _function("acquire", hostlimit.ACQUIRE_BODY) + _TRANSITION + _SPLIT + """
local got = acquire(k1, a1)
if got[1] ~= 1 then return {got} end
return {got, transition(k2, a2)}
"""

# Both always: the final state (kept if the URL had one) and the slot (given back once). Returns {transition's
# reply, release's}.
FINISH = _LIBRARIES + _TRANSITION + _function("release", hostlimit.RELEASE_BODY) + _SPLIT + """
return {transition(k1, a1), release(k2, a2)}
"""


def _call(script: Any, first: tuple[list, list], second: tuple[list, list]) -> Any:
    return script(keys=[*first[0], *second[0]], args=[len(first[0]), len(first[1]), *first[1], *second[1]])


class SlotAndState:
    """The two scripts, registered on the client that the ledger and the host limiter of a thread share."""

    def __init__(self, book: ledger.Ledger, limiter: hostlimit.HostLimiter) -> None:
        self.book, self.limiter = book, limiter
        self._start = book.r.register_script(START)
        self._finish = book.r.register_script(FINISH)

    def start(self, job: str, index: int, lease: float, host: str, limit: int, rate: float, waiter: str,
              waited: bool) -> tuple[hostlimit.Lease | None, float, str | None]:
        """A slot of `host` and, with it, the URL started with a lease of `lease` seconds: (slot, 0, the final
        state the URL already had or None); or (None, seconds to wait, None) and the URL left as it was."""
        lease_id = hostlimit.new_lease_id()
        reply = _call(self._start, self.limiter.acquire_keys_args(host, limit, rate, waiter, waited, lease_id),
                      self.book.transition_keys_args(job, index, ledger.STARTED, lease=lease))
        slot, wait = self.limiter.acquired(host, limit, lease_id, reply[0])
        already = reply[1] if slot is not None and len(reply) > 1 else None
        return slot, wait, already.decode() if already else None

    def finish(self, job: str, index: int, state: str, record: dict[str, Any], name: str | None,
               slot: hostlimit.Lease) -> str | None:
        """The URL's final state and its slot given back (the host answered). Returns the final state the URL
        already had (then it is kept), or None. Idempotent, as each half is."""
        reply = _call(self._finish, self.book.transition_keys_args(job, index, state, record, None, name),
                      self.limiter.release_keys_args(slot, True))
        return reply[0].decode() if reply[0] else None

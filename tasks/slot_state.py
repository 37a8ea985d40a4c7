"""A download's host slot and its URL's ledger state, changed together in one script run each.

At the start, the slot taken and the URL marked started (with its lease); at the end, the final state and the slot
given back. One script (not two in a round trip, `connection.together`) is one EVALSHA fewer for Redis to run per
URL, and atomic: no worker killed between the two leaves a started URL without its slot or a slot held for a URL
that is over. Each half keeps the text and the KEYS/ARGV of its own script (hostlimit.py, ledger/lua/transition.lua):
it runs as a Lua function whose parameters KEYS and ARGV shadow the script's, given its share of both.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import redis

from . import hostlimit, kombu_redis
from .connection import together
from .ledger import STARTED, Ledger
from .ledger.scripts import body

log = logging.getLogger("fleetfetch")

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


def _keys_args(first: tuple[list, list], second: tuple[list, list]) -> tuple[list, list]:
    return [*first[0], *second[0]], [len(first[0]), len(first[1]), *first[1], *second[1]]


def _call(script: Any, first: tuple[list, list], second: tuple[list, list]) -> Any:
    keys, args = _keys_args(first, second)
    return script(keys=keys, args=args)


class SlotAndState:
    """The two scripts, registered on the client that the ledger and the host limiter of a thread share."""

    def __init__(self, ledger: Ledger, limiter: hostlimit.HostLimiter) -> None:
        self.ledger, self.limiter = ledger, limiter
        self._start = ledger.r.register_script(START)
        self._finish = ledger.r.register_script(FINISH)

    def start(self, job: str, index: int, lease: float, host: str, limit: int, rate: float, waiter: str,
              waited: bool) -> tuple[hostlimit.Lease | None, float, str | None]:
        """A slot of `host` and, with it, the URL started with a lease of `lease` seconds: (slot, 0, the final
        state the URL already had or None); or (None, seconds to wait, None) and the URL left as it was."""
        lease_id = hostlimit.new_lease_id()
        reply = _call(self._start, self.limiter.acquire_keys_args(host, limit, rate, waiter, waited, lease_id),
                      self.ledger.transition_keys_args(job, index, STARTED, lease=lease))
        slot, wait = self.limiter.acquired(host, limit, lease_id, reply[0])
        already = reply[1] if slot is not None and len(reply) > 1 else None
        return slot, wait, already.decode() if already else None

    def finish(self, job: str, index: int, state: str, record: dict[str, Any], name: str | None,
               slot: hostlimit.Lease) -> str | None:
        """The URL's final state and its slot given back (the host answered). Returns the final state the URL
        already had (then it is kept), or None. Idempotent, as each half is."""
        keys, args = self.finish_keys_args(job, index, state, record, name, slot)
        reply = self._finish(keys=keys, args=args)
        return reply[0].decode() if reply[0] else None

    def finish_keys_args(self, job: str, index: int, state: str, record: dict[str, Any], name: str | None,
                         slot: hostlimit.Lease) -> tuple[list, list]:
        """FINISH's KEYS and ARGV: the final state, then the slot given back as answered."""
        return _keys_args(self.ledger.transition_keys_args(job, index, state, record, None, name),
                          self.limiter.release_keys_args(slot, True))


class Ends:
    """Downloads' ends (FINISH: the final state and the slot given back) sent by the worker's event loop with the
    acks of its turn, just before them (kombu_redis.before_acks), instead of each on a round trip of its own: a
    message is still acknowledged only once its URL's record is in Redis, and Redis reads one round trip per turn
    of the loop (a few URLs) where it read one per URL. The download's thread does not wait for it (FINISH's reply
    is only logged). Only where the loop acknowledges in batches (kombu_redis.acks_in_batches): elsewhere a
    download sends its FINISH itself (`SlotAndState.finish`)."""

    NAME = "fleetfetch-ends"  # its connection's name (CLIENT LIST)

    def __init__(self, client: Callable[[], redis.Redis]) -> None:
        self._new_client = client  # a client with a connection of its own (connection.together)
        self._client: redis.Redis | None = None
        self._script: Any = None
        self._pending: list[tuple[list, list]] = []
        self._lock = threading.Lock()
        kombu_redis.before_acks.append(self.flush)

    def add(self, both: SlotAndState, job: str, index: int, state: str, record: dict[str, Any], name: str | None,
            slot: hostlimit.Lease) -> bool:
        """`SlotAndState.finish`'s work, to be sent before the next acks; False (nothing done) in a process or a
        thread whose messages are not acknowledged by the event loop's batches: the caller sends it itself."""
        if not kombu_redis.acks_in_batches() or threading.current_thread() is threading.main_thread():
            return False
        call = both.finish_keys_args(job, index, state, record, name, slot)
        with self._lock:
            self._pending.append(call)
        return True

    def flush(self) -> None:
        """Send every end added so far, in one round trip; raises (and keeps them) if Redis did not take them."""
        with self._lock:
            batch, self._pending = self._pending, []
        if not batch:
            return
        try:
            if self._client is None:
                self._client = self._new_client()
                self._script = self._client.register_script(FINISH)
            together(self._client, [(self._script, keys, args) for keys, args in batch])
        except redis.ResponseError as exc:  # a script failed (the others ran): that URL's lease brings it back
            log.warning("Final state of a download not written (its lease will bring the URL back): %s", exc)
        except BaseException:
            with self._lock:
                self._pending[:0] = batch
            raise

"""Everything fleetfetch knows of kombu's Redis transport internals, in one module: its key names, the JSON of an
unacknowledged message, and a transport subclass that overrides its channel and QoS.

What is private to kombu and used here: `Channel._create_client`, `_brpop_read`, `_queue_cycle`, `_q_for_pri`,
`priority_steps`, `unacked_key`/`unacked_index_key`, `connection._deliver`, the `unacked` entry
`[message, exchange, routing_key]`, `QoS.pipe_or_acquire`, `TRANSPORT_ALIASES` and `_transport_cache`. `unfit()`
checks them against the kombu installed; `install()` puts the subclass in place only where they are as expected
(kombu KNOWN), and otherwise leaves kombu's own transport with one warning line: never half-patched. With
FLEETFETCH_STOCK=1 kombu's transport is used as it is. docs/upstream-kombu.md is the issue text for kombu that
would let the subclass go.

The subclass: one synchronous Redis client per channel instead of one per command.

kombu's Redis channel builds a new `redis.Redis` object for each command it sends outside BRPOP
(`conn_or_acquire()` -> `_create_client()`): the QoS bookkeeping of every message (MULTI ZADD HSET EXEC when it
is delivered, MULTI ZREM HDEL EXEC when it is acknowledged), the restore sweeps and publishing. Building one costs
more than sending the commands (an event dispatcher, a response-callback table: ~6% of a worker's CPU per URL).
A `redis.Redis` on a connection pool holds no connection of its own: each command checks one out of the pool and
gives it back, so one client serves every thread of a threads pool at once. Only the synchronous client is kept;
the asynchronous one (`Channel.client`, the BRPOP connection the event loop polls) stays kombu's own.

The kept client is tied to the pool it was made for: kombu drops its pools after a fork and when it closes or
reconnects a channel (`_disconnect_pools`), and the next command then gets a client on the new pool.

Its connections over plain TCP keep their timeout in the kernel instead of polling before each read and write
(tasks/connection.py): the QoS bookkeeping of each message and its BRPOP are two system calls fewer each.

Messages come in batches. kombu takes one message per BRPOP and records it as unacknowledged in a second round
trip (MULTI ZADD HSET EXEC), both on the worker's main thread, which also acknowledges every task: with 32 download
threads competing for the GIL, that one thread fell behind (on a list of small remote files, 13-25 of 32 threads
sat idle in the pool's queue while the host's slots were free).
After a BRPOP brings a message, one script (`_TAKE`) pops as many more as the prefetch limit leaves room for and
records each in `unacked`/`unacked_index` exactly as kombu's QoS does (same JSON, same score: the client's clock),
in the same atomic step as the pop: a message is never off the queue without being on the unacked index, so a
worker that dies (or a connection that breaks) before the reply gives it back by kombu's usual restore, as with
any delivered message. Fairness between workers is kept: a worker takes no more than its prefetch limit (one per
thread) allows. A message the script cannot read as kombu's JSON is handed over unrecorded and recorded by
kombu's own path, as a BRPOP'd one.

Acknowledgements go in batches too. Celery hands each finished task's ack to the event loop, which ran one
MULTI ZREM HDEL EXEC per task (~10 of them in a row per turn of the loop on the remote-like list). On the loop's
thread an ack now takes the message off kombu's in-memory books at once (the prefetch limit sees the room) and
leaves its `unacked` entry to one pipeline at the end of the loop's turn, before it waits for anything again:
one round trip for all the acks of a turn. Anything that restores unacknowledged messages (kombu's restore at
shutdown, a channel closing) sends the pending acks first, so an acknowledged message is never given back.
Elsewhere (no event loop: a plain kombu consumer) an ack is sent at once, as kombu does.

A payload on a queue that is not a kombu message (`LPUSH fleetfetch "not json"` by anyone who can write to the
broker) is dropped with a log line: kombu would raise in the event loop and the worker would exit.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import re
import threading
from collections.abc import Callable
from time import time
from typing import Any, cast

import redis
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import loads

from . import dependencies
from .connection import KernelTimeoutConnection

log = logging.getLogger(__name__)

KNOWN = ("5.7",)  # kombu minor versions whose Redis transport this module was read against and tested with
UNACKED_KEY = "unacked"  # kombu's hash: delivery tag -> [message, exchange, routing key], delivered, not acknowledged
UNACKED_INDEX_KEY = "unacked_index"  # kombu's sorted set: delivery tag -> when it was delivered

# KEYS: the queue lists in BRPOP's order, then unacked_index and unacked (kombu's names); ARGV[1] most messages,
# ARGV[2] the time kombu's QoS would score them with. Returns {list, message, 1 if recorded else 0, ...}.
_TAKE = """
local most = tonumber(ARGV[1])
local index, unacked = KEYS[#KEYS - 1], KEYS[#KEYS]
local out, taken = {}, 0
for i = 1, #KEYS - 2 do
  while taken < most do
    local m = redis.call('RPOP', KEYS[i])
    if not m then break end
    taken = taken + 1
    local ok, tag, ex, rk = pcall(function()
      local p = cjson.decode(m)['properties']
      local d = p['delivery_info']
      return p['delivery_tag'], cjson.encode(d['exchange']), cjson.encode(d['routing_key'])
    end)
    local recorded = ok and type(tag) == 'string'
    if recorded then
      redis.call('ZADD', index, ARGV[2], tag)
      redis.call('HSET', unacked, tag, '[' .. m .. ', ' .. ex .. ', ' .. rk .. ']')
    end
    out[#out + 1] = KEYS[i]
    out[#out + 1] = m
    out[#out + 1] = recorded and 1 or 0
  end
end
return out
"""


# Work that must reach Redis before the messages it belongs to are acknowledged (tasks/slot_state.py Ends: final
# states sent with the acks of a turn): run before each batch of acks and before an ack sent at once. A hook that
# raises keeps the acks for the next turn (and a restore gives their messages back).
before_acks: list[Callable[[], None]] = []
_loop_pid = 0  # the process whose event loop sends acks in batches (`acks_in_batches`)


def acks_in_batches() -> bool:
    """True in a worker process whose event loop sends acks in batches through this transport (not in a process
    forked from it: a prefork child acknowledges through its parent)."""
    return _loop_pid == os.getpid()


def _before_acks() -> bool:
    """Run the hooks; False if one failed (logged)."""
    try:
        for hook in before_acks:
            hook()
    except Exception as exc:  # noqa: BLE001 - the acks wait for the next turn
        log.warning("Acknowledgements held back: what must reach Redis before them did not (%s)", exc)
        return False
    return True


_TAG = re.compile(rb'"delivery_tag"\s*:\s*("(?:[^"\\]|\\.)*")')  # in a payload Python's JSON cannot read


def _readable(payload: Any) -> bool:
    """True if kombu can make a message of `payload` (it raises in the event loop otherwise)."""
    props = payload.get("properties") if isinstance(payload, dict) else None
    if not isinstance(props, dict) or not isinstance(props.get("delivery_tag"), str) \
            or not isinstance(props.get("delivery_info"), dict) or not isinstance(payload.get("headers") or {}, dict) \
            or not all(isinstance(payload.get(k) or "", str) for k in ("content-type", "content-encoding")):
        return False
    body, encoding = payload.get("body"), props.get("body_encoding")
    if not body or not encoding:
        return True
    if encoding != "base64" or not isinstance(body, str):
        return False
    try:
        base64.b64decode(str_to_bytes(body))
    except (binascii.Error, ValueError):
        return False
    return True


def _tag_of(payload: Any, raw: bytes) -> str:
    """The delivery tag `_TAKE` recorded a message by (cjson read it), also where Python's JSON cannot read it."""
    props = payload.get("properties") if isinstance(payload, dict) else None
    if isinstance(props, dict) and isinstance(props.get("delivery_tag"), str):
        return str(props["delivery_tag"])
    found = _TAG.search(raw)
    return str(loads(found.group(1).decode(errors="replace"))) if found else ""


def _dropped(queue: str) -> None:
    log.warning("Queue %s: dropped a message the broker transport cannot read (not a kombu message)", queue)


class QoS(kombu_redis.QoS):
    """kombu's Redis QoS, told which delivered messages `_TAKE` has recorded as unacknowledged already."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.recorded: set[str] = set()
        self.acks: list[str] = []  # acknowledged on the event loop's thread, `unacked` entries not yet deleted

    def append(self, message: Any, delivery_tag: str) -> None:
        if delivery_tag in self.recorded:
            self.recorded.discard(delivery_tag)
            virtual.QoS.append(self, message, delivery_tag)  # the in-memory part only
        else:
            super().append(message, delivery_tag)

    def ack(self, delivery_tag: str) -> None:
        if self.channel.connection.loop_thread == threading.get_ident():
            self.acks.append(delivery_tag)
            virtual.QoS.ack(self, delivery_tag)  # off the in-memory books now: the prefetch limit sees the room
        else:
            if not _before_acks():
                raise RuntimeError(f"message {delivery_tag} not acknowledged: its final state is not in Redis")
            super().ack(delivery_tag)

    def send_acks(self) -> None:
        """Delete the `unacked` entries of the messages acknowledged since the last call, in one round trip, after
        the `before_acks` hooks (if one fails, the acks wait for the next call)."""
        if not _before_acks():
            return
        tags, self.acks = self.acks, []
        if tags:
            with self.pipe_or_acquire() as pipe:  # kombu's `_remove_from_indices`, for all the tags at once
                pipe.zrem(self.unacked_index_key, *tags).hdel(self.unacked_key, *tags).execute()

    # Whatever gives unacknowledged messages back sends the pending acks first: an acknowledged message must not
    # be given back. `restore_unacked_once` runs when a channel closes (even with nothing left to restore). Acks
    # still held back then are dropped: their messages are given back, as their final states may not be in Redis.
    def restore_unacked(self, client: Any = None) -> None:
        self.send_acks()
        self.acks.clear()
        super().restore_unacked(client)

    def restore_unacked_once(self, stderr: Any = None) -> Any:
        self.send_acks()
        self.acks.clear()
        return super().restore_unacked_once(stderr)


class Channel(kombu_redis.Channel):
    QoS = QoS
    # redis:// (rediss:// and unix sockets keep redis-py's classes); kombu's stubs want redis.Connection itself
    connection_class = cast("type[redis.Connection]", KernelTimeoutConnection)
    _sync: tuple[Any, Any] | None = None  # (connection pool, redis.Redis on it)
    _take_script: Any = None  # _TAKE, registered once, run on whichever client is current

    def _create_client(self, asynchronous: bool = False) -> Any:
        if asynchronous:
            return super()._create_client(asynchronous=True)
        pool = self.pool  # kombu makes a new one after _disconnect_pools
        kept = self._sync
        if kept is None or kept[0] is not pool:
            kept = (pool, super()._create_client())
            self._sync = kept  # one assignment: threads racing here each get a working client
        return kept[1]

    def _brpop_read(self, **options: Any) -> bool:
        try:
            delivered = super()._brpop_read(**options)  # one message, or Empty
        except (json.JSONDecodeError, UnicodeDecodeError):  # kombu's `loads` of the message BRPOP took
            _dropped(", ".join(self.active_queues))
            raise kombu_redis.Empty() from None
        room = self.qos.can_consume_max_estimate() if self.qos.prefetch_count else 0
        if room and not self.global_keyprefix:
            queues = self._queue_cycle.consume(len(self.active_queues))
            if queues:
                self._take(room, queues)
        return delivered

    def _take(self, most: int, queues: list[str]) -> None:
        """Deliver up to `most` more messages, taken and recorded as unacknowledged in one round trip."""
        keys = [self._q_for_pri(q, pri) for pri in self.priority_steps for q in queues]
        client = self._create_client()
        if self._take_script is None:
            self._take_script = client.register_script(_TAKE)
        reply = self._take_script(keys=[*keys, self.unacked_index_key, self.unacked_key], args=[most, time()],
                                  client=client)
        qos = cast(QoS, self.qos)
        for i in range(0, len(reply), 3):
            key, raw, recorded = reply[i:i + 3]
            queue = key.decode().rsplit(self.sep, 1)[0]
            try:
                payload = loads(raw.decode())
            except ValueError:
                payload = None
            if not _readable(payload):
                if recorded:  # taken off `unacked` again: kombu's restore would bring it back forever
                    qos._remove_from_indices(_tag_of(payload, raw)).execute()
                _dropped(queue)
                continue
            if recorded:
                qos.recorded.add(payload["properties"]["delivery_tag"])
            self._queue_cycle.rotate(queue)
            self.connection._deliver(payload, queue)


class Transport(kombu_redis.Transport):
    Channel = Channel
    loop_thread: int | None = None  # the event loop's thread, once it runs

    def register_with_event_loop(self, connection: Any, loop: Any) -> None:
        global _loop_pid
        super().register_with_event_loop(connection, loop)
        loop.on_tick.add(self._send_acks)  # each turn of the loop, before it polls
        _loop_pid = os.getpid()

    def _deliver(self, message: Any, queue: str) -> None:
        if _readable(message):
            super()._deliver(message, queue)
        else:
            _dropped(queue)

    def _send_acks(self) -> None:
        self.loop_thread = threading.get_ident()
        for channel in self.channels:
            channel.qos.send_acks()


def task_id(entry: bytes | str) -> str:
    """The Celery task id of one `unacked` entry (ValueError if it is not kombu's JSON)."""
    try:
        return str(json.loads(entry)[0]["headers"]["id"])
    except (KeyError, TypeError, IndexError) as exc:
        raise ValueError(f"not an unacked entry of kombu's: {exc}") from None


def held(client: redis.Redis) -> dict[str, float]:
    """Task id -> when it was delivered, for every message a worker holds unacknowledged."""
    pipe = client.pipeline(transaction=False)
    pipe.hgetall(UNACKED_KEY)
    pipe.zrange(UNACKED_INDEX_KEY, 0, -1, withscores=True)
    messages, index = pipe.execute()
    since = dict(cast(list[tuple[bytes, float]], index))
    out = {}
    for tag, raw in cast(dict[bytes, bytes], messages).items():
        try:
            out[task_id(raw)] = since.get(tag, time())
        except ValueError:
            continue  # not a message of ours: the sweep leaves it to kombu's restore
    return out


def restore_all(broker_url: str, client: redis.Redis) -> None:
    """Give every unacknowledged message back to its queue now, through kombu's own restore: for a broker whose
    consumers are known to be gone (local mode's, whose directory lock is held)."""
    from kombu import Connection

    if client.hlen(UNACKED_KEY):
        with Connection(broker_url, transport_options={"visibility_timeout": 0}, connect_timeout=5) as conn:
            conn.default_channel.qos.restore_visible(num=1_000_000)


# What this module overrides or reads, by owner: each must be there for the subclass to be installed.
_USED = {
    kombu_redis.Channel: ("_create_client", "_brpop_read", "_q_for_pri", "unacked_key", "unacked_index_key",
                          "global_keyprefix", "conn_or_acquire"),
    kombu_redis.QoS: ("append", "ack", "restore_unacked", "restore_unacked_once", "pipe_or_acquire",
                      "unacked_key", "unacked_index_key"),
    virtual.QoS: ("append", "ack", "can_consume_max_estimate"),
    virtual.Transport: ("_deliver",),
    kombu_redis.Transport: ("register_with_event_loop",),
}


def unfit(version: str | None = None) -> str | None:
    """Why the subclass must not be installed on the kombu here, or on kombu `version` (None: it may)."""
    import kombu
    from kombu import transport

    version = version or kombu.__version__
    reason = dependencies.unfit("kombu", version, KNOWN, _USED)
    if reason is not None:
        return reason
    if (kombu_redis.Channel.unacked_key, kombu_redis.Channel.unacked_index_key) != (UNACKED_KEY, UNACKED_INDEX_KEY):
        return f"kombu {version} keeps unacknowledged messages under other keys"
    if not isinstance(getattr(transport, "TRANSPORT_ALIASES", None), dict) or not isinstance(
            getattr(transport, "_transport_cache", None), dict):
        return f"kombu {version} resolves transports another way"
    return None


def install(stock: bool = False) -> bool:
    """Make redis:// and rediss:// broker URLs use this transport, in this process; True if it did.

    kombu resolves a URL's scheme to a transport class through TRANSPORT_ALIASES only after it has parsed the URL
    by that scheme (host, port, password, db, TLS options and the `rediss` default): pointing the two aliases here
    changes the class and nothing else. Celery's `broker_transport` setting would not do: an explicit transport
    replaces the URL's scheme as the connection's transport name (it then shows in the worker's banner and skips
    kombu's rediss handling), and it would apply to an amqp:// broker too. Other schemes (amqp://, sentinel://)
    keep kombu's transports. `stock` (FLEETFETCH_STOCK) keeps kombu's own for redis:// too."""
    if stock:
        return False
    reason = unfit()
    if reason is not None:
        log.warning("%s: using kombu's own Redis transport (slower, as reliable)", reason)
        return False
    from kombu import transport

    for scheme in ("redis", "rediss"):
        transport.TRANSPORT_ALIASES[scheme] = f"{__name__}:Transport"
        transport._transport_cache.pop(scheme, None)  # a class resolved before this call is not kept
    return True

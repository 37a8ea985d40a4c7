"""The broker transport (tasks/kombu_redis.py): redis:// and rediss:// URLs get kombu's Redis transport with one reused
synchronous client per channel, parsed exactly as before; deliveries are still acknowledged (kombu's `unacked`
bookkeeping goes through that client) by a threads worker whose threads share it."""

from __future__ import annotations

import json
import socket
import struct
from pathlib import Path

import pytest
from kombu import Connection, Exchange, Queue
from kombu.transport import pyamqp
from kombu.transport import redis as kombu_redis

from bench.realparts.servers import RedisServer, Worker
from tasks import kombu_redis as transport  # the module under test
from tasks.app import app
from tests.conftest import ROOT, Cluster, read_manifest, write_list

UNACKED, UNACKED_INDEX = "unacked", "unacked_index"  # kombu's keys: delivered, not yet acknowledged


@pytest.fixture
def server(tmp_path: Path):
    with RedisServer(tmp_path / "redis", appendonly=False) as s:
        yield s


@pytest.mark.parametrize("url", [
    "redis://:pw@127.0.0.1:6390/3",
    "rediss://user:pw@127.0.0.1:6391/2?ssl_cert_reqs=required&ssl_ca_certs=/tmp/ca.pem",
])
@pytest.mark.fast
def test_redis_urls_get_the_subclass_and_parse_as_before(url):
    assert app.conf.broker_url  # tasks.app is imported: the aliases are installed
    conn = Connection(url)
    assert conn.get_transport_cls() is transport.Transport
    assert issubclass(transport.Transport, kombu_redis.Transport)
    assert transport.Transport.Channel is transport.Channel
    # What the URL says, as kombu's own transport reads it (the scheme stays the transport's name: rediss keeps TLS).
    scheme = url.split("://")[0]
    assert conn.transport_cls == scheme and conn.as_uri(include_password=True) == url.split("?")[0]
    assert (conn.hostname, conn.port, conn.password, conn.virtual_host) == (
        "127.0.0.1", 6390 if scheme == "redis" else 6391, "pw", "3" if scheme == "redis" else "2")
    if scheme == "rediss":
        assert conn.ssl == {"ssl_cert_reqs": 2, "ssl_ca_certs": "/tmp/ca.pem"}  # ssl.CERT_REQUIRED


@pytest.mark.fast
def test_other_brokers_keep_kombus_transports():
    assert Connection("amqp://guest:guest@127.0.0.1:5672//").get_transport_cls() is pyamqp.Transport
    assert Connection("sentinel://127.0.0.1:26379").get_transport_cls() is kombu_redis.SentinelTransport


@pytest.mark.fast
def test_a_channel_reuses_one_client_per_pool_and_acks_still_clear_unacked(server):
    with Connection(server.url(0), transport_options=dict(app.conf.broker_transport_options)) as conn:  # shipped
        channel = conn.default_channel
        assert isinstance(channel, transport.Channel)
        with channel.conn_or_acquire() as first, channel.conn_or_acquire() as second:
            assert first is second and first.connection_pool is channel.pool
        assert channel.client is not first and channel.client.connection_pool is channel.async_pool  # BRPOP's own
        # Both wait for the broker without a poll before each read and write, their timeout in the kernel.
        for client in (first, channel.client):
            connection = client.connection_pool.get_connection()
            try:
                connection.connect()
                assert connection.kernel_timeout == 30 and connection._sock.gettimeout() is None
                assert struct.unpack("ll", connection._sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, 16)) == (
                    30, 0)
            finally:
                client.connection_pool.release(connection)

        queue = conn.SimpleQueue("ff-transport-test")
        queue.put({"n": 1})
        message = queue.get(timeout=5)
        broker = server.client(0)
        assert broker.hlen(UNACKED) == 1 and broker.zcard(UNACKED_INDEX) == 1  # delivered, not acknowledged
        message.ack()
        assert broker.hlen(UNACKED) == 0 and broker.zcard(UNACKED_INDEX) == 0

        old_pool = channel.pool
        channel._disconnect_pools()  # what kombu does after a fork or when it drops a broken connection
        with channel.conn_or_acquire() as fresh:
            assert fresh is not first and fresh.connection_pool is channel.pool is not old_pool
            assert fresh.ping()
        queue.close()


def test_a_threads_worker_acknowledges_every_url_through_the_shared_client(server, tmp_path, origin):
    cluster = Cluster(server, tmp_path / "downloads")
    urls = []
    for i in range(40):
        origin.add(f"/t{i}.bin", bytes([i]) * 2000)
        urls.append(origin.url(f"/t{i}.bin"))
    with Worker(cluster.env, name="shared", concurrency=8, pool="threads", log=tmp_path / "w.log", cwd=ROOT):
        manifest = tmp_path / "m.jsonl"
        result = cluster.producer(str(write_list(tmp_path / "urls.txt", urls)), "-d", "t", "--manifest",
                                  str(manifest), timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
        assert [r["status"] for r in read_manifest(manifest)] == ["done"] * 40
        broker = cluster.broker()
        assert broker.hlen(UNACKED) == 0 and broker.zcard(UNACKED_INDEX) == 0  # every delivery acknowledged
        # The worker's connections to the broker's db: BRPOP, control, and a pool its 8 threads share.
        mine = broker.client_id()
        on_broker = [c for c in broker.client_list() if c["db"] == "0" and int(c["id"]) != mine]
        assert len(on_broker) <= 8 + 4, on_broker
    for i in range(40):
        assert (cluster.downloads / "t" / f"t{i}.bin").read_bytes() == bytes([i]) * 2000


def _publish(conn: Connection, name: str, count: int) -> Queue:
    queue = Queue(name, Exchange(name, type="direct"), routing_key=name)
    with conn.Producer() as producer:
        for n in range(count):
            producer.publish({"n": n}, exchange=queue.exchange, routing_key=name, declare=[queue])
    return queue


def _ran(broker, before: dict) -> dict[str, int]:
    """Commands the server ran since `before` (INFO commandstats), refused ones (a NOSCRIPT) not counted."""
    def ok(v: dict) -> int:
        return v["calls"] - v.get("failed_calls", 0) - v.get("rejected_calls", 0)
    return {k: ok(v) - (ok(before[k]) if k in before else 0) for k, v in broker.info("commandstats").items()}


def _queued(conn: Connection, broker, name: str) -> list[int]:
    channel = conn.default_channel
    return sorted(channel.Message(json.loads(raw), channel=channel).payload["n"] for raw in broker.lrange(name, 0, -1))


@pytest.mark.fast
def test_a_brpop_brings_as_many_messages_as_the_prefetch_limit_allows_each_recorded_as_kombu_would(server):
    """One BRPOP, then one script for the rest: each taken message is on kombu's unacked index in the same step as
    its pop, in the JSON kombu's own QoS writes, so kombu's restore gives it back (at shutdown, or after the
    visibility timeout) like any delivered message; the prefetch limit bounds the batch."""
    broker = server.client(0)
    with Connection(server.url(0), transport_options=dict(app.conf.broker_transport_options)) as conn:
        queue = _publish(conn, "ff-batch-test", 7)
        got: list = []
        with conn.Consumer(queue, callbacks=[lambda body, message: got.append(message)], prefetch_count=5):
            before = broker.info("commandstats")
            conn.drain_events(timeout=5)
            calls = _ran(broker, before)
            assert [m.payload["n"] for m in got] == [0, 1, 2, 3, 4]  # in order, no more than the prefetch limit
            assert calls["cmdstat_brpop"] == 1 and calls.get("cmdstat_multi", 0) == 1  # kombu's own, for the first
            assert calls["cmdstat_evalsha"] == 1  # the other four: one script (loaded first: a NOSCRIPT is not run)
            assert broker.llen("ff-batch-test") == 2
            recorded = {tag.decode(): json.loads(v) for tag, v in broker.hgetall(UNACKED).items()}
            assert sorted(recorded) == sorted(m.delivery_tag for m in got) and broker.zcard(UNACKED_INDEX) == 5
            for m in got:  # what kombu's QoS.append writes: [the message as received, exchange, routing key]
                assert recorded[m.delivery_tag] == [m._raw, "ff-batch-test", "ff-batch-test"]
            got[0].ack()  # no event loop here: sent at once, as kombu does
            got[3].ack()
            assert broker.hlen(UNACKED) == 3
            # Visibility timeout passed: kombu's restore puts the three unacknowledged ones back on the queue.
            broker.zadd(UNACKED_INDEX, {m.delivery_tag: 1 for m in got}, xx=True)
            conn.default_channel.qos.restore_visible(num=10)
            assert broker.hlen(UNACKED) == 0 and _queued(conn, broker, "ff-batch-test") == [1, 2, 4, 5, 6]


@pytest.mark.fast
def test_acks_on_the_event_loops_thread_go_in_one_round_trip_per_turn_and_are_never_given_back(server):
    """The worker's event loop runs the transport's tick before each poll (kombu's Hub.on_tick; called here as the
    loop would): the acks of a turn leave kombu's books at once and `unacked` in one pipeline; closing the channel
    sends what is pending before kombu gives back the unacknowledged rest."""
    broker = server.client(0)
    with Connection(server.url(0), transport_options=dict(app.conf.broker_transport_options)) as conn:
        queue = _publish(conn, "ff-ack-test", 7)
        got: list = []
        consumer = conn.Consumer(queue, callbacks=[lambda body, message: got.append(message)], prefetch_count=5)
        consumer.consume()
        conn.drain_events(timeout=5)
        assert len(got) == 5
        transport, qos = conn.transport, conn.default_channel.qos
        transport._send_acks()  # the loop's first turn: this thread is the loop's from now on
        before = broker.info("commandstats")
        for m in got[:3]:
            m.ack()
        assert broker.hlen(UNACKED) == 5  # not yet sent ...
        assert qos.can_consume_max_estimate() == 3  # ... but the prefetch limit already sees the room
        transport._send_acks()
        calls = _ran(broker, before)
        assert broker.hlen(UNACKED) == 2 and broker.zcard(UNACKED_INDEX) == 2
        assert (calls["cmdstat_multi"], calls["cmdstat_zrem"], calls["cmdstat_hdel"]) == (1, 1, 1)  # three acks
        got[3].ack()  # pending when the channel closes
        consumer.cancel()
        conn.default_channel.close()
        assert broker.hlen(UNACKED) == 0 and broker.zcard(UNACKED_INDEX) == 0
        assert _queued(conn, broker, "ff-ack-test") == [4, 5, 6]  # the unacknowledged one back; #3 never

"""rediss:// end to end: broker and backend over TLS, certificate verified against our own CA."""

from __future__ import annotations

from pathlib import Path

import redis

from bench.realparts.servers import RedisServer, Worker
from tests.conftest import ROOT, Cluster, write_list
from tests.support.certs import make_ca_and_server_cert
from tests.support.tls_proxy import TLSProxy


def rediss(port: int, db: int, ca: Path) -> str:
    return f"rediss://127.0.0.1:{port}/{db}?ssl_cert_reqs=required&ssl_ca_certs={ca}"


def test_broker_and_backend_over_tls(tmp_path, origin):
    certs = make_ca_and_server_cert(tmp_path)
    plain_server = RedisServer(tmp_path / "redis").start()
    proxy = TLSProxy(plain_server.port, certs.cert, certs.key)
    ca = certs.ca
    try:
        assert redis.Redis.from_url(rediss(proxy.port, 0, ca)).ping()
        cluster = Cluster(None, tmp_path / "dl", (rediss(proxy.port, 0, ca), rediss(proxy.port, 1, ca)))
        worker = Worker(cluster.env, name="tls", concurrency=1, log=tmp_path / "w.log", cwd=ROOT).start()
        try:
            origin.add("/over-tls.txt", b"via rediss")
            result = cluster.producer(str(write_list(tmp_path / "urls.txt", [origin.url("/over-tls.txt")])))
            assert result.returncode == 0, result.stdout + result.stderr
            assert (cluster.downloads / "over-tls.txt").read_bytes() == b"via rediss"
        finally:
            worker.stop()
        plain = cluster.env | {"CELERY_BROKER_URL": f"redis://127.0.0.1:{proxy.port}/0"}
        refused = cluster.producer(str(tmp_path / "urls.txt"), env=plain)
        assert refused.returncode == 3  # a plain-text client cannot talk to the TLS port
        other = make_ca_and_server_cert(tmp_path / "other-ca")
        untrusted = cluster.env | {"CELERY_BROKER_URL": rediss(proxy.port, 0, other.ca)}
        mitm = cluster.producer(str(tmp_path / "urls.txt"), env=untrusted)
        assert mitm.returncode == 3  # a certificate from another CA is refused
    finally:
        proxy.stop()
        plain_server.stop()

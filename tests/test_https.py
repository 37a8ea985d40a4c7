"""https end to end: workers verify the origin's certificate against FLEETFETCH_CA_BUNDLE, by the URL's name,
while connecting to the address the policy checked; through --proxy, TLS runs end to end inside a CONNECT tunnel.

`files.test` is mapped to 127.0.0.1 for the workers with FLEETFETCH_RESOLVE (and for the test proxy by its own
hosts map); `.test` names never resolve in DNS (RFC 6761), so nothing but those mappings can have found the origin.
The origin's certificates name `files.test` only (no IP address): a worker that checked the certificate against
the address it connected to would fail.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from bench.realparts.origin import Origin
from bench.realparts.servers import RedisServer, Worker
from tasks.config import QUEUE
from tests.conftest import ROOT, Cluster, job_id_of, read_manifest, write_list
from tests.support.certs import ServerCert, make_ca
from tests.support.proxy import Proxy

NAME = "files.test"


@dataclass(frozen=True)
class Certs:
    good: ServerCert  # files.test, from the CA the workers trust
    wrong_name: ServerCert  # wrong.test, from the same CA
    untrusted: ServerCert  # files.test, from a CA nobody trusts


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    d = tmp_path_factory.mktemp("certs")
    ca = make_ca(d / "ca")
    return Certs(ca.issue(d / "good", NAME), ca.issue(d / "wrong", "wrong.test"),
                 make_ca(d / "other-ca").issue(d / "untrusted", NAME))


def https_cluster(server: RedisServer, downloads: Path, certs: Certs) -> Cluster:
    """A cluster whose workers trust the test CA and find files.test on 127.0.0.1."""
    cluster = Cluster(server, downloads)
    cluster.env["FLEETFETCH_CA_BUNDLE"] = str(certs.good.ca)
    cluster.env["FLEETFETCH_RESOLVE"] += f",{NAME}:0:127.0.0.1"
    return cluster


@pytest.fixture(scope="module")
def https_worker(certs: Certs, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, Worker]]:
    base = tmp_path_factory.mktemp("https")
    with RedisServer(base / "redis") as server:
        cluster = https_cluster(server, base / "downloads", certs)
        with Worker(cluster.env, name="https", concurrency=2, log=base / "worker.log", cwd=ROOT) as worker:
            yield cluster, worker


@pytest.fixture
def tls_origin(certs: Certs) -> Iterator[Origin]:
    with Origin("127.0.0.1", tls=certs.good.server_context()).start() as o:
        yield o


def listed(origin: Origin, path: str, body: bytes) -> str:
    """The list line of `path` under files.test, with the body's SHA-256 to verify."""
    origin.add(path, body)
    return f"{origin.url(path, NAME)}  sha256={hashlib.sha256(body).hexdigest()}"


def test_an_https_download_is_verified_by_name_on_the_pinned_address(https_worker, tls_origin, tmp_path):
    cluster, _ = https_worker
    body = bytes(range(256)) * 2000
    manifest = tmp_path / "m.jsonl"
    listing = write_list(tmp_path / "urls.txt", [listed(tls_origin, "/report.bin", body)])
    result = cluster.producer(str(listing), "-d", "ok", "--manifest", str(manifest))
    assert result.returncode == 0, result.stdout + result.stderr
    [record] = read_manifest(manifest)
    assert record["status"] == "done" and record["sha256"] == hashlib.sha256(body).hexdigest()
    assert (cluster.downloads / "ok" / "report.bin").read_bytes() == body
    assert tls_origin.handshakes, "no TLS handshake reached the origin"
    for handshake in tls_origin.handshakes:  # SNI is the URL's name; the connection came to the pinned address
        assert (handshake.server_name, handshake.address, handshake.error) == (NAME, "127.0.0.1", None)
    assert [r.headers["Host"] for r in tls_origin.requests] == [f"{NAME}:{tls_origin.port}"]


def test_a_certificate_for_another_name_or_from_an_untrusted_ca_fails_the_url_and_leaves_no_file(
        https_worker, certs, tmp_path):
    cluster, _ = https_worker
    with Origin(tls=certs.wrong_name.server_context()).start() as wrong, \
            Origin(tls=certs.untrusted.server_context()).start() as untrusted:
        lines = [listed(wrong, "/wrong-name.bin", b"w" * 1000), listed(untrusted, "/untrusted.bin", b"u" * 1000)]
        manifest = tmp_path / "m.jsonl"
        result = cluster.producer(str(write_list(tmp_path / "urls.txt", lines)), "-d", "bad", "--manifest",
                                  str(manifest))
    assert result.returncode == 1, result.stdout + result.stderr
    records = read_manifest(manifest)
    assert [r["status"] for r in records] == ["failed", "failed"]
    assert [r["reason"] for r in records] == [
        f"TLS error: certificate verify failed: Hostname mismatch, certificate is not valid for '{NAME}'",
        "TLS error: certificate verify failed: unable to get local issuer certificate "
        "(not issued by a CA in FLEETFETCH_CA_BUNDLE)"]
    assert [r["attempts"] for r in records] == [1, 1]  # permanent: not retried
    assert "Traceback" not in result.stdout + result.stderr
    assert list((cluster.downloads / "bad").rglob("*")) == []  # no file, no temp file
    for origin in (wrong, untrusted):  # the worker broke off the handshake and sent no request
        assert origin.handshakes and all(h.error for h in origin.handshakes)
        assert origin.requests == []


def test_https_through_the_proxy_is_tls_end_to_end_in_a_connect_tunnel_with_its_password_kept_secret(
        certs, tls_origin, tmp_path):
    bodies = {"/t1.bin": b"tunnelled one " * 5000, "/t2.bin": b"tunnelled two " * 5000}
    lines = [listed(tls_origin, path, body) for path, body in bodies.items()]
    with RedisServer(tmp_path / "redis") as server, Proxy("127.0.0.1", hosts={NAME: "127.0.0.1"}).start() as proxy:
        cluster = https_cluster(server, tmp_path / "dl", certs)
        proxy_url = f"http://squid:pr0xy-pass@127.0.0.1:{proxy.port}"
        queued = cluster.producer(str(write_list(tmp_path / "urls.txt", lines)), "--no-wait", "--proxy", proxy_url)
        assert queued.returncode == 0, queued.stdout + queued.stderr
        raw = server.client(0).lrange(QUEUE, 0, -1)
        messages = b"".join(m + base64.b64decode(json.loads(m)["body"]) for m in raw)
        assert len(raw) == 2 and b"pr0xy-pass" not in messages
        manifest = tmp_path / "m.jsonl"
        with Worker(cluster.env, name="tunnel", concurrency=2, log=tmp_path / "w.log", cwd=ROOT) as w:
            result = cluster.producer("resume", job_id_of(queued.stdout), "--manifest", str(manifest))
        log = w.log_text()
    assert result.returncode == 0, result.stdout + result.stderr
    assert [r["status"] for r in read_manifest(manifest)] == ["done", "done"]
    for path, body in bodies.items():
        assert (tmp_path / "dl" / path.lstrip("/")).read_bytes() == body
    expected = "Basic " + base64.b64encode(b"squid:pr0xy-pass").decode()
    assert proxy.asked and all((a.method, a.target) == ("CONNECT", f"{NAME}:{tls_origin.port}") for a in proxy.asked)
    assert all(a.headers["Proxy-Authorization"] == expected for a in proxy.asked)
    assert all("Proxy-Authorization" not in r.headers for r in tls_origin.requests)  # only the proxy had it
    # Every handshake came through a tunnel (nothing went around the proxy) and asked for the URL's name.
    assert tls_origin.handshakes
    assert {h.client for h in tls_origin.handshakes} <= {t.upstream for t in proxy.tunnels}
    assert all((h.server_name, h.error) == (NAME, None) for h in tls_origin.handshakes)
    # The proxy relayed TLS records only: never a request line, a header or a byte of the files in clear.
    for tunnel in proxy.tunnels:
        assert tunnel.to_origin[:1] == b"\x16" and tunnel.to_client[:1] == b"\x16"  # TLS handshake records
        assert b"GET /" not in tunnel.to_origin and b"HTTP/1.1" not in tunnel.to_client
        assert not any(body[:64] in tunnel.to_client for body in bodies.values())
    shown = queued.stdout + queued.stderr + result.stdout + result.stderr + manifest.read_text() + log
    assert "pr0xy-pass" not in shown

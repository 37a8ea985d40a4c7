"""Dependencies: the declared ranges match what the fenced modules know, an unknown kombu or urllib3 is refused by
them, and the stock path (FLEETFETCH_STOCK=1: kombu's own transport, urllib3's own connections) downloads for real."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from bench.realparts.servers import RedisServer, Worker
from tasks import dependencies, kombu_redis, urllib3_hooks
from tests.conftest import ROOT, Cluster, base_env, read_manifest, write_list

TAKE_SHA = hashlib.sha1(kombu_redis._TAKE.encode()).hexdigest()  # the patched transport's batch-taking script


def _declared() -> dict[str, Requirement]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {r.name: r for r in map(Requirement, deps)}


@pytest.mark.fast
@pytest.mark.parametrize(("package", "known"), [("kombu", kombu_redis.KNOWN), ("urllib3", urllib3_hooks.KNOWN)])
def test_a_package_whose_internals_are_used_is_bounded_to_the_versions_its_module_knows(package, known):
    spec = _declared()[package].specifier
    assert any(s.operator == "<" for s in spec), f"{package} has no upper bound"
    for minor in known:  # every known minor is allowed, and nothing past the last one
        assert spec.contains(f"{minor}.0")
    first, last = Version(known[0]), Version(known[-1])
    assert not spec.contains(f"{first.major}.{first.minor - 1}.99")
    assert not spec.contains(f"{last.major}.{last.minor + 1}.0")


@pytest.mark.fast
def test_the_floors_checked_at_start_are_the_declared_ones():
    declared = _declared()
    for name, (floor, _why) in dependencies.FLOORS.items():
        assert any(s.operator == ">=" and s.version == floor for s in declared[name].specifier), name


@pytest.mark.fast
def test_a_library_below_its_floor_is_named_with_what_to_install():
    lines = dependencies.too_old({"kombu": "5.6.2", "requests": "2.32.3", "urllib3": "2.1.0rc1"})
    assert len(lines) == 2
    assert lines[0].startswith("error: fleetfetch needs kombu>=5.7 (") and "kombu 5.6.2 is installed" in lines[0]
    assert "pip install 'urllib3>=2.2'" in lines[1]


@pytest.mark.fast
def test_the_installed_kombu_and_urllib3_are_ones_the_modules_know():
    assert kombu_redis.unfit() is None
    assert urllib3_hooks.unfit() is None


@pytest.mark.fast
def test_an_unknown_version_is_named_in_the_reason_it_is_unfit():
    assert "kombu 5.8.0 is not a version fleetfetch knows (5.7)" in (kombu_redis.unfit("5.8.0") or "")
    assert "urllib3 3.0.0 is not a version fleetfetch knows" in (urllib3_hooks.unfit("3.0.0") or "")


def _job(cluster: Cluster, origin, tmp_path, stock: bool) -> list[dict]:
    env = dict(cluster.env, FLEETFETCH_STOCK="1" if stock else "0")
    for i in range(20):
        origin.add(f"/f{i}.bin", bytes([i]) * 50_000)
    urls = write_list(tmp_path / "urls.txt", [origin.url(f"/f{i}.bin") for i in range(20)])
    with Worker(env, name="dep", concurrency=4, pool="threads", log=tmp_path / "worker.log", cwd=ROOT):
        result = cluster.producer(str(urls), "--manifest", str(tmp_path / "m.jsonl"), env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    return read_manifest(tmp_path / "m.jsonl")


@pytest.mark.parametrize("stock", [False, True], ids=["patched", "stock"])
def test_a_job_runs_on_the_patched_and_on_the_stock_transport(tmp_path, origin, stock):
    with RedisServer(tmp_path / "redis", appendonly=False) as server:
        cluster = Cluster(server, tmp_path / "downloads")
        records = _job(cluster, origin, tmp_path, stock)
        assert sorted(r["status"] for r in records) == ["done"] * 20
        assert all((tmp_path / "downloads" / r["path"]).stat().st_size == 50_000 for r in records)
        # Only the patched transport takes messages with its script: the stock one leaves it unloaded.
        assert server.client(0).script_exists(TAKE_SHA) == [not stock]


_PROBE = """
from tasks import fetch, guard, urllib3_hooks
from tasks.config import settings as s
urllib3_hooks.use_stock(s.stock)  # as a worker's first download does (tasks/context.py)
limits = fetch.Limits(2, 2, 3, guard.Policy.from_settings(s.allow_private, s.allow_networks, s.resolve))
response = fetch.open_response({url!r}, {{}}, limits)
sock = type(response.raw.connection.sock).__name__
print(urllib3_hooks.patched(), sock, len(b"".join(fetch.body_chunks(response, 2))))
"""


@pytest.mark.parametrize("stock", [False, True], ids=["patched", "stock"])
def test_the_stock_http_path_connects_to_the_checked_address_and_names_the_host(origin, stock):
    """FLEETFETCH_RESOLVE maps allowed.test to 127.0.0.1 (tests/conftest.py): the request reaches the origin with
    the URL's name in its Host header either way; only the patched path's socket is the kernel-timeout one."""
    origin.add("/x.bin", b"y" * 70_000)
    url = origin.url("/x.bin", host="allowed.test")
    env = base_env(FLEETFETCH_STOCK="1" if stock else "0")
    out = subprocess.run([sys.executable, "-c", _PROBE.format(url=url)], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    patched, sock, size = out.stdout.split()
    assert (patched, size) == (str(not stock), "70000")
    assert sock == ("socket" if stock else "KernelTimeoutSocket")
    (request,) = origin.requests_for("/x.bin")
    assert request.headers["Host"] == f"allowed.test:{origin.port}"


_UNKNOWN = """
import logging
import kombu, urllib3
logging.basicConfig(level=logging.WARNING, format="%(message)s")
kombu.__version__, urllib3.__version__ = "5.8.0", "2.9.0"  # as if a newer release were installed
import tasks.app
from kombu import transport
from tasks import urllib3_hooks
print(transport.TRANSPORT_ALIASES["redis"], urllib3_hooks.patched())
"""


def test_a_newer_kombu_or_urllib3_gets_the_stock_path_with_one_warning_each():
    out = subprocess.run([sys.executable, "-c", _UNKNOWN], env=base_env(), cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["kombu.transport.redis:Transport", "False"]
    assert out.stderr.splitlines() == [
        "kombu 5.8.0 is not a version fleetfetch knows (5.7): using kombu's own Redis transport (slower, as reliable)",
        "urllib3 2.9.0 is not a version fleetfetch knows (2.2 to 2.8): "
        "using urllib3's own connections (slower, as safe)",
    ]

"""--queue: a job goes to its own Celery queue, only workers started with -Q NAME take it, and a lost message
is published again to that queue, not to the default one."""

from __future__ import annotations

from bench.realparts.servers import Worker
from tasks.config import QUEUE
from tests.conftest import FAST_HEAL, ROOT, job_id_of, read_manifest, write_list

NAME = "ff-test-special"


def test_a_job_on_its_own_queue_is_served_by_its_workers_and_healed_there(cluster, worker, origin, tmp_path):
    origin.add("/q1.txt", b"queue one")
    origin.add("/q2.txt", b"queue two")
    origin.fail("/q1.txt", [503])  # its retry must go back to NAME too
    broker = cluster.broker()
    before = broker.llen(QUEUE)
    listing = write_list(tmp_path / "urls.txt", [origin.url("/q1.txt"), origin.url("/q2.txt")])
    queued = cluster.producer(str(listing), "-d", "queued", "--queue", NAME, "--no-wait")
    assert queued.returncode == 0, queued.stdout + queued.stderr
    job = job_id_of(queued.stdout)
    assert broker.llen(NAME) == 2 and broker.llen(QUEUE) == before
    assert origin.requests == []  # the default queue's worker does not take it
    broker.delete(NAME)  # both messages lost: the reconciler must publish them again, to NAME
    env = dict(cluster.env, **FAST_HEAL)
    special = Worker(env, name="special", concurrency=2, log=tmp_path / "w.log", cwd=ROOT,
                     extra_args=["-Q", NAME]).start()
    try:
        manifest = tmp_path / "m.jsonl"
        result = cluster.producer("resume", job, "--manifest", str(manifest), timeout=90)
    finally:
        special.stop()
    assert result.returncode == 0, result.stdout + result.stderr
    records = read_manifest(manifest)
    assert [r["status"] for r in records] == ["done", "done"]
    assert all(r["worker"].startswith("special@") and r["redeliveries"] == 1 for r in records), records
    assert records[0]["attempts"] == 2
    assert (cluster.downloads / "queued" / "q2.txt").read_bytes() == b"queue two"
    assert f'"queue": "{NAME}"' in cluster.producer("status", job, "--json").stdout


def test_a_bad_queue_name_is_one_error_line(cluster, tmp_path):
    listing = write_list(tmp_path / "urls.txt", ["http://127.0.0.1/x"])
    result = cluster.producer(str(listing), "--queue", "no spaces")
    assert result.returncode == 2 and result.stderr.startswith("error: --queue 'no spaces'")

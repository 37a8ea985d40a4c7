"""Hardening, round 3: what a stranger on a shared volume, a changed list or a second job in one directory can do.

Real Redis, a real `celery worker`, a real HTTP origin; all traffic on 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from pathlib import Path

from tasks import labels, storage
from tasks.naming import with_hash
from tests.conftest import Cluster, read_manifest, write_list

NOBODY = 65534  # another local user


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def run(cluster: Cluster, tmp_path: Path, lines: list[str], *args: str,
        manifest: str = "m.jsonl") -> tuple[subprocess.CompletedProcess, list]:
    out = tmp_path / manifest
    out.unlink(missing_ok=True)
    result = cluster.producer(str(write_list(tmp_path / "urls.txt", lines)), "--manifest", str(out), *args)
    assert "Traceback" not in result.stderr, result.stderr
    return result, read_manifest(out) if out.exists() else []


def forge_label(path: Path, url: str, claimed: bytes, etag: str) -> None:
    """The label another user can write on a file of theirs: the real file's size, digest and ETag, and the
    planted file's own inode and mtime (so that it looks untouched)."""
    st = path.stat()
    label = {"url": storage.url_key(url), "bytes": len(claimed), "sha256": sha(claimed), "etag": etag,
             "last_modified": None, "inode": st.st_ino, "mtime_ns": st.st_mtime_ns}
    os.setxattr(path, labels.XATTR, json.dumps(label).encode())


# --- labels on files: trusted only when they can be ours --------------------------------------------------------


def test_a_label_forged_by_another_user_or_on_a_hard_link_is_not_trusted(cluster, worker, origin, tmp_path):
    real = b"the real report"
    origin.add("/f.pdf", real, etag='"r1"')
    origin.add("/g.pdf", real, etag='"r1"')
    target = cluster.downloads / "forged"
    target.mkdir(parents=True, exist_ok=True)
    planted = target / "f.pdf"
    planted.write_bytes(b"the evil report")  # same size as the real one
    forge_label(planted, origin.url("/f.pdf"), real, '"r1"')
    os.chown(planted, NOBODY, NOBODY)
    elsewhere = tmp_path / "elsewhere.pdf"  # a file of ours, labelled, that also has a name in the directory
    elsewhere.write_bytes(b"the other evil!")
    os.link(elsewhere, target / "g.pdf")
    forge_label(elsewhere, origin.url("/g.pdf"), real, '"r1"')
    lines = [f"{origin.url('/f.pdf')} sha256={sha(real)}", f"{origin.url('/g.pdf')} sha256={sha(real)}"]
    result, records = run(cluster, tmp_path, lines, "-d", "forged")
    assert result.returncode == 0, result.stdout + result.stderr
    assert [r["status"] for r in records] == ["done", "done"]
    assert planted.read_bytes() == real and (target / "g.pdf").read_bytes() == real
    assert elsewhere.read_bytes() == b"the other evil!"  # the link was replaced, not written through
    for path in ("/f.pdf", "/g.pdf"):
        assert "If-None-Match" not in origin.requests_for(path)[-1].headers  # an unconditional download


def test_a_new_expected_digest_on_a_rerun_is_checked_never_unchanged(cluster, worker, origin, tmp_path):
    body, other = b"version 1", sha(b"some other file")
    origin.add("/d.bin", body, etag='"d1"')
    url = origin.url("/d.bin")
    first, _ = run(cluster, tmp_path, [url], "-d", "digest")
    assert first.returncode == 0, first.stdout + first.stderr
    for lines in ([f"{url} sha256={other}"], [url, f"  checksum=sha-256={other}"]):
        again, records = run(cluster, tmp_path, lines, "-d", "digest")
        assert again.returncode == 1, again.stdout
        assert records[0]["status"] == "failed" and "sha256 mismatch" in records[0]["reason"]
        assert "If-None-Match" not in origin.requests_for("/d.bin")[-1].headers
    # the digest the file really has still lets a re-run keep it (a conditional request, a 304)
    same, records = run(cluster, tmp_path, [f"{url} sha256={sha(body)}"], "-d", "digest")
    assert same.returncode == 0 and records[0]["status"] == "unchanged"
    assert origin.requests_for("/d.bin")[-1].headers["If-None-Match"] == '"d1"'


# --- two jobs in one directory ---------------------------------------------------------------------------------


def test_two_jobs_whose_urls_share_a_name_in_one_directory_each_keep_a_file_their_record_describes(
        cluster, worker, origin, tmp_path):
    """Job A is still writing index.html when job B's URL (another one) wants the same name: B takes its URL's
    hashed name at once (no stepping aside as a duplicate delivery), and neither replaces the other's file."""
    origin.add("/a/", b"A" * 40_000, rate=20_000)  # 2 s: B arrives while A writes
    origin.add("/b/", b"B's page")
    job_a = cluster.producer_async(str(write_list(tmp_path / "a.txt", [origin.url("/a/")])), "-d", "shared",
                                   "--manifest", str(tmp_path / "a.jsonl"))
    try:
        deadline = time.monotonic() + 30
        while not origin.requests_for("/a/") and time.monotonic() < deadline:
            time.sleep(0.05)
        started = time.monotonic()
        second = cluster.producer(str(write_list(tmp_path / "b.txt", [origin.url("/b/")])), "-d", "shared",
                                  "--manifest", str(tmp_path / "b.jsonl"))
        b_took = time.monotonic() - started
        out, err = job_a.communicate(timeout=60)
    finally:
        if job_a.poll() is None:
            job_a.kill()
            job_a.wait()
    assert job_a.returncode == 0 and second.returncode == 0, out + err + second.stdout + second.stderr
    a, b = read_manifest(tmp_path / "a.jsonl")[0], read_manifest(tmp_path / "b.jsonl")[0]
    assert a["status"] == b["status"] == "done"
    assert a["path"] == "shared/index.html" and b["path"] == f"shared/{with_hash('index.html', origin.url('/b/'))}"
    for record in (a, b):
        assert sha((cluster.downloads / record["path"]).read_bytes()) == record["sha256"], record
    assert b_took < 15  # not stepped aside until its lease ran out (60 s)
    # a re-run of either job keeps its own file, and its own name
    again, records = run(cluster, tmp_path, [origin.url("/b/")], "-d", "shared")
    assert again.returncode == 0 and records[0]["status"] == "done" and records[0]["path"] == b["path"]


# --- a file and a directory of one name ------------------------------------------------------------------------


def test_a_file_and_a_directory_of_one_name_both_get_their_own_path(cluster, worker, origin, tmp_path):
    """-x: a site's /docs and /docs/a.pdf; without it, a file `forms` beside dir=forms. Whichever comes first
    keeps the plain name, the other a hashed one; the same list gives the same paths again."""
    for path, body in {"/docs": b"the docs page", "/docs/a.pdf": b"a", "/docs/b/c.pdf": b"c", "/forms": b"form",
                       "/f.pdf": b"f", "/later/x.pdf": b"x", "/later": b"later page"}.items():
        origin.add(path, body)
    tree = [origin.url(p) for p in ("/docs", "/docs/a.pdf", "/docs/b/c.pdf", "/later/x.pdf", "/later")]
    flat = [origin.url("/forms"), origin.url("/f.pdf"), "  dir=forms"]
    got = {}
    for lines, args in ((tree, ("-d", "tree", "-x")), (flat, ("-d", "flat"))):
        paths = got[args[1]] = []
        for _ in range(2):
            result, records = run(cluster, tmp_path, lines, *args)
            assert result.returncode == 0, result.stdout + result.stderr
            assert {r["status"] for r in records} == {"done"}
            for r in records:
                assert sha((cluster.downloads / r["path"]).read_bytes()) == r["sha256"], r
            paths.append([r["path"] for r in records])
        assert paths[0] == paths[1] and len(set(paths[0])) == len(paths[0])
    host = origin.base_url.removeprefix("http://").replace(":", "_")
    docs = with_hash("docs", f"{host}/docs/")  # seeded by its path in the job
    assert got["tree"][0] == [f"tree/{host}/docs", f"tree/{host}/{docs}/a.pdf", f"tree/{host}/{docs}/b/c.pdf",
                              f"tree/{host}/later/x.pdf", f"tree/{host}/{with_hash('later', origin.url('/later'))}"]
    assert got["flat"][0] == ["flat/forms", f"flat/{with_hash('forms', 'forms/')}/f.pdf"]


def test_a_file_whose_name_an_earlier_runs_directory_holds_takes_its_hashed_name(cluster, worker, origin, tmp_path):
    origin.add("/pages/p.pdf", b"p")
    origin.add("/pages", b"the pages page")
    first, _ = run(cluster, tmp_path, [origin.url("/pages/p.pdf")], "-d", "earlier", "-x")
    second, records = run(cluster, tmp_path, [origin.url("/pages")], "-d", "earlier", "-x")
    assert first.returncode == 0 and second.returncode == 0, second.stdout + second.stderr
    host = origin.base_url.removeprefix("http://").replace(":", "_")
    assert records[0]["path"] == f"earlier/{host}/{with_hash('pages', origin.url('/pages'))}"
    assert (cluster.downloads / records[0]["path"]).read_bytes() == b"the pages page"
    # the other way round (a directory needed where an earlier run left a file) fails the URL and says why
    run(cluster, tmp_path, [origin.url("/pages")], "-d", "earlier2", "-x")
    third, records = run(cluster, tmp_path, [origin.url("/pages/p.pdf")], "-d", "earlier2", "-x")
    assert third.returncode == 1 and "'pages' is a file there, not a directory" in records[0]["reason"]

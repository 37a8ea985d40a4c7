"""--netrc-file and --load-cookies: each login and cookie goes only to its own host (a redirect's too), and none
travels in a task message or shows in output.

`allowed.test` resolves to 127.0.0.1 for the workers (tests/conftest.py): the same origin reached under two host
names stands for two hosts.
"""

from __future__ import annotations

import base64
import json

from bench.realparts.servers import RedisServer, Worker
from tasks.config import QUEUE
from tests.conftest import ROOT, Cluster, job_id_of, read_manifest, write_list

NETRC = "machine allowed.test login alice password s3cret-netrc\nmachine 127.0.0.2 login bob password other-pw\n"
COOKIES = "\n".join([
    "# Netscape HTTP Cookie File",
    "allowed.test\tFALSE\t/\tFALSE\t0\tsid\tc00kie-sid",
    ".allowed.test\tTRUE\t/private\tFALSE\t0\tpriv\tpr1vate-val",
    "#HttpOnly_allowed.test\tFALSE\t/\tTRUE\t0\tsec\tsecure-only",    # https only
    "allowed.test\tFALSE\t/\tFALSE\t1000\told\texpired-val",          # expired in 1970
    "127.0.0.2\tFALSE\t/\tFALSE\t0\telse\telsewhere-val",
]) + "\n"
SECRETS = ("s3cret-netrc", "c00kie-sid", "pr1vate-val", "other-pw", "elsewhere-val")


def test_netrc_logins_and_cookies_go_only_to_their_host(tmp_path, origin):
    server = RedisServer(tmp_path / "redis").start()
    try:
        c = Cluster(server, tmp_path / "dl")
        for path in ("/n1.txt", "/n2.txt", "/n3.txt", "/private/p.txt"):
            origin.add(path, path.encode())
        named = f"http://allowed.test:{origin.port}"
        origin.redirect("/hop", origin.url("/n3.txt"))  # allowed.test -> 127.0.0.1: another host
        (tmp_path / "netrc").write_text(NETRC)
        (tmp_path / "cookies.txt").write_text(COOKIES)
        listing = write_list(tmp_path / "urls.txt", [f"{named}/n1.txt", origin.url("/n2.txt"), f"{named}/hop",
                                                     f"{named}/private/p.txt"])
        queued = c.producer(str(listing), "--no-wait", "--netrc-file", str(tmp_path / "netrc"),
                            "--load-cookies", str(tmp_path / "cookies.txt"))
        assert queued.returncode == 0, queued.stdout + queued.stderr
        job = job_id_of(queued.stdout)
        raw = server.client(0).lrange(QUEUE, 0, -1)
        messages = b"".join(m + base64.b64decode(json.loads(m)["body"]) for m in raw)
        assert len(raw) == 4 and not any(s.encode() in messages for s in SECRETS)
        w = Worker(c.env, name="cred", concurrency=2, log=tmp_path / "w.log", cwd=ROOT).start()
        try:
            manifest = tmp_path / "m.jsonl"
            result = c.producer("resume", job, "--manifest", str(manifest))
        finally:
            w.stop()
        assert result.returncode == 0, result.stdout + result.stderr
        assert [r["status"] for r in read_manifest(manifest)] == ["done"] * 4
        alice = "Basic " + base64.b64encode(b"alice:s3cret-netrc").decode()
        n1 = origin.requests_for("/n1.txt")[0].headers
        assert n1["Authorization"] == alice and n1["Cookie"] == "sid=c00kie-sid"  # not secure, not expired
        n2 = origin.requests_for("/n2.txt")[0].headers
        assert "Authorization" not in n2 and "Cookie" not in n2
        hop = origin.requests_for("/hop")[0].headers
        assert hop["Authorization"] == alice and hop["Cookie"] == "sid=c00kie-sid"
        n3 = origin.requests_for("/n3.txt")[0].headers  # the redirect's target is another host
        assert "Authorization" not in n3 and "Cookie" not in n3
        private = origin.requests_for("/private/p.txt")[0].headers
        assert private["Cookie"] == "sid=c00kie-sid; priv=pr1vate-val"
        shown = queued.stdout + queued.stderr + result.stdout + result.stderr + manifest.read_text() + w.log_text()
        assert not any(s in shown for s in SECRETS)
    finally:
        server.stop()


def test_bad_credential_files_are_one_error_line(cluster, tmp_path):
    listing = write_list(tmp_path / "urls.txt", ["http://127.0.0.1/x"])
    (tmp_path / "bad-netrc").write_text("machine h login alice\nbogus-token here\n")
    (tmp_path / "default-only").write_text("default login anon password x\n")
    (tmp_path / "bad-cookies").write_text("not a cookie file\n")
    cases = [("--netrc-file", "missing", "no such file"), ("--netrc-file", "bad-netrc", "bad-netrc:"),
             ("--netrc-file", "default-only", "a `default` entry is not used"),
             ("--load-cookies", "bad-cookies", "not a Netscape cookies.txt file")]
    for option, name, message in cases:
        result = cluster.producer(str(listing), option, str(tmp_path / name))
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith(f"error: {option} ") and message in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_a_cookie_requests_cannot_send_is_refused_at_load(cluster, tmp_path):
    listing = write_list(tmp_path / "urls.txt", ["http://127.0.0.1/x"])
    for name, value in [(" sid", "c00kie-sid"), ("sid", "c00kie; evil=1"), ("s id", "v4l"), ("sid", " c00kie-sid")]:
        lines = ["# Netscape HTTP Cookie File", f"allowed.test\tFALSE\t/\tFALSE\t0\t{name}\t{value}"]
        (tmp_path / "cookies.txt").write_text("\n".join(lines) + "\n")
        result = cluster.producer(str(listing), "--load-cookies", str(tmp_path / "cookies.txt"))
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith(f"error: --load-cookies {tmp_path / 'cookies.txt'}:2: "), result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
        assert value.strip().split(";")[0] not in result.stderr


def test_a_header_requests_refuses_fails_naming_only_the_header(tmp_path, origin):
    """A cookie the producer would refuse, put in the job's ledger by hand: the reason names the header, and its
    value (the cookie) shows nowhere."""
    from tasks.ledger import CREDENTIALS, JobKeys

    server = RedisServer(tmp_path / "redis").start()
    try:
        c = Cluster(server, tmp_path / "dl")
        origin.add("/c.txt", b"c")
        (tmp_path / "cookies.txt").write_text("127.0.0.1\tFALSE\t/\tFALSE\t0\tsid\tc00kie-sid\n")
        queued = c.producer(str(write_list(tmp_path / "urls.txt", [origin.url("/c.txt")])), "--no-wait",
                            "--load-cookies", str(tmp_path / "cookies.txt"))
        assert queued.returncode == 0, queued.stdout + queued.stderr
        job = job_id_of(queued.stdout)
        backend = server.client(1)
        stored = json.loads(backend.hget(JobKeys(job).meta, CREDENTIALS))
        stored["cookies"][0]["name"] = " sid"
        backend.hset(JobKeys(job).meta, CREDENTIALS, json.dumps(stored))
        w = Worker(c.env, name="hdr", concurrency=1, log=tmp_path / "w.log", cwd=ROOT).start()
        try:
            manifest = tmp_path / "m.jsonl"
            result = c.producer("resume", job, "--manifest", str(manifest))
        finally:
            w.stop()
        assert result.returncode == 1, result.stdout + result.stderr
        record = read_manifest(manifest)[0]
        assert record["reason"] == "invalid request header Cookie: a line break or a leading space in it (not sent)"
        assert "c00kie-sid" not in result.stdout + result.stderr + manifest.read_text() + w.log_text()
    finally:
        server.stop()

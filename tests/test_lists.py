"""URL lists in aria2c's input-file format work unchanged; sizes and rates read and print as people write them."""

from __future__ import annotations

import hashlib

import pytest

from producer.units import human_bytes, human_rate, parse_size
from tasks.config import QUEUE
from tasks.naming import with_hash
from tests.conftest import read_manifest, write_list


def test_an_aria2_list_lands_where_it_says(cluster, worker, origin, tmp_path):
    origin.add("/a/f.pdf", b"report a")
    origin.add("/b/f.pdf", b"report b")
    origin.add("/c/f.pdf", b"report c")
    origin.add("/plain.txt", b"plain line")
    digest = hashlib.sha256(b"report a").hexdigest()
    lines = [
        "# an aria2c input file",
        origin.url("/a/f.pdf"),
        "  out=annual.pdf",
        "  dir=reports/2024",
        f"  checksum=sha-256={digest}",
        "  header=X-From-List: yes",
        "  user-agent=Wget/1.21.4",
        origin.url("/b/f.pdf"),
        "\tdir=reports/2024",
        "\tout=annual.pdf",  # taken in that directory: gets the URL hash, never overwrites
        origin.url("/c/f.pdf"),
        "  dir=other",
        "  out=annual.pdf",  # another directory: the plain name is free there
        origin.url("/plain.txt"),
    ]
    manifest = tmp_path / "m.jsonl"
    result = cluster.producer(str(write_list(tmp_path / "list.aria2", lines)), "-d", "aria",
                              "--manifest", str(manifest))
    assert result.returncode == 0, result.stdout + result.stderr
    root = cluster.downloads / "aria"
    second = with_hash("annual.pdf", origin.url("/b/f.pdf"))
    assert (root / "reports" / "2024" / "annual.pdf").read_bytes() == b"report a"
    assert (root / "reports" / "2024" / second).read_bytes() == b"report b"
    assert (root / "other" / "annual.pdf").read_bytes() == b"report c"
    assert (root / "plain.txt").read_bytes() == b"plain line"
    assert [r["path"] for r in read_manifest(manifest)] == [
        "aria/reports/2024/annual.pdf", f"aria/reports/2024/{second}", "aria/other/annual.pdf", "aria/plain.txt"]
    first = origin.requests_for("/a/f.pdf")[0].headers
    assert first["X-From-List"] == "yes" and first["User-Agent"] == "Wget/1.21.4"
    assert "X-From-List" not in origin.requests_for("/b/f.pdf")[0].headers


def test_a_wrong_list_checksum_fails_the_url(cluster, worker, origin, tmp_path):
    origin.add("/sum.bin", b"actual bytes")
    lines = [origin.url("/sum.bin"), f"  checksum=sha-256={'0' * 64}"]
    manifest = tmp_path / "m.jsonl"
    result = cluster.producer(str(write_list(tmp_path / "l.txt", lines)), "-d", "sum", "--manifest", str(manifest))
    assert result.returncode == 1
    assert "sha256 mismatch" in read_manifest(manifest)[0]["reason"]
    assert not (cluster.downloads / "sum" / "sum.bin").exists()


def test_bad_option_lines_stop_the_job_each_reported(cluster, tmp_path):
    lines = ["http://127.0.0.1/x.pdf",
             "  max-conection-per-server=4",     # 3: not an aria2 option (a typo)
             "  out=../../etc/passwd",           # 4
             "  dir=/var/tmp",                   # 5
             "  checksum=md5=0123",              # 6
             "  header=NoColon",                 # 7
             "http://127.0.0.1/y.pdf",
             "  out=fine.pdf",
             "http://127.0.0.1/z.pdf\thttp://127.0.0.2/z.pdf"]  # 10: aria2's mirrors on one line
    before = cluster.broker().llen(QUEUE)
    listing = write_list(tmp_path / "bad.txt", [" out=orphan", *lines])  # 1: an option before any URL
    result = cluster.producer(str(listing))
    assert result.returncode == 2
    errors = result.stderr.strip().splitlines()
    assert [e.split(": ", 2)[1] for e in errors[:-1]] == [f"{listing}:{n}" for n in (1, 3, 4, 5, 6, 7, 10)]
    assert "unknown option 'max-conection-per-server'" in errors[1]
    assert "put directories in dir=" in errors[2] and "relative sub-directory" in errors[3]
    assert "only sha-256" in errors[4] and "'Name: value'" in errors[5] and "give each URL its own line" in errors[6]
    assert errors[-1] == "error: nothing was enqueued: fix the lines above" and "Traceback" not in result.stderr
    assert cluster.broker().llen(QUEUE) == before


@pytest.mark.fast
@pytest.mark.parametrize("text,size", [("0", 0), ("1234", 1234), ("500K", 500 * 1024), ("2M", 2 << 20),
                                       ("10G", 10 << 30), ("1.5m", 3 << 19), ("2MiB", 2 << 20), ("64KB", 64 << 10)])
def test_sizes_take_curl_suffixes(text, size):
    assert parse_size(text) == size


@pytest.mark.fast
@pytest.mark.parametrize("text", ["", "M", "10Q", "-1", "1e6", "ten"])
def test_a_bad_size_says_how_to_write_one(text):
    with pytest.raises(ValueError, match="e.g. 500K, 2M, 10G"):
        parse_size(text)


@pytest.mark.fast
def test_units_scale():
    assert human_bytes(0) == "0 B" and human_bytes(999) == "999 B" and human_bytes(48_000) == "48.0 kB"
    assert human_bytes(1_900_000) == "1.9 MB" and human_bytes(3.2e9) == "3.2 GB"
    assert human_rate(20_000, 2.0) == "10.0 kB/s"


def test_max_size_with_a_suffix_and_one_url_summary(cluster, worker, origin, tmp_path):
    origin.add("/big.bin", b"x" * 3000)
    origin.add("/small.bin", b"x" * 1000)
    listing = write_list(tmp_path / "u.txt", [origin.url("/big.bin")])
    result = cluster.producer(str(listing), "-d", "suffix", "--max-size", "2K")
    assert result.returncode == 1 and "over the limit of 2048" in result.stdout
    result = cluster.producer(str(write_list(tmp_path / "s.txt", [origin.url("/small.bin")])), "-d", "suffix",
                              "--max-size", "2K")
    assert result.returncode == 0, result.stdout + result.stderr
    assert ": 1 URL\n" in result.stdout and "1.0 kB in " in result.stdout and "0.0 MB/s" not in result.stdout


def test_force_directories_keeps_host_and_path(cluster, worker, origin, tmp_path):
    origin.add("/a/b/deep.txt", b"deep")
    origin.add("/a/f.txt", b"a")
    origin.add("/sub%3Adir/f.txt", b"colon")
    origin.add("/top.txt", b"top")
    lines = [origin.url("/a/b/deep.txt"), origin.url("/a/f.txt"), origin.url("/sub%3Adir/f.txt"),
             origin.url("/top.txt"), "  dir=extra"]
    result = cluster.producer(str(write_list(tmp_path / "u.txt", lines)), "-d", "mirror", "-x")
    assert result.returncode == 0, result.stdout + result.stderr
    host = cluster.downloads / "mirror" / f"127.0.0.1_{origin.port}"  # ':' is not a safe name character
    assert (host / "a" / "b" / "deep.txt").read_bytes() == b"deep"
    assert (host / "a" / "f.txt").read_bytes() == b"a"
    assert (host / "sub_dir" / "f.txt").read_bytes() == b"colon"  # same name, another directory: kept
    assert (cluster.downloads / "mirror" / "extra" / host.name / "top.txt").read_bytes() == b"top"


@pytest.mark.fast
def test_a_long_list_is_checked_the_same_once_its_urls_move_to_disk(tmp_path, monkeypatch):
    """Past seen.IN_MEMORY keys the producer keeps URLs and names on disk: same names, same duplicates dropped."""
    from producer import seen, urls

    lines = []
    for i in range(3000):
        lines.append(f"http://127.0.0.1:9/a/{i % 1200}/report.pdf")  # 1800 repeats of earlier URLs
        if i % 7 == 0:
            lines += [f"http://127.0.0.1:9/b/{i}/Report.PDF", "  dir=sub"]  # the same name under case folding
    listing = tmp_path / "urls.txt"
    listing.write_text("\n".join(lines) + "\n")

    def entries() -> list[tuple[int, str, str, str | None, dict]]:
        with urls.read(listing, "urls.txt") as spool:
            return [(e.index, e.url, e.name, e.sha256, e.opts) for e in spool.replay()]

    in_memory = entries()
    monkeypatch.setattr(seen, "IN_MEMORY", 100)  # ~3 300 keys: on disk after the first 100
    spilled = entries()
    assert spilled == in_memory and len(in_memory) == 1200 + 429
    assert len({(e[4].get("subdir"), e[2].casefold()) for e in in_memory}) == len(in_memory)  # names distinct


@pytest.mark.fast
def test_seen_claims_each_key_once_in_memory_and_on_disk():
    from producer.seen import Seen

    with Seen(in_memory=50) as s:
        assert all(s.claim(f"k{i}") for i in range(200)) and s.on_disk
        assert not any(s.claim(f"k{i}") for i in range(200))
        assert "k7" in s and "k200" not in s  # looking claims nothing
        assert s.claim("k200")


def test_an_indented_url_line_is_a_url_line(cluster, worker, origin, tmp_path):
    origin.add("/i/a.txt", b"indented a")
    origin.add("/i/b.txt", b"indented b")
    lines = [f"   {origin.url('/i/a.txt')}", "     out=first.txt", f"\t{origin.url('/i/b.txt')}  "]
    manifest = tmp_path / "m.jsonl"
    result = cluster.producer(str(write_list(tmp_path / "l.txt", lines)), "-d", "indent", "--manifest", str(manifest))
    assert result.returncode == 0, result.stdout + result.stderr
    assert (cluster.downloads / "indent" / "first.txt").read_bytes() == b"indented a"
    assert (cluster.downloads / "indent" / "b.txt").read_bytes() == b"indented b"
    assert [r["status"] for r in read_manifest(manifest)] == ["done", "done"]


def test_conflicting_out_or_checksum_lines_for_one_url_are_an_error(cluster, tmp_path):
    before = cluster.broker().llen(QUEUE)
    lines = ["http://127.0.0.1/a.pdf", "  out=one.pdf", "  out=two.pdf",
             f"http://127.0.0.1/b.pdf sha256={'a' * 64}", f"  checksum=sha-256={'b' * 64}",
             "http://127.0.0.1/c.pdf", "  out=same.pdf", "  out=same.pdf"]  # the same value twice: fine
    listing = write_list(tmp_path / "dup.txt", lines)
    result = cluster.producer(str(listing))
    assert result.returncode == 2
    errors = result.stderr.strip().splitlines()
    assert [e.split(": ", 2)[1] for e in errors[:-1]] == [f"{listing}:3", f"{listing}:5"]
    assert "out= is given twice" in errors[0] and "checksum= (or sha256=) is given twice" in errors[1]
    assert cluster.broker().llen(QUEUE) == before


def test_bidi_controls_never_reach_a_file_name(cluster, worker, origin, tmp_path):
    origin.add("/invoice\u202efdp.exe", b"not a pdf")
    manifest = tmp_path / "m.jsonl"
    result = cluster.producer(str(write_list(tmp_path / "u.txt", [origin.url("/invoice%E2%80%AEfdp.exe")])),
                              "-d", "bidi", "--manifest", str(manifest))
    assert result.returncode == 0, result.stdout + result.stderr
    assert [p.name for p in (cluster.downloads / "bidi").iterdir()] == ["invoice_fdp.exe"]
    assert read_manifest(manifest)[0]["path"] == "bidi/invoice_fdp.exe"


def test_failed_records_carry_their_path(cluster, worker, origin, tmp_path):
    manifest = tmp_path / "m.jsonl"
    lines = [origin.url("/missing.pdf"), origin.url("/gone/x.pdf"), "  dir=deeper", "  out=y.pdf"]
    result = cluster.producer(str(write_list(tmp_path / "u.txt", lines)), "-d", "nopath", "--manifest", str(manifest))
    assert result.returncode == 1
    records = read_manifest(manifest)
    assert [(r["status"], r["path"]) for r in records] == [("failed", "nopath/missing.pdf"),
                                                           ("failed", "nopath/deeper/y.pdf")]

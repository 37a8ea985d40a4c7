"""The naming function: one safe, deterministic component for any URL or Content-Disposition."""

import itertools
import os
import unicodedata
from urllib.parse import quote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tasks.naming import (
    MAX_NAME_BYTES,
    NameAllocator,
    candidates,
    check_component,
    collision_key,
    disposition_name,
    name_for,
    sanitize,
    with_hash,
)

pytestmark = pytest.mark.fast  # the fast tier (tests/conftest.py)


def assert_safe(name: str) -> None:
    assert name and name not in (".", "..")
    assert "/" not in name and "\\" not in name and "\x00" not in name
    assert not any(ord(c) < 32 or 0x7F <= ord(c) <= 0x9F for c in name)
    assert not name.startswith(".")
    assert len(name.encode()) <= MAX_NAME_BYTES
    assert os.path.basename(name) == name
    assert check_component(name) == name


def test_last_segment_percent_decoded_without_query():
    assert name_for("https://www.irs.gov/pub/irs-pdf/f1040.pdf?x=1#frag") == "f1040.pdf"
    assert name_for("http://h/a/my%20file.pdf") == "my file.pdf"
    assert name_for("http://h/caf%C3%A9.txt") == "café.txt"


def test_empty_path_becomes_index_html():
    assert name_for("http://h") == "index.html"
    assert name_for("http://h/dir/") == "index.html"


def test_traversal_in_url_path_is_one_harmless_component():
    for url in ("http://h/..%2F..%2Fetc/passwd", "http://h/%2e%2e%2f%2e%2e%2fx", "http://h/a/..",
                "http://h/%2e%2e", "http://h/..%5C..%5Cwin.ini", "http://h/%00evil"):
        assert_safe(name_for(url))
    assert name_for("http://h/..%2F..%2Fetc%2Fpasswd") == "___.._etc_passwd"


def test_dot_names_and_device_names():
    assert sanitize("..") == "__"
    assert sanitize(".") == "_"
    assert sanitize(".hidden") == "_hidden"
    assert sanitize("CON") == "_CON"
    assert sanitize("lpt1.txt") == "_lpt1.txt"
    assert sanitize("a\\b") == "a_b"


def test_overlong_names_keep_extension():
    name = sanitize("x" * 400 + ".pdf")
    assert name.endswith(".pdf") and len(name.encode()) <= MAX_NAME_BYTES
    multibyte = sanitize("é" * 300 + ".txt")
    assert multibyte.endswith(".txt") and len(multibyte.encode()) <= MAX_NAME_BYTES


def test_collisions_get_distinct_deterministic_names():
    urls = ["http://a.com/x/f.pdf", "http://b.com/y/f.pdf", "http://a.com/p?page=1", "http://a.com/p?page=2",
            "http://a.com/F.PDF", "http://a.com/cafe\u0301", "http://a.com/caf%C3%A9"]
    first = [NameAllocator().allocate(u) for u in [urls[0]]]
    alloc = NameAllocator()
    names = [alloc.allocate(u) for u in urls]
    assert names[0] == first[0] == "f.pdf"
    folded = {unicodedata.normalize("NFKC", n).casefold() for n in names}
    assert len(folded) == len(urls)
    again = NameAllocator()
    assert [again.allocate(u) for u in urls] == names
    assert names[1].startswith("f-") and names[1].endswith(".pdf")


def test_a_name_cut_to_the_limit_never_ends_in_a_space_or_a_dot():
    """The producer once made `aaa…a ` (cut before ` b`), which the worker refused as `UnsafeName`."""
    for tail in ("%20b", ".b", "%20.b", "..%20b"):
        name = name_for("http://h/" + "a" * 179 + tail)
        assert_safe(name)
        assert not name.endswith((" ", "."))
    assert_safe(sanitize("con" + " " * 200 + "x"))  # the cut leaves a device name: prefixed again


def test_a_hashed_name_that_another_url_holds_is_skipped():
    """`A/f.pdf`, `A/f-<hash of B/f.pdf>.pdf`, `B/f.pdf`: B must not get the second URL's name."""
    b = "http://h/B/f.pdf"
    crafted = with_hash("f.pdf", b)
    alloc = NameAllocator()
    names = [alloc.allocate(u) for u in ("http://h/A/f.pdf", f"http://h/A/{crafted}", b)]
    assert names[:2] == ["f.pdf", crafted]
    assert len(set(names)) == 3
    assert_safe(names[2])


def test_hashed_names_with_long_extensions_stay_within_the_limit():
    for name in ("a." + "b" * 170, "x" * 180, "é" * 90, "a.tar.gz", "a-b." + "c" * 16):
        hashed = with_hash(sanitize(name), "http://h/u")
        assert_safe(hashed)
        assert hashed != sanitize(name)


def test_content_disposition_hostile_values():
    assert disposition_name('attachment; filename="report.pdf"') == "report.pdf"
    assert disposition_name("attachment; filename*=UTF-8''na%C3%AFve%20file.txt") == "naïve file.txt"
    assert disposition_name('attachment; filename="../../x"') == "x"
    assert disposition_name('attachment; filename="/etc/passwd"') == "passwd"
    assert disposition_name('attachment; filename="..\\\\x"') == "x"
    assert disposition_name('attachment; filename=""') == "index.html"
    assert disposition_name("inline") is None
    assert disposition_name("attachment; filename*=idna''%C3%A9.txt") == "é.txt"  # codec without "replace"
    assert disposition_name("attachment; filename*=rot13''x.txt") == "x.txt"


@settings(max_examples=400)
@given(st.text(max_size=300))
def test_any_string_sanitizes_to_one_safe_component(raw):
    name = sanitize(raw)
    assert_safe(name)
    assert sanitize(name) == name


@settings(max_examples=300)
@given(st.lists(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40), max_size=6),
       st.text(max_size=20))
def test_any_url_path_names_one_safe_component(segments, query):
    from urllib.parse import quote

    url = "http://h/" + "/".join(quote(s, safe="") for s in segments) + "?" + quote(query)
    assert_safe(name_for(url))


@settings(max_examples=200)
@given(st.text(max_size=200))
def test_any_content_disposition_gives_a_safe_name(value):
    name = disposition_name("attachment; filename=" + value)
    assert name is None or (assert_safe(name) is None)


@settings(max_examples=100)
@given(st.lists(st.tuples(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=30), st.booleans()),
                min_size=1, max_size=20))
def test_one_pass_spools_distinct_urls_with_names_and_digests(items):
    """The producer reads the list once: every distinct URL in order, its name, its first digest; replayable."""
    import tempfile
    from pathlib import Path
    from urllib.parse import quote

    from producer.urls import read

    lines = [f"http://h{i % 3}.test/{quote(seg, safe='')}" + (f"  sha256={'Ab' * 32}" if digest else "")
             for i, (seg, digest) in enumerate(items)]
    first_digest: dict[str, str | None] = {}
    for line in lines:
        url, *rest = line.split()
        first_digest.setdefault(url, rest[0].removeprefix("sha256=").lower() if rest else None)
    names = NameAllocator()
    expected = [(i, url, names.allocate(url), d) for i, (url, d) in enumerate(first_digest.items())]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "urls.txt")
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        with read(path, "urls.txt") as spool:
            entries = list(spool.replay())
            assert [(e.index, e.url, e.name, e.sha256) for e in entries] == expected
            assert list(spool.replay()) == entries


_segments = st.text(alphabet="fFaé.- ", min_size=0, max_size=6)


@settings(max_examples=300)
@given(st.lists(st.tuples(st.sampled_from(["A", "B", "C"]), _segments, st.integers(0, 3)), min_size=1, max_size=12),
       st.randoms(use_true_random=False))
def test_no_two_urls_of_a_list_share_a_name_even_with_crafted_hashed_names(items, rnd):
    """Lists that hold other URLs' hashed candidate names as plain names, in any order: names stay distinct
    under case folding, and every one is accepted by the worker's check."""
    urls = []
    for folder, segment, crafted in items:
        url = f"http://h/{folder}/{quote(segment, safe='')}"
        urls.append(url)
        if urls and crafted:
            victim = rnd.choice(urls)
            made = list(itertools.islice(candidates(name_for(victim), victim), crafted + 1))[-1]
            urls.append(f"http://h/{folder}{crafted}/{quote(made, safe='')}")
    rnd.shuffle(urls)
    urls = list(dict.fromkeys(urls))
    alloc = NameAllocator()
    names = [alloc.allocate(u) for u in urls]
    assert len({collision_key(n) for n in names}) == len(urls)
    for n in names:
        assert_safe(n)
    again = NameAllocator()
    assert [again.allocate(u) for u in urls] == names  # deterministic


@settings(max_examples=300)
@given(st.text(max_size=400), st.text(max_size=40))
def test_every_candidate_name_is_accepted_by_the_worker(raw, url):
    for name in itertools.islice(candidates(sanitize(raw), url), 4):
        assert_safe(name)

"""A big file's ranges as pure data (tasks/ranges.py): planning, the map of complete bytes, range answers."""

from __future__ import annotations

import pytest
import requests

from tasks.ranges import MIN_PIECE, PIECE, RangeMap, contiguous, merge, plan, range_problem

pytestmark = pytest.mark.fast


def answer(status: int, headers: dict[str, str]) -> requests.Response:
    r = requests.Response()
    r.status_code = status
    r.headers.update(headers)
    return r


def test_merge_joins_touching_and_overlapping_ranges_and_drops_empty_ones():
    assert merge([[5, 9], [0, 2], [2, 4], [8, 12], [20, 20]]) == [[0, 4], [5, 12]]


def test_contiguous_stops_at_the_first_hole_and_at_the_size():
    assert contiguous([[0, 4], [5, 9]], 100) == 4
    assert contiguous([[4, 9], [0, 4]], 100) == 9
    assert contiguous([[1, 9]], 100) == 0
    assert contiguous([[0, 200]], 100) == 100


def test_a_plan_covers_what_is_missing_once_in_pieces_of_bounded_size():
    kept = RangeMap("u", 96 << 20, '"v"', [[0, 1 << 20], [30 << 20, 31 << 20]])
    missing = kept.missing()
    for count in (2, 8, 16):
        pieces = plan(missing, count)
        assert merge([[p.start, p.end] for p in pieces]) == [list(m) for m in missing]
        assert sum(p.end - p.start for p in pieces) == sum(b - a for a, b in missing)
        assert all(p.end - p.start <= PIECE for p in pieces)
        assert all(p.end - p.start >= MIN_PIECE // 2 for p in pieces)


def test_only_the_exact_range_of_the_same_file_is_accepted():
    ok = {"Content-Range": "bytes 10-19/100", "ETag": '"a"'}
    assert range_problem(answer(206, ok), 10, 20, 100, '"a"') is None
    assert "200 to a range" in range_problem(answer(200, {}), 10, 20, 100, '"a"')
    assert "Content-Range" in range_problem(answer(206, {**ok, "Content-Range": "bytes 0-9/100"}), 10, 20, 100, '"a"')
    assert "changed" in range_problem(answer(206, {**ok, "ETag": '"b"'}), 10, 20, 100, '"a"')


def test_only_a_big_identity_body_with_byte_ranges_and_a_validator_is_split():
    from tasks.ranges import splittable

    big = {"Content-Length": str(30 << 20), "Accept-Ranges": "bytes", "ETag": '"e"'}
    assert splittable(answer(200, big), 8, 20 << 20) == 30 << 20
    assert splittable(answer(200, big), 1, 20 << 20) is None  # --split 1
    assert splittable(answer(200, big), 8, 40 << 20) is None  # under --min-split-size
    assert splittable(answer(200, {**big, "Accept-Ranges": "none"}), 8, 1) is None
    assert splittable(answer(200, {**big, "Content-Encoding": "gzip"}), 8, 1) is None
    assert splittable(answer(200, {k: v for k, v in big.items() if k != "ETag"}), 8, 1) is None
    assert splittable(answer(206, big), 8, 1) is None

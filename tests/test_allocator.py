"""Whole-GPU preferred allocation: NVIDIA's DGX-1 answers, brute-force exactness, invariants."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from itertools import combinations
from math import comb

import builders
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deviceplugin import allocator
from deviceplugin.allocator import (
    MAX_EXACT_GPUS,
    Allocator,
    packing_table,
    pair_score,
    subset_scores,
)
from gpus.model import GPU, Link, Snapshot, SystemInfo, TopologyLevel

# nvidia-compat.md: DGX-1 (8 x V100, hybrid cube-mesh) NVLink counts per pair.
DGX1_NVLINKS = (
    "0-1:1 0-2:1 0-3:2 0-4:2 1-2:2 1-3:1 1-5:2 2-3:2 2-6:1 3-7:1 "
    "4-5:1 4-6:1 4-7:2 5-6:2 5-7:1 6-7:2"
)
LEVELS = list(TopologyLevel)


def dgx1_links() -> tuple[tuple[Link, ...], ...]:
    """Switch pairs 0-1, 2-3, 4-5, 6-7; host bridge within a half; cross-CPU across."""
    nvlinks = {}
    for token in DGX1_NVLINKS.split():
        pair, count = token.split(":")
        a, b = (int(x) for x in pair.split("-"))
        nvlinks[a, b] = nvlinks[b, a] = int(count)

    def level(i: int, j: int) -> TopologyLevel:
        if i == j:
            return TopologyLevel.INTERNAL
        if i // 2 == j // 2:
            return TopologyLevel.SINGLE
        if i // 4 == j // 4:
            return TopologyLevel.HOSTBRIDGE
        return TopologyLevel.SYSTEM

    return tuple(
        tuple(Link(level(i, j), nvlinks.get((i, j), 0)) for j in range(8)) for i in range(8)
    )


def make_gpu(index: int) -> GPU:
    """A DGX-1 V100 (PCI buses from 06)."""
    return builders.gpu(index, uuid=f"GPU-{index:08x}-0000-0000-0000-000000000000",
                        name="Tesla V100-SXM2-16GB", memory_bytes=16 * builders.GIB,
                        compute_capability=(7, 0), architecture="volta", brand="Tesla",
                        bus=index + 6)


def dgx1_snapshot() -> Snapshot:
    gpus = tuple(make_gpu(i) for i in range(8))
    return builders.snapshot(*gpus, links=dgx1_links())


@pytest.fixture(scope="module")
def dgx1() -> Allocator:
    return Allocator.from_snapshot(dgx1_snapshot())


def uuids(positions: Sequence[int]) -> list[str]:
    return [make_gpu(i).uuid for i in positions]


ALL = tuple(range(8))


# (available, must include, size, expected), straight from nvidia-compat.md.
DGX1_CASES = [
    ((0, 2, 4, 5), (), 2, (4, 5)),
    ((0, 4, 5, 6), (), 2, (5, 6)),
    ((0, 1, 3), (), 2, (0, 3)),
    ((0, 1, 4), (), 2, (0, 4)),
    (ALL, (4,), 1, (4,)),
    (ALL, (4,), 2, (4, 7)),
    (ALL, (4,), 4, (4, 5, 6, 7)),
    (ALL, (0, 2, 4, 6), 4, (0, 2, 4, 6)),
    ((1, 2, 3, 4, 5, 6, 7), (0, 1, 2, 3), 4, ()),
    (ALL, (1, 2, 3, 4, 5, 6), 4, ()),
    ((1, 2, 3, 4, 5), (1, 2, 3, 4, 5, 6), 1, ()),
]


@pytest.mark.parametrize(("available", "must", "size", "expected"), DGX1_CASES)
def test_dgx1_matches_nvidia(dgx1: Allocator, available: tuple[int, ...], must: tuple[int, ...],
                             size: int, expected: tuple[int, ...]) -> None:
    assert dgx1.preferred(uuids(available), uuids(must), size) == uuids(expected)


def test_pair_scores() -> None:
    assert pair_score(Link(TopologyLevel.SYSTEM)) == 10
    assert pair_score(Link(TopologyLevel.NODE)) == 20
    assert pair_score(Link(TopologyLevel.HOSTBRIDGE)) == 30
    assert pair_score(Link(TopologyLevel.MULTIPLE)) == 40
    assert pair_score(Link(TopologyLevel.SINGLE)) == 50
    assert pair_score(Link(TopologyLevel.INTERNAL, 0)) == 60
    assert pair_score(Link(TopologyLevel.SYSTEM, 2)) == 210


def test_from_snapshot_scores(dgx1: Allocator) -> None:
    assert dgx1.ids == tuple(uuids(ALL))
    assert dgx1.score(uuids((0, 3))) == 230  # host bridge + 2 NVLinks
    assert dgx1.score(uuids((4, 5, 6))) == 150 + 130 + 230


def test_snapshot_without_links_prefers_lowest_positions() -> None:
    snap = Snapshot(SystemInfo("1", 1), gpus=tuple(make_gpu(i) for i in range(4)))
    alloc = Allocator.from_snapshot(snap)
    assert alloc.preferred(uuids((3, 1, 2)), [], 2) == uuids((1, 2))


def test_empty_node() -> None:
    alloc = Allocator.from_snapshot(Snapshot(SystemInfo("1", 1)))
    assert alloc.preferred([], [], 1) == []


@pytest.mark.parametrize(
    ("available", "must", "size"),
    [
        (["a", "b"], [], 0),
        (["a", "b"], [], -1),
        (["a", "b"], [], 3),
        (["a", "b", "zzz"], [], 1),  # unknown id
        (["a", "b"], ["zzz"], 1),
        (["a", "b"], ["c"], 1),  # known but not available
        (["a", "b", "c"], ["a", "b"], 1),
    ],
)
def test_impossible_requests_are_empty_and_logged(caplog: pytest.LogCaptureFixture,
                                                  available: list[str], must: list[str],
                                                  size: int) -> None:
    alloc = Allocator(["a", "b", "c"], [[0, 1, 2], [1, 0, 3], [2, 3, 0]])
    with caplog.at_level(logging.WARNING, logger="deviceplugin.allocator"):
        assert alloc.preferred(available, must, size) == []
    assert "preferred allocation" in caplog.text


def test_duplicates_in_request_are_ignored() -> None:
    alloc = Allocator(["a", "b", "c"], [[0, 1, 9], [1, 0, 3], [9, 3, 0]])
    assert alloc.preferred(["c", "a", "a", "b"], ["a", "a"], 2) == ["a", "c"]


@pytest.mark.parametrize(
    ("ids", "scores", "message"),
    [
        (["a", "a"], [[0, 1], [1, 0]], "duplicate"),
        (["a", "b"], [[0, 1]], "matrix"),
        (["a", "b"], [[0, 1], [2, 0]], "symmetric"),
        (["a", "b"], [[0, -1], [-1, 0]], "negative"),
    ],
)
def test_bad_topology_is_rejected(ids: list[str], scores: list[list[int]], message: str) -> None:
    original = [list(row) for row in scores]
    with pytest.raises(ValueError, match=message):
        Allocator(ids, scores)
    assert scores == original  # the caller's matrix is untouched


def test_lazy_tables_are_built_once_and_reported() -> None:
    n = 14  # above the eager threshold
    alloc = Allocator(
        [str(i) for i in range(n)], [[(i + j) % 7 for j in range(n)] for i in range(n)]
    )
    assert alloc.stats().sizes_built == ()
    first = alloc.preferred([str(i) for i in range(n)], [], 3)
    assert alloc.stats().sizes_built == (3,)
    assert alloc.preferred([str(i) for i in range(n)], [], 3) == first
    alloc.warm([2])
    stats = alloc.stats()
    assert stats.sizes_built == (2, 3)
    # Subset scores and two packing tables, plus each size's best-first order of its k-sets.
    assert stats.exact and stats.table_bytes == 3 * 4 * (1 << n) + 4 * (comb(n, 2) + comb(n, 3))


def test_beyond_exact_limit_stays_valid(caplog: pytest.LogCaptureFixture) -> None:
    n = MAX_EXACT_GPUS + 1
    scores = [[0 if i == j else 10 + 100 * (i // 4 == j // 4) for j in range(n)] for i in range(n)]
    with caplog.at_level(logging.WARNING, logger="deviceplugin.allocator"):
        alloc = Allocator([f"g{i}" for i in range(n)], scores)
    assert "greedy" in caplog.text
    assert not alloc.stats().exact
    assert alloc.preferred([f"g{i}" for i in range(n)], ["g5"], 4) == ["g4", "g5", "g6", "g7"]


# --- brute force -------------------------------------------------------------------------


def brute_pack(items: tuple[int, ...], size: int, leftover: int, w: list[list[int]]) -> int:
    """Best packing of ``items`` into groups of ``size`` plus one group of ``leftover``.

    Plain enumeration of partitions by the group holding the lowest item.
    """
    if not items:
        return 0
    first, rest = items[0], items[1:]
    best = -1
    group_sizes = [size] if len(items) >= size else []
    if leftover:
        group_sizes.append(leftover)
    for g in group_sizes:
        for others in combinations(rest, g - 1):
            group = (first, *others)
            remaining = tuple(x for x in rest if x not in others)
            still_left = 0 if g == leftover else leftover  # g < size: it was the leftover
            score = set_score(group, w) + brute_pack(remaining, size, still_left, w)
            best = max(best, score)
    return best


def set_score(group: Sequence[int], w: list[list[int]]) -> int:
    return sum(w[a][b] for a, b in combinations(group, 2))


def brute_force(
    available: Sequence[int], must: Sequence[int], size: int, w: list[list[int]]
) -> tuple[tuple[int, ...], int]:
    """(best set, its objective): max objective, then max score(S), then smallest positions."""
    avail = sorted(set(available))
    best_key: tuple[int, int, tuple[int, ...]] | None = None
    for combo in combinations(avail, size):
        if not set(must) <= set(combo):
            continue
        rest = tuple(x for x in avail if x not in combo)
        total = set_score(combo, w) + brute_pack(rest, size, len(rest) % size, w)
        # Compare (objective, score) descending, positions ascending.
        key = (-total, -set_score(combo, w), combo)
        if best_key is None or key < best_key:
            best_key = key
    assert best_key is not None
    return best_key[2], -best_key[0]


@st.composite
def topologies(draw: st.DrawFn, max_gpus: int = 12, min_gpus: int = 2) -> list[list[int]]:
    n = draw(st.integers(min_gpus, max_gpus))
    # Half the topologies use two levels and no NVLink, so ties (and their rule) are common.
    levels = LEVELS if draw(st.booleans()) else LEVELS[-2:]
    max_nvlinks = draw(st.sampled_from([0, 3]))
    w = [[0] * n for _ in range(n)]
    for i in range(n):
        for j in range(i + 1, n):
            link = Link(draw(st.sampled_from(levels)), draw(st.integers(0, max_nvlinks)))
            w[i][j] = w[j][i] = pair_score(link)
    return w


Request = tuple[list[list[int]], list[int], list[int], int]


@st.composite
def requests(draw: st.DrawFn, min_available: int = 1, max_available: int = 10) -> Request:
    """A topology of up to 12 GPUs and a request over ``min_available..max_available`` of them.

    The brute force grows fast with the available count (about 0.3 s per request at 12), so
    the large cases get their own test with fewer examples.
    """
    w = draw(topologies(min_gpus=min_available))
    n = len(w)
    available = draw(
        st.lists(
            st.integers(0, n - 1),
            min_size=min_available,
            max_size=min(n, max_available),
            unique=True,
        )
    )
    size = draw(st.integers(1, len(available)))
    must = draw(st.lists(st.sampled_from(available), max_size=min(size, 3), unique=True))
    return w, available, must, size


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests())
def test_matches_brute_force(request: Request) -> None:
    check_against_brute_force(request)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests(min_available=11, max_available=12))
def test_matches_brute_force_up_to_12_available(request: Request) -> None:
    check_against_brute_force(request)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests(min_available=5, max_available=10))
def test_walk_and_scan_both_match_brute_force(request: Request) -> None:
    """Both query paths (best-first walk, full scan) are exact whichever the request picks."""
    original = allocator.SCAN_RATIO
    try:
        for ratio in (0, 10**9):  # 0: always scan; huge: always walk
            allocator.SCAN_RATIO = ratio
            check_against_brute_force(request)
    finally:
        allocator.SCAN_RATIO = original


def check_against_brute_force(request: Request) -> None:
    """The allocator's answer is the brute force's: same objective, same set (tie rule)."""
    w, available, must, size = request
    ids = [f"g{i}" for i in range(len(w))]
    alloc = Allocator(ids, w)
    got = alloc.preferred([ids[i] for i in available], [ids[i] for i in must], size)
    expected_set, expected_total = brute_force(available, must, size, w)
    got_positions = tuple(ids.index(g) for g in got)
    rest = tuple(sorted(set(available) - set(got_positions)))
    got_total = set_score(got_positions, w) + brute_pack(rest, size, len(rest) % size, w)
    assert got_total == expected_total
    assert got_positions == expected_set


@settings(max_examples=40, deadline=None)
@given(topologies(max_gpus=9), st.integers(2, 4))
def test_packing_table_matches_brute_force(w: list[list[int]], size: int) -> None:
    n = len(w)
    table = packing_table(subset_scores(w), n, size)
    for mask in range(1 << n):
        items = tuple(i for i in range(n) if mask >> i & 1)
        if len(items) <= n - size:  # the sizes the allocator looks up
            assert table[mask] == brute_pack(items, size, len(items) % size, w), items


@settings(max_examples=150, deadline=None)
@given(
    topologies(max_gpus=16),
    st.data(),
)
def test_invariants(w: list[list[int]], data: st.DataObject) -> None:
    n = len(w)
    ids = [f"g{i}" for i in range(n)]
    alloc = Allocator(ids, w)
    available = data.draw(st.lists(st.sampled_from(ids), max_size=n, unique=True))
    must = data.draw(st.lists(st.sampled_from(ids), max_size=4, unique=True))
    size = data.draw(st.integers(-1, n + 1))
    got = alloc.preferred(available, must, size)
    possible = 0 < size <= len(available) and set(must) <= set(available) and len(must) <= size
    if not possible:
        assert got == []
        return
    assert len(got) == size == len(set(got))
    assert set(must) <= set(got) <= set(available)
    assert got == sorted(got, key=ids.index)

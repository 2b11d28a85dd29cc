"""deviceplugin.allocator guards that mutation testing found unprotected (docs/testing.md)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from math import comb

import builders
import pytest
from test_allocator_shared import mig as shared_mig
from test_allocator_shared import replica
from test_resources import make_gpu

from deviceplugin import allocator
from deviceplugin.allocator import Allocator
from deviceplugin.rm import NodeManagers
from deviceplugin.shared_policy import preferred_shared
from gpus.config import Config
from gpus.model import Snapshot
from gpus.resources import Device


def no_topology(count: int) -> Snapshot:
    return builders.snapshot(*(make_gpu(i) for i in range(count)))


@pytest.mark.parametrize("count", [1, 2, 3])
def test_no_topology_scores_every_pair_zero_and_says_so_once(
        count: int, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="deviceplugin.allocator"):
        alloc = Allocator.from_snapshot(no_topology(count))
    warnings = [r.getMessage() for r in caplog.records]
    # A single GPU has no pairs: nothing is missing.
    assert warnings == ([] if count == 1 else
                        [f"no topology for {count} GPUs: every pair scores the same"])
    assert alloc.score(alloc.ids) == 0
    assert alloc.preferred(alloc.ids, [], 1) == list(alloc.ids[:1])


def test_stats_count_the_gpus() -> None:
    stats = Allocator.from_snapshot(no_topology(3)).stats()
    assert (stats.gpus, stats.exact) == (3, True)


# --- preferred_shared (deviceplugin/shared_policy.py) ------------------------------------------


def mig_with_uuid(gpu: int, index: int, uuid: str) -> Device:
    return dataclasses.replace(shared_mig(gpu, index), id=uuid, uuid=uuid)


def test_the_default_policy_is_distributed_and_silent(caplog: pytest.LogCaptureFixture) -> None:
    available = [replica(0, 0), replica(1, 0)]
    with caplog.at_level("WARNING", logger="deviceplugin.shared_policy"):
        assert preferred_shared(available, [], 2) == ["GPU-0::0", "GPU-1::0"]
    assert caplog.records == []


def test_unknown_policy_and_impossible_requests_are_logged_whole(
        caplog: pytest.LogCaptureFixture) -> None:
    available = [replica(0, 0), replica(1, 0)]
    with caplog.at_level("WARNING", logger="deviceplugin.shared_policy"):
        assert preferred_shared(available, [], 2, policy="spread") == ["GPU-0::0", "GPU-1::0"]
        assert preferred_shared(available, ["GPU-1::0"], 0) == []
        assert preferred_shared(available, [], 0) == []
    assert [r.getMessage() for r in caplog.records] == [
        "unknown allocation policy 'spread'; using distributed",
        "preferred allocation impossible: allocation size 0 is not positive "
        "(available=['GPU-0::0', 'GPU-1::0'] must_include=['GPU-1::0'])",
        "preferred allocation impossible: allocation size 0 is not positive "
        "(available=['GPU-0::0', 'GPU-1::0'] must_include=[])",
    ]


def test_replicas_go_by_number_not_by_id_text() -> None:
    # "GPU-0::10" sorts before "GPU-0::9" as text.
    assert preferred_shared([replica(0, 10), replica(0, 9)], [], 1) == ["GPU-0::9"]


def test_mig_devices_go_by_index_not_by_uuid() -> None:
    available = [mig_with_uuid(0, 1, "MIG-a"), mig_with_uuid(0, 0, "MIG-b")]
    assert preferred_shared(available, [], 1) == ["MIG-b"]
    assert preferred_shared(available, [], 1, policy="packed") == ["MIG-b"]


def test_must_include_devices_add_to_what_their_gpu_has_in_use() -> None:
    # Both GPUs have 2 in use; taking GPU 0's replica makes it 3, so the next goes to GPU 1.
    available = [replica(0, 2), replica(0, 3), replica(1, 2), replica(1, 3)]
    counts = {"GPU-0": 2, "GPU-1": 2}
    assert preferred_shared(available, ["GPU-0::2"], 2, allocated_counts=counts) == [
        "GPU-0::2", "GPU-1::2"]


def test_a_gpu_missing_from_the_counts_has_nothing_in_use() -> None:
    available = [replica(0, 1), replica(1, 0)]
    assert preferred_shared(available, [], 1, allocated_counts={"GPU-0": 1}) == ["GPU-1::0"]
    assert preferred_shared(available, [], 1, policy="packed",
                            allocated_counts={"GPU-0": 1}) == ["GPU-0::1"]


# --- tables ----------------------------------------------------------------------------------


def ring(count: int) -> list[list[int]]:
    """Pair scores that differ by distance on a ring, so no two sets tie by accident."""
    return [[0 if i == j else 10 * (count - min(abs(i - j), count - abs(i - j)))
             for j in range(count)] for i in range(count)]


def test_only_sizes_below_half_the_node_get_a_packing_table() -> None:
    # With 2k >= n the rest of a request fits in one group: pack is the score table itself.
    alloc = Allocator([f"g{i}" for i in range(8)], ring(8))
    assert alloc.stats().sizes_built == (2, 3)


@pytest.mark.parametrize(("count", "size"), [(6, 2), (8, 2), (8, 3), (9, 2), (9, 4), (10, 3)])
def test_packing_steps_counts_the_groups_packing_table_examines(
        count: int, size: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # The constructor decides from this cost model which tables to build eagerly.
    examined = [0]
    real_split = allocator._best_split

    def counting_split(subset: int, low: int, rest: tuple[int, ...], partners: int,
                       set_score: Callable[[int], int], packed: Callable[[int], int]) -> int:
        examined[0] += comb(len(rest), partners)
        return real_split(subset, low, rest, partners, set_score, packed)

    monkeypatch.setattr(allocator, "_best_split", counting_split)
    allocator.packing_table(allocator.subset_scores(ring(count)), count, size)
    assert allocator.packing_steps(count, size) == examined[0]


# --- the allocator's own refusals, for callers that use it directly (the bench, tools) -----------

def test_unknown_devices_are_refused_and_named_once_each_sorted(
        caplog: pytest.LogCaptureFixture) -> None:
    alloc = Allocator.from_snapshot(no_topology(2))
    caplog.clear()  # the construction's "no topology" warning
    with caplog.at_level("WARNING", logger="deviceplugin.allocator"):
        chosen = alloc.preferred([alloc.ids[0], "stale-b", "stale-b"], ["stale-a"], 1)
    assert chosen == []
    assert [r.getMessage() for r in caplog.records] == [
        "preferred allocation: unknown devices ['stale-a', 'stale-b']"]


def test_an_impossible_request_says_why_and_what_was_offered(
        caplog: pytest.LogCaptureFixture) -> None:
    alloc = Allocator.from_snapshot(no_topology(2))
    first, second = alloc.ids
    caplog.clear()
    with caplog.at_level("WARNING", logger="deviceplugin.allocator"):
        chosen = alloc.preferred([first], [second], 1)
    assert chosen == []
    assert [r.getMessage() for r in caplog.records] == [
        f"preferred allocation impossible: must-include devices not available: {second} "
        f"(available=['{first}'] must_include=['{second}'])"]


# --- warm(): what an eager allocator has ready, and what warming builds ---------------------------

def eight_gpus() -> Allocator:
    """Eight GPUs with uneven pair scores: few enough that the constructor warms every size."""
    n = 8
    return Allocator([str(i) for i in range(n)],
                     [[0 if i == j else (i + j) % 5 for j in range(n)] for i in range(n)])


def test_an_eager_allocator_has_every_free_node_answer_ready() -> None:
    alloc = eight_gpus()
    built = alloc.stats()
    # Subset scores and the packing tables of sizes 2 and 3 (a larger size's rest fits in one
    # group), plus the best-first order of the k-sets of each size 2..7: sizes 1 and 8 (the
    # whole node) are answered without one.
    assert built.sizes_built == (2, 3)
    assert built.table_bytes == 4 * 3 * (1 << 8) + 4 * sum(comb(8, k) for k in range(2, 8))
    # The free node's request of each size (the one a node without allocations always sends)
    # is answered without building anything more: warm() in the constructor did it all.
    for size in range(1, 9):
        assert len(alloc.preferred(alloc.ids, [], size)) == size
    assert alloc.stats() == built


def test_warming_sizes_that_need_no_table_builds_nothing() -> None:
    alloc = eight_gpus()
    built = alloc.stats()
    # Size 1 and the whole node are answered directly; 0 and 9 are no request at all.
    alloc.warm([0, 1, 8, 9])
    assert alloc.stats() == built


def test_only_exact_allocators_too_big_to_build_at_once_are_warmed_later() -> None:
    # 13..16 GPUs: tables left to a background warm-up; beyond 16 the allocator is greedy
    # and has no tables, so the plugin must not start a warm-up for it.
    assert [allocator.lazy_tables(n) for n in (12, 13, 16, 17)] == [False, True, True, False]
    assert NodeManagers.create(Config(), no_topology(17)).warm is None
    assert NodeManagers.create(Config(), no_topology(13)).warm is not None


# --- the exact allocator's limit, and what a greedy one tells the operator -----------------------

def uniform(n: int, score: int = 10) -> Allocator:
    return Allocator([f"g{i}" for i in range(n)],
                     [[0 if i == j else score for j in range(n)] for i in range(n)])


def test_sixteen_gpus_are_still_allocated_exactly(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="deviceplugin.allocator"):
        alloc = uniform(allocator.MAX_EXACT_GPUS)
    assert alloc.stats().exact
    assert caplog.records == []


def test_beyond_sixteen_gpus_the_warning_says_greedy_and_why(
        caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="deviceplugin.allocator"):
        alloc = uniform(17)
    assert not alloc.stats().exact
    assert [r.getMessage() for r in caplog.records] == [
        "17 GPUs exceed the exact allocator's limit of 16: preferred allocations will be "
        "greedy (best-connected set, packing of the rest ignored)"]


# --- answers: must-include devices on a free node, and a full answer cache ------------------------

def test_a_must_include_device_on_a_free_node_is_in_the_answer() -> None:
    # GPUs 1 and 2 are the best pair: the free node's answer of size 2. Requiring GPU 0 on
    # the same free node must not reuse that answer.
    scores = [[0, 1, 1, 1], [1, 0, 50, 1], [1, 50, 0, 1], [1, 1, 1, 0]]
    alloc = Allocator(["g0", "g1", "g2", "g3"], scores)
    assert alloc.preferred(alloc.ids, [], 2) == ["g1", "g2"]
    for must in ("g0", "g3"):
        chosen = alloc.preferred(alloc.ids, [must], 2)
        assert must in chosen and len(chosen) == 2


def test_more_distinct_requests_than_the_answer_cache_holds_are_all_answered() -> None:
    alloc = eight_gpus()
    ids = alloc.ids
    # Every (available set of 5 or more, size 3) request: 219 sets x a few sizes, well past
    # the cache's size, so older answers are evicted on the way.
    asked = 0
    for mask in range(1, 1 << 8):
        available = [ids[i] for i in range(8) if mask >> i & 1]
        for size in (2, 3, 4):
            if len(available) > size:
                chosen = alloc.preferred(available, [], size)
                assert len(chosen) == size and set(chosen) <= set(available)
                asked += 1
    assert asked > allocator.RESULT_CACHE_SIZE
    # Evicted answers are computed again, the same.
    assert alloc.preferred(list(ids[:5]), [], 2) == alloc.preferred(list(ids[:5]), [], 2)


# --- the score matrix: what is checked, and what each refusal names ------------------------------

def test_duplicate_ids_name_each_duplicate_once() -> None:
    with pytest.raises(ValueError) as refused:
        Allocator(["a", "b", "a", "c", "c", "c"], [[0] * 6 for _ in range(6)])
    assert str(refused.value) == "duplicate device ids: ['a', 'c']"


@pytest.mark.parametrize(("pair", "text"), [
    ((0, 1), "scores are not symmetric at (0, 1)"),
    ((0, 2), "scores are not symmetric at (0, 2)"),
    ((1, 2), "scores are not symmetric at (1, 2)"),
])
def test_an_asymmetric_matrix_names_the_pair_upper_first(pair: tuple[int, int], text: str
                                                          ) -> None:
    scores = [[0, 1, 1], [1, 0, 1], [1, 1, 0]]
    scores[pair[0]][pair[1]] = 7
    with pytest.raises(ValueError) as refused:
        Allocator(["a", "b", "c"], scores)
    assert str(refused.value) == text


def test_a_negative_score_names_its_pair_upper_first() -> None:
    with pytest.raises(ValueError) as refused:
        Allocator(["a", "b", "c"], [[0, 1, 1], [1, 0, -3], [1, -3, 0]])
    assert str(refused.value) == "negative score at (1, 2)"


@pytest.mark.parametrize("diagonal", [1, 5, 2**40])
def test_the_diagonal_is_ignored(diagonal: int) -> None:
    # A pair score of 2**31 - 1 still fits the 4-byte subset-score table, however large the
    # diagonal the caller passed: it is set to 0 before anything is sized from it.
    top = 2**31 - 1
    alloc = Allocator(["a", "b"], [[diagonal, top], [top, diagonal]])
    assert alloc.stats().table_bytes == 4 * 4
    assert alloc.score(["a", "b"]) == top


@pytest.mark.parametrize(("pair_score", "entry_bytes"), [(2**31 - 1, 4), (2**31, 8), (2**40, 8)])
def test_subset_scores_get_entries_wide_enough_for_the_largest(pair_score: int, entry_bytes: int
                                                               ) -> None:
    # The table's entry width follows the largest subset score (a pair score here): past
    # 2**31 - 1 it takes 8-byte entries instead of overflowing.
    alloc = Allocator(["a", "b"], [[0, pair_score], [pair_score, 0]])
    assert alloc.score(["a", "b"]) == pair_score
    assert alloc.stats().table_bytes == 4 * entry_bytes  # the four subsets of two GPUs


def test_every_missing_must_include_device_is_listed() -> None:
    assert allocator.impossible_request(3, ["x", "y"], 2, {"a", "b", "c"}) == (
        "must-include devices not available: x, y")

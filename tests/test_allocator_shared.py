"""Preferred allocation of time-slicing replicas and MIG devices: distributed and packed."""

from __future__ import annotations

import logging

import builders
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deviceplugin.shared_policy import device_order, preferred_shared, preferred_shared_ordered
from gpus.model import GPU
from gpus.resources import Device


def make_gpu(index: int) -> GPU:
    return builders.gpu(index, bus=index + 7)


GPUS = [make_gpu(i) for i in range(3)]


def replica(gpu: int, n: int) -> Device:
    """Replica ``n`` of GPU ``gpu``: id ``GPU-<gpu>::<n>``."""
    g = GPUS[gpu]
    return Device(id=f"{g.uuid}::{n}", uuid=g.uuid, gpu=g, replica=n)


def mig(gpu: int, index: int) -> Device:
    g = GPUS[gpu]
    device = builders.mig_device(gpu, index, parent_uuid=g.uuid)
    return Device(id=device.uuid, uuid=device.uuid, gpu=g, mig=device)


def ids(devices: list[Device]) -> list[str]:
    return [d.id for d in devices]


def r(gpu: int, n: int) -> str:
    return f"GPU-{gpu}::{n}"


FRESH = [replica(g, n) for g in (0, 1) for n in range(4)]
# GPU 0 has replicas 0 and 1 in use (not offered by the kubelet); GPU 1 is untouched.
GPU0_BUSY = [replica(0, 2), replica(0, 3)] + [replica(1, n) for n in range(4)]
# Three parents with 2, 3 and 1 free MIG devices (in the kubelet's shuffled order).
MIGS = [mig(1, 2), mig(0, 1), mig(2, 0), mig(1, 0), mig(0, 0), mig(1, 1)]

# (name, available, must include, size, policy, allocated counts, expected)
CASES = [
    ("fresh spread", FRESH, [], 2, "distributed", None, [r(0, 0), r(1, 0)]),
    ("fresh spread 3", FRESH, [], 3, "distributed", None, [r(0, 0), r(1, 0), r(0, 1)]),
    ("fresh pack", FRESH, [], 2, "packed", None, [r(0, 0), r(0, 1)]),
    (
        "fresh pack spills",
        FRESH,
        [],
        5,
        "packed",
        None,
        [r(0, 0), r(0, 1), r(0, 2), r(0, 3), r(1, 0)],
    ),
    ("busy gpu avoided", GPU0_BUSY, [], 2, "distributed", None, [r(1, 0), r(1, 1)]),
    (
        "busy gpu then spread",
        GPU0_BUSY,
        [],
        4,
        "distributed",
        None,
        [r(1, 0), r(1, 1), r(0, 2), r(1, 2)],
    ),
    ("busy gpu filled", GPU0_BUSY, [], 3, "packed", None, [r(0, 2), r(0, 3), r(1, 0)]),
    ("counts override", FRESH, [], 2, "distributed", {"GPU-0": 3, "GPU-1": 0}, [r(1, 0), r(1, 1)]),
    ("counts override packed", FRESH, [], 1, "packed", {"GPU-0": 0, "GPU-1": 2}, [r(1, 0)]),
    (
        "must first, then spread",
        FRESH,
        [r(0, 3)],
        3,
        "distributed",
        None,
        [r(0, 3), r(1, 0), r(0, 0)],
    ),
    ("must first, then pack", FRESH, [r(1, 2)], 3, "packed", None, [r(1, 2), r(1, 0), r(1, 1)]),
    ("must is everything", FRESH, [r(1, 2), r(0, 1)], 2, "packed", None, [r(1, 2), r(0, 1)]),
    ("size > available", GPU0_BUSY, [], 7, "distributed", None, []),
    ("size zero", FRESH, [], 0, "packed", None, []),
    ("must unavailable", GPU0_BUSY, [r(0, 0)], 2, "distributed", None, []),
    ("must exceeds size", FRESH, [r(0, 0), r(0, 1)], 1, "distributed", None, []),
    # In use inferred from free counts 2/3/1: parent 2 is the busiest, parent 1 the idlest.
    ("mig spread", MIGS, [], 3, "distributed", None, ["MIG-1-0", "MIG-0-0", "MIG-1-1"]),
    ("mig pack", MIGS, [], 3, "packed", None, ["MIG-2-0", "MIG-0-0", "MIG-0-1"]),
    ("mig pack whole parent", MIGS, [], 2, "packed", None, ["MIG-2-0", "MIG-0-0"]),
    ("mig must", MIGS, ["MIG-1-2"], 2, "packed", None, ["MIG-1-2", "MIG-2-0"]),
    ("mig must spread", MIGS, ["MIG-2-0"], 2, "distributed", None, ["MIG-2-0", "MIG-1-0"]),
]


@pytest.mark.parametrize(
    ("available", "must", "size", "policy", "counts", "expected"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_shared_policies(available: list[Device], must: list[str], size: int, policy: str,
                         counts: dict[str, int] | None, expected: list[str]) -> None:
    before = list(available)
    assert preferred_shared(available, must, size, policy, counts) == expected
    assert available == before  # the caller's list is untouched


def test_impossible_request_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="deviceplugin.shared_policy"):
        assert preferred_shared(FRESH, [], 9, "packed") == []
    assert "exceeds the 8 available" in caplog.text


def test_unknown_policy_falls_back_to_distributed(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="deviceplugin.shared_policy"):
        got = preferred_shared(FRESH, [], 2, "round-robin")
    assert got == [r(0, 0), r(1, 0)]
    assert "unknown allocation policy" in caplog.text


def test_duplicate_ids_are_ignored() -> None:
    assert preferred_shared(FRESH + FRESH[:2], [r(0, 0), r(0, 0)], 2, "packed") == [
        r(0, 0),
        r(0, 1),
    ]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 2), st.integers(0, 5)), unique=True, max_size=18),
    st.lists(st.integers(0, 6), min_size=3, max_size=3),
    st.data(),
    st.sampled_from(["distributed", "packed"]),
)
def test_shared_invariants(
    slots: list[tuple[int, int]], in_use: list[int], data: st.DataObject, policy: str
) -> None:
    available = [replica(g, n) for g, n in slots]
    all_ids = ids(available)
    must = data.draw(st.lists(st.sampled_from(all_ids), max_size=3, unique=True)) if all_ids else []
    size = data.draw(st.integers(-1, len(available) + 1))
    counts = {f"GPU-{g}": in_use[g] for g in range(3)}
    got = preferred_shared(available, must, size, policy, counts)
    if not (0 < size <= len(available) and len(must) <= size):
        assert got == []
        return
    assert len(got) == size == len(set(got))
    assert got[: len(must)] == must
    assert set(got) <= set(all_ids)
    picked = {g: sum(1 for x in got if x.startswith(f"GPU-{g}::")) for g in range(3)}
    final = {g: in_use[g] + picked[g] for g in range(3)}
    left = {g: sum(1 for s in slots if s[0] == g) - picked[g] for g in range(3)}
    for h in range(3):
        if picked[h] == 0 or (
            policy == "distributed" and picked[h] <= sum(x.startswith(f"GPU-{h}::") for x in must)
        ):
            continue
        for g in range(3):
            if left[g] and g != h:
                if policy == "distributed":
                    # h was the least used when last picked: it ends at most one above g.
                    assert final[h] - 1 <= final[g]
                elif not must:
                    # packed: g was passed over, so it was no busier than h at the time.
                    assert in_use[g] <= final[h] - 1


def reference_preferred_shared(
    available: list[Device],
    must_include: list[str],
    size: int,
    policy: str,
    allocated_counts: dict[str, int] | None,
) -> list[str]:
    """The straightforward version the fast one replaced (sort, lists, a scan per pick)."""
    devices = {d.id: d for d in available}
    must = list(dict.fromkeys(must_include))
    if not (0 < size <= len(devices)) or any(m not in devices for m in must) or len(must) > size:
        return []
    free: dict[str, list[Device]] = {}
    for device in sorted(devices.values(), key=device_order):
        free.setdefault(device.gpu.uuid, []).append(device)
    if allocated_counts is not None:
        in_use = {u: allocated_counts.get(u, 0) for u in free}
    else:
        per_gpu = max(max(len(g), *((d.replica or 0) + 1 for d in g)) for g in free.values())
        in_use = {u: per_gpu - len(g) for u, g in free.items()}
    index = {u: g[0].gpu.index for u, g in free.items()}
    chosen = list(must)
    for device_id in must:
        device = devices[device_id]
        free[device.gpu.uuid].remove(device)
        in_use[device.gpu.uuid] += 1
    sign = -1 if policy == "packed" else 1
    while len(chosen) < size:
        candidates = [u for u, g in free.items() if g]
        uuid = min(candidates, key=lambda u: (sign * in_use[u], index[u], u))
        chosen.append(free[uuid].pop(0).id)
        in_use[uuid] += 1
    return chosen


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("r"), st.integers(0, 2), st.integers(0, 6)),
            st.tuples(st.just("m"), st.integers(0, 2), st.integers(0, 3)),
        ),
        max_size=24,
    ),
    st.one_of(st.none(), st.lists(st.integers(0, 9), min_size=3, max_size=3)),
    st.sampled_from(["distributed", "packed"]),
    st.data(),
)
def test_fast_shared_matches_the_reference(
    slots: list[tuple[str, int, int]],
    in_use: list[int] | None,
    policy: str,
    data: st.DataObject,
) -> None:
    # Replicas and MIG devices mixed, duplicates, any order: the public function and the
    # server's pre-ordered one both answer exactly as the reference does.
    available = [replica(g, n) if kind == "r" else mig(g, n) for kind, g, n in slots]
    all_ids = ids(available)
    must = data.draw(st.lists(st.sampled_from(all_ids), max_size=4)) if all_ids else []
    size = data.draw(st.integers(0, len(set(all_ids)) + 1))
    counts = None if in_use is None else {f"GPU-{g}": in_use[g] for g in range(3)}
    expected = reference_preferred_shared(available, must, size, policy, counts)
    assert preferred_shared(available, must, size, policy, counts) == expected
    ordered = sorted({d.id: d for d in available}.values(), key=device_order)
    assert preferred_shared_ordered(ordered, must, size, policy, counts) == expected

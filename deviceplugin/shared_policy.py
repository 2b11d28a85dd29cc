"""Preferred allocation of shared replicas and MIG devices (pure functions).

NVIDIA's ``distributed`` policy spreads a request over the physical GPUs with the fewest
devices in use; ``packed`` fills the busiest GPU first (:func:`preferred_shared`). Whole,
unshared GPUs go to the topology allocator instead (:mod:`deviceplugin.allocator`).
"""

from __future__ import annotations

import logging
from bisect import bisect_right
from collections.abc import Mapping, Sequence
from heapq import heapify, heappop, heappush
from operator import attrgetter

from deviceplugin.allocator import impossible_request
from gpus.resources import Device

log = logging.getLogger(__name__)

POLICIES: tuple[str, ...] = ("distributed", "packed")


def preferred_shared(
    available: Sequence[Device],
    must_include: Sequence[str],
    size: int,
    policy: str = "distributed",
    allocated_counts: Mapping[str, int] | None = None,
) -> list[str]:
    """Preferred replicas / MIG devices: must-include first, then by ``policy``.

    ``distributed`` picks, one device at a time, from the physical GPU with the fewest devices
    in use (ties: GPU index); ``packed`` from the GPU with the most in use (ties: GPU index),
    which fills one GPU before touching the next. Within a GPU the lowest MIG index / replica
    number goes first, and every pick counts as in use for the next one. (Not "fewest free"
    as the tie-break: on a fresh MIG node that sends a request to every GPU's lone slice in
    turn instead of filling one GPU.)

    In use: ``allocated_counts[gpu uuid]`` when given (the server counts it from the
    resource's full device list); otherwise a guess from what is free: a GPU's devices number
    at least its highest free replica + 1, and the same for every GPU of a resource, so in
    use = that total minus free. The guess is wrong for MIG layouts that differ per GPU.
    Impossible requests return [] and log a warning.
    """
    distinct = {d.id: d for d in available}
    ordered = sorted(distinct.values(), key=device_order)
    return preferred_shared_ordered(ordered, must_include, size, policy, allocated_counts)


def preferred_shared_ordered(
    available: Sequence[Device],
    must_include: Sequence[str],
    size: int,
    policy: str = "distributed",
    allocated_counts: Mapping[str, int] | None = None,
) -> list[str]:
    """:func:`preferred_shared` for ``available`` already distinct and in :func:`device_order`.

    What the server calls: it keeps each resource's devices in that order, so a request of
    8,192 replicas costs no per-device Python work here beyond C-speed passes and the picks
    themselves (sorting them with a Python key took most of the 13.5 ms such a request cost).
    Each GPU's devices are one contiguous run in that order, found by bisection.
    """
    if policy not in POLICIES:
        log.warning("unknown allocation policy %r; using distributed", policy)
        policy = "distributed"
    must = list(dict.fromkeys(must_include))
    # By ID only when must-include devices need finding: the usual request has none.
    devices = dict(zip(map(_device_id, available), available, strict=True)) if must else {}
    problem = impossible_request(len(available), must, size, devices)
    if problem:
        log.warning(
            "preferred allocation impossible: %s (available=%s must_include=%s)",
            problem,
            [d.id for d in available],
            must,
        )
        return []
    free = _gpu_runs(available)
    in_use = _in_use(free, allocated_counts)
    gpu_index = {uuid: group[0].gpu.index for uuid, group in free.items()}
    taken = set(must)
    for device_id in must:
        in_use[devices[device_id].gpu.uuid] += 1
    chosen = list(must)
    picker = _Picker(free, taken)
    # One heap entry per GPU with free devices; only the picked GPU's key changes per pick.
    sign = -1 if policy == "packed" else 1
    heap = [(sign * in_use[u], gpu_index[u], u) for u in free if picker.peek(u) is not None]
    heapify(heap)
    while len(chosen) < size:
        uuid = heappop(heap)[2]
        chosen.append(picker.take(uuid))
        in_use[uuid] += 1
        if picker.peek(uuid) is not None:
            heappush(heap, (sign * in_use[uuid], gpu_index[uuid], uuid))
    return chosen


class _Picker:
    """Each GPU's free devices in order, skipping the must-include ones already chosen."""

    def __init__(self, free: Mapping[str, Sequence[Device]], taken: set[str]) -> None:
        self._free = free
        self._taken = taken
        self._next = dict.fromkeys(free, 0)

    def peek(self, uuid: str) -> str | None:
        """The next free device ID of GPU ``uuid``, or None when it has none left."""
        group, position = self._free[uuid], self._next[uuid]
        while position < len(group) and group[position].id in self._taken:
            position += 1
        self._next[uuid] = position
        return group[position].id if position < len(group) else None

    def take(self, uuid: str) -> str:
        """Take the device :meth:`peek` names (the caller has checked there is one)."""
        device_id = self.peek(uuid)
        assert device_id is not None
        self._next[uuid] += 1
        return device_id


def _gpu_runs(ordered: Sequence[Device]) -> dict[str, Sequence[Device]]:
    """Devices in :func:`device_order` split per physical GPU, found by bisection."""
    runs: dict[str, Sequence[Device]] = {}
    start, end = 0, len(ordered)
    while start < end:
        first = ordered[start]
        stop = bisect_right(ordered, _gpu_key(first), lo=start, key=_gpu_key)
        runs[first.gpu.uuid] = ordered[start:stop]
        start = stop
    return runs


def device_order(device: Device) -> tuple[int, str, int, int, str]:
    """The pick order: GPU index, then MIG index, then replica number (missing first), then id.

    The GPU's UUID after its index keeps each GPU's devices contiguous even if two GPUs
    claimed one index (NVML's indices are unique; the allocator relies on the runs).
    """
    mig = -1 if device.mig is None else device.mig.index
    replica = -1 if device.replica is None else device.replica
    return device.gpu.index, device.gpu.uuid, mig, replica, device.id


_device_id = attrgetter("id")
_gpu_key = attrgetter("gpu.index", "gpu.uuid")


def _in_use(
    free: Mapping[str, Sequence[Device]], allocated_counts: Mapping[str, int] | None
) -> dict[str, int]:
    """Devices in use per physical GPU: the given counts, else the guess (see preferred_shared)."""
    if allocated_counts is not None:
        return {uuid: int(allocated_counts.get(uuid, 0)) for uuid in free}
    per_gpu = max(
        max(len(group), *((d.replica or 0) + 1 for d in group)) for group in free.values()
    )
    return {uuid: per_gpu - len(group) for uuid, group in free.items()}

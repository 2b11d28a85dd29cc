"""Preferred allocation of shared replicas and MIG devices (pure functions).

NVIDIA's ``distributed`` policy spreads a request over the physical GPUs with the fewest
devices in use; ``packed`` fills the busiest GPU first (:func:`preferred_shared`). Whole,
unshared GPUs go to the topology allocator instead (:mod:`deviceplugin.allocator`).
"""

from __future__ import annotations

import logging
from bisect import bisect_right
from collections.abc import Callable, Container, Iterable, Iterator, Mapping, Sequence
from heapq import heapify, heappop, heappush
from itertools import filterfalse
from operator import attrgetter

from deviceplugin.allocator import impossible_request
from gpus.records import record
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

    Each GPU's devices are one contiguous run in that order, found by bisection.
    """
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
    request = SharedRequest(
        runs=[FreeRun(uuid, group[0].gpu.index, map(_device_id, group))
              for uuid, group in free.items()],
        available=len(available),
        offered=devices,
        gpu_of=lambda device_id: devices[device_id].gpu.uuid,
    )
    return preferred_shared_runs(request, must, size, policy, _in_use(free, allocated_counts))


@record
class FreeRun:
    """One physical GPU's free devices in a request, in pick order."""

    uuid: str
    index: int  # the GPU's NVML index: the tie-break between GPUs
    ids: Iterable[str]  # read lazily: only the devices the picks reach are looked at


@record
class SharedRequest:
    """A shared / MIG request as the policy reads it, GPU by GPU.

    The resource manager builds it from its per-resource index without a Python step per
    device: a time-sliced node's request names 8,192 replicas, of which a pick reads a few.
    """

    runs: Sequence[FreeRun]  # the GPUs with free devices, each once
    available: int  # distinct free devices in all
    offered: Container[str]  # the free device IDs (must-include devices must be among them)
    gpu_of: Callable[[str], str]  # the physical GPU UUID of an offered device ID


def preferred_shared_runs(
    request: SharedRequest,
    must_include: Sequence[str],
    size: int,
    policy: str,
    allocated_counts: Mapping[str, int],
) -> list[str]:
    """The policy of :func:`preferred_shared` over ``request``'s GPUs; ``allocated_counts``
    is the devices in use per physical GPU UUID (absent: none). Impossible requests return []
    and log a warning."""
    if policy not in POLICIES:
        log.warning("unknown allocation policy %r; using distributed", policy)
        policy = "distributed"
    must = list(dict.fromkeys(must_include))
    problem = impossible_request(request.available, must, size, request.offered)
    if problem:
        log.warning("preferred allocation impossible: %s (%d available, must_include=%s)",
                    problem, request.available, must)
        return []
    in_use = {run.uuid: int(allocated_counts.get(run.uuid, 0)) for run in request.runs}
    gpu_index = {run.uuid: run.index for run in request.runs}
    for device_id in must:
        in_use[request.gpu_of(device_id)] += 1
    chosen = list(must)
    picker = _Picker({run.uuid: iter(run.ids) for run in request.runs}, set(must))
    # One heap entry per GPU with free devices; only the picked GPU's key changes per pick.
    sign = -1 if policy == "packed" else 1
    heap = [(sign * in_use[u], gpu_index[u], u) for u in gpu_index if picker.peek(u) is not None]
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

    def __init__(self, free: Mapping[str, Iterator[str]], taken: set[str]) -> None:
        self._free = free
        self._taken = taken
        self._next: dict[str, str | None] = {}

    def peek(self, uuid: str) -> str | None:
        """The next free device ID of GPU ``uuid``, or None when it has none left."""
        if uuid not in self._next:
            self._next[uuid] = next(filterfalse(self._taken.__contains__, self._free[uuid]), None)
        return self._next[uuid]

    def take(self, uuid: str) -> str:
        """Take the device :meth:`peek` names (the caller has checked there is one)."""
        device_id = self.peek(uuid)
        assert device_id is not None
        del self._next[uuid]
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

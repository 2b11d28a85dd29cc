"""deviceplugin.rm guards that mutation testing found unprotected (docs/testing.md).

In-process, against :class:`~deviceplugin.rm.GpuResourceManager` with the real shared policy
(or a recording stand-in where the test is about what the policy is handed): the request
bounds and their error texts, the log lines an operator reads when no preferred set is given,
and the preferred sets themselves on time-sliced, MIG and whole-GPU resources.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import builders
import pytest

from deviceplugin.allocate import AllocationError
from deviceplugin.rm import (
    MAX_CONTAINER_REQUESTS,
    MAX_DEVICE_ID_BYTES,
    GpuResourceManager,
    KnownOffer,
    NodeManagers,
    PreferredQuery,
    RequestIndex,
    in_use_counts,
    is_whole_gpu_resource,
)
from deviceplugin.shared_policy import (
    FreeRun,
    SharedRequest,
    preferred_shared,
    preferred_shared_runs,
)
from gpus.config import Config
from gpus.config.enums import AllocationPolicy
from gpus.model import GPU
from gpus.resources import Device, Resource

SHARED = "nvidia.com/gpu.shared"
LOGGER = "deviceplugin.rm"
REFUSED = 'invalid allocation request for "nvidia.com/gpu": invalid request: '


@dataclass(frozen=True)
class Alloc:
    """One container of an Allocate call (:class:`deviceplugin.rm.AllocateRequest`)."""

    devices_ids: Sequence[str]


@dataclass(frozen=True)
class Pref:
    """One container of a GetPreferredAllocation call (``PreferredRequest``)."""

    available_deviceIDs: Sequence[str]
    must_include_deviceIDs: Sequence[str] = ()
    allocation_size: int = 1


@dataclass
class WholeRecorder:
    """The topology allocator's stand-in: records its calls, answers in offered order."""

    calls: list[tuple[list[str], list[str], int]] = field(default_factory=list)

    def preferred(self, available: Sequence[str], must_include: Sequence[str],
                  size: int) -> list[str]:
        self.calls.append((list(available), list(must_include), size))
        return list(dict.fromkeys([*must_include, *available]))[:size]


@dataclass
class SharedRecorder:
    """A shared policy that records what it is handed and answers with ``answer``."""

    answer: list[str]
    requests: list[tuple[list[tuple[str, int, list[str]]], int, list[str], int, str,
                         dict[str, int]]] = field(default_factory=list)

    def __call__(self, request: SharedRequest, must: Sequence[str], size: int, policy: str,
                 in_use: Mapping[str, int]) -> list[str]:
        runs = [(run.uuid, run.index, list(run.ids)) for run in request.runs]
        self.requests.append((runs, request.available, list(must), size, policy, dict(in_use)))
        return self.answer


def gpus(count: int) -> tuple[GPU, ...]:
    return tuple(builders.gpu(i) for i in range(count))


def replicas(gpu_list: Sequence[GPU], n: int, sick: Sequence[int] = ()) -> Resource:
    """``n`` time-slicing replicas of each GPU; the GPUs whose index is in ``sick`` Unhealthy."""
    devices = tuple(Device(f"{g.uuid}::{r}", g.uuid, g, replica=r, healthy=g.index not in sick)
                    for g in gpu_list for r in range(n))
    return Resource(name=SHARED, devices=devices, replicas=n)


def whole(gpu_list: Sequence[GPU]) -> Resource:
    return Resource(name="nvidia.com/gpu", devices=tuple(Device(g.uuid, g.uuid, g)
                                                         for g in gpu_list))


def migs(per_gpu: Sequence[int]) -> Resource:
    """A MIG resource: ``per_gpu[i]`` 1g.5gb devices on GPU ``i``."""
    devices = []
    for i, count in enumerate(per_gpu):
        parts = [builders.mig_device(i, m) for m in range(count)]
        parent = builders.gpu(i, mig_capable=True, migs=parts)
        devices += [Device(m.uuid, m.uuid, parent, mig=m) for m in parts]
    return Resource(name="nvidia.com/mig-1g.5gb", devices=tuple(devices))


def manager(resource: Resource, *, policy: AllocationPolicy = AllocationPolicy.DISTRIBUTED,
            whole_allocator: WholeRecorder | None = None,
            shared: SharedRecorder | None = None) -> GpuResourceManager:
    config = Config()
    config = dataclasses.replace(config, flags=dataclasses.replace(
        config.flags, plugin=dataclasses.replace(config.flags.plugin,
                                                 shared_devices_allocation_policy=policy)))
    managers = NodeManagers(config, builders.snapshot(), whole_allocator or WholeRecorder(),
                            shared=shared or preferred_shared_runs)
    return managers.manager(resource)


def ids(resource: Resource) -> list[str]:
    return [d.id for d in resource.devices]


def prefer(mgr: GpuResourceManager, available: Sequence[str], must: Sequence[str] = (),
           size: int = 1) -> list[str]:
    [chosen] = mgr.preferred([Pref(list(available), list(must), size)])
    return chosen


def rm_messages(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
    return [(r.levelno, r.getMessage()) for r in caplog.records if r.name == LOGGER]


# -- NodeManagers.manager: the managers use the node's shared policy -------------------------

def test_managers_hand_their_shared_policy_to_each_manager() -> None:
    resource = replicas(gpus(2), 2)
    policy = SharedRecorder([ids(resource)[3]])
    assert prefer(manager(resource, shared=policy), ids(resource)) == [ids(resource)[3]]
    assert len(policy.requests) == 1


# -- request_problem: the bounds of one call, and their texts --------------------------------

def test_the_container_cap_is_inclusive_and_named_in_the_refusal() -> None:
    resource = whole(gpus(4))
    mgr = manager(resource)
    one = ids(resource)[:1]
    assert len(mgr.allocate([Alloc(one)] * MAX_CONTAINER_REQUESTS)) == MAX_CONTAINER_REQUESTS
    assert len(mgr.preferred([Pref(one)] * MAX_CONTAINER_REQUESTS)) == MAX_CONTAINER_REQUESTS
    too_many = MAX_CONTAINER_REQUESTS + 1
    why = (f"{too_many} container requests; at most {MAX_CONTAINER_REQUESTS} are accepted in "
           "one call")
    with pytest.raises(AllocationError) as info:
        mgr.allocate([Alloc(one)] * too_many)
    assert str(info.value) == f"{REFUSED}{why}"
    with pytest.raises(AllocationError) as info:
        mgr.preferred([Pref(one)] * too_many)
    assert str(info.value) == why


def test_one_container_may_name_twice_the_devices_and_no_more() -> None:
    # 4 devices: 8 IDs in one container (stale lists repeat IDs) pass, 9 are refused.
    resource = whole(gpus(4))
    mgr = manager(resource)
    eight = ids(resource) * 2
    assert len(mgr.allocate([Alloc(eight)])) == 1
    assert prefer(mgr, eight, size=2) == ids(resource)[:2]
    why = "9 device IDs in one container request; nvidia.com/gpu has 4 devices"
    with pytest.raises(AllocationError) as info:
        mgr.allocate([Alloc([*eight, ids(resource)[0]])])
    assert str(info.value).endswith(f"invalid request: {why}")
    # GetPreferredAllocation counts the must-include IDs with the available ones.
    with pytest.raises(AllocationError) as info:
        mgr.preferred([Pref(eight, ids(resource)[:1], 1)])
    assert str(info.value) == why


def test_the_call_total_is_bounded_across_containers() -> None:
    # 4 devices: the total may reach max(8, 64) = 64 IDs; 8 containers of 8 do, 9 do not.
    resource = whole(gpus(4))
    mgr = manager(resource)
    eight = ids(resource) * 2
    assert len(mgr.allocate([Alloc(eight)] * 8)) == 8
    assert len(mgr.preferred([Pref(eight)] * 8)) == 8
    why = "72 device IDs in one call; nvidia.com/gpu has 4 devices"
    with pytest.raises(AllocationError) as info:
        mgr.allocate([Alloc(eight)] * 9)
    assert str(info.value).endswith(f"invalid request: {why}")
    with pytest.raises(AllocationError) as info:
        mgr.preferred([Pref(eight)] * 9)
    assert str(info.value) == why


# -- long_id_problem / PreferredQuery.id_problem: IDs too long to be one ---------------------

def test_an_id_of_the_maximum_length_is_merely_unknown() -> None:
    resource = whole(gpus(2))
    mgr = manager(resource)
    longest = "G" * MAX_DEVICE_ID_BYTES
    with pytest.raises(AllocationError) as info:
        mgr.allocate([Alloc([longest])])
    assert "unknown device" in str(info.value)
    assert prefer(mgr, [longest, *ids(resource)]) == ids(resource)[:1]


def test_a_longer_id_is_refused_with_its_length() -> None:
    resource = whole(gpus(2))
    mgr = manager(resource)
    bogus = "G" * (MAX_DEVICE_ID_BYTES + 1)
    why = f"a device ID of {MAX_DEVICE_ID_BYTES + 1} characters; IDs are at most 256"
    with pytest.raises(AllocationError) as info:
        mgr.allocate([Alloc([ids(resource)[0], bogus])])
    assert str(info.value) == f"{REFUSED}{why}"
    with pytest.raises(AllocationError) as info:
        mgr.preferred([Pref(ids(resource), [bogus], 1)])
    assert str(info.value) == why


@pytest.mark.parametrize("strangers", [1, 2])
def test_long_unknown_ids_among_replicas_are_refused(strangers: int) -> None:
    # 3 of 4 replicas offered plus long strangers: with 1 stranger the IDs sent number one
    # less than all devices, with 2 exactly all devices plus the one left out; neither may
    # pass for the kubelet's usual "every free replica" request.
    resource = replicas(gpus(2), 2)
    bogus = ["x" * (MAX_DEVICE_ID_BYTES + 1 + n) for n in range(strangers)]
    with pytest.raises(AllocationError) as info:
        manager(resource).preferred([Pref([*ids(resource)[1:], *bogus])])
    longest = MAX_DEVICE_ID_BYTES + strangers
    assert str(info.value) == f"a device ID of {longest} characters; IDs are at most 256"


# -- which policy a resource gets -----------------------------------------------------------

def test_whole_gpus_go_to_the_topology_allocator() -> None:
    resource = whole(gpus(3))
    recorder, policy = WholeRecorder(), SharedRecorder([])
    mgr = manager(resource, whole_allocator=recorder, shared=policy)
    assert is_whole_gpu_resource(resource)
    # An unknown (stale) ID is dropped before the allocator sees the offer.
    assert prefer(mgr, ["GPU-gone", *ids(resource)], size=2) == ids(resource)[:2]
    assert recorder.calls == [(ids(resource), [], 2)]
    assert policy.requests == []


@pytest.mark.parametrize("resource", [replicas(gpus(2), 2), migs([1, 1])],
                         ids=["replicas", "mig"])
def test_replicas_and_mig_devices_go_to_the_shared_policy(resource: Resource) -> None:
    recorder = WholeRecorder()
    assert not is_whole_gpu_resource(resource)
    mgr = manager(resource, whole_allocator=recorder)
    # One device of each GPU: the first GPU's first, then the second GPU's first.
    first_of_each = [ids(resource)[0], ids(resource)[len(resource.devices) // 2]]
    assert prefer(mgr, ids(resource), size=2) == first_of_each
    assert recorder.calls == []


# -- preferred sets through the real shared policy ------------------------------------------

def test_distributed_spreads_replicas_over_the_gpus() -> None:
    resource = replicas(gpus(3), 2)
    every = ids(resource)
    # Fresh node: one replica per GPU, GPU order; then the first GPU again.
    assert prefer(manager(resource), every, size=4) == [every[0], every[2], every[4], every[1]]
    # Asking for everything hands back everything, the last GPU's replicas included.
    assert sorted(prefer(manager(resource), every, size=6)) == sorted(every)


def test_distributed_avoids_the_gpus_with_replicas_in_use() -> None:
    resource = replicas(gpus(3), 2)
    every = ids(resource)
    # GPU 0's replica 0 and GPU 1's replica 1 are in use; GPU 2 is free, so it goes first.
    offered = [every[1], every[2], every[4], every[5]]
    assert prefer(manager(resource), offered, size=1) == [every[4]]
    assert prefer(manager(resource), offered, size=3) == [every[4], every[1], every[2]]


def test_packed_fills_the_busiest_gpu_first() -> None:
    resource = replicas(gpus(3), 3)
    every = ids(resource)
    # GPU 1 has one replica in use: packed fills it; distributed starts on GPU 0.
    offered = [i for i in every if i != every[3]]
    packed = manager(resource, policy=AllocationPolicy.PACKED)
    assert prefer(packed, offered, size=3) == [every[4], every[5], every[0]]
    assert prefer(manager(resource), offered, size=2) == [every[0], every[6]]


def test_the_gpu_index_breaks_ties_not_the_uuid() -> None:
    # GPU 0's UUID sorts after GPU 1's: the NVML index decides which fresh GPU goes first.
    first, second = builders.gpu(0, uuid="GPU-b"), builders.gpu(1, uuid="GPU-a")
    resource = replicas([first, second], 2)
    assert prefer(manager(resource), ids(resource), size=1) == ["GPU-b::0"]


def test_a_gpu_with_one_mig_device_is_its_own_gpu() -> None:
    # One MIG device on each of three GPUs: distributed takes GPU 0's and GPU 1's, in order.
    resource = migs([1, 1, 1])
    assert prefer(manager(resource), ids(resource), size=2) == ids(resource)[:2]


def test_must_include_replicas_come_first_and_count_as_in_use() -> None:
    resource = replicas(gpus(2), 2)
    every = ids(resource)
    # The must-include replica puts GPU 0 ahead in use, so distributed goes to GPU 1.
    assert prefer(manager(resource), every, [every[1]], 2) == [every[1], every[2]]
    # The same with one replica in use (the offer is then "every device but one").
    assert prefer(manager(resource), every[1:], [every[1]], 2) == [every[1], every[2]]
    # GPU 0 (must-include) and GPU 1 (one in use) tie: the lower index goes first.
    assert prefer(manager(resource), every[:3], [every[0]], 2) == [every[0], every[1]]


def test_unhealthy_replicas_are_not_in_use() -> None:
    # GPU 1 is Unhealthy (never offered), GPU 0 has one replica in use, GPU 2 is free: the
    # policy is handed exactly that, and never GPU 1, which has nothing free.
    resource = replicas(gpus(3), 2, sick=[1])
    every = ids(resource)
    offered = [every[1], every[4], every[5]]
    assert in_use_counts(resource, set(offered)) == {"GPU-0": 1, "GPU-1": 0, "GPU-2": 0}
    policy = SharedRecorder([every[4]])
    assert prefer(manager(resource, shared=policy), offered) == [every[4]]
    [(runs, available, must, size, name, in_use)] = policy.requests
    assert runs == [("GPU-0", 0, [every[1]]), ("GPU-2", 2, [every[4], every[5]])]
    assert (available, must, size, name) == (3, [], 1, "distributed")
    assert in_use == {"GPU-0": 1, "GPU-1": 0, "GPU-2": 0}
    # Packed: GPU 0 is the busiest of the offered GPUs (GPU 1's sick replicas do not count).
    packed = manager(resource, policy=AllocationPolicy.PACKED)
    assert prefer(packed, offered, size=2) == [every[1], every[4]]


def test_in_use_counts_count_healthy_devices_not_offered() -> None:
    resource = replicas(gpus(3), 3, sick=[2])
    every = ids(resource)
    assert in_use_counts(resource, set(every[2:4])) == {"GPU-0": 2, "GPU-1": 2, "GPU-2": 0}
    assert in_use_counts(resource, set(every)) == {"GPU-0": 0, "GPU-1": 0, "GPU-2": 0}


def test_the_policy_sees_only_gpus_with_free_devices() -> None:
    # SharedRequest.runs: the GPUs with free devices, each once, their free IDs in order.
    resource = replicas(gpus(3), 2)
    every = ids(resource)
    policy = SharedRecorder([every[5]])
    offered = [every[5], every[0], every[1]]
    assert prefer(manager(resource, shared=policy), offered, [every[5]]) == [every[5]]
    [(runs, available, must, size, _, in_use)] = policy.requests
    assert runs == [("GPU-0", 0, every[:2]), ("GPU-2", 2, [every[5]])]
    assert (available, must, size) == (3, [every[5]], 1)
    assert in_use == {"GPU-0": 0, "GPU-1": 2, "GPU-2": 1}


def test_a_request_index_built_alone_maps_the_resources_ids() -> None:
    resource = replicas(gpus(2), 2)
    index = RequestIndex.of(resource)
    assert dict(index.known) == {d.id: d for d in resource.devices}
    scan = PreferredQuery.of(ids(resource)[1:], [], 1).scan(index)
    assert set(scan.offered) == set(ids(resource)[1:])
    request = index.shared_request(scan.offered, scan.missing)
    assert request.gpu_of(ids(resource)[3]) == "GPU-1"


def test_a_scan_offers_exactly_the_known_ids_sent() -> None:
    resource = replicas(gpus(2), 2)
    every = ids(resource)
    index = RequestIndex.of(resource)
    # Every device but one, sent once each: the usual request.
    scan = PreferredQuery.of(every[1:], [], 1).scan(index)
    assert sorted(scan.offered) == every[1:] and len(scan.offered) == 3
    assert every[0] not in scan.offered and "GPU-9::0" not in scan.offered
    assert set(scan.unknown) == set()
    # Repeats and a stranger: the same offer, the stranger unknown.
    scan = PreferredQuery.of([*every[1:], every[1], "GPU-9::0"], [], 1).scan(index)
    assert sorted(scan.offered) == every[1:] and len(scan.offered) == 3
    assert set(scan.unknown) == {"GPU-9::0"}


def test_left_out_is_what_an_exact_offer_does_not_name() -> None:
    index = RequestIndex.of(replicas(gpus(2), 2))
    every = list(index.ordered_ids)
    results = [index.left_out(offer) for offer in (every[1:3], every, [])]
    assert [None if r is None else set(r) for r in results] == [
        {every[0], every[3]}, set(), set(every)]
    # A repeat or a stranger: None, and the scan takes the set path instead.
    assert index.left_out([every[1], every[1]]) is None
    assert index.left_out([every[1], "GPU-9::0"]) is None
    # The index's own map is never changed by a scan.
    assert list(index.id_map) == every and len(index.known) == 4


def test_a_repeat_alone_falls_back_to_the_exact_offer() -> None:
    resource = replicas(gpus(2), 2)
    every = ids(resource)
    scan = PreferredQuery.of([every[2], every[0], every[2]], [], 1).scan(RequestIndex.of(resource))
    assert sorted(scan.offered) == [every[0], every[2]] and set(scan.unknown) == set()
    assert [set(m) for m in scan.missing] == [{every[1]}, {every[3]}]


@pytest.mark.parametrize("resource", [replicas(gpus(8), 64), whole(gpus(8)), migs([2, 3])],
                         ids=["replicas", "whole", "mig"])
def test_the_kubelets_request_builds_no_set_of_the_offered_ids(resource: Resource) -> None:
    # Issue 10, defect 7: the usual request (every free device, each once) is checked against
    # the index's ID map in one pass; a set of the thousands of offered IDs is built only for a
    # stale list (an unknown or repeated ID).
    every = ids(resource)
    index = RequestIndex.of(resource)
    scan = PreferredQuery.of(every[2:][::-1], [], 1).scan(index)
    assert isinstance(scan.offered, KnownOffer) and sorted(scan.offered) == sorted(every[2:])
    assert sorted(i for m in scan.missing for i in m) == sorted(every[:2])
    stale = PreferredQuery.of([*every[2:], "GPU-gone"], [], 1).scan(index)
    assert isinstance(stale.offered, set) and set(stale.unknown) == {"GPU-gone"}
    assert sorted(stale.offered) == sorted(every[2:])


def test_a_query_is_scanned_again_against_a_new_resource_version() -> None:
    # A health change builds a new resource and index; a scan must never answer for another.
    old, new = replicas(gpus(1), 2), replicas(gpus(2), 2)
    query = PreferredQuery.of(ids(new), [], 1)
    assert set(query.scan(RequestIndex.of(old)).unknown) == set(ids(new)[2:])
    new_index = RequestIndex.of(new)
    scan = query.scan(new_index)
    assert scan.index is new_index and set(scan.unknown) == set()


def test_a_resource_without_devices_prefers_nothing(caplog: pytest.LogCaptureFixture) -> None:
    empty = Resource(name=SHARED, devices=(), replicas=2)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert prefer(manager(empty), [], size=1) == []
    assert rm_messages(caplog) == [(logging.WARNING, (
        f"GetPreferredAllocation for {SHARED}: no preferred set: "
        "allocation size 1 exceeds the 0 available devices"))]


# -- preferred_for: what an operator reads when no preferred set is given --------------------

@pytest.mark.parametrize(("offer", "must", "size", "why"), [
    (slice(1, None), [], 4, "allocation size 4 exceeds the 3 available devices"),
    (slice(1, None), [0], 1, "must-include devices not available: GPU-0::0"),
    (slice(0, 3), [3], 2, "must-include devices not available: GPU-1::1"),
    (slice(0, None), [0, 1], 1, "2 must-include devices exceed allocation size 1"),
])
def test_an_impossible_request_is_logged_with_the_resource_and_why(
        offer: slice, must: list[int], size: int, why: str,
        caplog: pytest.LogCaptureFixture) -> None:
    resource = replicas(gpus(2), 2)
    every = ids(resource)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert prefer(manager(resource), every[offer], [every[i] for i in must], size) == []
    assert rm_messages(caplog) == [
        (logging.WARNING, f"GetPreferredAllocation for {SHARED}: no preferred set: {why}")]


def test_a_failing_policy_is_logged_and_answered_with_nothing(
        caplog: pytest.LogCaptureFixture) -> None:
    def broken(*_: object) -> list[str]:
        raise RuntimeError("policy bug")

    resource = replicas(gpus(2), 2)
    mgr = NodeManagers(Config(), builders.snapshot(), WholeRecorder(), shared=broken).manager(
        resource)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert prefer(mgr, ids(resource)) == []
    [record] = [r for r in caplog.records if r.name == LOGGER]
    assert (record.levelno, record.getMessage()) == (
        logging.ERROR, f"preferred allocation failed for {SHARED}")
    assert record.exc_info is not None and str(record.exc_info[1]) == "policy bug"


@pytest.mark.parametrize("answer", [
    ["GPU-0::0", "GPU-0::0"],  # repeats an offered replica
    ["GPU-0::0", "GPU-7::0"],  # names a device not offered
    ["GPU-0::0"],  # too few
], ids=["repeat", "foreign", "short"])
def test_an_invalid_policy_answer_is_logged_and_dropped(
        answer: list[str], caplog: pytest.LogCaptureFixture) -> None:
    resource = replicas(gpus(2), 2)
    mgr = manager(resource, shared=SharedRecorder(answer))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert prefer(mgr, ids(resource), size=2) == []
    assert rm_messages(caplog) == [
        (logging.ERROR, f"allocator returned an invalid set for {SHARED}: {answer}")]


# -- shared_policy: the policy's own contract, called directly -------------------------------

def test_the_gpu_index_breaks_ties_in_preferred_shared() -> None:
    first, second = builders.gpu(0, uuid="GPU-b"), builders.gpu(1, uuid="GPU-a")
    resource = replicas([first, second], 2)
    assert preferred_shared(resource.devices, [], 1) == ["GPU-b::0"]
    assert preferred_shared(resource.devices, [], 3, "packed") == [
        "GPU-b::0", "GPU-b::1", "GPU-a::0"]


def shared_request(free: Mapping[str, Sequence[str]]) -> SharedRequest:
    """A SharedRequest over GPUs ``GPU-<n>`` (index n) with the given free replica IDs."""
    offered = {i: uuid for uuid, group in free.items() for i in group}
    runs = [FreeRun(uuid, int(uuid.removeprefix("GPU-")), group) for uuid, group in free.items()]
    return SharedRequest(runs, len(offered), offered, offered.__getitem__)


def test_a_gpu_absent_from_the_counts_has_none_in_use() -> None:
    request = shared_request({"GPU-0": ["GPU-0::1"], "GPU-1": ["GPU-1::0", "GPU-1::1"]})
    assert preferred_shared_runs(request, [], 1, "distributed", {"GPU-0": 1}) == ["GPU-1::0"]
    assert preferred_shared_runs(request, [], 2, "distributed", {}) == ["GPU-0::1", "GPU-1::0"]


@pytest.mark.parametrize(("must", "size", "why"), [
    ([], 3, "allocation size 3 exceeds the 2 available devices"),
    (["GPU-1::0"], 1, "must-include devices not available: GPU-1::0"),
])
def test_preferred_shared_runs_refuses_an_impossible_request(
        must: list[str], size: int, why: str, caplog: pytest.LogCaptureFixture) -> None:
    request = shared_request({"GPU-0": ["GPU-0::0", "GPU-0::1"]})
    with caplog.at_level(logging.WARNING, logger="deviceplugin.shared_policy"):
        assert preferred_shared_runs(request, must, size, "distributed", {}) == []
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [(logging.WARNING, (
        f"preferred allocation impossible: {why} (2 available, must_include={must})"))]

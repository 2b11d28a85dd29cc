"""deviceplugin.allocate guards that mutation testing found unprotected (docs/testing.md)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import pytest
from test_allocate import RESOURCE, allocate, config, gpu, mig_resource, minors_table, replicated

import deviceplugin.allocate
from deviceplugin.allocate import (
    AllocationError,
    IndexedAllocate,
    device_index,
    host_path,
    strip_replica,
)


def test_strip_replica() -> None:
    assert strip_replica("GPU-x::3") == "GPU-x"
    assert strip_replica("GPU-x") == "GPU-x"
    assert strip_replica("MIG-y::0::1") == "MIG-y"  # only the first separator counts
    assert strip_replica("") == ""


def test_host_path_joins_under_the_root() -> None:
    assert host_path("", "/dev/nvidia0") == "/dev/nvidia0"
    assert host_path("/", "/dev/nvidia0") == "/dev/nvidia0"
    assert host_path("/run/nvidia/driver", "/dev/nvidia0") == "/run/nvidia/driver/dev/nvidia0"
    assert host_path("/drv", "proc/driver/nvidia-caps/mig-minors") == (
        "/drv/proc/driver/nvidia-caps/mig-minors")


def test_a_given_index_is_used_instead_of_building_one(monkeypatch: pytest.MonkeyPatch) -> None:
    # Allocate is on the pod start path: with 8,192 replicas, building the index per request
    # is what the caller's index avoids.
    index = device_index(RESOURCE)

    def no_rebuild(_: object) -> dict[str, object]:
        raise AssertionError("index rebuilt")

    monkeypatch.setattr(deviceplugin.allocate, "device_index", no_rebuild)
    alloc = allocate(RESOURCE, ["GPU-0001"], index=index)
    assert alloc.envs == {"NVIDIA_VISIBLE_DEVICES": "GPU-0001"}


def test_indexed_allocate_reuses_the_index_until_the_resource_changes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[str] = []
    real_index = device_index

    def counting_index(resource: deviceplugin.allocate.Resource) -> dict[str, object]:
        built.append(resource.name)
        return real_index(resource)  # type: ignore[return-value]

    monkeypatch.setattr(deviceplugin.allocate, "device_index", counting_index)
    allocator = IndexedAllocate()
    cfg = config()
    shared = replicated([gpu(0), gpu(1)], 2)
    assert allocator(RESOURCE, ["GPU-0002"], cfg).envs == {"NVIDIA_VISIBLE_DEVICES": "GPU-0002"}
    assert allocator(RESOURCE, ["GPU-0003", "GPU-0000"], cfg).envs == {
        "NVIDIA_VISIBLE_DEVICES": "GPU-0003,GPU-0000"}
    assert allocator(shared, ["GPU-0001::1"], cfg).envs == {"NVIDIA_VISIBLE_DEVICES": "GPU-0001"}
    assert built == ["nvidia.com/gpu", "nvidia.com/gpu.shared"]
    # A new version of the resource (a health change rebuilds the map) is indexed again.
    sick = dataclasses.replace(RESOURCE.devices[2], healthy=False)
    changed = dataclasses.replace(RESOURCE, devices=(*RESOURCE.devices[:2], sick,
                                                     *RESOURCE.devices[3:]))
    with pytest.raises(AllocationError, match="unhealthy device: GPU-0002$"):
        allocator(changed, ["GPU-0002"], cfg)
    assert built == ["nvidia.com/gpu", "nvidia.com/gpu.shared", "nvidia.com/gpu"]
    assert allocator(changed, ["GPU-0000"], cfg).envs == {"NVIDIA_VISIBLE_DEVICES": "GPU-0000"}
    assert len(built) == 3


def test_errors_name_the_resource() -> None:
    with pytest.raises(AllocationError) as empty:
        allocate(replicated([gpu(0)], 2), [])
    assert str(empty.value) == ('invalid allocation request for "nvidia.com/gpu.shared": '
                                "invalid request: no devices requested")
    with pytest.raises(AllocationError) as too_many:
        allocate(replicated([gpu(0)], 2, fail=True), ["GPU-0000::0", "GPU-0000::1"])
    assert str(too_many.value) == (
        'invalid allocation request for "nvidia.com/gpu.shared": invalid request: '
        "maximum request size for shared resources is 1; found 2")


def test_mig_minors_errors_name_the_resource_and_the_file() -> None:
    cfg = config(pass_device_specs=True, driver_root="/run/nvidia/driver")

    def unreadable_minors(root: str) -> Mapping[str, int]:
        raise FileNotFoundError(2, "No such file or directory", root + "/absent")

    with pytest.raises(AllocationError) as unreadable:
        allocate(mig_resource(gpu(2, migs=1)), ["MIG-0002-0"], cfg, mig_minors=unreadable_minors)
    assert str(unreadable.value).startswith(
        'cannot allocate MIG devices of "nvidia.com/mig-1g.5gb" with device specs: reading MIG '
        "capability minors under '/run/nvidia/driver' failed: ")
    with pytest.raises(AllocationError) as unlisted:
        allocate(mig_resource(gpu(2, migs=1)), ["MIG-0002-0"], cfg, mig_minors=lambda _: {})
    assert str(unlisted.value) == (
        'cannot allocate MIG device MIG-0002-0 of "nvidia.com/mig-1g.5gb" with device specs: '
        "gpu2/gi1/access is not listed in /run/nvidia/driver/proc/driver/nvidia-caps/mig-minors")


def test_mig_minors_are_read_once_per_allocation() -> None:
    reads: list[str] = []

    def minors(root: str) -> Mapping[str, int]:
        reads.append(root)
        return minors_table(root)

    alloc = allocate(mig_resource(gpu(2, migs=2)), ["MIG-0002-0", "MIG-0002-1"],
                     config(pass_device_specs=True, driver_root="/drv"), mig_minors=minors)
    assert len(alloc.devices) == 5
    assert reads == ["/drv"]

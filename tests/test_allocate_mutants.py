"""deviceplugin.allocate guards that mutation testing found unprotected (docs/testing.md)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import builders
import pytest
from test_allocate import (
    GPUS,
    RESOURCE,
    allocate,
    config,
    gpu,
    mig_resource,
    minors_table,
    replicated,
)
from test_extras import allocate as extras_allocate
from test_extras import config as extras_config
from test_extras import dev_root as extras_dev_root

import deviceplugin.allocate
import deviceplugin.rm
from deviceplugin.allocate import AllocationError, ContainerAllocation, device_index, host_path
from deviceplugin.rm import GpuResourceManager, NodeManagers
from gpus.config import Config
from gpus.resources import Device, Resource


@dataclass(frozen=True)
class Request:
    """One container of an Allocate call, as :class:`deviceplugin.rm.AllocateRequest`."""

    devices_ids: Sequence[str]


def envs(manager: GpuResourceManager, *ids: str) -> Mapping[str, str]:
    [alloc] = manager.allocate([Request(ids)])
    return alloc.envs


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


def test_a_manager_indexes_its_resource_once_and_a_new_version_again(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Was IndexedAllocate's cache; the rm layer keeps it now: one GpuResourceManager per
    # resource version (a health change or reload builds a new one), its by_id built on first
    # use and handed to every build_allocation, which then never builds its own.
    def no_rebuild(_: object) -> dict[str, object]:
        raise AssertionError("index rebuilt per request")

    given: list[tuple[str, Mapping[str, Device]]] = []
    real_build = deviceplugin.allocate.build_allocation

    def recording_build(resource: Resource, ids: Sequence[str], cfg: Config,
                        *, index: Mapping[str, Device]) -> ContainerAllocation:
        given.append((resource.name, index))
        return real_build(resource, ids, cfg, index=index)

    monkeypatch.setattr(deviceplugin.allocate, "device_index", no_rebuild)
    monkeypatch.setattr(deviceplugin.rm, "build_allocation", recording_build)
    snapshot = builders.snapshot(*GPUS)
    managers = NodeManagers.create(config(), snapshot)
    whole, shared = managers.manager(RESOURCE), managers.manager(replicated(GPUS[:2], 2))
    assert envs(whole, "GPU-0002") == {"NVIDIA_VISIBLE_DEVICES": "GPU-0002"}
    assert envs(whole, "GPU-0003", "GPU-0000") == {
        "NVIDIA_VISIBLE_DEVICES": "GPU-0003,GPU-0000"}
    assert envs(shared, "GPU-0001::1") == {"NVIDIA_VISIBLE_DEVICES": "GPU-0001"}
    indexes = {id(index): index for _, index in given}
    assert [name for name, _ in given] == [
        "nvidia.com/gpu", "nvidia.com/gpu", "nvidia.com/gpu.shared"]
    assert given[0][1] is given[1][1] is whole.by_id  # built once, then reused
    assert given[2][1] is shared.by_id
    assert len(indexes) == 2
    # A new version of the resource (a health change rebuilds the map) is indexed again.
    sick = dataclasses.replace(RESOURCE.devices[2], healthy=False)
    changed = dataclasses.replace(RESOURCE, devices=(*RESOURCE.devices[:2], sick,
                                                     *RESOURCE.devices[3:]))
    after = managers.manager(changed)
    with pytest.raises(AllocationError, match="unhealthy device: GPU-0002$"):
        envs(after, "GPU-0002")
    assert given[3][1] is after.by_id
    assert given[3][1] is not whole.by_id
    assert envs(after, "GPU-0000") == {"NVIDIA_VISIBLE_DEVICES": "GPU-0000"}
    assert given[4][1] is given[3][1]
    assert len({id(index) for _, index in given}) == 3
    # The old version's manager still serves the old version, from its own index.
    assert envs(whole, "GPU-0002") == {"NVIDIA_VISIBLE_DEVICES": "GPU-0002"}
    assert given[5][1] is whole.by_id


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


def test_both_cdi_strategies_together_still_set_no_extra_env(tmp_path: Path) -> None:
    # add_extras adds the extras' environment only when some strategy is not a CDI one; both
    # CDI strategies at once are still CDI only (a `<` for the `<=` survived test_extras.py).
    root = extras_dev_root(tmp_path)
    cfg = extras_config(root, ("cdi-annotations", "cdi-cri"), channels=("0",),
                        specs=True, gds_enabled=True, mofed_enabled=True)
    alloc = extras_allocate(cfg)
    assert alloc.envs == {}
    # The GPU's own node only: the extras' nodes (nvidia-fs*, uverbs...) come with their env.
    assert [spec.container_path for spec in alloc.devices] == ["/dev/nvidia0"]
    names = ("k8s.device-plugin.nvidia.com/gpu=GPU-0",
             "k8s.device-plugin.nvidia.com/imex-channel=0",
             "k8s.device-plugin.nvidia.com/gds=all", "k8s.device-plugin.nvidia.com/mofed=all")
    assert alloc.cdi_devices == names
    assert alloc.annotations == {"cdi.k8s.io/nvidia-device-plugin_u1": ",".join(names)}

"""Allocate responses: strategies, ID strategies, device specs, and request validation."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import builders
import pytest

from deviceplugin.allocate import (
    AllocationError,
    ContainerAllocation,
    DeviceSpec,
    Mount,
    build_allocation,
    read_mig_minors,
)
from gpus.config import (
    Config,
    DeviceListStrategy,
    Flags,
    MigStrategy,
    PluginFlags,
    SharingStrategy,
)
from gpus.model import GPU, Snapshot
from gpus.resources import Device, Resource, build_resource_map

CONTROL = ("/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools", "/dev/nvidia-modeset")
MIG_MINORS = {
    "gpu2/gi1/access": 21, "gpu2/gi1/ci0/access": 22,
    "gpu2/gi2/access": 30, "gpu2/gi2/ci0/access": 31,
}


def gpu(index: int, *, minor: int | None = None, migs: int = 0) -> GPU:
    """A GPU with ``migs`` 1g.5gb MIG devices (GI = i + 1, CI 0)."""
    uuid = f"GPU-{index:04d}"
    return builders.gpu(index, uuid=uuid, minor=minor, mig_capable=True, migs=(
        builders.mig_device(index, i, uuid=f"MIG-{index:04d}-{i}", parent_uuid=uuid)
        for i in range(migs)))


def whole(gpus: Iterable[GPU], name: str = "nvidia.com/gpu") -> Resource:
    return Resource(name=name, devices=tuple(Device(id=g.uuid, uuid=g.uuid, gpu=g) for g in gpus))


def replicated(gpus: Iterable[GPU], replicas: int, *, fail: bool = False) -> Resource:
    devices = tuple(Device(id=f"{g.uuid}::{n}", uuid=g.uuid, gpu=g, replica=n)
                    for g in gpus for n in range(replicas))
    return Resource(name="nvidia.com/gpu.shared", devices=devices, replicas=replicas,
                    fail_requests_greater_than_one=fail)


def mig_resource(parent: GPU) -> Resource:
    devices = tuple(Device(id=m.uuid, uuid=m.uuid, gpu=parent, mig=m) for m in parent.mig_devices)
    return Resource(name="nvidia.com/mig-1g.5gb", devices=devices)


def config(**plugin: object) -> Config:
    dev_root = plugin.pop("dev_root", "")
    driver_root = plugin.pop("driver_root", "/")
    if isinstance(plugin.get("device_list_strategy"), str):
        plugin["device_list_strategy"] = (plugin["device_list_strategy"],)
    return Config(flags=Flags(nvidia_driver_root=str(driver_root), nvidia_dev_root=str(dev_root),
                              plugin=PluginFlags(**plugin)))  # type: ignore[arg-type]


def never(_: str) -> bool:
    return False


def exists_in(paths: Iterable[str]) -> Callable[[str], bool]:
    present = set(paths)
    return lambda path: path in present


def minors_table(_: str) -> Mapping[str, int]:
    return MIG_MINORS


GPUS = [gpu(i) for i in range(4)]
RESOURCE = whole(GPUS)


def allocate(resource: Resource, ids: list[str], cfg: Config | None = None,
             **kwargs: object) -> ContainerAllocation:
    kwargs.setdefault("uuid_factory", lambda: "fixed-uuid")
    kwargs.setdefault("path_exists", never)
    return build_allocation(resource, ids, cfg or config(), **kwargs)  # type: ignore[arg-type]


# --- device-list strategies ----------------------------------------------------------------


def test_envvar_default_lists_uuids_in_request_order() -> None:
    alloc = allocate(RESOURCE, ["GPU-0002", "GPU-0000"])
    assert alloc.envs == {"NVIDIA_VISIBLE_DEVICES": "GPU-0002,GPU-0000"}
    assert alloc.mounts == () and alloc.devices == ()
    assert alloc.annotations == {} and alloc.cdi_devices == ()


def test_volume_mounts() -> None:
    cfg = config(device_list_strategy="volume-mounts")
    alloc = allocate(RESOURCE, ["GPU-0001", "GPU-0003"], cfg)
    assert alloc.envs == {"NVIDIA_VISIBLE_DEVICES": "/var/run/nvidia-container-devices"}
    # NVIDIA's volume mounts are not read-only (its Mount leaves ReadOnly false); ours were,
    # which broke the drop-in promise (issue 12).
    assert alloc.mounts == (
        Mount("/var/run/nvidia-container-devices/GPU-0001", "/dev/null", read_only=False),
        Mount("/var/run/nvidia-container-devices/GPU-0003", "/dev/null", read_only=False),
    )


def test_envvar_and_volume_mounts_volume_mounts_wins_the_env() -> None:
    cfg = config(device_list_strategy=("envvar", "volume-mounts"))
    alloc = allocate(RESOURCE, ["GPU-0001"], cfg)
    assert alloc.envs == {"NVIDIA_VISIBLE_DEVICES": "/var/run/nvidia-container-devices"}
    assert [m.container_path for m in alloc.mounts] == [
        "/var/run/nvidia-container-devices/GPU-0001"]


def test_cdi_annotations_only() -> None:
    cfg = config(device_list_strategy="cdi-annotations")
    alloc = allocate(RESOURCE, ["GPU-0000", "GPU-0001"], cfg)
    assert alloc.envs == {} and alloc.mounts == () and alloc.cdi_devices == ()
    assert alloc.annotations == {
        "cdi.k8s.io/nvidia-device-plugin_fixed-uuid":
            "k8s.device-plugin.nvidia.com/gpu=GPU-0000,k8s.device-plugin.nvidia.com/gpu=GPU-0001"
    }


def test_cdi_cri_only() -> None:
    alloc = allocate(RESOURCE, ["GPU-0003"], config(device_list_strategy="cdi-cri"))
    assert alloc.envs == {} and alloc.annotations == {}
    assert alloc.cdi_devices == ("k8s.device-plugin.nvidia.com/gpu=GPU-0003",)


def test_envvar_with_cdi_keeps_env() -> None:
    cfg = config(device_list_strategy=("envvar", "cdi-cri", "cdi-annotations"))
    alloc = allocate(RESOURCE, ["GPU-0003"], cfg)
    assert alloc.envs == {"NVIDIA_VISIBLE_DEVICES": "GPU-0003"}
    assert alloc.cdi_devices == ("k8s.device-plugin.nvidia.com/gpu=GPU-0003",)
    assert list(alloc.annotations.values()) == ["k8s.device-plugin.nvidia.com/gpu=GPU-0003"]


def test_annotation_key_uses_a_fresh_uuid_by_default() -> None:
    cfg = config(device_list_strategy="cdi-annotations")
    keys = {next(iter(build_allocation(RESOURCE, ["GPU-0000"], cfg).annotations))
            for _ in range(3)}
    assert len(keys) == 3
    assert all(k.startswith("cdi.k8s.io/nvidia-device-plugin_") for k in keys)


# --- device ID strategy ----------------------------------------------------------------------


def test_index_strategy_whole_gpus() -> None:
    alloc = allocate(RESOURCE, ["GPU-0003", "GPU-0001"], config(device_id_strategy="index"))
    assert alloc.envs == {"NVIDIA_VISIBLE_DEVICES": "3,1"}


def test_index_strategy_mig_and_cdi_names() -> None:
    parent = gpu(2, migs=2)
    cfg = config(device_id_strategy="index", device_list_strategy=("envvar", "cdi-cri"))
    alloc = allocate(mig_resource(parent), ["MIG-0002-1"], cfg)
    assert alloc.envs == {"NVIDIA_VISIBLE_DEVICES": "2:1"}
    assert alloc.cdi_devices == ("k8s.device-plugin.nvidia.com/gpu=2:1",)


# --- request normalisation and errors -----------------------------------------------------------


def test_replicas_are_stripped_and_deduplicated_in_order() -> None:
    resource = replicated(GPUS[:2], 4)
    alloc = allocate(resource, ["GPU-0001::3", "GPU-0000::0", "GPU-0001::1"])
    assert alloc.envs == {"NVIDIA_VISIBLE_DEVICES": "GPU-0001,GPU-0000"}


def test_duplicate_ids_collapse() -> None:
    alloc = allocate(RESOURCE, ["GPU-0001", "GPU-0001"])
    assert alloc.envs == {"NVIDIA_VISIBLE_DEVICES": "GPU-0001"}


def test_unknown_device_message_is_nvidias() -> None:
    with pytest.raises(AllocationError) as info:
        allocate(RESOURCE, ["GPU-0000", "GPU-9999"])
    assert str(info.value) == ('invalid allocation request for "nvidia.com/gpu": '
                               "invalid request: unknown device: GPU-9999")


def test_unknown_device_names_the_resource() -> None:
    parent = gpu(2, migs=1)
    with pytest.raises(AllocationError, match='for "nvidia.com/mig-1g.5gb": .*unknown device: '
                                              "GPU-0002"):
        allocate(mig_resource(parent), ["GPU-0002"])


def test_bare_uuid_is_unknown_on_a_shared_resource() -> None:
    with pytest.raises(AllocationError, match="unknown device: GPU-0000$"):
        allocate(replicated(GPUS[:1], 2), ["GPU-0000"])


def test_empty_request_rejected() -> None:
    with pytest.raises(AllocationError, match="invalid request: no devices requested"):
        allocate(RESOURCE, [])


def test_unhealthy_device_rejected() -> None:
    sick = dataclasses.replace(RESOURCE.devices[1], healthy=False)
    resource = dataclasses.replace(RESOURCE, devices=(RESOURCE.devices[0], sick))
    with pytest.raises(AllocationError) as info:
        allocate(resource, ["GPU-0000", "GPU-0001"])
    assert str(info.value) == ('invalid allocation request for "nvidia.com/gpu": '
                               "invalid request: unhealthy device: GPU-0001")


def test_shared_more_than_one_fails_only_when_configured() -> None:
    ids = ["GPU-0000::0", "GPU-0000::1"]
    assert allocate(replicated(GPUS[:1], 2), ids).envs == {"NVIDIA_VISIBLE_DEVICES": "GPU-0000"}
    with pytest.raises(AllocationError) as info:
        allocate(replicated(GPUS[:1], 2, fail=True), ids)
    assert str(info.value).endswith("maximum request size for shared resources is 1; found 2")
    assert allocate(replicated(GPUS[:1], 2, fail=True), ids[:1]).envs


def test_bad_request_leaves_resource_untouched() -> None:
    before = dataclasses.replace(RESOURCE)
    with pytest.raises(AllocationError):
        allocate(RESOURCE, ["nope"])
    assert before == RESOURCE


# --- device specs ----------------------------------------------------------------------------


def test_device_specs_whole_gpus_with_present_control_nodes() -> None:
    cfg = config(pass_device_specs=True)
    alloc = allocate(RESOURCE, ["GPU-0001", "GPU-0003"], cfg,
                     path_exists=exists_in(["/dev/nvidiactl", "/dev/nvidia-uvm"]))
    assert alloc.devices == (
        DeviceSpec("/dev/nvidiactl", "/dev/nvidiactl", "rw"),
        DeviceSpec("/dev/nvidia-uvm", "/dev/nvidia-uvm", "rw"),
        DeviceSpec("/dev/nvidia1", "/dev/nvidia1", "rw"),
        DeviceSpec("/dev/nvidia3", "/dev/nvidia3", "rw"),
    )


def test_device_specs_prefix_host_paths_with_dev_root() -> None:
    cfg = config(pass_device_specs=True, dev_root="/run/nvidia/driver", driver_root="/drv")
    seen: list[str] = []

    def exists(path: str) -> bool:
        seen.append(path)
        return True

    alloc = allocate(RESOURCE, ["GPU-0000"], cfg, path_exists=exists)
    assert seen == [f"/run/nvidia/driver{p}" for p in CONTROL]
    assert [d.container_path for d in alloc.devices] == [*CONTROL, "/dev/nvidia0"]
    assert all(d.host_path == "/run/nvidia/driver" + d.container_path for d in alloc.devices)


def test_device_specs_use_the_minor_not_the_index() -> None:
    resource = whole([gpu(0, minor=7)])
    alloc = allocate(resource, ["GPU-0000"], config(pass_device_specs=True))
    assert [d.container_path for d in alloc.devices] == ["/dev/nvidia7"]


def test_device_specs_for_mig_include_caps_once_per_parent() -> None:
    parent = gpu(2, migs=2)
    alloc = allocate(mig_resource(parent), ["MIG-0002-0", "MIG-0002-1"],
                     config(pass_device_specs=True), mig_minors=minors_table)
    assert [d.container_path for d in alloc.devices] == [
        "/dev/nvidia2",
        "/dev/nvidia-caps/nvidia-cap21", "/dev/nvidia-caps/nvidia-cap22",
        "/dev/nvidia-caps/nvidia-cap30", "/dev/nvidia-caps/nvidia-cap31",
    ]


def test_mig_minors_not_read_without_mig_or_device_specs() -> None:
    def boom(_: str) -> Mapping[str, int]:
        raise AssertionError("must not be read")

    allocate(RESOURCE, ["GPU-0000"], config(pass_device_specs=True), mig_minors=boom)
    allocate(mig_resource(gpu(2, migs=1)), ["MIG-0002-0"], mig_minors=boom)


def test_missing_mig_minors_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(AllocationError, match="MIG capability minors .*No such file"):
        allocate(mig_resource(gpu(2, migs=1)), ["MIG-0002-0"],
                 config(pass_device_specs=True, driver_root=str(tmp_path)),
                 mig_minors=read_mig_minors)


def test_mig_device_missing_from_minors_is_a_clear_error() -> None:
    with pytest.raises(AllocationError, match="gpu2/gi1/access is not listed"):
        allocate(mig_resource(gpu(2, migs=1)), ["MIG-0002-0"], config(pass_device_specs=True),
                 mig_minors=lambda _: {})


def test_read_mig_minors(tmp_path: Path) -> None:
    caps = tmp_path / "proc/driver/nvidia-caps"
    caps.mkdir(parents=True)
    (caps / "mig-minors").write_text("config 1\nmonitor 2\ngpu0/gi1/access 12\n\n"
                                     "gpu0/gi1/ci0/access 13\n")
    assert read_mig_minors(str(tmp_path)) == {
        "config": 1, "monitor": 2, "gpu0/gi1/access": 12, "gpu0/gi1/ci0/access": 13}


def test_read_mig_minors_rejects_malformed_lines(tmp_path: Path) -> None:
    caps = tmp_path / "proc/driver/nvidia-caps"
    caps.mkdir(parents=True)
    (caps / "mig-minors").write_text("gpu0/gi1/access twelve\n")
    with pytest.raises(ValueError, match="mig-minors:1: .*'gpu0/gi1/access twelve'"):
        read_mig_minors(str(tmp_path))


def test_malformed_mig_minors_is_an_allocation_error(tmp_path: Path) -> None:
    caps = tmp_path / "proc/driver/nvidia-caps"
    caps.mkdir(parents=True)
    (caps / "mig-minors").write_text("garbage\n")
    with pytest.raises(AllocationError, match="expected"):
        allocate(mig_resource(gpu(2, migs=1)), ["MIG-0002-0"],
                 config(pass_device_specs=True, driver_root=str(tmp_path)),
                 mig_minors=read_mig_minors)


def test_every_device_of_real_profiles_allocates(fake_snapshot: Callable[..., Snapshot]) -> None:
    snapshot = fake_snapshot("dgx-a100-mig")
    cfg = Config(flags=Flags(mig_strategy=MigStrategy.MIXED, plugin=PluginFlags(
        pass_device_specs=True,
        device_list_strategy=(DeviceListStrategy.ENVVAR, DeviceListStrategy.CDI_CRI))))
    table = {}
    for g in snapshot.gpus:
        for m in g.mig_devices:
            table[f"gpu{g.minor}/gi{m.gpu_instance_id}/access"] = 1
            table[f"gpu{g.minor}/gi{m.gpu_instance_id}/ci{m.compute_instance_id}/access"] = 2
    resource_map = build_resource_map(snapshot, cfg)
    assert resource_map.resources
    for resource in resource_map.resources.values():
        ids = [d.id for d in resource.devices]
        alloc = build_allocation(resource, ids, cfg, path_exists=never,
                                 mig_minors=lambda _: table)
        assert alloc.envs["NVIDIA_VISIBLE_DEVICES"].split(",") == [d.uuid for d in resource.devices]
        assert len(alloc.cdi_devices) == len(ids)
        assert {f"/dev/nvidia{d.gpu.minor}" for d in resource.devices} <= {
            s.container_path for s in alloc.devices}


# --- MPS -------------------------------------------------------------------------------------

MPS_ENV = {"CUDA_MPS_PIPE_DIRECTORY": "/mps/nvidia.com/gpu/pipe"}
MPS_MOUNTS = (
    Mount(container_path="/mps/nvidia.com/gpu/pipe",
          host_path="/run/nvidia/mps/nvidia.com/gpu/pipe", read_only=False),
    Mount(container_path="/dev/shm", host_path="/run/nvidia/mps/shm", read_only=False),
)


def mps_resource(gpus: Iterable[GPU], replicas: int, *, fail: bool = True) -> Resource:
    shared = replicated(gpus, replicas, fail=fail)
    return dataclasses.replace(shared, name="nvidia.com/gpu", sharing=SharingStrategy.MPS)


def mps_config(strategies: tuple[str, ...]) -> Config:
    base = config(device_list_strategy=strategies)
    return dataclasses.replace(base, flags=dataclasses.replace(base.flags,
                                                               mps_root="/run/nvidia/mps"))


@pytest.mark.parametrize("strategies", [
    ("envvar",), ("volume-mounts",), ("cdi-annotations",), ("cdi-cri",),
    ("envvar", "cdi-cri"),
])
def test_mps_adds_nvidias_env_and_mounts_in_every_strategy(strategies: tuple[str, ...]) -> None:
    resource = mps_resource(GPUS[:2], 4)
    plain = allocate(dataclasses.replace(resource, sharing=SharingStrategy.TIME_SLICING),
                     ["GPU-0001::2"], mps_config(strategies))
    alloc = allocate(resource, ["GPU-0001::2"], mps_config(strategies))
    # Exactly NVIDIA's additions on top of what the strategies give (CDI names included).
    assert alloc.envs == {**plain.envs, **MPS_ENV}
    assert alloc.mounts == (*plain.mounts, *MPS_MOUNTS)
    assert (alloc.annotations, alloc.cdi_devices) == (plain.annotations, plain.cdi_devices)


def test_time_slicing_gets_no_mps_additions() -> None:
    resource = dataclasses.replace(mps_resource(GPUS[:1], 2), sharing=SharingStrategy.TIME_SLICING)
    alloc = allocate(resource, ["GPU-0000::0"], mps_config(("envvar",)))
    assert alloc.envs == {"NVIDIA_VISIBLE_DEVICES": "GPU-0000"} and alloc.mounts == ()


def test_mps_more_than_one_replica_fails_with_nvidias_text() -> None:
    with pytest.raises(AllocationError) as info:
        allocate(mps_resource(GPUS[:2], 4), ["GPU-0000::0", "GPU-0001::0"],
                 mps_config(("envvar",)))
    assert str(info.value) == ('invalid allocation request for "nvidia.com/gpu": invalid '
                               "request: maximum request size for shared resources is 1; found 2")

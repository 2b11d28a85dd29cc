"""The generated kubelet API stubs: reproducible, and matching the kubelet's wire contract."""

from __future__ import annotations

from pathlib import Path

import pytest

from protos import generate
from protos.deviceplugin.v1beta1 import api_pb2, api_pb2_grpc
from protos.podresources.v1 import api_pb2 as pr_pb2
from protos.podresources.v1 import api_pb2_grpc as pr_pb2_grpc

REPO_ROOT = Path(generate.REPO_ROOT)
STUB_DIR = REPO_ROOT / "protos" / "deviceplugin" / "v1beta1"
PR_STUB_DIR = REPO_ROOT / "protos" / "podresources" / "v1"


def test_regeneration_is_byte_identical(tmp_path: Path) -> None:
    outputs = generate.generate(tmp_path)
    # Every proto's three stubs, each compared with the checked-in file at the same path (both
    # APIs name their stubs api_pb2*, so the name alone would compare the wrong pair).
    assert len(outputs) == 3 * len(generate.PROTO_FILES) >= 6
    for produced in outputs:
        checked_in = REPO_ROOT / produced.relative_to(tmp_path)
        assert produced.read_bytes() == checked_in.read_bytes(), (
            f"{checked_in} is stale: run `make protos`"
        )


@pytest.mark.parametrize(
    ("stub_dir", "package"),
    [(STUB_DIR, "protos.deviceplugin.v1beta1"), (PR_STUB_DIR, "protos.podresources.v1")],
)
def test_generated_grpc_module_imports_by_package_path(stub_dir: Path, package: str) -> None:
    text = (stub_dir / "api_pb2_grpc.py").read_text()
    assert f"from {package} import api_pb2" in text


@pytest.mark.parametrize(
    ("service", "method", "wire"),
    [
        ("Registration", "Register", "/v1beta1.Registration/Register"),
        ("DevicePlugin", "GetDevicePluginOptions", "/v1beta1.DevicePlugin/GetDevicePluginOptions"),
        ("DevicePlugin", "ListAndWatch", "/v1beta1.DevicePlugin/ListAndWatch"),
        ("DevicePlugin", "GetPreferredAllocation", "/v1beta1.DevicePlugin/GetPreferredAllocation"),
        ("DevicePlugin", "Allocate", "/v1beta1.DevicePlugin/Allocate"),
        ("DevicePlugin", "PreStartContainer", "/v1beta1.DevicePlugin/PreStartContainer"),
    ],
)
def test_wire_names(service: str, method: str, wire: str) -> None:
    descriptor = api_pb2.DESCRIPTOR.services_by_name[service].methods_by_name[method]
    assert f"/{descriptor.containing_service.full_name}/{descriptor.name}" == wire
    assert wire in (STUB_DIR / "api_pb2_grpc.py").read_text()


def test_only_list_and_watch_streams() -> None:
    methods = api_pb2.DESCRIPTOR.services_by_name["DevicePlugin"].methods
    streaming = {m.name for m in methods if m.server_streaming or m.client_streaming}
    assert streaming == {"ListAndWatch"}
    assert api_pb2.DESCRIPTOR.package == "v1beta1"


@pytest.mark.parametrize(
    ("message", "field", "number"),
    [
        ("DevicePluginOptions", "pre_start_required", 1),
        ("DevicePluginOptions", "get_preferred_allocation_available", 2),
        ("RegisterRequest", "version", 1),
        ("RegisterRequest", "endpoint", 2),
        ("RegisterRequest", "resource_name", 3),
        ("RegisterRequest", "options", 4),
        ("ListAndWatchResponse", "devices", 1),
        ("TopologyInfo", "nodes", 1),
        ("NUMANode", "ID", 1),
        ("Device", "ID", 1),
        ("Device", "health", 2),
        ("Device", "topology", 3),
        ("PreStartContainerRequest", "devices_ids", 1),
        ("PreferredAllocationRequest", "container_requests", 1),
        ("ContainerPreferredAllocationRequest", "available_deviceIDs", 1),
        ("ContainerPreferredAllocationRequest", "must_include_deviceIDs", 2),
        ("ContainerPreferredAllocationRequest", "allocation_size", 3),
        ("PreferredAllocationResponse", "container_responses", 1),
        ("ContainerPreferredAllocationResponse", "deviceIDs", 1),
        ("AllocateRequest", "container_requests", 1),
        ("ContainerAllocateRequest", "devices_ids", 1),
        ("CDIDevice", "name", 1),
        ("AllocateResponse", "container_responses", 1),
        ("ContainerAllocateResponse", "envs", 1),
        ("ContainerAllocateResponse", "mounts", 2),
        ("ContainerAllocateResponse", "devices", 3),
        ("ContainerAllocateResponse", "annotations", 4),
        ("ContainerAllocateResponse", "cdi_devices", 5),
        ("Mount", "container_path", 1),
        ("Mount", "host_path", 2),
        ("Mount", "read_only", 3),
        ("DeviceSpec", "container_path", 1),
        ("DeviceSpec", "host_path", 2),
        ("DeviceSpec", "permissions", 3),
    ],
)
def test_field_numbers(message: str, field: str, number: int) -> None:
    descriptor = api_pb2.DESCRIPTOR.message_types_by_name[message]
    assert descriptor.fields_by_name[field].number == number


def test_maps_and_empties() -> None:
    response = api_pb2.ContainerAllocateResponse(envs={"A": "1"}, annotations={"k": "v"})
    assert dict(response.envs) == {"A": "1"}
    assert api_pb2.DESCRIPTOR.message_types_by_name["Empty"].fields == []
    assert api_pb2.DESCRIPTOR.message_types_by_name["PreStartContainerResponse"].fields == []
    assert hasattr(api_pb2_grpc, "DevicePluginServicer")
    assert hasattr(api_pb2_grpc, "RegistrationStub")


# PodResources v1 (kubernetes/kubelet pkg/apis/podresources/v1/api.proto) -------------------------


@pytest.mark.parametrize(
    ("method", "wire"),
    [
        ("List", "/v1.PodResourcesLister/List"),
        ("GetAllocatableResources", "/v1.PodResourcesLister/GetAllocatableResources"),
        ("Get", "/v1.PodResourcesLister/Get"),
    ],
)
def test_pod_resources_wire_names(method: str, wire: str) -> None:
    descriptor = pr_pb2.DESCRIPTOR.services_by_name["PodResourcesLister"].methods_by_name[method]
    assert f"/{descriptor.containing_service.full_name}/{descriptor.name}" == wire
    assert not (descriptor.server_streaming or descriptor.client_streaming)
    assert wire in (PR_STUB_DIR / "api_pb2_grpc.py").read_text()


def test_pod_resources_package_and_methods() -> None:
    assert pr_pb2.DESCRIPTOR.package == "v1"
    methods = pr_pb2.DESCRIPTOR.services_by_name["PodResourcesLister"].methods
    assert {m.name for m in methods} == {"List", "GetAllocatableResources", "Get"}
    assert hasattr(pr_pb2_grpc, "PodResourcesListerServicer")
    assert hasattr(pr_pb2_grpc, "PodResourcesListerStub")


@pytest.mark.parametrize(
    ("message", "field", "number"),
    [
        ("ListPodResourcesResponse", "pod_resources", 1),
        ("PodResources", "name", 1),
        ("PodResources", "namespace", 2),
        ("PodResources", "containers", 3),
        ("PodResources", "cpu_ids", 4),
        ("PodResources", "memory", 5),
        ("ContainerResources", "name", 1),
        ("ContainerResources", "devices", 2),
        ("ContainerResources", "cpu_ids", 3),
        ("ContainerResources", "memory", 4),
        ("ContainerResources", "dynamic_resources", 5),
        ("ContainerDevices", "resource_name", 1),
        ("ContainerDevices", "device_ids", 2),
        ("ContainerDevices", "topology", 3),
        ("TopologyInfo", "nodes", 1),
        ("NUMANode", "ID", 1),
        ("ContainerMemory", "memory_type", 1),
        ("ContainerMemory", "size", 2),
        ("ContainerMemory", "topology", 3),
        ("DynamicResource", "claim_name", 2),
        ("DynamicResource", "claim_namespace", 3),
        ("DynamicResource", "claim_resources", 4),
        ("ClaimResource", "cdi_devices", 1),
        ("ClaimResource", "driver_name", 2),
        ("ClaimResource", "pool_name", 3),
        ("ClaimResource", "device_name", 4),
        ("ClaimResource", "share_id", 5),
        ("CDIDevice", "name", 1),
        ("AllocatableResourcesResponse", "devices", 1),
        ("AllocatableResourcesResponse", "cpu_ids", 2),
        ("AllocatableResourcesResponse", "memory", 3),
        ("GetPodResourcesRequest", "pod_name", 1),
        ("GetPodResourcesRequest", "pod_namespace", 2),
        ("GetPodResourcesResponse", "pod_resources", 1),
    ],
)
def test_pod_resources_field_numbers(message: str, field: str, number: int) -> None:
    descriptor = pr_pb2.DESCRIPTOR.message_types_by_name[message]
    assert descriptor.fields_by_name[field].number == number


def test_pod_resources_field_sets_are_exact() -> None:
    # No field beyond the public API's: a stray one would be silently ignored on the wire.
    expected = {
        "ListPodResourcesRequest": set(),
        "AllocatableResourcesRequest": set(),
        "DynamicResource": {"claim_name", "claim_namespace", "claim_resources"},
        "ContainerDevices": {"resource_name", "device_ids", "topology"},
        "ClaimResource": {"cdi_devices", "driver_name", "pool_name", "device_name", "share_id"},
    }
    for message, fields in expected.items():
        descriptor = pr_pb2.DESCRIPTOR.message_types_by_name[message]
        assert set(descriptor.fields_by_name) == fields, message


def test_pod_resources_share_id_has_presence() -> None:
    claim = pr_pb2.ClaimResource(driver_name="gpu.nvidia.com")
    assert not claim.HasField("share_id")
    claim.share_id = ""
    assert claim.HasField("share_id")

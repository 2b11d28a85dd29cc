"""The generated kubelet API stubs: reproducible, and matching the kubelet's wire contract."""

from __future__ import annotations

from pathlib import Path

import pytest

from protos import generate
from protos.deviceplugin.v1beta1 import api_pb2, api_pb2_grpc

STUB_DIR = Path(generate.REPO_ROOT) / "protos" / "deviceplugin" / "v1beta1"


def test_regeneration_is_byte_identical(tmp_path: Path) -> None:
    outputs = generate.generate(tmp_path)
    assert outputs, "nothing generated"
    for produced in outputs:
        checked_in = STUB_DIR / produced.name
        assert produced.read_bytes() == checked_in.read_bytes(), (
            f"{checked_in} is stale: run `make protos`"
        )


def test_generated_grpc_module_imports_by_package_path() -> None:
    text = (STUB_DIR / "api_pb2_grpc.py").read_text()
    assert "from protos.deviceplugin.v1beta1 import api_pb2" in text


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

"""Fuzzing the plugin's gRPC surface over its real Unix sockets.

Two running plugins (whole GPUs on the fake DGX A100; MIG mixed with time-sliced, strictly
shared MIG resources), one Unhealthy device each. Every request message the kubelet can send
is generated with random, known, mutated and duplicated IDs, unicode, odd sizes and big lists;
raw undecodable bytes too. The plugin answers with a valid response or INVALID_ARGUMENT (gRPC
itself answers INTERNAL for bytes that are not the message), never crashes, and a request never
changes what it serves (device lists and health identical before and after).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from faults.support import plugin_config, served_state, start_plugin, watch_until
from google.protobuf.message import DecodeError, Message
from hypothesis import given
from hypothesis import strategies as st
from plugin_support import controller_of, manager_of, monitor_of

from deviceplugin.main import DevicePlugin, replace_plugin_flags
from deviceplugin.server import PluginServer
from gpus.config import parse_config
from gpus.resources import Resource
from protos.deviceplugin.v1beta1 import api_pb2, api_pb2_grpc

from .strategies import TEXT, fuzz_settings

RPC_TIMEOUT = 10.0
SERVICE = "/v1beta1.DevicePlugin/"
SHARED_MIG = """
version: v1
flags:
  migStrategy: mixed
sharing:
  timeSlicing:
    failRequestsGreaterThanOne: true
    resources:
    - name: nvidia.com/mig-1g.5gb
      replicas: 3
    - name: nvidia.com/mig-2g.10gb
      replicas: 2
"""
# Beyond any kubelet request: the plugin may refuse these as too big (INVALID_ARGUMENT).
OVERSIZED_CONTAINERS = 16


@dataclass
class Target:
    """A running plugin and a channel to each of its resources."""

    plugin: DevicePlugin
    stubs: dict[str, api_pb2_grpc.DevicePluginStub]
    channels: dict[str, grpc.Channel]
    ids: list[str]  # every device ID of every resource

    def server(self, name: str) -> PluginServer:
        server = manager_of(self.plugin).server(name)
        assert server is not None
        return server


def make_unhealthy(plugin: DevicePlugin) -> None:
    """Mark one device Unhealthy for good (recovery is off) and wait until it is served so."""
    assert monitor_of(plugin).wait_watching(RPC_TIMEOUT)
    server = manager_of(plugin).servers()[0]
    device = server.resource.devices[0]
    gpu = device.gpu
    target = device.mig.uuid if device.mig is not None else gpu.uuid
    controller_of(plugin).inject_xid(target, 79)
    watch_until(server.socket_path,
                lambda r: any(d.health == "Unhealthy" for d in r.devices), RPC_TIMEOUT)


@pytest.fixture(scope="module", params=["whole", "mig-shared"])
def target(request: pytest.FixtureRequest) -> Iterator[Target]:
    directory = tempfile.mkdtemp(prefix="nvk", dir="/tmp")
    if request.param == "whole":
        config = plugin_config(directory, "dgx-a100", kubelet=False)
    else:
        config = plugin_config(directory, "a100-mig-mixed", parse_config(SHARED_MIG),
                               kubelet=False)
    # No recovery: the Unhealthy device stays so, and nothing but requests could change state.
    config = replace_plugin_flags(config, health_recovery_interval=0.0,
                                  health_quiet_period=3600.0)
    plugin = start_plugin(config, socket_dir=directory)
    channels: dict[str, grpc.Channel] = {}
    try:
        make_unhealthy(plugin)
        servers = manager_of(plugin).servers()
        channels = {s.name: grpc.insecure_channel(f"unix:{s.socket_path}") for s in servers}
        stubs = {n: api_pb2_grpc.DevicePluginStub(c) for n, c in channels.items()}
        ids = [d.id for s in servers for d in s.resource.devices]
        yield Target(plugin, stubs, channels, ids)
        # Still serving after everything.
        for server in manager_of(plugin).servers():
            first = watch_until(server.socket_path, lambda r: True, RPC_TIMEOUT)
            assert len(first.devices) == len(server.resource.devices)
    finally:
        for channel in channels.values():
            channel.close()
        plugin.close()
        shutil.rmtree(directory, ignore_errors=True)


# --- strategies ---------------------------------------------------------------------------------


@st.composite
def device_ids(draw: st.DrawFn, known: Sequence[str]) -> list[str]:
    """Known IDs (any resource), random text, mutated IDs; sometimes a huge list."""
    one = st.one_of(
        st.sampled_from(known),
        TEXT,
        st.sampled_from(known).map(lambda i: i + "::9"),
        st.sampled_from(known).map(lambda i: i.split("::")[0]),
        st.sampled_from(known).map(str.lower),
        st.sampled_from(known).map(lambda i: i[:-1]),
        st.text(min_size=257, max_size=400),
    )
    ids = draw(st.lists(one, max_size=10))
    if draw(st.integers(0, 9)) == 0:  # a big list: the same IDs many times
        ids = ids * draw(st.integers(50, 500)) or [draw(st.sampled_from(known))] * 3000
    return ids


def allocate_requests(known: Sequence[str]) -> st.SearchStrategy[api_pb2.AllocateRequest]:
    container = device_ids(known).map(lambda ids: api_pb2.ContainerAllocateRequest(
        devices_ids=ids))
    return st.lists(container, max_size=4).map(
        lambda cs: api_pb2.AllocateRequest(container_requests=cs))


def preferred_requests(known: Sequence[str]) -> st.SearchStrategy[Any]:
    container = st.builds(
        lambda a, m, n: api_pb2.ContainerPreferredAllocationRequest(
            available_deviceIDs=a, must_include_deviceIDs=m, allocation_size=n),
        device_ids(known), device_ids(known),
        st.one_of(st.integers(-2, 12), st.integers(-(2**31), 2**31 - 1)))
    return st.lists(container, max_size=4).map(
        lambda cs: api_pb2.PreferredAllocationRequest(container_requests=cs))


# --- oracles ------------------------------------------------------------------------------------


def oversized(containers: Sequence[Sequence[str]], resource: Resource) -> bool:
    """Bigger than any kubelet request: refusing it is allowed."""
    return len(containers) > OVERSIZED_CONTAINERS or any(
        len(ids) > len(resource.devices) or any(len(i) > 256 for i in ids) for ids in containers)


def allocate_valid(resource: Resource, ids: Sequence[str]) -> bool:
    """What build_allocation accepts: known, healthy IDs; one replica at most when strict."""
    by_id = {d.id: d for d in resource.devices}
    if not ids or any(i not in by_id or not by_id[i].healthy for i in ids):
        return False
    return not (resource.shared and resource.fail_requests_greater_than_one and len(ids) > 1)


def call(method: Any, request: Any) -> tuple[Any, grpc.StatusCode | None, str]:
    try:
        return method(request, timeout=RPC_TIMEOUT), None, ""
    except grpc.RpcError as err:
        return None, err.code(), err.details() or ""


def check_allocate(resource: Resource, request: api_pb2.AllocateRequest, response: Any,
                   code: grpc.StatusCode | None, details: str) -> None:
    containers = [list(c.devices_ids) for c in request.container_requests]
    valid = all(allocate_valid(resource, ids) for ids in containers)
    if code is None:
        assert valid, f"accepted an invalid request: {containers[:2]}"
        assert len(response.container_responses) == len(containers)
        return
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
    assert details.startswith(f'invalid allocation request for "{resource.name}"'), details
    assert not valid or oversized(containers, resource), f"refused a valid request: {details}"


def check_preferred(resource: Resource, request: Any, response: Any,
                    code: grpc.StatusCode | None, details: str) -> None:
    containers = [[*c.available_deviceIDs, *c.must_include_deviceIDs]
                  for c in request.container_requests]
    if code is not None:
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
        assert oversized(containers, resource), f"refused a plausible request: {details}"
        return
    assert len(response.container_responses) == len(request.container_requests)
    known = {d.id for d in resource.devices}
    for req, resp in zip(request.container_requests, response.container_responses,
                         strict=True):
        chosen = list(resp.deviceIDs)
        if not chosen:
            continue
        assert len(chosen) == req.allocation_size == len(set(chosen))
        assert set(chosen) <= set(req.available_deviceIDs) & known
        assert set(req.must_include_deviceIDs) <= set(chosen)


# --- tests --------------------------------------------------------------------------------------


@fuzz_settings(150)
@given(data=st.data())
def test_allocate(target: Target, data: st.DataObject) -> None:
    name = data.draw(st.sampled_from(sorted(target.stubs)))
    request = data.draw(allocate_requests(target.ids))
    resource = target.server(name).resource
    before = served_state(target.plugin)
    response, code, details = call(target.stubs[name].Allocate, request)
    check_allocate(resource, request, response, code, details)
    assert served_state(target.plugin) == before


@fuzz_settings(150)
@given(data=st.data())
def test_preferred_allocation(target: Target, data: st.DataObject) -> None:
    name = data.draw(st.sampled_from(sorted(target.stubs)))
    request = data.draw(preferred_requests(target.ids))
    resource = target.server(name).resource
    before = served_state(target.plugin)
    response, code, details = call(target.stubs[name].GetPreferredAllocation, request)
    check_preferred(resource, request, response, code, details)
    assert served_state(target.plugin) == before


@fuzz_settings(25)
@given(data=st.data())
def test_prestart_options_and_list_and_watch(target: Target, data: st.DataObject) -> None:
    name = data.draw(st.sampled_from(sorted(target.stubs)))
    stub = target.stubs[name]
    before = served_state(target.plugin)
    ids = data.draw(device_ids(target.ids))
    response, code, details = call(stub.PreStartContainer,
                                    api_pb2.PreStartContainerRequest(devices_ids=ids))
    assert code is None, (code, details)
    options, code, details = call(stub.GetDevicePluginOptions, api_pb2.Empty())
    assert code is None and options.get_preferred_allocation_available
    stream = stub.ListAndWatch(api_pb2.Empty(), timeout=RPC_TIMEOUT)
    try:
        first = next(stream)
    finally:
        stream.cancel()
    resource = target.server(name).resource
    assert [(d.ID, d.health) for d in first.devices] == [(d.id, d.health) for d in
                                                         resource.devices]
    assert served_state(target.plugin) == before


MESSAGES: dict[str, type[Message]] = {
    "Allocate": api_pb2.AllocateRequest,
    "GetPreferredAllocation": api_pb2.PreferredAllocationRequest,
    "PreStartContainer": api_pb2.PreStartContainerRequest,
    "GetDevicePluginOptions": api_pb2.Empty,
    "ListAndWatch": api_pb2.Empty,
}


@fuzz_settings(100)
@given(data=st.data())
def test_raw_bytes(target: Target, data: st.DataObject) -> None:
    """Arbitrary bytes as any request: INTERNAL only when they are not the message."""
    name = data.draw(st.sampled_from(sorted(target.stubs)))
    method = data.draw(st.sampled_from(sorted(MESSAGES)))
    payload = data.draw(st.binary(max_size=300))
    try:
        MESSAGES[method].FromString(payload)
        decodable = True
    except (DecodeError, ValueError):
        decodable = False
    channel = target.channels[name]
    before = served_state(target.plugin)
    try:
        if method == "ListAndWatch":
            stream = channel.unary_stream(SERVICE + method)(payload, timeout=RPC_TIMEOUT)
            try:
                next(stream)
            finally:
                stream.cancel()
        else:
            channel.unary_unary(SERVICE + method)(payload, timeout=RPC_TIMEOUT)
        code = None
    except grpc.RpcError as err:
        code = err.code()
    if not decodable:
        assert code in (grpc.StatusCode.INTERNAL, None), code
    else:
        assert code in (None, grpc.StatusCode.INVALID_ARGUMENT), code
    assert served_state(target.plugin) == before

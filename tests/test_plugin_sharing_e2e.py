"""End to end: time-slicing through the mock kubelet (replicas, renames, limits, policies)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import grpc
import pytest
from plugin_support import controller_of, monitor_of, snapshot_of
from test_plugin_mig_e2e import TIMEOUT, Env, mig_config, running
from test_server_support import short_tmpdir

from gpus.config import Config, ReplicatedResource, Sharing, TimeSlicing
from protos.deviceplugin.v1beta1 import api_pb2

GPU = "nvidia.com/gpu"


def shared(config: Config, *resources: ReplicatedResource, **options: bool) -> Config:
    """``config`` with ``sharing.timeSlicing`` set."""
    slicing = TimeSlicing(resources=tuple(resources), **options)
    return dataclasses.replace(config, sharing=Sharing(time_slicing=slicing))


@contextmanager
def sharing_env(
    *resources: ReplicatedResource,
    profile: str = "dgx-a100",
    strategy: str = "none",
    policy: str = "distributed",
    **options: bool,
) -> Iterator[Env]:
    with short_tmpdir() as directory:
        base = mig_config(directory, profile, strategy,
                          shared_devices_allocation_policy=policy)
        with running(shared(base, *resources, **options), directory) as env:
            yield env


def test_replicas_are_registered_as_uuid_and_number() -> None:
    with sharing_env(ReplicatedResource(GPU, 4)) as env:
        uuids = [g.uuid for g in snapshot_of(env.plugin).gpus]
        ids = [d.id for d in env.kubelet.devices(GPU)]
        assert ids == [f"{u}::{n}" for u in uuids for n in range(4)]
        # A replica allocates its physical GPU.
        outcome = env.kubelet.allocate(GPU, 1)
        (chosen,) = outcome.allocated
        assert outcome.response.envs["NVIDIA_VISIBLE_DEVICES"] == chosen.split("::")[0]


def test_rename_by_default_serves_gpu_shared_only() -> None:
    with sharing_env(ReplicatedResource(GPU, 2), rename_by_default=True) as env:
        assert [r.resource_name for r in env.kubelet.registrations()] == ["nvidia.com/gpu.shared"]
        assert env.kubelet.resources() == ["nvidia.com/gpu.shared"]
        assert len(env.kubelet.devices("nvidia.com/gpu.shared")) == 16


def allocate(env: Env, resource: str, ids: list[str]) -> api_pb2.AllocateResponse:
    request = api_pb2.AllocateRequest(
        container_requests=[api_pb2.ContainerAllocateRequest(devices_ids=ids)]
    )
    stub = env.kubelet.stub(resource)
    response: api_pb2.AllocateResponse = stub.Allocate(request, timeout=TIMEOUT)
    return response


def test_fail_requests_greater_than_one_reaches_the_kubelet() -> None:
    with sharing_env(ReplicatedResource(GPU, 4), fail_requests_greater_than_one=True) as env:
        ids = [d.id for d in env.kubelet.devices(GPU)]
        with pytest.raises(grpc.RpcError) as info:
            allocate(env, GPU, ids[:2])
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details() == (
            'invalid allocation request for "nvidia.com/gpu": invalid request: '
            "maximum request size for shared resources is 1; found 2"
        )
        # One replica is fine.
        assert allocate(env, GPU, ids[:1]).container_responses[0].envs


def test_more_than_one_replica_is_allowed_by_default() -> None:
    with sharing_env(ReplicatedResource(GPU, 4)) as env:
        ids = [d.id for d in env.kubelet.devices(GPU)]
        response = allocate(env, GPU, [ids[0], ids[1], ids[4]])
        # Replicas of one GPU collapse to that GPU, request order kept.
        uuids = [g.uuid for g in snapshot_of(env.plugin).gpus]
        assert response.container_responses[0].envs["NVIDIA_VISIBLE_DEVICES"] == (
            f"{uuids[0]},{uuids[1]}"
        )


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        # distributed: one replica per GPU, lowest GPU index first.
        ("distributed", lambda u: [f"{u[0]}::0", f"{u[1]}::0", f"{u[2]}::0"]),
        # packed: fill GPU 0 before touching GPU 1.
        ("packed", lambda u: [f"{u[0]}::0", f"{u[0]}::1", f"{u[0]}::2"]),
    ],
)
def test_preferred_allocation_policies_through_the_kubelet(
        policy: str, expected: Callable[[list[str]], list[str]]) -> None:
    with sharing_env(ReplicatedResource(GPU, 4), policy=policy) as env:
        uuids = [g.uuid for g in snapshot_of(env.plugin).gpus]
        outcome = env.kubelet.allocate(GPU, 3)
        assert list(outcome.preferred) == expected(uuids)
        assert list(outcome.allocated) == expected(uuids)


def test_packed_policy_prefers_the_busiest_gpu() -> None:
    with sharing_env(ReplicatedResource(GPU, 4), policy="packed") as env:
        uuids = [g.uuid for g in snapshot_of(env.plugin).gpus]
        # GPU 3 has two replicas in use (not offered), every other GPU is free.
        available = [d.id for d in env.kubelet.devices(GPU)
                     if d.id not in (f"{uuids[3]}::0", f"{uuids[3]}::1")]
        request = api_pb2.PreferredAllocationRequest(container_requests=[
            api_pb2.ContainerPreferredAllocationRequest(
                available_deviceIDs=available, allocation_size=2
            )
        ])
        response = env.kubelet.stub(GPU).GetPreferredAllocation(request, timeout=TIMEOUT)
        assert list(response.container_responses[0].deviceIDs) == [
            f"{uuids[3]}::2", f"{uuids[3]}::3"
        ]


def test_time_sliced_mig_devices_under_mixed() -> None:
    resource = "nvidia.com/mig-1g.5gb"
    with sharing_env(ReplicatedResource(resource, 2), profile="a100-mig-1g",
                     strategy="mixed") as env:
        migs = [m.uuid for g in snapshot_of(env.plugin).gpus for m in g.mig_devices]
        assert [d.id for d in env.kubelet.devices(resource)] == [
            f"{m}::{n}" for m in migs for n in range(2)
        ]
        outcome = env.kubelet.allocate(resource, 1)
        (chosen,) = outcome.allocated
        assert outcome.response.envs["NVIDIA_VISIBLE_DEVICES"] == chosen.split("::")[0]
        # Device specs for a replica are its MIG device's: parent node plus two capabilities.
        caps = [d for d in outcome.response.devices
                if d.container_path.startswith("/dev/nvidia-caps/")]
        assert len(caps) == 2


def test_xid_marks_every_replica_of_the_gpu() -> None:
    with sharing_env(ReplicatedResource(GPU, 3)) as env:
        assert monitor_of(env.plugin).wait_watching(TIMEOUT)
        uuid = snapshot_of(env.plugin).gpus[5].uuid
        controller_of(env.plugin).inject_xid(5, 79)
        devices = env.kubelet.wait_for_devices(
            GPU, lambda ds: any(d.health == "Unhealthy" for d in ds), TIMEOUT
        )
        assert devices is not None
        assert sorted(d.id for d in devices if d.health == "Unhealthy") == [
            f"{uuid}::{n}" for n in range(3)
        ]

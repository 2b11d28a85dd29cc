"""End to end over the MIG profiles: every strategy, through the mock kubelet, with device specs.

The plugin runs on the fake NVML with ``--pass-device-specs``; the fake writes the driver's
``mig-minors`` file under a driver root and plain-file device nodes under a separate dev root,
so Allocate's host paths must carry the dev root and its MIG capability minors must come from
the file. Invalid layouts must be reported, never crash, and leave the valid devices served.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from plugin_support import controller_of, installed_fake, monitor_of, snapshot_of
from test_server_support import short_tmpdir

from deviceplugin.main import DevicePlugin, replace_flags, replace_plugin_flags
from deviceplugin.mockkubelet import DeviceInfo, MockKubelet
from gpus.config import Config
from gpus.fake.controller import mig_ci_minor, mig_gi_minor
from gpus.resources import Device
from protos.deviceplugin.v1beta1 import api_pb2

TIMEOUT = 10.0
GPU = "nvidia.com/gpu"
# The fake creates these control nodes, not /dev/nvidia-modeset (see write_driver_root).
CONTROL = ["/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools"]


@dataclass
class Env:
    kubelet: MockKubelet
    plugin: DevicePlugin
    directory: str

    @property
    def dev_root(self) -> str:
        return os.path.join(self.directory, "devroot")


def mig_config(directory: str, profile: str, strategy: str, **plugin_flags: object) -> Config:
    """Fake ``profile`` under ``strategy`` with device specs and separate driver and dev roots."""
    config = replace_flags(
        Config(),
        nvml=f"fake:{profile}",
        sysfs_root=os.path.join(directory, "root"),
        mig_strategy=strategy,
        nvidia_driver_root=os.path.join(directory, "driver"),
        nvidia_dev_root=os.path.join(directory, "devroot"),
    )
    flags = {
        "kubelet_socket": os.path.join(directory, "kubelet.sock"),
        "cdi_spec_dir": os.path.join(directory, "cdi"),
        "pass_device_specs": True,
        # No recovery during a test: an XID-marked device stays Unhealthy.
        "health_recovery_interval": 0.0,
        **plugin_flags,
    }
    return replace_plugin_flags(config, **flags)


@contextmanager
def running(config: Config, directory: str) -> Iterator[Env]:
    """The mock kubelet and the plugin on ``config``, torn down afterwards."""
    kubelet = MockKubelet(directory)
    kubelet.start()
    plugin = DevicePlugin(config, {}, poll_interval=0.02)
    try:
        controller = installed_fake(plugin.select_backend())
        controller.write_sysfs(Path(config.flags.sysfs_root))
        controller.write_driver_root(config.flags.nvidia_driver_root, config.flags.dev_root)
        plugin.start()
        assert plugin.readiness.wait(True, TIMEOUT), "the plugin never became ready"
        env = Env(kubelet, plugin, directory)
        for name in served(env):
            assert kubelet.wait_for_registration(name, TIMEOUT), name
        yield env
    finally:
        plugin.close()
        kubelet.stop()


@contextmanager
def mig_env(profile: str, strategy: str, **plugin_flags: object) -> Iterator[Env]:
    with short_tmpdir() as directory, running(
        mig_config(directory, profile, strategy, **plugin_flags), directory
    ) as env:
        yield env


def served(env: Env) -> dict[str, tuple[Device, ...]]:
    """The plugin's resources with devices."""
    resources = env.plugin.resource_map.resources
    return {name: r.devices for name, r in resources.items() if r.devices}


def host(env: Env, path: str) -> str:
    return os.path.join(env.dev_root, path.lstrip("/"))


def expected_specs(env: Env, device: Device) -> list[tuple[str, str, str]]:
    """(container path, host path, permissions) NVIDIA passes for one device."""
    paths = [*CONTROL, f"/dev/nvidia{device.gpu.minor}"]
    if device.mig is not None:
        gi, ci = device.mig.gpu_instance_id, device.mig.compute_instance_id
        paths += [
            f"/dev/nvidia-caps/nvidia-cap{mig_gi_minor(device.gpu.minor, gi)}",
            f"/dev/nvidia-caps/nvidia-cap{mig_ci_minor(device.gpu.minor, gi, ci)}",
        ]
    return [(p, host(env, p), "rw") for p in paths]


def health_of(devices: list[DeviceInfo]) -> dict[str, str]:
    return {d.id: d.health for d in devices}


# (profile, strategy) -> {resource: device count}; MIG devices are "MIG-..." IDs.
EXPECTED: dict[tuple[str, str], dict[str, int]] = {
    ("a100-mig-1g", "single"): {GPU: 56},
    ("a100-mig-1g", "mixed"): {"nvidia.com/mig-1g.5gb": 56},
    ("a100-mig-mixed", "single"): {},
    ("a100-mig-mixed", "mixed"): {
        "nvidia.com/mig-1g.5gb": 8, "nvidia.com/mig-2g.10gb": 8, "nvidia.com/mig-3g.20gb": 8,
    },
    ("a100-mig-7g", "single"): {GPU: 8},
    ("a100-mig-7g", "mixed"): {"nvidia.com/mig-7g.40gb": 8},
    ("a100-mig-me", "single"): {GPU: 8},
    ("a100-mig-me", "mixed"): {"nvidia.com/mig-1g.5gb.me": 8},
    ("dgx-a100-mig", "single"): {},
    ("dgx-a100-mig", "mixed"): {
        "nvidia.com/mig-1g.5gb": 9, "nvidia.com/mig-2g.10gb": 3, "nvidia.com/mig-3g.20gb": 4,
        "nvidia.com/mig-4g.20gb": 1, "nvidia.com/mig-7g.40gb": 1, "nvidia.com/mig-1g.10gb": 1,
        "nvidia.com/mig-1g.5gb.me": 1, "nvidia.com/mig-1c.3g.20gb": 1,
        "nvidia.com/mig-2c.3g.20gb": 1,
    },
    ("a100-mig-empty", "single"): {},
    ("a100-mig-empty", "mixed"): {},
    ("a100-mig-partial", "single"): {GPU: 28},
    ("a100-mig-partial", "mixed"): {GPU: 4, "nvidia.com/mig-1g.5gb": 28},
    ("h100-mig", "single"): {GPU: 56},
    ("h100-mig", "mixed"): {"nvidia.com/mig-1g.10gb": 56},
    ("h100-mig-mixed", "single"): {},
    ("h100-mig-mixed", "mixed"): {
        "nvidia.com/mig-3g.40gb": 8, "nvidia.com/mig-2g.20gb": 8, "nvidia.com/mig-1g.10gb": 8,
    },
    ("h100-mig-7g", "single"): {GPU: 8},
    ("h100-mig-7g", "mixed"): {"nvidia.com/mig-7g.80gb": 8},
    ("h100-mig-me", "single"): {GPU: 8},
    ("h100-mig-me", "mixed"): {"nvidia.com/mig-1g.10gb.me": 8},
}
# Strategy none: MIG ignored, every GPU whole.
EXPECTED.update({(profile, "none"): {GPU: 8} for profile, _ in list(EXPECTED)})
# How many problems each layout reports (the wording is tested in test_resources*).
PROBLEMS = {("a100-mig-mixed", "single"): 1, ("h100-mig-mixed", "single"): 1,
            ("dgx-a100-mig", "single"): 2,
            ("dgx-a100-mig", "mixed"): 1, ("a100-mig-empty", "single"): 8,
            ("a100-mig-empty", "mixed"): 8, ("a100-mig-partial", "single"): 1}


@pytest.mark.parametrize(("profile", "strategy"), sorted(EXPECTED))
def test_mig_strategies_register_and_allocate_with_device_specs(profile: str,
                                                               strategy: str) -> None:
    with mig_env(profile, strategy) as env:
        kubelet, plugin = env.kubelet, env.plugin
        expected = EXPECTED[(profile, strategy)]
        assert {name: len(d) for name, d in served(env).items()} == expected
        assert len(plugin.resource_map.problems) == PROBLEMS.get((profile, strategy), 0)
        # One Register per resource with devices, endpoint nvidia-<name>.sock, none for others.
        registered = {r.resource_name: r.endpoint for r in kubelet.registrations()}
        assert registered == {
            name: "nvidia-" + name.removeprefix("nvidia.com/") + ".sock" for name in expected
        }
        assert kubelet.resources() == sorted(expected)
        mig_uuids = [m.uuid for g in snapshot_of(plugin).gpus for m in g.mig_devices]
        for name, devices in served(env).items():
            seen = kubelet.devices(name)
            # IDs: MIG UUIDs (unless MIG-disabled GPUs are served whole), all Healthy.
            assert [d.id for d in seen] == [d.id for d in devices]
            assert {d.health for d in seen} == {"Healthy"}
            assert all(d.id.startswith("MIG-") == (d.mig is not None) for d in devices)
            assert {d.id for d in devices if d.mig is not None} <= set(mig_uuids)
            outcome = kubelet.allocate(name, 1)
            (chosen,) = outcome.allocated
            device = next(d for d in devices if d.id == chosen)
            response = outcome.response
            assert response.envs["NVIDIA_VISIBLE_DEVICES"] == device.uuid
            specs = [(d.container_path, d.host_path, d.permissions) for d in response.devices]
            assert specs == expected_specs(env, device)


def test_single_strategy_serves_mig_devices_as_gpu() -> None:
    with mig_env("a100-mig-1g", "single") as env:
        ids = [d.id for d in env.kubelet.devices(GPU)]
        snapshot = snapshot_of(env.plugin)
        assert ids == [m.uuid for g in snapshot.gpus for m in g.mig_devices]
        # Two MIG devices of one GPU in one container: one parent node, four capabilities.
        gpu0 = [m for m in snapshot.gpus[0].mig_devices][:2]
        outcome = env.kubelet.allocate(GPU, 2, must_include=[m.uuid for m in gpu0])
        paths = [d.container_path for d in outcome.response.devices]
        assert paths.count("/dev/nvidia0") == 1
        assert len([p for p in paths if p.startswith("/dev/nvidia-caps/")]) == 4


@pytest.mark.parametrize("strategy", ["single", "mixed"])
def test_empty_mig_layout_reports_and_serves_nothing(strategy: str) -> None:
    with mig_env("a100-mig-empty", strategy) as env:
        assert env.kubelet.registrations() == []
        problems = env.plugin.resource_map.problems
        assert len(problems) == 8
        assert all("MIG enabled but no MIG devices" in p or "no MIG devices" in p
                   for p in problems)
        # Nothing to register is still ready (the probes must not restart us for it).
        assert env.plugin.readiness.ready


def test_partial_single_layout_keeps_serving_the_mig_devices() -> None:
    with mig_env("a100-mig-partial", "single") as env:
        (problem,) = env.plugin.resource_map.problems
        assert "MIG disabled" in problem and "GPU 4" in problem and "GPU 7" in problem
        devices = env.kubelet.devices(GPU)
        assert len(devices) == 28 and all(d.id.startswith("MIG-") for d in devices)
        outcome = env.kubelet.allocate(GPU, 1)
        assert any(d.container_path.startswith("/dev/nvidia-caps/")
                   for d in outcome.response.devices)


def test_missing_mig_minors_fails_only_mig_allocations() -> None:
    with mig_env("a100-mig-partial", "mixed") as env:
        os.unlink(os.path.join(env.directory, "driver", "proc/driver/nvidia-caps/mig-minors"))
        with pytest.raises(grpc.RpcError) as info:
            env.kubelet.allocate("nvidia.com/mig-1g.5gb", 1)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "mig-minors" in info.value.details()
        # Whole GPUs need no capability minors and still allocate.
        assert env.kubelet.allocate(GPU, 1).response.devices


def test_xid_on_a_mig_device_marks_only_that_device() -> None:
    with mig_env("a100-mig-1g", "mixed") as env:
        resource = "nvidia.com/mig-1g.5gb"
        assert monitor_of(env.plugin).wait_watching(TIMEOUT)
        target = snapshot_of(env.plugin).gpus[1].mig_devices[3].uuid
        controller_of(env.plugin).inject_xid(target, 79)
        devices = env.kubelet.wait_for_devices(
            resource, lambda ds: health_of(ds)[target] == "Unhealthy", TIMEOUT
        )
        assert devices is not None
        assert [d.id for d in devices if d.health == "Unhealthy"] == [target]


def test_xid_on_a_whole_gpu_marks_all_its_mig_devices() -> None:
    with mig_env("a100-mig-1g", "single") as env:
        assert monitor_of(env.plugin).wait_watching(TIMEOUT)
        gpu = snapshot_of(env.plugin).gpus[2]
        children = {m.uuid for m in gpu.mig_devices}
        controller_of(env.plugin).inject_xid(2, 79)
        devices = env.kubelet.wait_for_devices(
            GPU, lambda ds: {d.id for d in ds if d.health == "Unhealthy"} == children, TIMEOUT
        )
        assert devices is not None and len(devices) == 56
        # Our Allocate refuses an Unhealthy device even if a kubelet asked for it.
        request = api_pb2.AllocateRequest(container_requests=[
            api_pb2.ContainerAllocateRequest(devices_ids=[gpu.mig_devices[0].uuid])
        ])
        with pytest.raises(grpc.RpcError) as info:
            env.kubelet.stub(GPU).Allocate(request, timeout=TIMEOUT)
        assert "unhealthy device" in info.value.details()


MIG_1G = "nvidia.com/mig-1g.5gb"


def preferred(env: Env, resource: str, available: list[str], size: int) -> list[str]:
    """GetPreferredAllocation as the kubelet sends it: only the free devices are offered."""
    request = api_pb2.PreferredAllocationRequest(container_requests=[
        api_pb2.ContainerPreferredAllocationRequest(available_deviceIDs=available,
                                                    allocation_size=size)
    ])
    response = env.kubelet.stub(resource).GetPreferredAllocation(request, timeout=TIMEOUT)
    return list(response.container_responses[0].deviceIDs)


def parents(env: Env, ids: list[str]) -> list[int]:
    """The parent GPU index of each MIG device."""
    by_uuid = {m.uuid: g.index for g in snapshot_of(env.plugin).gpus for m in g.mig_devices}
    return [by_uuid[i] for i in ids]


def test_packed_fills_one_gpu_first_on_uneven_mig_layouts() -> None:
    # dgx-a100-mig, mixed: mig-1g.5gb has seven slices on GPU 0 and one each on GPUs 1 and 3.
    # Guessing "in use" from the free devices (as if every GPU had seven) made GPUs 1 and 3
    # look busiest, so packed took their lone slices and split a request over three GPUs.
    with mig_env("dgx-a100-mig", "mixed", shared_devices_allocation_policy="packed") as env:
        ids = [d.id for d in env.kubelet.devices(MIG_1G)]
        assert sorted(parents(env, ids)) == [0] * 7 + [1, 3]
        assert parents(env, preferred(env, MIG_1G, ids, 3)) == [0, 0, 0]
        # Two of GPU 0's slices in use: GPU 0 is the busiest, so it is filled first.
        first_two = [i for i in ids if parents(env, [i]) == [0]][:2]
        free = [i for i in ids if i not in first_two]
        assert parents(env, preferred(env, MIG_1G, free, 6)) == [0, 0, 0, 0, 0, 1]
        # GPU 3's slice in use: GPU 3 has nothing free, GPU 0 (index) goes first again.
        rest = [i for i in ids if parents(env, [i]) != [3]]
        assert parents(env, preferred(env, MIG_1G, rest, 2)) == [0, 0]


def test_distributed_spreads_over_uneven_mig_layouts() -> None:
    with mig_env("dgx-a100-mig", "mixed", shared_devices_allocation_policy="distributed") as env:
        ids = [d.id for d in env.kubelet.devices(MIG_1G)]
        assert parents(env, preferred(env, MIG_1G, ids, 3)) == [0, 1, 3]
        # One of GPU 0's slices in use: GPUs 1 and 3 (none in use) come first.
        gpu0 = [i for i in ids if parents(env, [i]) == [0]]
        free = [i for i in ids if i != gpu0[0]]
        assert parents(env, preferred(env, MIG_1G, free, 2)) == [1, 3]


def test_unhealthy_mig_devices_do_not_count_as_in_use() -> None:
    # An XID on one of GPU 0's slices: that slice is not offered, but nobody holds it, so
    # GPU 0 is as idle as GPUs 1 and 3 and distributed still starts there (index order).
    # Counted as in use, GPU 0 would go last.
    with mig_env("dgx-a100-mig", "mixed") as env:
        assert monitor_of(env.plugin).wait_watching(TIMEOUT)
        sick = snapshot_of(env.plugin).gpus[0].mig_devices[2].uuid
        controller_of(env.plugin).inject_xid(sick, 79)
        devices = env.kubelet.wait_for_devices(
            MIG_1G, lambda ds: health_of(ds)[sick] == "Unhealthy", TIMEOUT
        )
        assert devices is not None
        healthy = [d.id for d in devices if d.health == "Healthy"]
        assert parents(env, preferred(env, MIG_1G, healthy, 3)) == [0, 1, 3]

"""Issue 13's wiring: the running plugin discovers the driver and writes full CDI specs.

For every shipped profile, in both CDI strategies, the plugin (fake NVML, a fake driver root
from :func:`gpus.fake.driverroot.write_fake_driver_root`, the mock kubelet, real gRPC) writes a
spec that passes tests/cdi_checks.py, holds the fake root's libraries, binaries, firmware and
hooks, and every Allocate answer names only its devices. A missing driver is a clear error and
exit 1 in CDI mode, and changes nothing in envvar mode. The spec goes on a clean stop.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from cdi_checks import allocated_names, check_spec
from test_server_support import short_tmpdir

from deviceplugin.main import DevicePlugin, main, replace_flags, replace_plugin_flags
from deviceplugin.mockkubelet import MockKubelet
from gpus.config import Config
from gpus.errors import InitError
from gpus.fake.driverroot import FakeDriverRoot, write_fake_driver_root
from gpus.fake.profile import list_profiles
from protos.deviceplugin.v1beta1 import api_pb2

TIMEOUT = 10.0
SPEC = "k8s.device-plugin.nvidia.com-gpu.json"
HOOKS = ["create-symlinks", "create-symlinks", "enable-cuda-compat", "update-ldcache",
         "disable-device-node-modification", "update-application-profile"]


def cdi_config(directory: str, profile: str, *strategies: str, **plugin_flags: Any) -> Config:
    driver = os.path.join(directory, "driver")
    config = replace_flags(Config(), nvml=f"fake:{profile}", mig_strategy="mixed",
                           sysfs_root=os.path.join(directory, "root"), nvidia_driver_root=driver)
    return replace_plugin_flags(
        config, device_list_strategy=strategies, container_driver_root=driver,
        kubelet_socket=os.path.join(directory, "kubelet.sock"),
        cdi_spec_dir=os.path.join(directory, "cdi"), **plugin_flags)


@contextmanager
def started(config: Config, *, fake_root: bool = True
            ) -> Iterator[tuple[MockKubelet, DevicePlugin, FakeDriverRoot | None]]:
    kubelet = MockKubelet(os.path.dirname(config.flags.plugin.kubelet_socket))
    kubelet.start()
    plugin = DevicePlugin(config, {}, poll_interval=0.02)
    try:
        controller = plugin.select_backend()
        assert controller is not None
        controller.write_sysfs(Path(config.flags.sysfs_root))
        root = None
        if fake_root:
            root = write_fake_driver_root(controller.profile, config.flags.nvidia_driver_root)
        plugin.start()
        yield kubelet, plugin, root
    finally:
        plugin.close()
        kubelet.stop()


def allocate_all(kubelet: MockKubelet, resource: str) -> Any:
    """One Allocate of every device the kubelet sees (no preferred-set search: not the point
    here, and slow on 16 GPUs)."""
    ids = [d.id for d in kubelet.devices(resource)]
    request = api_pb2.AllocateRequest(
        container_requests=[api_pb2.ContainerAllocateRequest(devices_ids=ids)])
    return kubelet.stub(resource).Allocate(request, timeout=TIMEOUT).container_responses[0]


def spec_of(config: Config) -> dict[str, Any]:
    path = os.path.join(config.flags.plugin.cdi_spec_dir, SPEC)
    spec: dict[str, Any] = json.loads(Path(path).read_text())
    return spec


@pytest.mark.parametrize("profile", list_profiles())
def test_every_profile_serves_a_complete_spec_that_resolves_every_allocation(
        profile: str) -> None:
    # Both CDI strategies at once (one plugin run per profile): each answer carries the
    # annotation and the CRI devices, which must name the same devices.
    with short_tmpdir() as directory:
        config = cdi_config(directory, profile, "cdi-annotations", "cdi-cri")
        with started(config) as (kubelet, plugin, root):
            assert root is not None
            spec = spec_of(config)
            allocated: list[str] = []
            for name, resource in plugin.resource_map.resources.items():
                if not resource.devices:
                    continue
                assert kubelet.wait_for_registration(name, TIMEOUT), name
                response = allocate_all(kubelet, name)
                assert dict(response.envs) == {} and list(response.mounts) == []
                by_annotation = allocated_names(dict(response.annotations), [])
                by_cri = [d.name for d in response.cdi_devices]
                assert by_annotation == by_cri, name
                assert len(by_cri) == len({d.uuid for d in resource.devices}), name
                allocated += by_cri
            check_spec(spec, allocated=allocated)
            common = spec["containerEdits"]
            mounted = {m["containerPath"] for m in common["mounts"]}
            assert set(root.libraries + root.binaries + root.firmware) <= mounted
            assert [h["args"][2] for h in common["hooks"]] == HOOKS
            assert all(m["hostPath"].startswith(str(root.root)) for m in common["mounts"])
        assert not os.path.exists(os.path.join(config.flags.plugin.cdi_spec_dir, SPEC))


def test_options_from_the_flags_reach_the_spec_and_allocate() -> None:
    with short_tmpdir() as directory:
        config = cdi_config(directory, "t4", "cdi-annotations",
                            nvidia_cdi_hook_path="/usr/local/bin/nvidia-cdi-hook",
                            cdi_disable_hooks=("update-application-profile",),
                            cdi_feature_flags=("disable-ipc-discoverer",),
                            cdi_annotation_prefix="nvidia.cdi.k8s.io/")
        with started(config) as (kubelet, _, _):
            assert kubelet.wait_for_registration("nvidia.com/gpu", TIMEOUT)
            response = kubelet.allocate("nvidia.com/gpu", 1).response
            (key,) = response.annotations
            assert key.startswith("nvidia.cdi.k8s.io/nvidia-device-plugin_")
            common = spec_of(config)["containerEdits"]
            assert {h["path"] for h in common["hooks"]} == {"/usr/local/bin/nvidia-cdi-hook"}
            assert [h["args"][1] for h in common["hooks"]] == HOOKS[:-1]
            assert not any("socket" in m["containerPath"] for m in common["mounts"])


def test_reload_rewrites_the_spec_with_the_new_options() -> None:
    with short_tmpdir() as directory:
        config = cdi_config(directory, "t4", "cdi-cri")
        with started(config) as (_, plugin, _):
            assert len(spec_of(config)["containerEdits"]["hooks"]) == 6
            new = replace_plugin_flags(config, cdi_disable_hooks=("all",))
            plugin._reload_config = lambda current: (new, None)
            assert plugin.reload() is None
            assert "hooks" not in spec_of(config)["containerEdits"]


def test_missing_driver_in_cdi_mode_is_a_clear_init_error() -> None:
    with short_tmpdir() as directory:
        config = cdi_config(directory, "t4", "cdi-cri")
        with pytest.raises(InitError, match=r"^CDI device-list strategy cdi-cri: NVIDIA driver "
                                            r"not found: no libcuda\.so\.\S+ under "), \
                started(config, fake_root=False):
            pass
        assert not os.path.exists(os.path.join(directory, "cdi", SPEC))


def test_missing_driver_in_envvar_mode_changes_nothing() -> None:
    with short_tmpdir() as directory:
        config = cdi_config(directory, "t4", "envvar")
        with started(config, fake_root=False) as (kubelet, _, _):
            assert kubelet.wait_for_registration("nvidia.com/gpu", TIMEOUT)
            response = kubelet.allocate("nvidia.com/gpu", 1).response
            assert list(response.envs) == ["NVIDIA_VISIBLE_DEVICES"]
        assert not os.path.exists(os.path.join(directory, "cdi"))


@pytest.mark.parametrize(("strategy", "code"), [("cdi-cri", 1), ("cdi-annotations", 1)])
def test_missing_driver_exits_1_with_one_line(strategy: str, code: int,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    with short_tmpdir() as directory:
        argv = ["--nvml", "fake:t4", "--kubelet-socket", "", "--socket-dir", directory,
                "--ready-file", "", "--device-list-strategy", strategy,
                "--driver-root", os.path.join(directory, "none"),
                "--driver-root-ctr-path", os.path.join(directory, "none"),
                "--cdi-spec-dir", os.path.join(directory, "cdi")]
        assert main(argv) == code
    lines = [line for line in capsys.readouterr().err.splitlines()
             if line.startswith("nvidia-device-plugin:")]
    assert len(lines) == 1
    assert lines[0].startswith(f"nvidia-device-plugin: initialisation failed: CDI device-list "
                               f"strategy {strategy}: NVIDIA driver not found: no libcuda")


def test_reload_out_of_cdi_mode_removes_the_spec() -> None:
    with short_tmpdir() as directory:
        config = cdi_config(directory, "t4", "cdi-cri")
        with started(config) as (_, plugin, _):
            spec = os.path.join(config.flags.plugin.cdi_spec_dir, SPEC)
            assert os.path.exists(spec)
            new = replace_plugin_flags(config, device_list_strategy=("envvar",))
            plugin._reload_config = lambda current: (new, None)
            assert plugin.reload() is None
            assert not os.path.exists(spec)

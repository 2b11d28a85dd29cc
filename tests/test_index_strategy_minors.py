"""``device-id-strategy index`` hands out NVML indices, never minor numbers.

End to end on ``t4-minors-permuted``, where no GPU's minor number equals its NVML index: the
device plugin on the fake NVML, Allocate through the mock kubelet's gRPC client.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_plugin_e2e import GPU, TIMEOUT, allocate_ids, e2e_config
from test_server_support import short_tmpdir

from deviceplugin.main import DevicePlugin, replace_flags, replace_plugin_flags
from deviceplugin.mockkubelet import MockKubelet
from gpus.fake import load_profile

PROFILE = "t4-minors-permuted"


def test_profile_minors_differ_from_indices() -> None:
    """The premise of this file: otherwise the tests below could not tell the two apart."""
    gpus = load_profile(PROFILE).gpus
    assert all(gpu.minor != gpu.index for gpu in gpus)
    assert sorted(gpu.minor for gpu in gpus) == [gpu.index for gpu in gpus]


@pytest.fixture
def env() -> Iterator[tuple[MockKubelet, DevicePlugin]]:
    with short_tmpdir() as directory:
        config = e2e_config(directory, PROFILE)
        config = replace_flags(config, nvidia_driver_root=os.path.join(directory, "driver"))
        config = replace_plugin_flags(config, device_id_strategy="index", pass_device_specs=True)
        kubelet = MockKubelet(directory)
        kubelet.start()
        plugin = DevicePlugin(config, {}, poll_interval=0.02)
        try:
            controller = plugin.select_backend()
            assert controller is not None
            controller.write_sysfs(Path(config.flags.sysfs_root))
            controller.write_driver_root(config.flags.nvidia_driver_root)
            plugin.start()
            assert kubelet.wait_for_registration(GPU, TIMEOUT)
            yield kubelet, plugin
        finally:
            plugin.close()
            kubelet.stop()


def test_visible_devices_carry_the_index_and_device_nodes_the_minor(
    env: tuple[MockKubelet, DevicePlugin],
) -> None:
    kubelet, plugin = env
    assert plugin.snapshot is not None
    for gpu in plugin.snapshot.gpus:
        response = allocate_ids(kubelet, [gpu.uuid]).container_responses[0]
        assert response.envs["NVIDIA_VISIBLE_DEVICES"] == str(gpu.index), gpu
        nodes = [spec.container_path for spec in response.devices]
        assert f"/dev/nvidia{gpu.minor}" in nodes, gpu
        assert f"/dev/nvidia{gpu.index}" not in nodes, gpu


def test_several_devices_list_every_index(env: tuple[MockKubelet, DevicePlugin]) -> None:
    kubelet, plugin = env
    assert plugin.snapshot is not None
    gpus = plugin.snapshot.gpus
    response = allocate_ids(kubelet, [gpus[0].uuid, gpus[3].uuid]).container_responses[0]
    assert sorted(response.envs["NVIDIA_VISIBLE_DEVICES"].split(",")) == ["0", "3"]

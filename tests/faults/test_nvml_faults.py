"""NVML faults from the fake under a running plugin: init failures, failing event waits,
lost GPUs, calls that fail and recover. Health moves as expected and nothing crashes."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from plugin_support import controller_of, manager_of, monitor_of, snapshot_of
from test_server_support import short_tmpdir

import gpus.fake
from deviceplugin.main import DevicePlugin, main
from deviceplugin.mockkubelet import DeviceInfo, MockKubelet
from gpus.fake import FakeNvml
from protos.deviceplugin.v1beta1 import api_pb2

from .support import GPU, TIMEOUT, plugin_config, run_main_while, start_plugin, watching_logs

PROG = "nvidia-device-plugin:"


def health(devices: list[DeviceInfo]) -> dict[str, str]:
    return {d.id: d.health for d in devices}


def all_are(state: str) -> Callable[[list[DeviceInfo]], bool]:
    return lambda devices: bool(devices) and all(d.health == state for d in devices)


@pytest.fixture
def env() -> Iterator[tuple[MockKubelet, DevicePlugin, list[dict[str, str]]]]:
    """The plugin on the fake DGX A100 under a mock kubelet; every list the kubelet saw."""
    history: list[dict[str, str]] = []
    with short_tmpdir() as directory:
        kubelet = MockKubelet(directory, on_update=lambda _, ds: history.append(health(ds)))
        kubelet.start()
        plugin = start_plugin(plugin_config(directory))
        try:
            assert kubelet.wait_for_registration(GPU, TIMEOUT)
            assert monitor_of(plugin).wait_watching(TIMEOUT)
            yield kubelet, plugin, history
        finally:
            plugin.close()
            kubelet.stop()


def uuid_of(plugin: DevicePlugin, index: int) -> str:
    return snapshot_of(plugin).gpus[index].uuid


def wait_health(kubelet: MockKubelet, uuid: str, state: str) -> dict[str, str]:
    devices = kubelet.wait_for_devices(GPU, lambda ds: health(ds).get(uuid) == state, TIMEOUT)
    assert devices is not None, f"{uuid} never became {state}"
    return health(devices)


# --- init failures ------------------------------------------------------------------------------


@pytest.fixture
def failing_init(monkeypatch: pytest.MonkeyPatch) -> list[FakeNvml]:
    """Every fake the daemon installs starts with nvmlInit failing (driver not loaded)."""
    installed: list[FakeNvml] = []
    real_install = gpus.fake.install

    def install(profile: Any, control_socket: str | None = None) -> FakeNvml:
        fake = real_install(profile, control_socket=control_socket)
        fake.fail_init("NVML_ERROR_DRIVER_NOT_LOADED")
        installed.append(fake)
        return fake

    monkeypatch.setattr(gpus.fake, "install", install)
    return installed


def daemon_args(directory: str, *extra: str) -> list[str]:
    root = os.path.join(directory, "root")
    return ["--nvml", "fake:dgx-a100", "--kubelet-socket", os.path.join(directory, "kubelet.sock"),
            "--sysfs-root", root, "--cdi-spec-dir", os.path.join(directory, "cdi"),
            "--ready-file", "", *extra]


def test_init_failure_exits_1_with_one_line(
    failing_init: list[FakeNvml],
    capsys: pytest.CaptureFixture[str],
) -> None:
    with short_tmpdir() as directory:
        assert main(daemon_args(directory)) == 1
        # No socket left behind ("root" is the fake's sysfs tree, written at --sysfs-root).
        assert sorted(os.listdir(directory)) in ([], ["root"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith(PROG)]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{PROG} initialisation failed: failed to initialise NVML: ")
    assert "Driver Not Loaded" in lines[0] or "DRIVER_NOT_LOADED" in lines[0], lines[0]
    assert "Traceback" not in err
    assert not failing_init[0].installed  # the fake backend was removed on the way out


def test_init_failure_tolerated_idles_then_sighup_starts(failing_init: list[FakeNvml]) -> None:
    """--fail-on-init-error=false: log, idle (no crash, no sockets), SIGHUP retries."""
    outcome: dict[str, Any] = {}
    with short_tmpdir() as directory, MockKubelet(directory) as kubelet, \
            watching_logs("deviceplugin") as logs:
        root = Path(directory, "root")

        def operator() -> None:
            assert logs.wait_for("initialisation failed"), "no init error logged"
            outcome["idle_files"] = sorted(set(os.listdir(directory)) - {"root"})
            fake = failing_init[0]
            fake.write_sysfs(root)
            fake.clear_faults()  # the driver is loaded now
            os.kill(os.getpid(), signal.SIGHUP)
            outcome["registered"] = kubelet.wait_for_registration(GPU, TIMEOUT)
            outcome["devices"] = len(kubelet.devices(GPU))

        code = run_main_while(lambda: main(daemon_args(directory, "--fail-on-init-error=false")),
                              operator, outcome)
    assert "error" not in outcome, outcome.get("error")
    assert code == 0
    assert outcome["idle_files"] == ["kubelet.sock"]
    assert outcome["registered"] and outcome["devices"] == 8
    errors = [m for m in logs.messages() if "initialisation failed" in m]
    assert len(errors) == 1 and "\n" not in errors[0]


# --- faults while running -----------------------------------------------------------------------


def test_event_wait_errors_mark_every_gpu_then_recover(
    env: tuple[MockKubelet, DevicePlugin, list[dict[str, str]]],
) -> None:
    kubelet, plugin, _ = env
    controller_of(plugin).fail_event_wait("NVML_ERROR_UNKNOWN")
    assert kubelet.wait_for_devices(GPU, all_are("Unhealthy"), TIMEOUT) is not None
    controller_of(plugin).clear_faults()
    assert kubelet.wait_for_devices(GPU, all_are("Healthy"), TIMEOUT) is not None
    assert kubelet.allocate(GPU, 8).response.envs["NVIDIA_VISIBLE_DEVICES"]


def test_lost_gpu_only_it_unhealthy_others_allocate(
    env: tuple[MockKubelet, DevicePlugin, list[dict[str, str]]],
) -> None:
    kubelet, plugin, history = env
    lost = uuid_of(plugin, 3)
    with watching_logs("deviceplugin.health") as logs:
        controller_of(plugin).lose_gpu(3)  # XID 79, then every call on it fails
        states = wait_health(kubelet, lost, "Unhealthy")
        assert [u for u, s in states.items() if s != "Healthy"] == [lost]
        # Probe passes after the quiet period keep it Unhealthy while it is lost.
        assert logs.wait_for(f"device {lost} still unhealthy: probe failed", count=3)
    assert health(kubelet.devices(GPU))[lost] == "Unhealthy"
    outcome = kubelet.allocate(GPU, 7)
    assert lost not in outcome.allocated
    assert outcome.response.envs["NVIDIA_VISIBLE_DEVICES"].split(",") == list(outcome.allocated)
    with pytest.raises(grpc.RpcError) as info:
        kubelet.stub(GPU).Allocate(api_pb2.AllocateRequest(container_requests=[
            api_pb2.ContainerAllocateRequest(devices_ids=[lost])]), timeout=TIMEOUT)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"unhealthy device: {lost}" in info.value.details()
    # No other GPU ever went Unhealthy.
    assert all(s == "Healthy" for states in history for u, s in states.items() if u != lost)
    controller_of(plugin).restore_gpu(3)
    wait_health(kubelet, lost, "Healthy")


def test_silently_lost_gpu_is_found_by_the_probe(
    env: tuple[MockKubelet, DevicePlugin, list[dict[str, str]]],
) -> None:
    kubelet, plugin, history = env
    lost = uuid_of(plugin, 5)
    controller_of(plugin).lose_gpu(5, xid=None)  # no event: only the probe can notice
    states = wait_health(kubelet, lost, "Unhealthy")
    assert [u for u, s in states.items() if s != "Healthy"] == [lost]
    assert kubelet.allocate(GPU, 4).response.envs["NVIDIA_VISIBLE_DEVICES"]
    controller_of(plugin).restore_gpu(5)
    wait_health(kubelet, lost, "Healthy")
    assert all(s == "Healthy" for states in history for u, s in states.items() if u != lost)


def test_failing_call_delays_recovery_until_it_answers(
    env: tuple[MockKubelet, DevicePlugin, list[dict[str, str]]],
) -> None:
    """A critical XID, then the probe's NVML call fails (not 'lost'): the GPU stays Unhealthy
    past its quiet period and the others stay Healthy; once the call answers, it recovers."""
    kubelet, plugin, history = env
    bad = uuid_of(plugin, 2)
    with watching_logs("deviceplugin.health") as logs:
        controller_of(plugin).fail("nvmlDeviceGetMemoryInfo", "NVML_ERROR_UNKNOWN")
        controller_of(plugin).inject_xid(2, 48)
        wait_health(kubelet, bad, "Unhealthy")
        assert logs.wait_for(f"device {bad} still unhealthy: probe failed", count=2)
        assert health(kubelet.devices(GPU))[bad] == "Unhealthy"
        controller_of(plugin).clear_faults()
        wait_health(kubelet, bad, "Healthy")
    assert all(s == "Healthy" for states in history for u, s in states.items() if u != bad)
    assert kubelet.allocate(GPU, 8).response.envs["NVIDIA_VISIBLE_DEVICES"]


def test_every_gpu_lost_then_back(
    env: tuple[MockKubelet, DevicePlugin, list[dict[str, str]]],
) -> None:
    kubelet, plugin, _ = env
    for index in range(8):
        controller_of(plugin).lose_gpu(index)
    assert kubelet.wait_for_devices(GPU, all_are("Unhealthy"), TIMEOUT) is not None
    with pytest.raises(ValueError, match="0 healthy devices"):
        kubelet.allocate(GPU, 1)
    controller_of(plugin).clear_faults()
    assert kubelet.wait_for_devices(GPU, all_are("Healthy"), TIMEOUT) is not None
    assert plugin.health is not None and manager_of(plugin).errors == {}

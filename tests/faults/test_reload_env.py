"""SIGHUP keeps the settings that came from environment variables (issue 10).

The daemon resolves its configuration from flags, environment and config file at start; a
SIGHUP resolves it again. A reload that resolved without the environment would quietly swap
each env-derived setting for the file's value or the default (or, with ``NVML_BACKEND`` and
``KUBELET_SOCKET`` from the environment, restart on another backend and socket). These tests
run :func:`deviceplugin.main.main` with the settings in its process environment, send SIGHUP,
and compare what the reloaded plugin runs with.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from plugin_support import manager_of, snapshot_of
from test_server_support import short_tmpdir

from deviceplugin import main as mainmod
from deviceplugin.health import HealthMonitor, parse_health_env
from deviceplugin.main import DevicePlugin, main
from deviceplugin.mockkubelet import MockKubelet
from gpus.config import Config
from gpus.fake.driverroot import write_fake_driver_root
from gpus.fake.profile import load_profile
from protos.deviceplugin.v1beta1 import api_pb2

from .support import GPU, TIMEOUT, run_main_while

# Every variable the plugin reads; cleared first so the runner's environment cannot leak in.
PLUGIN_ENV = (
    "MIG_STRATEGY", "FAIL_ON_INIT_ERROR", "NVIDIA_DRIVER_ROOT", "NVIDIA_DEV_ROOT",
    "NVML_BACKEND", "SYSFS_ROOT", "PASS_DEVICE_SPECS", "DEVICE_LIST_STRATEGY",
    "DEVICE_ID_STRATEGY", "SHARED_DEVICES_ALLOCATION_POLICY", "KUBELET_SOCKET", "CDI_SPEC_DIR",
    "HEALTH_RECOVERY_INTERVAL", "HEALTH_QUIET_PERIOD", "CONFIG_FILE", "PLUGIN_SOCKET_DIR",
    "DP_READY_FILE", "DP_STATUS_FILE", "DP_DISABLE_HEALTHCHECKS", "DP_ENABLE_HEALTHCHECKS",
    "DP_LOG_LEVEL", "DRIVER_ROOT_CTR_PATH", "CONTAINER_DRIVER_ROOT", "CDI_ANNOTATION_PREFIX",
    "NVIDIA_CDI_HOOK_PATH", "NVIDIA_CTK_PATH", "CDI_FEATURE_FLAGS", "CDI_DISABLE_HOOKS",
    "GDS_ENABLED", "MOFED_ENABLED", "GDRCOPY_ENABLED", "MPS_ROOT", "DEVICE_DISCOVERY_STRATEGY",
    "IMEX_CHANNEL_IDS", "IMEX_REQUIRED",
)


class RecordingPlugin(DevicePlugin):
    """The DevicePlugin main() builds, recorded so the test can look at it after a reload."""

    made: list[RecordingPlugin] = []

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reloads: list[str | None] = []
        self.reloaded = threading.Event()
        RecordingPlugin.made.append(self)

    def reload(self) -> str | None:
        """As DevicePlugin.reload; records the outcome and wakes the waiting test."""
        error = super().reload()
        self.reloads.append(error)
        self.reloaded.set()
        return error


@dataclass
class Reloaded:
    """What the plugin ran with before and after the SIGHUP."""

    before: Config
    after: Config
    plugin: RecordingPlugin
    same_server: bool  # served in place: the resource's server was not restarted


@pytest.fixture
def plugin_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """A clean plugin environment, and main() building RecordingPlugins."""
    for name in PLUGIN_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(mainmod, "DevicePlugin", RecordingPlugin)
    RecordingPlugin.made = []
    yield monkeypatch
    RecordingPlugin.made = []


def run_and_reload(directory: str, kubelet: MockKubelet, argv: list[str],
                   after_reload: Callable[[RecordingPlugin], None] | None = None) -> Reloaded:
    """main(argv) until registered, SIGHUP, wait for the reload, run ``after_reload``; stop."""
    os.makedirs(os.path.join(directory, "root"), exist_ok=True)
    outcome: dict[str, Any] = {}

    def operator() -> None:
        assert kubelet.wait_for_registration(GPU, TIMEOUT)
        [plugin] = RecordingPlugin.made
        before, server = plugin.config, manager_of(plugin).server(GPU)
        os.kill(os.getpid(), signal.SIGHUP)
        assert plugin.reloaded.wait(TIMEOUT), "SIGHUP never reached reload()"
        assert plugin.reloads == [None], f"reload failed: {plugin.reloads}"
        outcome["reloaded"] = Reloaded(before, plugin.config, plugin,
                                       manager_of(plugin).server(GPU) is server)
        if after_reload is not None:
            after_reload(plugin)

    code = run_main_while(lambda: main(argv), operator, outcome)
    if "error" in outcome:
        raise outcome["error"]
    assert code == 0
    reloaded: Reloaded = outcome["reloaded"]
    return reloaded


def infrastructure_flags(directory: str, config_file: Path) -> list[str]:
    """Where the test plugin runs, as flags: what is under test comes from the environment."""
    return ["--nvml", "fake:dgx-a100", "--kubelet-socket", os.path.join(directory, "kubelet.sock"),
            "--sysfs-root", os.path.join(directory, "root"),
            "--cdi-spec-dir", os.path.join(directory, "cdi"), "--config-file", str(config_file),
            "--ready-file", ""]


def allocate_one(kubelet: MockKubelet) -> api_pb2.ContainerAllocateResponse:
    response: api_pb2.ContainerAllocateResponse = kubelet.allocate(GPU, 1).response
    return response


@dataclass(frozen=True)
class EnvCase:
    variable: str
    value: str
    file: str  # flags the config file sets too ("" none): the environment must still win
    read: Callable[[Config], object]
    expected: object
    # What the reloaded plugin's Allocate shows of the setting, when it shows it.
    served: Callable[[api_pb2.ContainerAllocateResponse], bool] | None = None
    # What the health monitor the reload started runs with, for the health settings.
    monitor: Callable[[HealthMonitor], object] | None = None


def _visible(response: api_pb2.ContainerAllocateResponse) -> str:
    return str(response.envs.get("NVIDIA_VISIBLE_DEVICES", ""))


ENV_CASES = [
    EnvCase("MIG_STRATEGY", "single", "flags:\n  migStrategy: mixed\n",
            lambda c: c.flags.mig_strategy, "single"),
    EnvCase("DEVICE_LIST_STRATEGY", "volume-mounts",
            "flags:\n  plugin:\n    deviceListStrategy: envvar\n",
            lambda c: c.flags.plugin.device_list_strategy, ("volume-mounts",),
            lambda r: _visible(r) == "/var/run/nvidia-container-devices"
            and any(m.container_path.startswith("/var/run/nvidia-container-devices/")
                    for m in r.mounts)),
    EnvCase("DEVICE_ID_STRATEGY", "index", "flags:\n  plugin:\n    deviceIDStrategy: uuid\n",
            lambda c: c.flags.plugin.device_id_strategy, "index",
            lambda r: _visible(r).isdigit()),
    EnvCase("PASS_DEVICE_SPECS", "true", "flags:\n  plugin:\n    passDeviceSpecs: false\n",
            lambda c: c.flags.plugin.pass_device_specs, True,
            lambda r: any(d.host_path.startswith("/dev/nvidia") for d in r.devices)),
    EnvCase("FAIL_ON_INIT_ERROR", "false", "flags:\n  failOnInitError: true\n",
            lambda c: c.flags.fail_on_init_error, False),
    EnvCase("SHARED_DEVICES_ALLOCATION_POLICY", "packed", "",
            lambda c: c.flags.plugin.shared_devices_allocation_policy, "packed"),
    EnvCase("HEALTH_QUIET_PERIOD", "45s", "flags:\n  plugin:\n    healthQuietPeriod: 10s\n",
            lambda c: c.flags.plugin.health_quiet_period, 45.0,
            monitor=lambda h: h.quiet_period),
    EnvCase("HEALTH_RECOVERY_INTERVAL", "2s",
            "flags:\n  plugin:\n    healthRecoveryInterval: 7s\n",
            lambda c: c.flags.plugin.health_recovery_interval, 2.0,
            monitor=lambda h: h.recovery_interval),
    # The daemon's own rows (gpus.config's ``daemon``): no file key, the environment alone.
    EnvCase("DP_LOG_LEVEL", "WARNING", "", lambda c: c.daemon.log_level, "warning"),
    EnvCase("DP_DISABLE_HEALTHCHECKS", "48", "",
            lambda c: c.daemon.plugin.disable_healthchecks, "48",
            monitor=lambda h: "48" if 48 in h.policy.ignored else "critical"),
    EnvCase("DP_ENABLE_HEALTHCHECKS", "13", "",
            lambda c: c.daemon.plugin.enable_healthchecks, "13",
            monitor=lambda h: "13" if 13 in h.policy.reenabled else "ignored"),
]


@pytest.mark.parametrize("case", ENV_CASES, ids=[c.variable for c in ENV_CASES])
def test_sighup_keeps_a_setting_from_the_environment(plugin_env: pytest.MonkeyPatch,
                                                     tmp_path: Path, case: EnvCase) -> None:
    config_file = tmp_path / "config.yaml"
    config_file.write_text("version: v1\n" + case.file)
    plugin_env.setenv(case.variable, case.value)
    served: list[api_pb2.ContainerAllocateResponse] = []
    monitored: list[object] = []

    def look(plugin: RecordingPlugin) -> None:
        served.append(allocate_one(kubelet))
        if case.monitor is not None and plugin.health is not None:
            monitored.append(case.monitor(plugin.health))

    with short_tmpdir() as directory, MockKubelet(directory) as kubelet:
        reloaded = run_and_reload(directory, kubelet, infrastructure_flags(directory, config_file),
                                  look)
    assert case.read(reloaded.before) == case.expected  # the environment won at start...
    assert case.read(reloaded.after) == case.expected  # ...and still does after the reload
    assert reloaded.after == reloaded.before
    if case.served is not None:
        assert case.served(served[0]), served[0]
    if case.monitor is not None:
        assert monitored == [case.expected]


def test_sighup_keeps_a_configuration_made_only_of_environment_variables(
        plugin_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No flags at all: backend, sockets, file and settings all come from the environment.
    A reload without them would restart on real NVML and the default kubelet socket."""
    config_file = tmp_path / "config.yaml"
    config_file.write_text("version: v1\nflags:\n  migStrategy: mixed\n")
    with short_tmpdir() as directory, MockKubelet(directory) as kubelet:
        driver = os.path.join(directory, "driver")  # CDI mode needs a driver: the fake one
        write_fake_driver_root(load_profile("dgx-a100"), driver)
        env = {
            "NVIDIA_DRIVER_ROOT": driver,
            "DRIVER_ROOT_CTR_PATH": driver,
            "NVML_BACKEND": "fake:dgx-a100",
            "KUBELET_SOCKET": os.path.join(directory, "kubelet.sock"),
            "SYSFS_ROOT": os.path.join(directory, "root"),
            "CDI_SPEC_DIR": os.path.join(directory, "cdi"),
            "CONFIG_FILE": str(config_file),
            "DP_READY_FILE": "",
            "MIG_STRATEGY": "single",
            "DEVICE_LIST_STRATEGY": "volume-mounts,cdi-annotations",
            "DEVICE_ID_STRATEGY": "index",
            "PASS_DEVICE_SPECS": "true",
            "FAIL_ON_INIT_ERROR": "false",
        }
        for name, value in env.items():
            plugin_env.setenv(name, value)
        reloaded = run_and_reload(directory, kubelet, [])
    flags = reloaded.after.flags
    assert flags.nvml == "fake:dgx-a100"
    assert flags.plugin.kubelet_socket == env["KUBELET_SOCKET"]
    assert (flags.mig_strategy, flags.fail_on_init_error) == ("single", False)
    assert flags.plugin.device_list_strategy == ("volume-mounts", "cdi-annotations")
    assert (flags.plugin.device_id_strategy, flags.plugin.pass_device_specs) == ("index", True)
    assert flags.plugin.container_driver_root == env["DRIVER_ROOT_CTR_PATH"]
    assert reloaded.after == reloaded.before
    assert reloaded.same_server  # reloaded in place, not restarted elsewhere


def test_sighup_keeps_the_health_check_variables(plugin_env: pytest.MonkeyPatch,
                                                 tmp_path: Path) -> None:
    """DP_DISABLE_HEALTHCHECKS / DP_ENABLE_HEALTHCHECKS still rule the monitor the reload
    starts: XID 48 (made non-critical) is ignored, XID 13 (made critical) marks its GPU."""
    config_file = tmp_path / "config.yaml"
    config_file.write_text("version: v1\n")
    health_env = {"DP_DISABLE_HEALTHCHECKS": "48", "DP_ENABLE_HEALTHCHECKS": "13"}
    for name, value in health_env.items():
        plugin_env.setenv(name, value)
    seen: dict[str, Any] = {}

    def inject(plugin: RecordingPlugin) -> None:
        health, controller = plugin.health, plugin.controller
        assert health is not None and controller is not None and plugin.snapshot is not None
        seen["policy"] = health.policy
        assert health.wait_watching(TIMEOUT)
        uuids = [gpu.uuid for gpu in snapshot_of(plugin).gpus]
        # One event thread handles them in order: once GPU 2 shows, GPU 1's XID was handled.
        controller.inject_xid(1, 48)
        controller.inject_xid(2, 13)
        devices = kubelet.wait_for_devices(
            GPU, lambda ds: any(d.health == "Unhealthy" for d in ds), TIMEOUT)
        assert devices is not None
        seen["unhealthy"] = {d.id for d in devices if d.health == "Unhealthy"}
        seen["expected"] = {uuids[2]}

    with short_tmpdir() as directory, MockKubelet(directory) as kubelet:
        run_and_reload(directory, kubelet, infrastructure_flags(directory, config_file), inject)
    assert seen["policy"] == parse_health_env(health_env)
    assert seen["unhealthy"] == seen["expected"]

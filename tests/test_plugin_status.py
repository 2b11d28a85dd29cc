"""The machine-readable status: readiness file content, the status file, reported problems."""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from test_server_support import short_tmpdir

from deviceplugin.allocate import cdi_enabled
from deviceplugin.main import (
    DevicePlugin,
    InitError,
    replace_flags,
    replace_plugin_flags,
    status_file_path,
)
from deviceplugin.mockkubelet import MockKubelet
from deviceplugin.readiness import ReadinessFile, ResourceStatus, Status
from gpus.config import Config
from gpus.fake.driverroot import write_fake_driver_root
from protos.deviceplugin.v1beta1 import api_pb2

TIMEOUT = 10.0
GPU = "nvidia.com/gpu"


def read_json(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as handle:
        document: dict[str, Any] = json.load(handle)
    return document


# --- ReadinessFile ------------------------------------------------------------------------------


def test_ready_file_holds_the_status_and_exists_only_when_ready(tmp_path: Path) -> None:
    ready, status = str(tmp_path / "ready"), str(tmp_path / "status.json")
    files = ReadinessFile(ready, status)
    files.clear()
    assert not os.path.exists(ready)
    assert read_json(status) == {"ready": False, "resources": {}, "problems": []}
    files.report({GPU: ResourceStatus(8, 8)}, ["GPU 6: bad layout"])
    assert not os.path.exists(ready)  # not ready yet: the status file alone says so
    assert read_json(status)["problems"] == ["GPU 6: bad layout"]
    files.set(True)
    expected = {"ready": True, "resources": {GPU: {"devices": 8, "healthy": 8}},
                "problems": ["GPU 6: bad layout"]}
    assert read_json(ready) == read_json(status) == expected
    files.report({GPU: ResourceStatus(8, 7)}, [])  # a health change rewrites both
    assert read_json(ready)["resources"][GPU] == {"devices": 8, "healthy": 7}
    assert read_json(status) == read_json(ready)
    files.set(False)
    assert not os.path.exists(ready)
    assert read_json(status)["ready"] is False
    # Atomic writes leave no temporary files behind.
    assert sorted(os.listdir(tmp_path)) == ["status.json"]


def test_status_json_shape() -> None:
    status = Status(True, {"b": ResourceStatus(2, 1), "a": ResourceStatus(0, 0)}, ("x",))
    assert json.loads(status.to_json()) == {
        "ready": True,
        "resources": {"a": {"devices": 0, "healthy": 0}, "b": {"devices": 2, "healthy": 1}},
        "problems": ["x"],
    }


def test_unwritable_status_file_is_logged_once_not_raised(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    missing = str(tmp_path / "no-such-dir" / "status.json")
    files = ReadinessFile("", missing)
    with caplog.at_level("WARNING", logger="deviceplugin.readiness"):
        files.clear()
        files.report({}, ["one"])
        files.set(True)
    assert files.ready and files.status.problems == ("one",)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "cannot write status file" in warnings[0]


def test_status_file_from_the_environment_and_flag() -> None:
    assert status_file_path(None, {}) == ""
    assert status_file_path(None, {"DP_STATUS_FILE": "/x/status.json"}) == "/x/status.json"
    assert status_file_path("", {"DP_STATUS_FILE": "/x/status.json"}) == ""  # the flag wins


# --- the plugin ---------------------------------------------------------------------------------


def plugin_config(directory: str, profile: str, strategy: str = "none",
                  kubelet: bool = True, **plugin_flags: Any) -> Config:
    config = replace_flags(Config(), nvml=f"fake:{profile}", mig_strategy=strategy,
                           sysfs_root=os.path.join(directory, "root"),
                           nvidia_driver_root=os.path.join(directory, "driver"))
    flags: dict[str, Any] = {
        # The plugin reads the driver where the host's is (no container here): CDI mode.
        "container_driver_root": os.path.join(directory, "driver"),
        "kubelet_socket": os.path.join(directory, "kubelet.sock") if kubelet else "",
        "cdi_spec_dir": os.path.join(directory, "cdi"),
        "health_recovery_interval": 0.0,  # an XID-marked device stays Unhealthy
        **plugin_flags,
    }
    return replace_plugin_flags(config, **flags)


@contextmanager
def running(config: Config, directory: str, *, mig_minors: bool = True
            ) -> Iterator[tuple[MockKubelet, DevicePlugin, str, str]]:
    """The mock kubelet and a started plugin with a readiness and a status file."""
    kubelet = MockKubelet(directory)
    kubelet.start()
    ready, status = os.path.join(directory, "ready"), os.path.join(directory, "status.json")
    plugin = DevicePlugin(config, {}, poll_interval=0.02, ready_file=ready, status_file=status)
    try:
        controller = plugin.select_backend()
        assert controller is not None
        controller.write_sysfs(Path(config.flags.sysfs_root))
        controller.write_driver_root(config.flags.nvidia_driver_root)
        if cdi_enabled(config):  # the CDI spec needs a driver: the profile's fake one
            write_fake_driver_root(controller.profile, config.flags.nvidia_driver_root)
        if not mig_minors:
            os.unlink(os.path.join(config.flags.nvidia_driver_root,
                                   "proc/driver/nvidia-caps/mig-minors"))
        plugin.readiness.clear()
        plugin.start()
        yield kubelet, plugin, ready, status
    finally:
        plugin.close()
        kubelet.stop()


def healthy(count: int) -> Any:
    return lambda status: status.resources.get(GPU) == ResourceStatus(28, count)


def test_layout_problems_are_errors_once_and_in_the_status(
        caplog: pytest.LogCaptureFixture) -> None:
    # a100-mig-partial under single: four GPUs have MIG disabled and are left out.
    with short_tmpdir() as directory, caplog.at_level("ERROR"):
        config = plugin_config(directory, "a100-mig-partial", "single")
        with running(config, directory) as (kubelet, plugin, ready, status):
            assert plugin.readiness.wait(True, TIMEOUT)
            (problem,) = plugin.resource_map.problems
            assert plugin.readiness.wait_status(healthy(28), TIMEOUT)
            document = read_json(ready)
            assert document == {"ready": True, "problems": [problem],
                                "resources": {GPU: {"devices": 28, "healthy": 28}}}
            assert read_json(status) == document
            # A health change rebuilds the map: counts change, the problem is not logged again.
            assert plugin.health is not None and plugin.controller is not None
            assert plugin.health.wait_watching(TIMEOUT)
            plugin.controller.inject_xid(0, 79)  # GPU 0's seven MIG devices
            assert plugin.readiness.wait_status(healthy(21), TIMEOUT)
            assert read_json(ready)["resources"][GPU] == {"devices": 28, "healthy": 21}
            assert read_json(status)["problems"] == [problem]
        logged = [r for r in caplog.records if problem in r.getMessage()]
        assert [r.levelname for r in logged] == ["ERROR"]
        # Stopped: no readiness file, the status file says not ready.
        assert not os.path.exists(ready)
        assert read_json(status) == {"ready": False, "resources": {}, "problems": []}


def test_status_file_shows_problems_while_not_ready() -> None:
    with short_tmpdir() as directory:
        config = plugin_config(directory, "dgx-a100")
        with running(config, directory) as (kubelet, plugin, ready, status):
            assert plugin.readiness.wait(True, TIMEOUT)
            kubelet.stop()  # registration lost: not ready, the readiness file is gone
            assert plugin.readiness.wait(False, TIMEOUT)
            assert not os.path.exists(ready)
            document = read_json(status)
            assert document["ready"] is False
            assert document["resources"] == {GPU: {"devices": 8, "healthy": 8}}


def test_unreadable_mig_minors_with_cdi_serves_whole_gpus_and_reports(
        caplog: pytest.LogCaptureFixture) -> None:
    # Before: the whole plugin failed to start. Now the CDI spec leaves the MIG devices out,
    # the whole GPUs are served, and the problem is logged and in the status.
    with short_tmpdir() as directory, caplog.at_level("ERROR"):
        config = plugin_config(directory, "a100-mig-partial", "mixed",
                               device_list_strategy=("cdi-cri",))
        with running(config, directory, mig_minors=False) as (kubelet, plugin, ready, _):
            assert kubelet.wait_for_registration(GPU, TIMEOUT)
            outcome = kubelet.allocate(GPU, 1)
            assert [d.name for d in outcome.response.cdi_devices] == [
                f"k8s.device-plugin.nvidia.com/gpu={outcome.allocated[0]}"]
            assert plugin.readiness.wait(True, TIMEOUT)
            (problem,) = read_json(ready)["problems"]
            assert problem.startswith("MIG devices left out of the CDI spec: reading ")
            assert "mig-minors" in problem
            spec = read_json(os.path.join(directory, "cdi",
                                          "k8s.device-plugin.nvidia.com-gpu.json"))
            names = {d["name"] for d in spec["devices"]}
            assert plugin.snapshot is not None
            whole = {g.uuid for g in plugin.snapshot.gpus if not g.mig_enabled}
            assert whole <= names and not any(n.startswith("MIG-") for n in names)
        assert [r.getMessage() for r in caplog.records if r.name == "deviceplugin.cdi"] == [
            problem]


def test_idle_after_an_init_error_reports_it() -> None:
    with short_tmpdir() as directory:
        config = replace_flags(plugin_config(directory, "no-such-profile"),
                               fail_on_init_error=False)
        ready, status = os.path.join(directory, "ready"), os.path.join(directory, "status.json")
        plugin = DevicePlugin(config, {}, ready_file=ready, status_file=status)
        try:
            plugin.readiness.clear()
            with pytest.raises(InitError) as info:
                plugin.start()
            plugin.idle(info.value)
            document = read_json(status)
            assert document["ready"] is True and document["resources"] == {}
            (problem,) = document["problems"]
            assert problem.startswith("initialisation failed: ") and "no-such-profile" in problem
            assert read_json(ready) == document
        finally:
            plugin.close()


class HeldRegistrations:
    """Makes a MockKubelet hold every Register call until ``release`` is set."""

    def __init__(self, kubelet: MockKubelet) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self._handle = kubelet.handle_register
        kubelet.handle_register = self._held  # type: ignore[method-assign]  # held on purpose

    def _held(self, request: api_pb2.RegisterRequest) -> str | None:
        self.entered.set()
        if not self.release.wait(TIMEOUT):
            return "test: registration held too long"
        return self._handle(request)


def test_not_ready_while_a_rebound_socket_is_not_registered(
        caplog: pytest.LogCaptureFixture) -> None:
    with short_tmpdir() as directory, caplog.at_level(logging.INFO, "deviceplugin.kubelet"):
        config = plugin_config(directory, "dgx-a100")
        with running(config, directory) as (kubelet, plugin, ready, status):
            assert plugin.readiness.wait(True, TIMEOUT)
            assert os.path.exists(ready)
            held = HeldRegistrations(kubelet)
            server = plugin.manager.server(GPU) if plugin.manager else None
            assert server is not None
            # Only our socket goes (as when the kubelet wipes its directory): the watch re-binds
            # it and registers again in one tick. A whole kubelet.restart() would race: a tick
            # between the wipe and the new kubelet.sock sees no kubelet and turns readiness
            # false by itself, so the guard under test would not be exercised.
            os.unlink(server.socket_path)
            try:
                assert held.entered.wait(TIMEOUT)  # re-bound, and now registering
                assert server.intact()
                assert plugin.readiness.ready is False
                assert not os.path.exists(ready)
                assert read_json(status)["ready"] is False
            finally:
                held.release.set()
            assert plugin.readiness.wait(True, TIMEOUT)
            assert read_json(ready)["ready"] is True
            assert kubelet.wait_for_registration(GPU, TIMEOUT)
    # The operator's view: the loss and the recovery, one line each.
    recovered = [r for r in caplog.records if r.getMessage().startswith(f"re-registered {GPU} ")]
    assert len(recovered) == 1 and recovered[0].levelno == logging.INFO
    assert re.search(r" [0-9.]+ s after the registration was lost \((our socket was removed|"
                     r"the kubelet restarted|the kubelet socket went away)\)$",
                     recovered[0].getMessage())

"""Config reloads (DevicePlugin.reload() and SIGHUP) with a valid, an invalid and a vanished
file while another thread keeps allocating: a bad file keeps the running configuration and
says why; allocations never fail because of a reload (unless the resource really changed)."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from plugin_support import manager_of, server_of, snapshot_of
from test_server_support import short_tmpdir

from deviceplugin.main import DevicePlugin, build_parser, main
from deviceplugin.mockkubelet import MockKubelet
from gpus import config as configmod
from protos.deviceplugin.v1beta1 import api_pb2, api_pb2_grpc

from .support import GPU, TIMEOUT, run_main_while, start_plugin, watching_logs

VALID = "version: v1\nflags:\n  plugin:\n    deviceListStrategy: {strategy}\n"
INVALID = "version: v1\nflags:\n  plugin:\n    deviceListStrategy: nfs\n"
SHARED = ("version: v1\nsharing:\n  timeSlicing:\n    resources:\n"
          "    - name: nvidia.com/gpu\n      replicas: 2\n")


class Allocator(threading.Thread):
    """Allocates one GPU after another on the plugin's socket until stopped."""

    def __init__(self, socket_path: str, ids: list[str]) -> None:
        super().__init__(name="allocator", daemon=True)
        self.channel = grpc.insecure_channel(f"unix:{socket_path}")
        self.stub = api_pb2_grpc.DevicePluginStub(self.channel)
        self.ids = ids
        self.done = 0
        self.failures: list[str] = []
        self.envs: list[str] = []
        self._cond = threading.Condition()
        self._halt = threading.Event()

    def run(self) -> None:
        i = 0
        while not self._halt.is_set():
            request = api_pb2.AllocateRequest(container_requests=[
                api_pb2.ContainerAllocateRequest(devices_ids=[self.ids[i % len(self.ids)]])])
            try:
                response = self.stub.Allocate(request, timeout=TIMEOUT)
                env = response.container_responses[0].envs["NVIDIA_VISIBLE_DEVICES"]
            except grpc.RpcError as err:
                env, failure = "", f"{err.code()}: {err.details()}"
                self.failures.append(failure)
            with self._cond:
                self.done += 1
                if env:
                    self.envs.append(env)
                self._cond.notify_all()
            i += 1

    def wait_more(self, count: int = 5) -> bool:
        """Wait until ``count`` more allocations have completed."""
        with self._cond:
            target = self.done + count
            return self._cond.wait_for(lambda: self.done >= target, TIMEOUT)

    def finish(self) -> None:
        self._halt.set()
        self.join(TIMEOUT)
        self.channel.close()
        assert not self.is_alive()


def plugin_args(directory: str, config_file: Path) -> list[str]:
    return ["--nvml", "fake:dgx-a100", "--kubelet-socket", os.path.join(directory, "kubelet.sock"),
            "--sysfs-root", os.path.join(directory, "root"),
            "--cdi-spec-dir", os.path.join(directory, "cdi"), "--config-file", str(config_file),
            "--ready-file", ""]


@pytest.fixture
def env(tmp_path: Path) -> Iterator[tuple[DevicePlugin, Path, MockKubelet]]:
    """A plugin whose reload re-reads ``config.yaml`` like SIGHUP does."""
    config_file = tmp_path / "config.yaml"
    config_file.write_text(VALID.format(strategy="envvar"))
    with short_tmpdir() as directory, MockKubelet(directory) as kubelet:
        args = build_parser().parse_args(plugin_args(directory, config_file))
        config = configmod.resolve(args, {})
        plugin = start_plugin(
            config, reload_config=lambda current: configmod.reload(current, args, {}))
        try:
            assert kubelet.wait_for_registration(GPU, TIMEOUT)
            yield plugin, config_file, kubelet
        finally:
            plugin.close()


def test_reloads_while_allocating(env: tuple[DevicePlugin, Path, MockKubelet]) -> None:
    plugin, config_file, _ = env
    server = server_of(manager_of(plugin), GPU)
    allocator = Allocator(server.socket_path, [g.uuid for g in snapshot_of(plugin).gpus])
    allocator.start()
    try:
        assert allocator.wait_more()
        for round_ in range(5):
            strategy = "volume-mounts" if round_ % 2 == 0 else "envvar"
            config_file.write_text(VALID.format(strategy=strategy))
            assert plugin.reload() is None
            assert plugin.config.flags.plugin.device_list_strategy == (strategy,)
            assert allocator.wait_more()
            running = plugin.config

            config_file.write_text(INVALID)
            with watching_logs("deviceplugin") as logs:
                error = plugin.reload()
            assert error is not None and error.startswith(f"{config_file}:4: ")
            assert "deviceListStrategy" in error
            assert plugin.config is running
            assert any("keeping the running configuration" in m and error in m
                       for m in logs.messages())
            assert allocator.wait_more()

            config_file.unlink()
            error = plugin.reload()
            assert error == (f"cannot read config file {config_file}: "
                             "No such file or directory")
            assert plugin.config is running
            assert manager_of(plugin).server(GPU) is server  # never restarted
            assert allocator.wait_more()
    finally:
        allocator.finish()
    assert allocator.failures == []
    # Both strategies were served, each allocation with one of them.
    assert "/var/run/nvidia-container-devices" in allocator.envs
    assert any(env.startswith("GPU-") for env in allocator.envs)


def test_sighup_with_bad_vanished_then_changed_config(tmp_path: Path) -> None:
    """Through main(): SIGHUP with an invalid file, with no file, then with a file that
    shares the GPUs (the resource's devices legitimately change)."""
    config_file = tmp_path / "config.yaml"
    config_file.write_text(VALID.format(strategy="envvar"))
    outcome: dict[str, Any] = {}
    with short_tmpdir() as directory, MockKubelet(directory) as kubelet, \
            watching_logs("deviceplugin", "gpus.config") as logs:
        os.makedirs(os.path.join(directory, "root"))

        def operator() -> None:
            assert kubelet.wait_for_registration(GPU, TIMEOUT)
            allocator = Allocator(os.path.join(directory, "nvidia-gpu.sock"),
                                  [d.id for d in kubelet.devices(GPU)])
            allocator.start()
            try:
                assert allocator.wait_more()
                changes: tuple[Callable[[], object], ...] = (
                    lambda: config_file.write_text(INVALID), config_file.unlink)
                for count, change in enumerate(changes, start=1):
                    change()
                    os.kill(os.getpid(), signal.SIGHUP)
                    assert logs.wait_for("keeping the running configuration", count=count)
                    assert allocator.wait_more()
                outcome["failures_before_change"] = list(allocator.failures)
                config_file.write_text(SHARED)
                os.kill(os.getpid(), signal.SIGHUP)
                shared = kubelet.wait_for_devices(
                    GPU, lambda ds: len(ds) == 16 and all("::" in d.id for d in ds), TIMEOUT)
                outcome["shared"] = shared is not None
                outcome["allocated"] = kubelet.allocate(GPU, 1).allocated
            finally:
                allocator.finish()
            outcome["failures"] = allocator.failures

        code = run_main_while(lambda: main(plugin_args(directory, config_file)), operator, outcome)
    assert "error" not in outcome, outcome.get("error")
    assert code == 0
    assert outcome["failures_before_change"] == []
    assert outcome["shared"] and "::" in outcome["allocated"][0]
    # Only the old, unshared IDs may fail, once the resource changed under them.
    assert all("unknown device: GPU-" in f and "INVALID_ARGUMENT" in f
               for f in outcome["failures"])
    reasons = [m for m in logs.messages() if "keeping the running configuration" in m]
    assert any("config.yaml:4:" in m for m in reasons)
    assert any("cannot read config file" in m for m in reasons)

"""The kubelet restarted 100 times: every restart ends fully re-registered, nothing leaks.

A restart wipes every socket in the directory (the plugin's included) and recreates
``kubelet.sock``. Three kinds alternate: a graceful restart (streams closed first); sockets
wiped while the old ListAndWatch streams are still open, then the restart; and only the
plugin's sockets wiped under a running kubelet (the plugin must rebind and register again).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator

import pytest
from plugin_support import manager_of
from test_server_support import (
    fake_manager,
    make_resource,
    make_snapshot,
    plugin_stub,
    short_tmpdir,
)

from deviceplugin.main import DevicePlugin, replace_flags
from deviceplugin.mockkubelet import DeviceInfo, MockKubelet
from deviceplugin.server import PluginServer, ServeError
from gpus.config import Config
from protos.deviceplugin.v1beta1 import api_pb2

from .support import TIMEOUT, Resources, plugin_config, start_plugin, wait_until

RESTARTS = 100
FD_SLACK = 3


def wipe_sockets(directory: str, keep_kubelet: bool = False) -> None:
    """Delete sockets the way a starting kubelet does (optionally sparing kubelet.sock)."""
    for name in os.listdir(directory):
        if keep_kubelet and name == "kubelet.sock":
            continue
        path = os.path.join(directory, name)
        try:
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)
        except FileNotFoundError:
            pass


@pytest.fixture
def env() -> Iterator[tuple[str, MockKubelet, DevicePlugin]]:
    """Three MIG resources (mixed strategy), registered with a mock kubelet."""
    with short_tmpdir() as directory:
        kubelet = MockKubelet(directory)
        kubelet.start()
        config = plugin_config(directory, "a100-mig-mixed",
                               replace_flags(Config(), mig_strategy="mixed"))
        plugin = start_plugin(config, poll_interval=0.005)
        try:
            yield directory, kubelet, plugin
        finally:
            plugin.close()
            kubelet.stop()


def registered_lists(kubelet: MockKubelet, names: list[str],
                     counts: dict[str, int]) -> dict[str, list[DeviceInfo]]:
    """Wait until every resource registered more than ``counts`` times and sent its list."""
    lists = {}
    for name in names:
        assert kubelet.wait_for_registration(name, TIMEOUT, count=counts[name] + 1), (
            f"{name} not re-registered within {TIMEOUT}s")
        lists[name] = kubelet.devices(name)
    return lists


def test_hundred_kubelet_restarts(env: tuple[str, MockKubelet, DevicePlugin]) -> None:
    directory, kubelet, plugin = env
    names = sorted(s.name for s in manager_of(plugin).servers())
    assert len(names) == 3  # MIG mixed: one resource per MIG profile
    expected = registered_lists(kubelet, names, {n: 0 for n in names})
    counts = {n: len(kubelet.registrations(n)) for n in names}

    def restart(kind: int) -> None:
        if kind == 0:
            kubelet.restart()
        elif kind == 1:
            wipe_sockets(directory)  # old streams still open when the sockets vanish
            kubelet.restart()
        else:
            wipe_sockets(directory, keep_kubelet=True)

    # Warm up (gRPC allocates its pollers and thread pools lazily), then take the baseline.
    for kind in range(3):
        restart(kind)
        assert registered_lists(kubelet, names, counts) == expected
        counts = {n: len(kubelet.registrations(n)) for n in names}
    before = Resources.count(directory)

    for i in range(RESTARTS):
        restart(i % 3)
        assert registered_lists(kubelet, names, counts) == expected, f"restart {i}"
        counts = {n: len(kubelet.registrations(n)) for n in names}
        # The kubelet can dial back and receive the list before the plugin's Register call
        # has returned and been recorded: wait for the plugin's own view to catch up.
        assert wait_until(lambda: all(manager_of(plugin).registration.registered().values())), (
            f"restart {i}")

    # gRPC closes the last restart's connections in the background: let the count settle.
    # A leak grows with the restarts (hundreds here); gRPC may keep one or two in flight.
    wait_until(lambda: Resources.count(directory).fds <= before.fds + FD_SLACK)
    after = Resources.count(directory)
    assert after.files == before.files
    assert after.threads == before.threads
    assert after.duplicate_workers == ()
    assert after.fds <= before.fds + FD_SLACK, (before.fds, after.fds)
    assert manager_of(plugin).errors == {}


def test_failed_rebind_is_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression: the kubelet wiped our socket again between our bind and our stat, the
    rebind raised, and every later restart() returned at once (no server): the resource
    stayed unserved until the next reload. The registration loop's next tick now rebinds."""
    snapshot = make_snapshot(2)
    with short_tmpdir() as directory:
        server = PluginServer(fake_manager(make_resource(snapshot), snapshot), directory)
        server.start()
        try:
            real_start = PluginServer._start_locked
            failures = [ServeError("socket vanished right after bind (injected)")]

            def flaky_start(self: PluginServer) -> None:
                if failures:
                    raise failures.pop()
                real_start(self)

            monkeypatch.setattr(PluginServer, "_start_locked", flaky_start)
            os.unlink(server.socket_path)
            with pytest.raises(ServeError):
                server.restart()
            assert not server.serving and not server.intact()
            server.restart()  # what the next tick of the registration loop does
            assert server.serving and server.intact()
            assert server.generation == 2
            channel, stub = plugin_stub(server.socket_path)
            with channel:
                first = next(stub.ListAndWatch(api_pb2.Empty(), timeout=TIMEOUT))
            assert len(first.devices) == 2
        finally:
            server.stop()
        server.restart()  # stopped for good: restart() must not bring it back
        assert not server.serving

"""Security mitigations (docs/security.md), one test per claim that can be checked locally.

File modes are checked under a permissive umask (0) and a restrictive one (077), so they hold
whatever umask the container runtime hands the daemons.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pynvml
import pytest
from test_server_support import (
    FakeAllocator,
    fake_manager,
    make_map,
    make_resource,
    make_snapshot,
    plugin_stub,
)

from deviceplugin.cdi import write_cdi_spec
from deviceplugin.main import DevicePlugin, InitError, replace_flags, replace_plugin_flags
from deviceplugin.rm import MAX_CONTAINER_REQUESTS, MAX_DEVICE_ID_BYTES
from deviceplugin.server import (
    MAX_MESSAGE_BYTES,
    SOCKET_MODE,
    PluginServer,
    ServeError,
    warn_if_shared,
)
from gfd.nodepatch import OWNERSHIP_ANNOTATION, plan_patch
from gfd.output import write_atomically
from gpus.backend import backend_from_env, parse_backend, select_backend
from gpus.config import (
    Config,
    ConfigError,
    DeviceListStrategy,
    Flags,
    PluginFlags,
    load_config_file,
    parse_config,
)
from gpus.fake import FakeNvml
from gpus.fake.control import MAX_LINE, send
from gpus.fake.lib import FakeNvmlLib
from gpus.fake.profile import ProfileError, load_profile
from protos.deviceplugin.v1beta1 import api_pb2

TIMEOUT = 10.0
WORLD = stat.S_IWOTH | stat.S_IROTH | stat.S_IXOTH


@pytest.fixture(params=[0o000, 0o077], ids=["umask000", "umask077"])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    """Run the test under a permissive and a restrictive umask, then restore the old one."""
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def mode(path: str | Path) -> int:
    """Permission bits of ``path`` (not following a final symlink)."""
    return stat.S_IMODE(os.lstat(path).st_mode)


# --- sockets -------------------------------------------------------------------------------------


@pytest.fixture
def server(sockdir: str) -> Iterator[tuple[PluginServer, FakeAllocator]]:
    snapshot = make_snapshot(4)
    allocator = FakeAllocator()
    srv = PluginServer(fake_manager(make_resource(snapshot), snapshot, allocator), sockdir)
    srv.start()
    yield srv, allocator
    srv.stop()


def test_plugin_socket_is_owner_only_whatever_the_umask(umask: int, sockdir: str) -> None:
    snapshot = make_snapshot(2)
    srv = PluginServer(fake_manager(make_resource(snapshot), snapshot), sockdir)
    srv.start()
    try:
        assert mode(srv.socket_path) == SOCKET_MODE == 0o600
        os.unlink(srv.socket_path)  # what a kubelet restart does
        srv.restart()
        assert mode(srv.socket_path) == 0o600
    finally:
        srv.stop()


class SocketWatch:
    """Checks every Unix socket gRPC binds, the moment it listens, and every rename of one.

    A socket is reachable by others when its mode allows more than SOCKET_MODE and every
    directory above it (up to the socket directory) lets others through; the target path must
    never hold such a socket, not even between listen and a later chmod.
    """

    def __init__(self, sockdir: str) -> None:
        self.sockdir = sockdir
        self.bound: list[str] = []
        self.problems: list[str] = []

    def reachable_loosely(self, path: str) -> bool:
        if mode(path) & ~SOCKET_MODE:
            parent = os.path.dirname(path)
            while len(parent) >= len(self.sockdir):
                if not mode(parent) & (stat.S_IXGRP | stat.S_IXOTH):
                    return False
                parent = os.path.dirname(parent)
            return True
        return False

    def listening(self, address: str) -> None:
        path = address.removeprefix("unix:")
        self.bound.append(path)
        if self.reachable_loosely(path):
            self.problems.append(f"{path} listens with mode {mode(path):04o}, reachable")
        for name in os.listdir(self.sockdir):
            target = os.path.join(self.sockdir, name)
            if stat.S_ISSOCK(os.lstat(target).st_mode) and mode(target) & ~SOCKET_MODE:
                self.problems.append(f"{target} exists with mode {mode(target):04o}")

    def renaming(self, source: str, target: str) -> None:
        if stat.S_ISSOCK(os.lstat(source).st_mode) and mode(source) & ~SOCKET_MODE:
            self.problems.append(f"{source} moved to {target} with mode {mode(source):04o}")


@pytest.fixture
def socket_watch(sockdir: str, monkeypatch: pytest.MonkeyPatch) -> SocketWatch:
    watch = SocketWatch(sockdir)
    real_server, real_rename = grpc.server, os.rename

    class WatchedServer:
        def __init__(self, inner: grpc.Server) -> None:
            self._inner = inner

        def __getattr__(self, name: str) -> object:
            return getattr(self._inner, name)

        def add_insecure_port(self, address: str) -> int:
            port: int = self._inner.add_insecure_port(address)
            watch.listening(address)  # gRPC listens inside add_insecure_port
            return port

    def server(*args: object, **kwargs: object) -> WatchedServer:
        return WatchedServer(real_server(*args, **kwargs))

    def rename(source: str, target: str, **kwargs: Any) -> None:  # os.rename's own kwargs
        watch.renaming(source, target)
        real_rename(source, target, **kwargs)

    monkeypatch.setattr("deviceplugin.server.grpc.server", server)
    monkeypatch.setattr("deviceplugin.server.os.rename", rename)
    return watch


def test_plugin_socket_is_never_reachable_with_a_looser_mode(
    umask: int, sockdir: str, socket_watch: SocketWatch
) -> None:
    os.chmod(sockdir, 0o755)  # like the kubelet's directory: anyone may look inside
    snapshot = make_snapshot(2)
    srv = PluginServer(fake_manager(make_resource(snapshot), snapshot), sockdir)
    srv.start()
    try:
        os.unlink(srv.socket_path)  # what a kubelet restart does
        srv.restart()
        assert len(socket_watch.bound) == 2
        assert socket_watch.problems == []
        # Bound elsewhere, in a private directory that is gone once the socket is in place.
        assert srv.socket_path not in socket_watch.bound
        assert os.listdir(sockdir) == [os.path.basename(srv.socket_path)]
        assert mode(srv.socket_path) == 0o600
    finally:
        srv.stop()


def test_private_bind_directory_is_owner_only_and_removed_after_a_failure(
    sockdir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    os.umask(old := os.umask(0))
    seen: list[int] = []

    def failing_rename(source: str, target: str, **kwargs: object) -> None:
        seen.append(mode(os.path.dirname(source)))
        raise OSError(errno.EBUSY, "planted rename failure")

    monkeypatch.setattr("deviceplugin.server.os.rename", failing_rename)
    snapshot = make_snapshot(1)
    srv = PluginServer(fake_manager(make_resource(snapshot), snapshot), sockdir)
    try:
        with pytest.raises(ServeError, match="planted rename failure"):
            srv.start()
    finally:
        os.umask(old)
    assert seen == [0o700]
    assert os.listdir(sockdir) == []  # neither the temporary socket nor its directory


def test_group_or_world_writable_socket_dir_is_warned_once(
    sockdir: str, caplog: pytest.LogCaptureFixture
) -> None:
    warn_if_shared.cache_clear()
    os.chmod(sockdir, 0o777)
    snapshot = make_snapshot(1)
    servers = [PluginServer(fake_manager(make_resource(snapshot), snapshot), sockdir)
               for _ in range(2)]
    try:
        for srv in servers:
            srv.start()
            srv.stop()
    finally:
        warn_if_shared.cache_clear()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING
                and "writable by others" in r.getMessage()]
    assert len(warnings) == 1
    assert os.path.realpath(sockdir) in warnings[0].getMessage()


def test_owner_only_socket_dir_is_not_warned(
    sockdir: str, caplog: pytest.LogCaptureFixture
) -> None:
    warn_if_shared.cache_clear()
    os.chmod(sockdir, 0o755)
    snapshot = make_snapshot(1)
    srv = PluginServer(fake_manager(make_resource(snapshot), snapshot), sockdir)
    srv.start()
    srv.stop()
    warn_if_shared.cache_clear()
    assert not [r for r in caplog.records if "writable by" in r.getMessage()]


def test_stale_socket_path_that_is_a_symlink_is_never_followed_nor_removed(sockdir: str) -> None:
    snapshot = make_snapshot(1)
    srv = PluginServer(fake_manager(make_resource(snapshot), snapshot), sockdir)
    victim = os.path.join(sockdir, "victim")
    Path(victim).write_text("keep me")
    os.symlink(victim, srv.socket_path)
    with pytest.raises(ServeError, match="not a socket"):
        srv.start()
    assert os.path.islink(srv.socket_path)
    assert Path(victim).read_text() == "keep me"


def test_fake_control_socket_is_owner_only(umask: int, sockdir: str) -> None:
    path = os.path.join(sockdir, "control.sock")
    fake = select_backend(f"fake:dgx-a100?control={path}")
    assert isinstance(fake, FakeNvml)
    try:
        assert mode(path) == 0o600
        assert send(path, {"op": "ping"})["ok"] is True
    finally:
        fake.uninstall()
    assert not os.path.exists(path)


def test_fake_control_line_without_newline_is_cut_off(sockdir: str) -> None:
    path = os.path.join(sockdir, "control.sock")
    fake = select_backend(f"fake:t4?control={path}")
    assert isinstance(fake, FakeNvml)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(TIMEOUT)
            sock.connect(path)
            sock.sendall(b"x" * (MAX_LINE + 10))  # never a newline
            reply = json.loads(sock.makefile("rb").readline())
            assert reply == {"ok": False, "error": "request too long"}
            assert sock.recv(1) == b""  # and the connection is closed
        assert fake.status()["lost"] == []  # nothing happened to the GPUs
        assert send(path, {"op": "ping"})["ok"] is True  # and it still serves
    finally:
        fake.uninstall()


# --- files ---------------------------------------------------------------------------------------


def test_features_file_is_0644_and_replaced_atomically(
    umask: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "features.d" / "gfd"
    write_atomically(str(target), "nvidia.com/gpu.count=8\n")
    assert mode(target) == 0o644
    # A write that fails half-way leaves the previous file whole and no temporary behind.
    def broken_replace(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        write_atomically(str(target), "nvidia.com/gpu.count=4\n")
    assert target.read_text() == "nvidia.com/gpu.count=8\n"
    assert os.listdir(target.parent) == ["gfd"]


def test_features_directory_is_created_0755(umask: int, tmp_path: Path) -> None:
    target = tmp_path / "etc" / "features.d" / "gfd"
    write_atomically(str(target), "nvidia.com/gpu.count=8\n")
    assert mode(tmp_path / "etc") == mode(target.parent) == 0o755


def test_cdi_spec_is_0644_in_a_0755_directory(umask: int, tmp_path: Path) -> None:
    config = Config(flags=Flags(plugin=PluginFlags(
        device_list_strategy=(DeviceListStrategy.CDI_CRI,),
        cdi_spec_dir=str(tmp_path / "run" / "cdi"))))
    written = write_cdi_spec(make_map(make_resource(make_snapshot(2))), config,
                             path_exists=lambda _: False)
    assert written is not None
    assert mode(written) == 0o644
    assert mode(tmp_path / "run") == mode(written.parent) == 0o755
    assert os.listdir(written.parent) == [written.name]


# --- untrusted input: configuration and profiles -----------------------------------------------


def python_tag_yaml(marker: Path) -> str:
    """YAML that creates ``marker`` if (and only if) it is loaded with an unsafe loader."""
    return f"version: v1\nflags: !!python/object/apply:os.mkdir [{str(marker)!r}]\n"


def test_config_with_python_tags_is_rejected_and_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    with pytest.raises(ConfigError, match="python/object"):
        parse_config(python_tag_yaml(marker), "config.yaml")
    path = tmp_path / "config.yaml"
    path.write_text(python_tag_yaml(marker))
    with pytest.raises(ConfigError):
        load_config_file(path)
    assert not marker.exists()


def test_profile_with_python_tags_is_rejected_and_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "node.yaml"
    path.write_text(f"name: evil\nextends: !!python/object/apply:os.mkdir [{str(marker)!r}]\n")
    with pytest.raises(ProfileError):
        load_profile(path)
    with pytest.raises(ValueError):
        select_backend(f"fake:{path}")
    assert not marker.exists()
    assert not isinstance(pynvml.nvmlLib, FakeNvmlLib)


# --- untrusted input: requests on the plugin socket ---------------------------------------------


def expect_invalid(call: object, match: str) -> grpc.RpcError:
    """Run ``call``; it must fail with INVALID_ARGUMENT and a short message matching ``match``."""
    assert callable(call)
    with pytest.raises(grpc.RpcError) as info:
        call()
    err = info.value
    assert isinstance(err, grpc.Call)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert match in (err.details() or "")
    assert len(err.details() or "") < 1024
    return err


def test_huge_allocate_requests_are_refused_and_change_nothing(
    server: tuple[PluginServer, FakeAllocator],
) -> None:
    srv, _ = server
    before = srv.manager
    ids = [d.id for d in srv.resource.devices]
    channel, stub = plugin_stub(srv.socket_path)
    with channel:
        many_ids = api_pb2.AllocateRequest(container_requests=[
            api_pb2.ContainerAllocateRequest(devices_ids=[f"GPU-{n}" for n in range(100_000)])])
        expect_invalid(lambda: stub.Allocate(many_ids, timeout=TIMEOUT), "device IDs")
        many_containers = api_pb2.AllocateRequest(container_requests=[
            api_pb2.ContainerAllocateRequest(devices_ids=ids[:1])
            for _ in range(MAX_CONTAINER_REQUESTS + 1)])
        expect_invalid(lambda: stub.Allocate(many_containers, timeout=TIMEOUT),
                       "container requests")
        long_id = api_pb2.AllocateRequest(container_requests=[
            api_pb2.ContainerAllocateRequest(devices_ids=["G" * 1_000_000])])
        expect_invalid(lambda: stub.Allocate(long_id, timeout=TIMEOUT), str(MAX_DEVICE_ID_BYTES))
        # Nothing changed: same manager object, and a normal request is served as before.
        assert srv.manager is before
        ok = stub.Allocate(api_pb2.AllocateRequest(container_requests=[
            api_pb2.ContainerAllocateRequest(devices_ids=ids[:2])]), timeout=TIMEOUT)
        assert ok.container_responses[0].envs["NVIDIA_VISIBLE_DEVICES"] == ",".join(ids[:2])
        at_limit = stub.Allocate(api_pb2.AllocateRequest(container_requests=[
            api_pb2.ContainerAllocateRequest(devices_ids=ids[:1])
            for _ in range(MAX_CONTAINER_REQUESTS)]), timeout=TIMEOUT)
        assert len(at_limit.container_responses) == MAX_CONTAINER_REQUESTS


def test_huge_preferred_allocation_requests_never_reach_the_allocator(
    server: tuple[PluginServer, FakeAllocator],
) -> None:
    srv, allocator = server
    ids = [d.id for d in srv.resource.devices]
    channel, stub = plugin_stub(srv.socket_path)
    with channel:
        huge = api_pb2.PreferredAllocationRequest(container_requests=[
            api_pb2.ContainerPreferredAllocationRequest(
                available_deviceIDs=[f"GPU-{n}" for n in range(100_000)], allocation_size=2)])
        expect_invalid(lambda: stub.GetPreferredAllocation(huge, timeout=TIMEOUT), "device IDs")
        many = api_pb2.PreferredAllocationRequest(container_requests=[
            api_pb2.ContainerPreferredAllocationRequest(available_deviceIDs=ids,
                                                        allocation_size=1)
            for _ in range(MAX_CONTAINER_REQUESTS + 1)])
        expect_invalid(lambda: stub.GetPreferredAllocation(many, timeout=TIMEOUT),
                       "container requests")
        assert allocator.calls == []
        # A huge allocation_size is simply impossible: no preference, no error.
        big = api_pb2.PreferredAllocationRequest(container_requests=[
            api_pb2.ContainerPreferredAllocationRequest(available_deviceIDs=ids,
                                                        allocation_size=2**31 - 1)])
        answer = stub.GetPreferredAllocation(big, timeout=TIMEOUT)
        assert list(answer.container_responses[0].deviceIDs) == []


def test_grpc_message_size_is_bounded(server: tuple[PluginServer, FakeAllocator]) -> None:
    srv, _ = server
    ids = [d.id for d in srv.resource.devices]
    channel, stub = plugin_stub(srv.socket_path)
    with channel:
        too_big = api_pb2.AllocateRequest(container_requests=[
            api_pb2.ContainerAllocateRequest(devices_ids=["x" * (MAX_MESSAGE_BYTES + 1)])])
        with pytest.raises(grpc.RpcError) as info:
            stub.Allocate(too_big, timeout=TIMEOUT)
        assert isinstance(info.value, grpc.Call)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        ok = stub.Allocate(api_pb2.AllocateRequest(container_requests=[
            api_pb2.ContainerAllocateRequest(devices_ids=ids[:1])]), timeout=TIMEOUT)
        assert len(ok.container_responses) == 1


# --- the API server: only our labels -----------------------------------------------------------


def test_node_patch_never_touches_labels_outside_nvidia_com() -> None:
    foreign = {
        "kubernetes.io/hostname": "gpu-node-1",
        "node-role.kubernetes.io/worker": "",
        "example.com/team": "ml",
    }
    node = {"metadata": {
        "resourceVersion": "7",
        "labels": {**foreign, "nvidia.com/gpu.count": "8", "nvidia.com/gpu.product": "A100"},
        # Tampered: claims ownership of foreign labels (and a protected one).
        "annotations": {OWNERSHIP_ANNOTATION: "gpu.count,gpu.product,kubernetes.io/hostname,"
                                              "node-role.kubernetes.io/worker,example.com/team,"
                                              "device-plugin.config",
                        "example.com/other": "x"},
    }}
    desired = {"nvidia.com/gpu.count": "4", "example.com/injected": "yes",
               "kubernetes.io/hostname": "evil"}
    patch = plan_patch(node, desired)
    assert patch is not None
    labels = patch["metadata"]["labels"]
    assert all(key.startswith("nvidia.com/") for key in labels), labels
    assert labels == {"nvidia.com/gpu.count": "4", "nvidia.com/gpu.product": None}
    assert set(patch["metadata"]["annotations"]) == {OWNERSHIP_ANNOTATION}
    assert patch["metadata"]["annotations"][OWNERSHIP_ANNOTATION] == "gpu.count"
    # Nothing to remove: an empty desired set still leaves foreign labels alone.
    cleared = plan_patch(node, {})
    assert cleared is not None
    assert all(k.startswith("nvidia.com/") for k in cleared["metadata"].get("labels", {}))


# --- the fake NVML is never chosen by accident ---------------------------------------------------


def test_the_default_backend_is_the_real_driver() -> None:
    assert Config().flags.nvml == "real"
    assert backend_from_env({}) == "real"
    assert backend_from_env({"NVML_BACKEND": "  "}) == "real"
    assert parse_backend("real") is None
    for spec in ("", "fake", "fake:", "FAKE:dgx-a100", "simulated"):
        with pytest.raises(ValueError):
            parse_backend(spec)


def test_no_fallback_to_the_fake_when_the_real_nvml_fails(sockdir: str) -> None:
    # This machine has no libnvidia-ml (or, on a GPU node, no kubelet): either way the real
    # backend must fail or serve real GPUs, never quietly install the fake.
    config = replace_plugin_flags(
        replace_flags(Config(), nvml="real", fail_on_init_error=True),
        kubelet_socket="", cdi_spec_dir=os.path.join(sockdir, "cdi"))
    plugin = DevicePlugin(config, {}, socket_dir=sockdir)
    try:
        with contextlib.suppress(InitError):
            plugin.start()
        assert plugin.controller is None
        assert not isinstance(pynvml.nvmlLib, FakeNvmlLib)
    finally:
        plugin.close()

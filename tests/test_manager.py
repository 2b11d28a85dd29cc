"""The manager reconciling servers with resource maps, against the mock kubelet."""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Callable, Iterator

import pytest
from plugin_support import server_of
from test_server_support import (
    default_config,
    fake_context,
    make_map,
    make_resource,
    make_snapshot,
    short_tmpdir,
)

from deviceplugin.manager import PluginManager
from deviceplugin.mockkubelet import DeviceInfo, MockKubelet
from deviceplugin.rm import NodeManagers
from gpus.model import Snapshot
from gpus.resources import Resource

TIMEOUT = 10.0
GPU = "nvidia.com/gpu"
MIG = "nvidia.com/mig-1g.5gb"


@pytest.fixture
def snapshot() -> Snapshot:
    return make_snapshot(4)


@pytest.fixture
def env(snapshot: Snapshot) -> Iterator[tuple[MockKubelet, PluginManager]]:
    with short_tmpdir() as directory:
        kubelet = MockKubelet(directory)
        kubelet.start()
        manager = PluginManager(
            directory, kubelet.socket_path, fake_context(snapshot), poll_interval=0.02
        )
        manager.start()
        try:
            yield kubelet, manager
        finally:
            manager.stop()
            kubelet.stop()


def healthy_ids(devices: list[DeviceInfo]) -> set[str]:
    return {d.id for d in devices if d.health == "Healthy"}


def test_apply_starts_and_registers(
    env: tuple[MockKubelet, PluginManager],
    snapshot: Snapshot,
) -> None:
    kubelet, manager = env
    result = manager.apply(make_map(make_resource(snapshot)))
    assert result.started == (GPU,)
    assert kubelet.wait_for_registration(GPU, TIMEOUT)
    (request,) = kubelet.registrations(GPU)
    assert request.endpoint == "nvidia-gpu.sock"
    devices = kubelet.devices(GPU)
    assert [d.id for d in devices] == [g.uuid for g in snapshot.gpus]
    assert devices[0].numa_nodes == (0,)


def test_empty_resources_are_not_served(
    env: tuple[MockKubelet, PluginManager],
    snapshot: Snapshot,
) -> None:
    kubelet, manager = env
    empty = Resource(name=MIG, devices=())
    result = manager.apply(make_map(make_resource(snapshot), empty))
    assert result.started == (GPU,)
    assert manager.server(MIG) is None
    assert not os.path.exists(os.path.join(manager.socket_dir, "nvidia-mig-1g.5gb.sock"))


def test_changes_are_pushed_and_removals_stop(
    env: tuple[MockKubelet, PluginManager],
    snapshot: Snapshot,
) -> None:
    kubelet, manager = env
    manager.apply(make_map(make_resource(snapshot)))
    assert kubelet.wait_for_registration(GPU, TIMEOUT)
    sick = snapshot.gpus[1].uuid
    result = manager.apply(make_map(make_resource(snapshot, unhealthy=[sick])))
    assert result.updated == (GPU,)
    devices = kubelet.wait_for_devices(GPU, lambda ds: sick not in healthy_ids(ds), TIMEOUT)
    assert devices is not None and len(healthy_ids(devices)) == 3

    # A second resource appears; then the first goes away.
    mig = make_resource(snapshot, name=MIG)
    manager.apply(make_map(make_resource(snapshot), mig))
    assert kubelet.wait_for_registration(MIG, TIMEOUT)
    socket_path = server_of(manager, GPU).socket_path
    result = manager.apply(make_map(mig))
    assert result.stopped == (GPU,)
    assert not os.path.exists(socket_path)
    assert kubelet.wait_disconnected(GPU, TIMEOUT)
    assert [s.name for s in manager.servers()] == [MIG]


def test_kubelet_restart_reregisters(
    env: tuple[MockKubelet, PluginManager],
    snapshot: Snapshot,
) -> None:
    kubelet, manager = env
    manager.apply(make_map(make_resource(snapshot)))
    assert kubelet.wait_for_registration(GPU, TIMEOUT)
    kubelet.restart()
    assert kubelet.wait_for_registration(GPU, TIMEOUT, count=2)
    assert len(kubelet.devices(GPU)) == 4
    assert server_of(manager, GPU).intact()


def test_our_socket_removed_rebinds_and_reregisters(
    env: tuple[MockKubelet, PluginManager],
    snapshot: Snapshot,
) -> None:
    kubelet, manager = env
    manager.apply(make_map(make_resource(snapshot)))
    assert kubelet.wait_for_registration(GPU, TIMEOUT)
    os.unlink(server_of(manager, GPU).socket_path)
    assert kubelet.wait_for_registration(GPU, TIMEOUT, count=2)
    assert server_of(manager, GPU).intact()


def test_one_bad_resource_does_not_stop_the_others(
    env: tuple[MockKubelet, PluginManager],
    snapshot: Snapshot,
) -> None:
    kubelet, manager = env
    long_name = "nvidia.com/" + "x" * 120
    result = manager.apply(make_map(make_resource(snapshot), make_resource(snapshot, long_name)))
    assert result.started == (GPU,)
    assert "AF_UNIX" in result.errors[long_name]
    assert kubelet.wait_for_registration(GPU, TIMEOUT)


def test_kubelet_socket_not_a_socket_keeps_serving(snapshot: Snapshot) -> None:
    with short_tmpdir() as directory:
        bogus = os.path.join(directory, "kubelet.sock")
        open(bogus, "w").close()
        manager = PluginManager(directory, bogus, fake_context(snapshot), poll_interval=0.02)
        try:
            manager.apply(make_map(make_resource(snapshot)))
            manager.registration.tick()  # driven by hand: the thread is not started yet
            assert manager.registration.last_problem == f"kubelet socket {bogus} is not a socket"
            server = manager.server(GPU)
            assert server is not None and server.serving
            # Now a real kubelet shows up at that path: we register.
            manager.start()
            os.unlink(bogus)
            kubelet = MockKubelet(directory)
            kubelet.start()
            try:
                assert kubelet.wait_for_registration(GPU, TIMEOUT)
            finally:
                kubelet.stop()
        finally:
            manager.stop()


def test_no_kubelet_socket_serves_without_registering(snapshot: Snapshot) -> None:
    with short_tmpdir() as directory:
        manager = PluginManager(directory, "", fake_context(snapshot))
        manager.start()
        try:
            manager.apply(make_map(make_resource(snapshot)))
            assert os.path.exists(os.path.join(directory, "nvidia-gpu.sock"))
            assert manager.registration.registered() == {}
        finally:
            manager.stop()
        assert os.listdir(directory) == []


def readiness_env(
    snapshot: Snapshot, directory: str, kubelet: MockKubelet,
    context: NodeManagers | None = None,
) -> tuple[PluginManager, list[bool], threading.Condition]:
    """A manager reporting readiness changes into a list (with a condition to wait on)."""
    reports: list[bool] = []
    cond = threading.Condition()

    def on_ready(ready: bool) -> None:
        with cond:
            reports.append(ready)
            cond.notify_all()

    manager = PluginManager(
        directory, kubelet.socket_path, context or fake_context(snapshot), poll_interval=0.02,
        on_ready=on_ready,
    )
    return manager, reports, cond


def wait_report(reports: list[bool], cond: threading.Condition, ready: bool) -> bool:
    with cond:
        return cond.wait_for(lambda: bool(reports) and reports[-1] is ready, timeout=TIMEOUT)


def test_ready_once_registered_lost_with_the_kubelet_and_back(snapshot: Snapshot) -> None:
    with short_tmpdir() as directory, MockKubelet(directory) as kubelet:
        manager, reports, cond = readiness_env(snapshot, directory, kubelet)
        try:
            manager.apply(make_map(make_resource(snapshot)))
            manager.start()
            assert wait_report(reports, cond, True)
            assert kubelet.registrations(GPU)
            assert manager.ready()
            kubelet.stop()  # kubelet.sock gone: registration lost
            assert wait_report(reports, cond, False)
            kubelet.start()
            assert wait_report(reports, cond, True)
            assert len(kubelet.registrations(GPU)) == 2
            assert reports == [True, False, True]
        finally:
            manager.stop()


def test_ready_with_nothing_to_serve(snapshot: Snapshot) -> None:
    with short_tmpdir() as directory, MockKubelet(directory) as kubelet:
        manager, reports, cond = readiness_env(snapshot, directory, kubelet)
        try:
            manager.apply(make_map(Resource(name=MIG, devices=())))
            manager.start()
            assert wait_report(reports, cond, True)
            assert kubelet.registrations() == []
        finally:
            manager.stop()


def test_not_ready_before_the_kubelet_is_up(snapshot: Snapshot) -> None:
    with short_tmpdir() as directory:
        kubelet = MockKubelet(directory)  # not started: no kubelet.sock yet
        manager, reports, cond = readiness_env(snapshot, directory, kubelet)
        try:
            manager.apply(make_map(make_resource(snapshot)))
            manager.start()
            assert wait_report(reports, cond, False)
            kubelet.start()
            assert wait_report(reports, cond, True)
        finally:
            manager.stop()
            kubelet.stop()


def test_warm_runs_once_per_context_after_registration(snapshot: Snapshot) -> None:
    warmed: list[str] = []
    done = threading.Event()

    def warm(label: str) -> None:
        # Registration already happened when warm-up starts: it never delays it.
        assert kubelet.registrations(GPU)
        warmed.append(label)
        done.set()

    with short_tmpdir() as directory, MockKubelet(directory) as kubelet:
        first = dataclasses.replace(fake_context(snapshot), warm=lambda: warm("first"))
        manager, reports, cond = readiness_env(snapshot, directory, kubelet, first)
        try:
            manager.apply(make_map(make_resource(snapshot)))
            manager.start()
            assert done.wait(TIMEOUT)
            done.clear()
            # The same context again (a health change): no second warm-up.
            manager.apply(make_map(make_resource(snapshot, unhealthy=[snapshot.gpus[0].uuid])))
            second = dataclasses.replace(first, warm=lambda: warm("second"))
            manager.apply(make_map(make_resource(snapshot)), second)  # a reload
            assert done.wait(TIMEOUT)
            assert manager.warm_thread is not None
            manager.warm_thread.join(TIMEOUT)
            assert warmed == ["first", "second"]
        finally:
            manager.stop()


def test_production_context_warms_only_big_nodes(fake_snapshot: Callable[..., Snapshot]) -> None:
    from deviceplugin.rm import NodeManagers

    assert NodeManagers.create(default_config(), fake_snapshot("dgx-a100")).warm is None
    big = NodeManagers.create(default_config(), fake_snapshot("hgx-16"))
    assert big.warm is not None


def test_a_problem_is_logged_when_it_appears_not_on_every_rebuild(
    env: tuple[MockKubelet, PluginManager],
    snapshot: Snapshot,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Health changes rebuild the map many times a minute; the same layout problem must not
    # flood the log each time.
    _, manager = env
    problem = "MIG strategy single: GPU 6 has MIG enabled but no MIG devices"
    resource = make_resource(snapshot)
    with_problem = dataclasses.replace(make_map(resource), problems=(problem,))
    with caplog.at_level("WARNING", logger="deviceplugin.manager"):
        manager.apply(with_problem)
        manager.apply(with_problem)
        manager.apply(make_map(resource))
        manager.apply(with_problem)
    logged = [(r.levelname, r.getMessage()) for r in caplog.records if problem in r.getMessage()]
    assert logged == [("ERROR", f"resource map: {problem}")] * 2


def test_gate_holds_a_resource_until_it_opens_then_registers(snapshot: Snapshot) -> None:
    """A held resource is neither served nor registered, the node is not ready and ``unserved``
    says why; the watch thread retries and serves it once the gate opens (MPS readiness)."""
    from gpus.backoff import Backoff

    gate_open = threading.Event()
    asked = threading.Event()
    status_changes = threading.Event()

    def gate(resource: Resource) -> str | None:
        asked.set()
        return None if gate_open.is_set() else "its MPS control daemon does not answer: no"

    with short_tmpdir() as directory:
        kubelet = MockKubelet(directory)
        kubelet.start()
        manager = PluginManager(
            directory, kubelet.socket_path, fake_context(snapshot), poll_interval=0.02,
            gate=gate, gate_backoff=lambda: Backoff(initial=0.01, cap=0.05),
            on_status=status_changes.set,
        )
        manager.start()
        try:
            result = manager.apply(make_map(make_resource(snapshot)))
            assert result.started == () and result.errors == {}
            assert result.held == {GPU: "its MPS control daemon does not answer: no"}
            assert manager.unserved == result.held and not manager.ready()
            assert manager.server(GPU) is None and kubelet.registrations(GPU) == []
            asked.clear()
            assert asked.wait(TIMEOUT)  # retried on the watch thread
            assert kubelet.registrations(GPU) == []
            gate_open.set()
            assert kubelet.wait_for_registration(GPU, TIMEOUT)
            assert status_changes.wait(TIMEOUT)
            assert manager.unserved == {} and manager.held == {}
            # Once served, a resource is not gated again (NVIDIA checks only before serving).
            gate_open.clear()
            assert manager.apply(make_map(make_resource(snapshot))).held == {}
            assert manager.server(GPU) is not None
        finally:
            manager.stop()
            kubelet.stop()

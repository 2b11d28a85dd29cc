"""Health: XID policy, event handling, recovery, and the monitor's threads (stand-in NVML)."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import builders
import pytest
from health_support import WAIT_S, Changes, Clock, FailingOnce

from deviceplugin.health import (
    EVENT_DOUBLE_BIT_ECC,
    EVENT_XID,
    HealthMonitor,
    HealthPolicy,
    parse_health_env,
)
from gpus.model import GPU, Snapshot

# --- fixtures ------------------------------------------------------------------------------------


def make_gpu(index: int, migs: tuple[tuple[int, int], ...] = ()) -> GPU:
    """A100 ``index`` with a 1g.5gb MIG device per (GPU instance, compute instance) pair."""
    return builders.gpu(index, migs=(
        builders.mig_device(index, i, uuid=f"MIG-{index}-{gi}-{ci}", gpu_instance_id=gi,
                            compute_instance_id=ci)
        for i, (gi, ci) in enumerate(migs)))


SNAPSHOT = builders.snapshot(make_gpu(0), make_gpu(1), make_gpu(2, migs=((1, 0), (1, 1), (2, 0))))
ALL_GPUS = frozenset({"GPU-0", "GPU-1", "GPU-2"})


@dataclass(frozen=True)
class Event:
    gpu_uuid: str
    xid: int = 79
    event_type: int = EVENT_XID
    gpu_instance_id: int | None = None
    compute_instance_id: int | None = None


class FakeNvmlError(Exception):
    """Shaped like gpus.nvml.NvmlError: carries NVML's error name."""

    def __init__(self, name: str) -> None:
        super().__init__(f"nvmlDeviceGetMemoryInfo: {name}")
        self.name = name


@dataclass
class Prober:
    """Stand-in for Nvml.probe: UUIDs in ``failing`` raise the given error name; a hook in
    ``during`` runs once, inside the probe of its UUID (before it answers)."""

    failing: dict[str, str] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)
    during: dict[str, Callable[[], None]] = field(default_factory=dict)

    def probe(self, uuid: str) -> None:
        self.calls.append(uuid)
        hook = self.during.pop(uuid, None)
        if hook is not None:
            hook()
        if uuid in self.failing:
            raise FakeNvmlError(self.failing[uuid])


class Watcher:
    """Stand-in EventWatcher fed through a queue (events, or exceptions to raise)."""

    def __init__(self, registration_errors: Mapping[str, Exception]) -> None:
        self.registration_errors = dict(registration_errors)
        self.items: queue.Queue[Event | Exception] = queue.Queue()
        self.closed = threading.Event()

    def wait(self, timeout_ms: int) -> Event | None:
        try:
            item = self.items.get(timeout=timeout_ms / 1000)
        except queue.Empty:
            return None
        if isinstance(item, Exception):
            raise item
        return item

    def close(self) -> None:
        self.closed.set()


class WatcherFactory:
    """Hands out Watchers; the first ``failing_registrations`` calls fail these UUIDs."""

    def __init__(self, registration_errors: Mapping[str, Exception] | None = None) -> None:
        self.registration_errors = dict(registration_errors or {})
        self.made: list[Watcher] = []
        self.cond = threading.Condition()

    def __call__(self, nvml: object, uuids: list[str]) -> Watcher:
        assert sorted(uuids) == sorted(ALL_GPUS)
        watcher = Watcher(self.registration_errors)
        self.registration_errors = {}  # registration works when retried
        with self.cond:
            self.made.append(watcher)
            self.cond.notify_all()
        return watcher

    def wait_made(self, count: int) -> Watcher:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.made) >= count, WAIT_S)
            return self.made[count - 1]


def monitor(prober: Prober | None = None, environ: Mapping[str, str] | None = None,
            factory: Callable[[object, list[str]], Watcher] | None = None,
            recovery_interval: float = 5.0, clock: Clock | None = None
            ) -> tuple[HealthMonitor, Changes, Prober, Clock]:
    changes, prober, clock = Changes(), prober or Prober(), clock or Clock(1000.0)
    mon = HealthMonitor(prober, SNAPSHOT, changes, environ or {},
                        recovery_interval=recovery_interval, quiet_period=30.0, clock=clock,
                        watcher_factory=factory or WatcherFactory(), wait_timeout_ms=20)
    return mon, changes, prober, clock


# --- policy --------------------------------------------------------------------------------


def test_default_policy_ignores_application_xids() -> None:
    policy = parse_health_env({})
    assert policy == HealthPolicy()
    for xid in (13, 31, 43, 45, 68, 109):
        assert not policy.is_critical(xid)
    for xid in (48, 63, 64, 74, 79, 94, 95):
        assert policy.is_critical(xid)


@pytest.mark.parametrize("value", ["all", "xids", "ALL", " xids ", "48,xids"])
def test_disable_all(value: str) -> None:
    policy = parse_health_env({"DP_DISABLE_HEALTHCHECKS": value,
                               "DP_ENABLE_HEALTHCHECKS": "all"})
    assert not policy.enabled
    assert not policy.is_critical(79)


def test_xid_zero_is_an_xid() -> None:
    policy = parse_health_env({"DP_DISABLE_HEALTHCHECKS": "0", "DP_ENABLE_HEALTHCHECKS": "0"})
    assert policy.problems == ()
    assert policy.is_critical(0)


def test_disable_adds_ignored_xids() -> None:
    policy = parse_health_env({"DP_DISABLE_HEALTHCHECKS": "48, 79"})
    assert not policy.is_critical(48) and not policy.is_critical(79)
    assert not policy.is_critical(13)
    assert policy.is_critical(94)


def test_enable_reenables_listed_xids() -> None:
    policy = parse_health_env({"DP_DISABLE_HEALTHCHECKS": "48",
                               "DP_ENABLE_HEALTHCHECKS": "13,48"})
    assert policy.is_critical(13) and policy.is_critical(48)
    assert not policy.is_critical(31)


def test_enable_all_makes_every_xid_critical() -> None:
    policy = parse_health_env({"DP_DISABLE_HEALTHCHECKS": "79", "DP_ENABLE_HEALTHCHECKS": "all"})
    assert all(policy.is_critical(x) for x in (13, 31, 43, 45, 68, 79, 109))


def test_malformed_entries_are_reported_and_skipped() -> None:
    policy = parse_health_env({"DP_DISABLE_HEALTHCHECKS": "48,abc,,-3",
                               "DP_ENABLE_HEALTHCHECKS": "x13"})
    assert policy.problems == (
        "DP_DISABLE_HEALTHCHECKS: ignoring 'abc': not an XID number",
        "DP_DISABLE_HEALTHCHECKS: ignoring '-3': XIDs are not negative",
        "DP_ENABLE_HEALTHCHECKS: ignoring 'x13': not an XID number",
    )
    assert not policy.is_critical(48)
    assert not policy.is_critical(13)  # nothing re-enabled by the bad entry


# --- events (no threads) ----------------------------------------------------------------------


def test_critical_xid_on_whole_gpu_marks_only_that_gpu() -> None:
    mon, changes, _, _ = monitor()
    mon.handle_event(Event("GPU-1", xid=79))
    assert mon.unhealthy == {"GPU-1"}
    assert changes.seen == [frozenset({"GPU-1"})]


def test_ignored_xid_and_ecc_events_change_nothing() -> None:
    mon, changes, _, _ = monitor()
    mon.handle_event(Event("GPU-0", xid=13))
    mon.handle_event(Event("GPU-0", xid=0, event_type=EVENT_DOUBLE_BIT_ECC))
    assert mon.unhealthy == set() and changes.seen == []


def test_env_policy_is_used() -> None:
    mon, _, _, _ = monitor(environ={"DP_ENABLE_HEALTHCHECKS": "13"})
    mon.handle_event(Event("GPU-0", xid=13))
    assert mon.unhealthy == {"GPU-0"}


def test_xid_on_mig_device_marks_only_that_instance() -> None:
    mon, _, _, _ = monitor()
    mon.handle_event(Event("GPU-2", gpu_instance_id=1, compute_instance_id=1))
    assert mon.unhealthy == {"MIG-2-1-1"}


def test_xid_with_gi_only_marks_every_ci_of_that_gi() -> None:
    mon, _, _, _ = monitor()
    mon.handle_event(Event("GPU-2", gpu_instance_id=1))
    assert mon.unhealthy == {"MIG-2-1-0", "MIG-2-1-1"}


def test_xid_on_mig_gpu_without_instance_marks_the_gpu() -> None:
    mon, _, _, _ = monitor()
    mon.handle_event(Event("GPU-2"))
    assert mon.unhealthy == {"GPU-2"}


@pytest.mark.parametrize(("gpu", "gi", "ci"), [
    ("GPU-1", 1, 0), ("GPU-1", 1, None), ("GPU-0", 0, 0), ("GPU-0", 7, 3)])
def test_xid_with_instance_ids_on_a_gpu_without_mig_devices_marks_the_gpu(
        gpu: str, gi: int, ci: int | None) -> None:
    # The ids cannot name a MIG device there; dropping the event would hide a real fault.
    mon, changes, _, _ = monitor()
    mon.handle_event(Event(gpu, gpu_instance_id=gi, compute_instance_id=ci))
    assert mon.unhealthy == {gpu}
    assert changes.seen == [frozenset({gpu})]


def test_xid_on_unknown_instance_or_gpu_is_ignored() -> None:
    mon, changes, _, _ = monitor()
    mon.handle_event(Event("GPU-2", gpu_instance_id=9, compute_instance_id=0))
    mon.handle_event(Event("GPU-77"))
    assert mon.unhealthy == set() and changes.seen == []


def test_repeated_xid_does_not_renotify() -> None:
    mon, changes, _, _ = monitor()
    mon.handle_event(Event("GPU-0"))
    mon.handle_event(Event("GPU-0", xid=48))
    assert changes.seen == [frozenset({"GPU-0"})]


def test_generic_wait_error_marks_every_gpu() -> None:
    mon, changes, _, _ = monitor()
    mon.handle_wait_error(FakeNvmlError("NVML_ERROR_UNKNOWN"))
    assert mon.unhealthy == ALL_GPUS
    assert changes.seen == [ALL_GPUS]


def test_gpu_lost_wait_error_marks_only_the_lost_gpu() -> None:
    mon, _, _, _ = monitor(Prober(failing={"GPU-1": "NVML_ERROR_GPU_IS_LOST"}))
    mon.handle_wait_error(FakeNvmlError("NVML_ERROR_GPU_IS_LOST"))
    assert mon.unhealthy == {"GPU-1"}


def test_gpu_lost_wait_error_nobody_to_blame_marks_all() -> None:
    mon, _, _, _ = monitor()
    mon.handle_wait_error(FakeNvmlError("NVML_ERROR_GPU_IS_LOST"))
    assert mon.unhealthy == ALL_GPUS


# --- recovery (driven by step() with an injected clock) -----------------------------------------


def test_recovery_needs_quiet_period_and_a_good_probe() -> None:
    prober = Prober(failing={"GPU-0": "NVML_ERROR_UNKNOWN"})
    mon, changes, _, clock = monitor(prober)
    mon.handle_event(Event("GPU-0"))
    clock.now += 10
    mon.step()
    assert "GPU-0" not in prober.calls  # still inside the quiet period: not even probed
    clock.now += 25
    mon.step()
    assert mon.unhealthy == {"GPU-0"}  # quiet, but the probe failed: quiet period restarts
    prober.failing.clear()
    clock.now += 29
    mon.step()
    assert mon.unhealthy == {"GPU-0"}
    clock.now += 1
    mon.step()
    assert mon.unhealthy == set()
    assert changes.seen == [frozenset({"GPU-0"}), frozenset()]


def test_new_xid_restarts_the_quiet_period() -> None:
    mon, _, _, clock = monitor()
    mon.handle_event(Event("GPU-0"))
    clock.now += 20
    mon.handle_event(Event("GPU-0", xid=48))
    clock.now += 20
    mon.step()
    assert mon.unhealthy == {"GPU-0"}
    clock.now += 10
    mon.step()
    assert mon.unhealthy == set()


@pytest.mark.parametrize("tick", [0.0, 1.0], ids=["same-clock-reading", "clock-moved"])
@pytest.mark.parametrize("device", ["GPU-0", "MIG-2-1-1"])
def test_xid_during_the_recovery_probe_keeps_the_device_unhealthy(device: str,
                                                                   tick: float) -> None:
    """The XID lands while the probe is in flight (and the probe then answers): the pass must
    not recover the device, and the quiet period restarts from that XID. ``tick`` 0 is a
    clock too coarse to tell the XID from the pass's start."""
    prober = Prober()
    mon, changes, _, clock = monitor(prober)
    parent, gi, ci = ("GPU-0", None, None) if device == "GPU-0" else ("GPU-2", 1, 1)
    mon.handle_event(Event(parent, gpu_instance_id=gi, compute_instance_id=ci))
    clock.now += 30

    def xid_while_probing() -> None:
        clock.now += tick
        mon.handle_event(Event(parent, xid=48, gpu_instance_id=gi, compute_instance_id=ci))

    prober.during[device] = xid_while_probing
    mon.step()
    assert device in prober.calls and not prober.during  # probed, and the XID came meanwhile
    assert mon.unhealthy == {device}
    assert changes.seen == [frozenset({device})]
    clock.now += 29
    mon.step()
    assert mon.unhealthy == {device}
    clock.now += 1
    mon.step()
    assert mon.unhealthy == set()
    assert changes.seen == [frozenset({device}), frozenset()]


def test_recovery_log_names_the_last_problem(caplog: pytest.LogCaptureFixture) -> None:
    # The operator's only record of why a device was out: the latest reason, not the first.
    mon, _, _, clock = monitor()
    mon.handle_event(Event("GPU-0", xid=79))
    mon.handle_event(Event("GPU-0", xid=48))
    clock.now += 30
    with caplog.at_level("INFO", logger="deviceplugin.health"):
        mon.step()
    [line] = [r.getMessage() for r in caplog.records if "healthy again" in r.getMessage()]
    assert line.startswith("device GPU-0 healthy again") and line.endswith("(was: critical XID 48)")


def test_step_marks_a_lost_healthy_gpu_and_ignores_other_probe_errors() -> None:
    prober = Prober(failing={"GPU-0": "NVML_ERROR_GPU_IS_LOST", "GPU-1": "NVML_ERROR_UNKNOWN"})
    mon, _, _, clock = monitor(prober)
    mon.step()
    assert mon.unhealthy == {"GPU-0"}
    prober.failing.clear()
    clock.now += 30
    mon.step()
    assert mon.unhealthy == set()


def test_mig_device_recovers_independently() -> None:
    mon, _, prober, clock = monitor()
    mon.handle_event(Event("GPU-2", gpu_instance_id=2, compute_instance_id=0))
    clock.now += 30
    mon.step()
    assert mon.unhealthy == set()
    assert "MIG-2-2-0" in prober.calls


def test_failing_listener_does_not_break_the_monitor() -> None:
    def explode(_: frozenset[str]) -> None:
        raise RuntimeError("listener bug")

    mon = HealthMonitor(Prober(), SNAPSHOT, explode, {}, clock=Clock(1000.0))
    mon.handle_event(Event("GPU-0"))
    assert mon.unhealthy == {"GPU-0"}


# --- threads --------------------------------------------------------------------------------------


def test_threads_report_registration_failures_events_and_wait_errors() -> None:
    factory = WatcherFactory({"GPU-1": FakeNvmlError("NVML_ERROR_GPU_IS_LOST")})
    mon, changes, _, _ = monitor(factory=factory)
    mon.start()
    try:
        changes.wait_for({"GPU-1"})
        watcher = factory.wait_made(1)
        watcher.items.put(Event("GPU-0", xid=13))  # ignored
        watcher.items.put(Event("GPU-0", xid=79))
        changes.wait_for({"GPU-0", "GPU-1"})
        watcher.items.put(FakeNvmlError("NVML_ERROR_UNKNOWN"))
        changes.wait_for(set(ALL_GPUS))
    finally:
        mon.stop()
    assert watcher.closed.is_set()
    assert changes.seen == [frozenset({"GPU-1"}), frozenset({"GPU-0", "GPU-1"}), ALL_GPUS]


def test_keeps_waiting_after_a_wait_error() -> None:
    factory = WatcherFactory()
    mon, changes, _, clock = monitor(factory=factory)
    mon.start()
    try:
        watcher = factory.wait_made(1)
        watcher.items.put(FakeNvmlError("NVML_ERROR_UNKNOWN"))
        changes.wait_for(set(ALL_GPUS))
        clock.now += 30
        mon.step()
        changes.wait_for(set())
        watcher.items.put(Event("GPU-2", gpu_instance_id=1, compute_instance_id=0))
        changes.wait_for({"MIG-2-1-0"})
    finally:
        mon.stop()


def test_recovered_registration_failure_rebuilds_the_watcher() -> None:
    factory = WatcherFactory({"GPU-0": FakeNvmlError("NVML_ERROR_UNKNOWN")})
    mon, changes, _, clock = monitor(factory=factory)
    mon.start()
    try:
        changes.wait_for({"GPU-0"})
        clock.now += 30
        mon.step()
        changes.wait_for(set())
        second = factory.wait_made(2)
        assert factory.made[0].closed.wait(WAIT_S)
        second.items.put(Event("GPU-0"))
        changes.wait_for({"GPU-0"})
        # Rebuilt once, not on every wait: the same event set still delivers.
        second.items.put(Event("GPU-1"))
        changes.wait_for({"GPU-0", "GPU-1"})
        assert len(factory.made) == 2 and not second.closed.is_set()
    finally:
        mon.stop()


def test_a_later_problem_does_not_cancel_the_rebuild_of_a_failed_registration() -> None:
    """GPU-0's events are not registered; a failed probe then restarts its quiet period. On
    recovery the event set must still be rebuilt, or GPU-0 would never report an XID again."""
    factory = WatcherFactory({"GPU-0": FakeNvmlError("NVML_ERROR_UNKNOWN")})
    prober = Prober(failing={"GPU-0": "NVML_ERROR_UNKNOWN"})
    mon, changes, _, clock = monitor(prober, factory=factory)
    mon.start()
    try:
        changes.wait_for({"GPU-0"})
        clock.now += 30
        mon.step()  # the probe fails: a new problem, without a registration failure
        assert mon.unhealthy == {"GPU-0"}
        prober.failing.clear()
        clock.now += 30
        mon.step()
        changes.wait_for(set())
        factory.wait_made(2).items.put(Event("GPU-0"))
        changes.wait_for({"GPU-0"})
    finally:
        mon.stop()


def test_probe_thread_survives_a_failing_pass() -> None:
    clock = FailingOnce(1000.0)
    mon, changes, _, _ = monitor(recovery_interval=0.001, clock=clock)
    mon.handle_event(Event("GPU-1"))
    clock.now += 31
    clock.fail = True  # only the probe thread reads the clock from here on
    mon.start()
    try:
        changes.wait_for(set())
    finally:
        mon.stop()
    assert not clock.fail


def test_probe_thread_recovers_devices() -> None:
    clock = Clock(1000.0)
    mon, changes, _, _ = monitor(recovery_interval=0.001, clock=clock)
    mon.handle_event(Event("GPU-1"))
    clock.now += 31
    mon.start()
    try:
        changes.wait_for(set())
    finally:
        mon.stop()


def test_event_set_creation_failure_marks_all_and_retries() -> None:
    attempts: list[int] = []
    retried = threading.Event()
    good = WatcherFactory()

    def factory(nvml: object, uuids: list[str]) -> Watcher:
        attempts.append(1)
        if len(attempts) == 1:
            raise FakeNvmlError("NVML_ERROR_UNKNOWN")
        retried.set()
        return good(nvml, uuids)

    mon, changes, _, _ = monitor(factory=factory)
    mon.start()
    try:
        changes.wait_for(set(ALL_GPUS))
        assert retried.wait(WAIT_S)
    finally:
        mon.stop()


def test_disabled_checks_start_nothing() -> None:
    factory = WatcherFactory()
    mon, _, _, _ = monitor(environ={"DP_DISABLE_HEALTHCHECKS": "all"}, factory=factory)
    mon.start()
    mon.stop()
    assert factory.made == []


def test_zero_recovery_interval_disables_the_probe_thread() -> None:
    factory = WatcherFactory()
    mon, _, prober, _ = monitor(recovery_interval=0, factory=factory)
    mon.start()
    try:
        factory.wait_made(1)
        names = {t.name for t in threading.enumerate()}
        assert "health-events" in names and "health-probe" not in names
    finally:
        mon.stop()
    assert prober.calls == []


def test_second_start_starts_no_more_threads() -> None:
    factory = WatcherFactory()
    mon, _, _, _ = monitor(factory=factory)
    mon.start()
    try:
        factory.wait_made(1)
        mon.start()
        names = [t.name for t in threading.enumerate()]
        assert names.count("health-events") == 1 and names.count("health-probe") == 1
    finally:
        mon.stop()
    assert len(factory.made) == 1


def test_stop_ends_watching() -> None:
    factory = WatcherFactory()
    mon, _, _, _ = monitor(factory=factory)
    mon.start()
    assert mon.wait_watching(WAIT_S)
    mon.stop()
    assert not mon.wait_watching(0)


def test_policy_problems_are_logged_at_start(caplog: pytest.LogCaptureFixture) -> None:
    mon, _, _, _ = monitor(environ={"DP_DISABLE_HEALTHCHECKS": "48,abc"})
    with caplog.at_level("WARNING", logger="deviceplugin.health"):
        mon.start()
        mon.stop()
    assert "health checks: DP_DISABLE_HEALTHCHECKS: ignoring 'abc': not an XID number" in [
        r.getMessage() for r in caplog.records]


def test_stop_joins_threads() -> None:
    factory = WatcherFactory()
    mon, _, _, _ = monitor(factory=factory)
    mon.start()
    factory.wait_made(1)
    mon.stop()
    assert not any(t.name.startswith("health-") for t in threading.enumerate())


def test_listener_may_read_state_from_another_thread() -> None:
    seen: list[frozenset[str]] = []

    def listener(_: frozenset[str]) -> None:
        # A manager that hands the change to its own thread, which reads the monitor back.
        reader = threading.Thread(target=lambda: seen.append(mon.unhealthy))
        reader.start()
        reader.join(WAIT_S)

    mon = HealthMonitor(Prober(), SNAPSHOT, listener, {}, clock=Clock(1000.0))
    mon.handle_event(Event("GPU-0"))
    assert seen == [frozenset({"GPU-0"})]


def test_stopped_monitor_reports_nothing() -> None:
    mon, changes, _, _ = monitor()
    mon.start()
    mon.stop()
    mon.handle_event(Event("GPU-0"))
    assert changes.seen == []


def test_event_constants_match_nvml() -> None:
    from deviceplugin import health
    from gpus import nvml

    assert health.EVENT_XID == nvml.EVENT_XID
    assert health.EVENT_SINGLE_BIT_ECC == nvml.EVENT_SINGLE_BIT_ECC
    assert health.EVENT_DOUBLE_BIT_ECC == nvml.EVENT_DOUBLE_BIT_ECC


# --- reload: a new monitor takes over the old one's set ------------------------------------


def test_successor_measures_the_quiet_period_from_the_last_problem() -> None:
    old, _, prober, clock = monitor()
    old.handle_event(Event("GPU-0"))
    clock.now += 20.0  # the reload comes 20 s after the XID
    old.stop()
    new = HealthMonitor(prober, SNAPSHOT, Changes(), {}, recovery_interval=5.0,
                        quiet_period=30.0, clock=clock, watcher_factory=WatcherFactory(),
                        wait_timeout_ms=20, previous=old)
    clock.now += 10.0
    new.step()
    assert new.unhealthy == frozenset()


def test_successor_starts_from_the_previous_unhealthy_set() -> None:
    old, _, prober, clock = monitor()
    old.handle_event(Event("GPU-1", xid=79))
    old.handle_event(Event("GPU-2", xid=79, gpu_instance_id=1, compute_instance_id=1))
    assert old.unhealthy == {"GPU-1", "MIG-2-1-1"}
    # The new snapshot no longer has GPU 2's MIG device 1/1 (re-partitioned).
    gpus = (make_gpu(0), make_gpu(1), make_gpu(2, migs=((2, 0),)))
    changes = Changes()
    new = HealthMonitor(prober, Snapshot(system=SNAPSHOT.system, gpus=gpus), changes, {},
                        recovery_interval=5.0, quiet_period=30.0, clock=clock,
                        watcher_factory=WatcherFactory(), wait_timeout_ms=20, previous=old)
    assert new.unhealthy == {"GPU-1"}
    # The quiet period carries over too: recovery is measured from the XID, not the reload.
    clock.now += 29.0
    new.step()
    assert new.unhealthy == {"GPU-1"}
    clock.now += 2.0
    new.step()
    assert new.unhealthy == frozenset()
    changes.wait_for(set())
    # The carried set was never re-reported as news: only the recovery was.
    assert changes.seen == [frozenset()]

"""deviceplugin.health's recovery and lifecycle side, and deviceplugin.healthpolicy: guards that
mutation testing found unprotected (docs/testing.md).

The event side (handle_event, _mark, _xid_targets, reason_kind, _count, _carry) has its own file,
tests/test_health_mutants.py. Threads are waited on with events and bounded joins, never slept on.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from health_support import WAIT_S, Changes, Clock, FailingOnce
from prometheus_client import CollectorRegistry, Counter
from test_health import (
    ALL_GPUS,
    SNAPSHOT,
    Event,
    FakeNvmlError,
    Prober,
    Watcher,
    WatcherFactory,
    monitor,
)

import deviceplugin.health as health
from deviceplugin.health import GPU_IS_LOST, HealthMonitor, nvml_watcher
from deviceplugin.healthpolicy import HealthPolicy, parse_health_env
from gpus.config.model import PluginFlags
from gpus.runtime.metrics import PluginMetrics

LOGGER = "deviceplugin.health"
UNKNOWN = "NVML_ERROR_UNKNOWN"


def messages(caplog: pytest.LogCaptureFixture, level: int = logging.DEBUG) -> list[str]:
    """The health monitor's log lines at ``level`` or above, as an operator reads them."""
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno >= level]


def samples(registry: CollectorRegistry, family: str) -> dict[tuple[str, ...], float]:
    """Every labelled ``<family>_total`` sample: label values (in order) -> value."""
    return {tuple(s.labels.values()): s.value
            for metric in registry.collect() if metric.name == family
            for s in metric.samples if s.name == family + "_total"}


def metered(prober: health.Prober, metrics: PluginMetrics, clock: Clock,
            changes: Changes | None = None, previous: HealthMonitor | None = None
            ) -> HealthMonitor:
    """A monitor (no threads started) reporting to ``metrics``."""
    return HealthMonitor(prober, SNAPSHOT, changes or Changes(), {}, recovery_interval=5.0,
                         quiet_period=30.0, clock=clock, watcher_factory=WatcherFactory(),
                         wait_timeout_ms=20, previous=previous, metrics=metrics)


def named(name: str) -> threading.Thread:
    """The one running thread called ``name``."""
    [thread] = [t for t in threading.enumerate() if t.name == name]
    return thread


@dataclass
class Probes:
    """Nvml.probe stand-in raising a given exception per UUID (NVML's, or any other)."""

    errors: dict[str, Exception] = field(default_factory=dict)

    def probe(self, uuid: str) -> None:
        err = self.errors.get(uuid)
        if err is not None:
            raise err


class CountHook:
    """Stands in for PluginMetrics.health_transitions and runs ``hook`` once, at its first
    count: the moment after the monitor changed its set and before it reports the change, where
    another thread's change can land."""

    def __init__(self, counter: Counter, hook: Callable[[], None]) -> None:
        self.counter = counter
        self.hook: Callable[[], None] | None = hook

    def labels(self, *values: str) -> Counter:
        hook, self.hook = self.hook, None
        if hook is not None:
            hook()
        return self.counter.labels(*values)


# --- construction -------------------------------------------------------------------------------


def test_defaults_are_the_daemons_documented_defaults() -> None:
    # A monitor built without the two timings behaves as the plugin's configuration says by
    # default (--health-recovery-interval, --health-quiet-period).
    flags, clock = PluginFlags(), Clock(1000.0)
    mon = HealthMonitor(Prober(), SNAPSHOT, Changes(), {}, clock=clock,
                        watcher_factory=WatcherFactory())
    assert mon.recovery_interval == flags.health_recovery_interval
    assert mon.quiet_period == flags.health_quiet_period
    mon.handle_event(Event("GPU-0"))
    clock.now += flags.health_quiet_period - 0.5
    mon.step()
    assert mon.unhealthy == {"GPU-0"}
    clock.now += 0.5
    mon.step()
    assert mon.unhealthy == frozenset()


def test_nvml_watcher_refuses_a_stand_in_and_names_what_it_got() -> None:
    with pytest.raises(TypeError, match=re.escape(
            f"the NVML event watcher needs a gpus.nvml.Nvml, not {Prober!r}")):
        nvml_watcher(Prober(), ["GPU-0"])


# --- start / stop ---------------------------------------------------------------------------------


def test_disabled_checks_log_which_variable_disabled_them(caplog: pytest.LogCaptureFixture) -> None:
    mon, _, _, _ = monitor(environ={"DP_DISABLE_HEALTHCHECKS": "xids"})
    with caplog.at_level(logging.INFO, logger=LOGGER):
        mon.start()
    mon.stop()
    assert messages(caplog) == ["health checks disabled by DP_DISABLE_HEALTHCHECKS"]


def test_monitor_threads_do_not_keep_the_process_alive() -> None:
    # Daemon threads: a plugin that exits on an error path without stop() still exits.
    factory = WatcherFactory()
    mon, _, _, _ = monitor(factory=factory)
    mon.start()
    try:
        factory.wait_made(1)
        threads = [named("health-events"), named("health-probe")]
        assert all(thread.daemon for thread in threads)
    finally:
        mon.stop()


class StuckWatcher:
    """A watcher whose wait does not return until released: a wait stuck in the driver."""

    def __init__(self) -> None:
        self.registration_errors: dict[str, Exception] = {}
        self.entered = threading.Event()
        self.release = threading.Event()
        self.closed = threading.Event()

    def wait(self, timeout_ms: int) -> None:
        self.entered.set()
        self.release.wait(10 * WAIT_S)  # bounded, in case the test dies before releasing it

    def close(self) -> None:
        self.closed.set()


def test_stop_gives_up_on_a_stuck_thread_and_says_which(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(health, "JOIN_TIMEOUT_S", 0.1)
    stuck = StuckWatcher()
    mon = HealthMonitor(Prober(), SNAPSHOT, Changes(), {}, recovery_interval=0,
                        clock=Clock(1000.0), watcher_factory=lambda _, __: stuck)
    mon.start()
    assert stuck.entered.wait(WAIT_S)
    events_thread = named("health-events")
    stopped = threading.Event()

    def stop() -> None:
        mon.stop()
        stopped.set()

    stopper = threading.Thread(target=stop)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        stopper.start()
        try:
            assert stopped.wait(WAIT_S), "stop() waited for a thread stuck in NVML"
        finally:
            stuck.release.set()
            stopper.join(WAIT_S)
            events_thread.join(WAIT_S)
    assert messages(caplog) == ["health thread health-events did not stop within 0.1s"]
    assert stuck.closed.is_set()  # the thread still cleaned up once its wait returned


def test_stop_may_be_called_again() -> None:
    factory = WatcherFactory()
    mon, _, _, _ = monitor(factory=factory)
    mon.start()
    factory.wait_made(1)
    mon.stop()
    mon.stop()
    assert not any(t.name.startswith("health-") for t in threading.enumerate())


def test_a_watcher_that_fails_to_close_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    class CloseFails(Watcher):
        def close(self) -> None:
            super().close()
            raise RuntimeError("event set busy")

    mon = HealthMonitor(Prober(), SNAPSHOT, Changes(), {}, recovery_interval=0,
                        clock=Clock(1000.0), wait_timeout_ms=20,
                        watcher_factory=lambda _, __: CloseFails({}))
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        mon.start()
        assert mon.wait_watching(WAIT_S)
        events_thread = named("health-events")
        mon.stop()
        events_thread.join(WAIT_S)
    assert "closing NVML event watcher failed: event set busy" in messages(caplog)


# --- the event thread's error paths ---------------------------------------------------------------


def test_event_set_creation_failure_is_reported_as_that(caplog: pytest.LogCaptureFixture) -> None:
    # Not also as a failed wait on the event set that does not exist.
    good = WatcherFactory()
    attempts: list[int] = []

    def factory(nvml: object, uuids: list[str]) -> Watcher:
        attempts.append(1)
        if len(attempts) == 1:
            raise FakeNvmlError(UNKNOWN)
        return good(nvml, uuids)

    mon, changes, _, clock = monitor(factory=factory, recovery_interval=0)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        mon.start()
        try:
            changes.wait_for(set(ALL_GPUS))
            good.wait_made(1)  # the retry
            clock.now += 30
            mon.step()
            changes.wait_for(set())
        finally:
            mon.stop()
    assert messages(caplog, logging.ERROR) == []
    assert ("device GPU-0 healthy again: probe answered and no critical event for 30s "
            f"(was: cannot create NVML event set: nvmlDeviceGetMemoryInfo: {UNKNOWN})"
            in messages(caplog))


def test_event_thread_pins_a_lost_gpu_wait_error_on_the_lost_gpu() -> None:
    factory = WatcherFactory()
    mon, changes, _, _ = monitor(Prober(failing={"GPU-1": GPU_IS_LOST}), factory=factory,
                                 recovery_interval=0)
    mon.start()
    try:
        factory.wait_made(1).items.put(FakeNvmlError(GPU_IS_LOST))
        changes.wait_for({"GPU-1"})
    finally:
        mon.stop()
    assert changes.seen == [frozenset({"GPU-1"})]


def test_wait_error_log_names_the_error(caplog: pytest.LogCaptureFixture) -> None:
    mon, _, _, _ = monitor()
    with caplog.at_level(logging.ERROR, logger=LOGGER):
        mon.handle_wait_error(FakeNvmlError(UNKNOWN))
    assert messages(caplog, logging.ERROR) == [
        f"waiting for NVML events failed: nvmlDeviceGetMemoryInfo: {UNKNOWN}; "
        "marking all GPUs unhealthy"]


def test_wait_errors_are_counted_by_nvml_name_or_exception_type() -> None:
    metrics = PluginMetrics()
    mon = metered(Prober(), metrics, Clock(1000.0))
    mon.handle_wait_error(RuntimeError("driver went away"))  # no NVML name at all
    assert mon.unhealthy == ALL_GPUS
    mon.handle_wait_error(FakeNvmlError(UNKNOWN))
    assert samples(metrics.registry, "nvidia_device_plugin_nvml_errors") == {
        ("nvmlEventSetWait", "RuntimeError"): 1.0, ("nvmlEventSetWait", UNKNOWN): 1.0}


# --- the probe pass -------------------------------------------------------------------------------


def test_probe_failures_are_counted_and_only_a_lost_gpu_is_marked() -> None:
    metrics = PluginMetrics()
    probes = Probes({"GPU-0": FakeNvmlError(GPU_IS_LOST), "GPU-1": OSError("bus error")})
    mon = metered(probes, metrics, Clock(1000.0))
    mon.step()
    assert mon.unhealthy == {"GPU-0"}
    assert samples(metrics.registry, "nvidia_device_plugin_nvml_errors") == {
        ("probe", GPU_IS_LOST): 1.0, ("probe", "OSError"): 1.0}


def test_recoveries_are_counted_per_device() -> None:
    metrics, clock = PluginMetrics(), Clock(1000.0)
    mon = metered(Prober(), metrics, clock)
    mon.handle_event(Event("GPU-0"))
    mon.handle_event(Event("GPU-1"))
    clock.now += 30
    mon.step()
    assert mon.unhealthy == frozenset()
    assert samples(metrics.registry, "nvidia_device_plugin_health_transitions") == {
        ("Unhealthy", "xid"): 2.0, ("Healthy", "recovered"): 2.0}


def test_a_device_in_its_quiet_period_does_not_hold_up_the_others() -> None:
    mon, _, _, clock = monitor()
    mon.handle_event(Event("GPU-0"))
    mon.handle_event(Event("GPU-1"))
    clock.now += 20
    mon.handle_event(Event("GPU-0", xid=48))  # GPU-0 (first in line) starts its quiet period over
    clock.now += 10
    mon.step()
    assert mon.unhealthy == {"GPU-0"}


def test_an_unhealthy_gpu_does_not_stop_the_pass_probing_the_healthy_ones() -> None:
    mon, _, _, _ = monitor(Prober(failing={"GPU-1": GPU_IS_LOST}))
    mon.handle_event(Event("GPU-0"))
    mon.step()  # GPU-0 is still quiet-period bound; GPU-1 and GPU-2 are probed
    assert mon.unhealthy == {"GPU-0", "GPU-1"}


def test_an_xid_during_one_probe_does_not_hold_up_the_other_recoveries() -> None:
    prober = Prober()
    mon, changes, _, clock = monitor(prober)
    mon.handle_event(Event("GPU-0"))
    mon.handle_event(Event("GPU-1"))
    clock.now += 30
    prober.during["GPU-0"] = lambda: mon.handle_event(Event("GPU-0", xid=48))
    mon.step()
    assert mon.unhealthy == {"GPU-0"}
    assert changes.seen == [frozenset({"GPU-0"}), frozenset({"GPU-0", "GPU-1"}),
                            frozenset({"GPU-0"})]


def test_recovery_log_gives_the_quiet_time_and_the_failed_probe(
        caplog: pytest.LogCaptureFixture) -> None:
    prober = Prober(failing={"GPU-0": UNKNOWN})
    mon, _, _, clock = monitor(prober)
    mon.handle_event(Event("GPU-0"))
    clock.now += 30
    mon.step()  # the probe fails: that is now the reason, and the quiet period starts over
    prober.failing.clear()
    clock.now += 45
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        mon.step()
    assert messages(caplog) == [
        "device GPU-0 healthy again: probe answered and no critical event for 45s "
        f"(was: probe failed: nvmlDeviceGetMemoryInfo: {UNKNOWN})"]


def test_a_failing_probe_pass_is_logged_with_its_traceback(
        caplog: pytest.LogCaptureFixture) -> None:
    clock = FailingOnce(1000.0)
    mon, changes, _, _ = monitor(recovery_interval=0.001, clock=clock)
    mon.handle_event(Event("GPU-1"))
    clock.now += 31
    clock.fail = True  # only the probe thread reads the clock from here on
    with caplog.at_level(logging.ERROR, logger=LOGGER):
        mon.start()
        try:
            changes.wait_for(set())  # the pass after the failed one recovered GPU-1
        finally:
            mon.stop()
    [record] = [r for r in caplog.records if r.name == LOGGER and r.levelno >= logging.ERROR]
    assert record.getMessage() == "health probe pass failed"
    assert record.exc_info is not None and str(record.exc_info[1]) == "clock broke"


# --- reporting ------------------------------------------------------------------------------------


def test_a_change_undone_before_its_report_is_not_news(monkeypatch: pytest.MonkeyPatch) -> None:
    """After a reload the listener shows GPU-0 Unhealthy (carried over). A pass recovers it and,
    before that is reported, a new XID marks it again: the set is what the listener shows, so
    nothing is reported."""
    prober, clock = Prober(), Clock(1000.0)
    old = HealthMonitor(prober, SNAPSHOT, Changes(), {}, clock=clock,
                        watcher_factory=WatcherFactory())
    old.handle_event(Event("GPU-0"))
    old.stop()
    metrics, changes = PluginMetrics(), Changes()
    new = metered(prober, metrics, clock, changes, previous=old)
    monkeypatch.setattr(metrics, "health_transitions", CountHook(
        metrics.health_transitions, lambda: new.handle_event(Event("GPU-0", xid=48))))
    clock.now += 30
    new.step()
    assert new.unhealthy == {"GPU-0"}
    assert changes.seen == []


def test_changes_reported_together_are_reported_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """An XID marks GPU-0 and, before that is reported, the probe thread finds GPU-1 lost: the
    first report carries both, and the second has no news."""
    metrics, changes = PluginMetrics(), Changes()
    mon = metered(Prober(failing={"GPU-1": GPU_IS_LOST}), metrics, Clock(1000.0), changes)
    monkeypatch.setattr(metrics, "health_transitions",
                        CountHook(metrics.health_transitions, mon.step))
    mon.handle_event(Event("GPU-0"))
    assert changes.seen == [frozenset({"GPU-0", "GPU-1"})]


def test_a_stopped_monitor_logs_what_it_did_not_report(caplog: pytest.LogCaptureFixture) -> None:
    mon, changes, _, _ = monitor()
    mon.stop()  # replaced on reload
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        mon.handle_event(Event("GPU-2", gpu_instance_id=1))
    assert "health monitor stopped; not reporting ['MIG-2-1-0', 'MIG-2-1-1']" in messages(caplog)
    assert changes.seen == []


def test_a_failing_listener_is_logged_with_its_traceback(
        caplog: pytest.LogCaptureFixture) -> None:
    def explode(_: frozenset[str]) -> None:
        raise RuntimeError("listener bug")

    mon = HealthMonitor(Prober(), SNAPSHOT, explode, {}, clock=Clock(1000.0))
    with caplog.at_level(logging.ERROR, logger=LOGGER):
        mon.handle_event(Event("GPU-0"))
    [record] = [r for r in caplog.records if r.name == LOGGER and r.levelno >= logging.ERROR]
    assert record.getMessage() == "health on_change callback failed"
    assert record.exc_info is not None and str(record.exc_info[1]) == "listener bug"


# --- policy (deviceplugin.healthpolicy) -----------------------------------------------------------


def test_a_negative_entry_does_not_drop_the_entries_after_it() -> None:
    policy = parse_health_env({"DP_DISABLE_HEALTHCHECKS": "-3,48",
                               "DP_ENABLE_HEALTHCHECKS": "-1,13"})
    assert not policy.is_critical(48)
    assert policy.is_critical(13)
    assert policy.problems == (
        "DP_DISABLE_HEALTHCHECKS: ignoring '-3': XIDs are not negative",
        "DP_ENABLE_HEALTHCHECKS: ignoring '-1': XIDs are not negative",
    )


def test_enable_all_is_not_reported_as_a_bad_entry() -> None:
    policy = parse_health_env({"DP_ENABLE_HEALTHCHECKS": "ALL,13"})
    assert policy.all_reenabled and policy.problems == ()


def test_disable_all_is_the_disabled_policy_whatever_the_other_variable_holds() -> None:
    # Nothing of DP_ENABLE_HEALTHCHECKS is parsed, so its bad entry is not reported either.
    policy = parse_health_env({"DP_DISABLE_HEALTHCHECKS": "all", "DP_ENABLE_HEALTHCHECKS": "x13"})
    assert policy == HealthPolicy(enabled=False)

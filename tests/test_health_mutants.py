"""Health monitor, event path: what an operator reads and counts when a device goes Unhealthy.

Written against mutants that survived tests/test_health.py and tests/test_health_fake.py
(docs/testing.md): the log lines naming the device and the reason, the metric labels and
counts of Unhealthy transitions, the quiet-period bookkeeping of repeated problems, and what a
reload carries over. No threads: events, wait errors and probe passes are driven by hand.
"""

from __future__ import annotations

import pytest
from health_support import Changes, Clock
from prometheus_client import CollectorRegistry
from test_health import (
    SNAPSHOT,
    Event,
    FakeNvmlError,
    Prober,
    WatcherFactory,
    monitor,
)

from deviceplugin.health import EVENT_DOUBLE_BIT_ECC, HealthMonitor, reason_kind
from gpus.runtime.metrics import PluginMetrics

LOGGER = "deviceplugin.health"


def messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The health monitor's log lines, formatted as an operator sees them."""
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


def successor(old: HealthMonitor, prober: Prober, clock: Clock) -> HealthMonitor:
    """The monitor a reload builds after stopping ``old`` (same NVML, clock and snapshot)."""
    old.stop()
    return HealthMonitor(prober, SNAPSHOT, Changes(), {}, recovery_interval=5.0,
                         quiet_period=30.0, clock=clock, watcher_factory=WatcherFactory(),
                         wait_timeout_ms=20, previous=old)


# --- handle_event: events that do not act say so, naming the event and the GPU -----------------


def test_non_xid_event_is_logged_with_its_type_and_gpu(caplog: pytest.LogCaptureFixture) -> None:
    mon, changes, _, _ = monitor()
    with caplog.at_level("DEBUG", logger=LOGGER):
        mon.handle_event(Event("GPU-1", xid=0, event_type=EVENT_DOUBLE_BIT_ECC))
    assert messages(caplog) == ["ignoring non-XID health event type 0x2 on GPU-1"]
    assert mon.unhealthy == set() and changes.seen == []


def test_non_critical_xid_is_logged_with_the_xid_and_gpu(
        caplog: pytest.LogCaptureFixture) -> None:
    mon, changes, _, _ = monitor()
    with caplog.at_level("INFO", logger=LOGGER):
        mon.handle_event(Event("GPU-0", xid=13))
    assert messages(caplog) == ["ignoring XID 13 on GPU-0 (not critical by policy)"]
    assert mon.unhealthy == set() and changes.seen == []


# --- _xid_targets: an XID nobody can be blamed for is reported, not silently dropped ------------


def test_xid_on_unknown_gpu_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    mon, _, _, _ = monitor()
    with caplog.at_level("WARNING", logger=LOGGER):
        mon.handle_event(Event("GPU-77", xid=79))
    assert messages(caplog) == ["XID 79 on unknown GPU GPU-77 ignored"]
    assert mon.unhealthy == set()


def test_xid_on_unknown_mig_instance_is_logged_with_gpu_gi_and_ci(
        caplog: pytest.LogCaptureFixture) -> None:
    mon, _, _, _ = monitor()
    with caplog.at_level("WARNING", logger=LOGGER):
        mon.handle_event(Event("GPU-2", xid=79, gpu_instance_id=9, compute_instance_id=4))
    assert messages(caplog) == [
        "XID 79 on GPU-2 GI 9 CI 4 matches no known MIG device; ignored"]
    assert mon.unhealthy == set()


def test_xid_on_a_known_mig_instance_warns_only_that_it_is_unhealthy(
        caplog: pytest.LogCaptureFixture) -> None:
    # The "matches no known MIG device" warning is for misses only: on a hit it would tell the
    # operator the fault was dropped when it was not.
    mon, _, _, _ = monitor()
    with caplog.at_level("WARNING", logger=LOGGER):
        mon.handle_event(Event("GPU-2", xid=79, gpu_instance_id=1, compute_instance_id=1))
    assert messages(caplog) == ["device MIG-2-1-1 unhealthy: critical XID 79"]


# --- _mark: the Unhealthy log lines name the device and the reason -------------------------------


def test_each_newly_unhealthy_device_is_warned_with_its_reason(
        caplog: pytest.LogCaptureFixture) -> None:
    mon, _, _, _ = monitor()
    with caplog.at_level("WARNING", logger=LOGGER):
        mon.handle_event(Event("GPU-1", xid=79))
        mon.handle_event(Event("GPU-2", xid=48, gpu_instance_id=1))
    assert messages(caplog) == [
        "device GPU-1 unhealthy: critical XID 79",
        "device MIG-2-1-0 unhealthy: critical XID 48",
        "device MIG-2-1-1 unhealthy: critical XID 48",
    ]


def test_a_repeated_problem_is_logged_at_debug_with_the_new_reason(
        caplog: pytest.LogCaptureFixture) -> None:
    mon, _, _, _ = monitor()
    mon.handle_event(Event("GPU-0", xid=79))
    caplog.clear()
    with caplog.at_level("DEBUG", logger=LOGGER):
        mon.handle_event(Event("GPU-0", xid=48))
    assert messages(caplog) == ["device GPU-0 still unhealthy: critical XID 48"]


def test_every_repeated_problem_cancels_an_inflight_recovery() -> None:
    """GPU-0 has had two XIDs; a third lands while the recovery probe is in flight. The pass
    must not return it to Healthy: each problem, not only the first repeat, must be told apart
    from the state the pass started from."""
    prober = Prober()
    mon, changes, _, clock = monitor(prober)
    mon.handle_event(Event("GPU-0", xid=79))
    mon.handle_event(Event("GPU-0", xid=48))
    clock.now += 30
    prober.during["GPU-0"] = lambda: mon.handle_event(Event("GPU-0", xid=79))
    mon.step()
    assert not prober.during  # the third XID did come during the probe
    assert mon.unhealthy == {"GPU-0"}
    assert changes.seen == [frozenset({"GPU-0"})]


# --- reason_kind and _count: the metric of Unhealthy transitions --------------------------------


@pytest.mark.parametrize(("reason", "kind"), [
    ("critical XID 79", "xid"),
    ("GPU lost (nvmlDeviceGetMemoryInfo: NVML_ERROR_GPU_IS_LOST)", "gpu_lost"),
    ("probe failed: nvmlDeviceGetMemoryInfo: NVML_ERROR_UNKNOWN", "probe_failed"),
    ("NVML event wait failed: boom", "nvml_events"),
    ("NVML event registration failed: boom", "nvml_events"),
    ("cannot create NVML event set: boom", "nvml_events"),
])
def test_reason_kind_maps_each_reason_the_monitor_writes_to_its_label(reason: str,
                                                                     kind: str) -> None:
    assert reason_kind(reason) == kind


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    """A sample's value, 0 when absent."""
    found = registry.get_sample_value("nvidia_device_plugin_" + name, labels)
    return 0.0 if found is None else found


def test_unhealthy_transitions_are_counted_per_new_device_and_labelled_by_kind() -> None:
    metrics = PluginMetrics()
    reg = metrics.registry
    prober = Prober(failing={"GPU-1": "NVML_ERROR_GPU_IS_LOST"})
    mon = HealthMonitor(prober, SNAPSHOT, Changes(), {}, watcher_factory=WatcherFactory(),
                        metrics=metrics)
    mon.handle_wait_error(FakeNvmlError("NVML_ERROR_GPU_IS_LOST"))
    assert sample(reg, "health_transitions_total", state="Unhealthy", reason="gpu_lost") == 1
    assert sample(reg, "unhealthy_devices") == 1
    mon.handle_event(Event("GPU-2", xid=79, gpu_instance_id=1))  # two MIG devices at once
    assert sample(reg, "health_transitions_total", state="Unhealthy", reason="xid") == 2
    assert sample(reg, "unhealthy_devices") == 3
    # Every GPU is blamed, but only GPU-0 and GPU-2 are new: GPU-1 was already Unhealthy.
    mon.handle_wait_error(FakeNvmlError("NVML_ERROR_UNKNOWN"))
    assert sample(reg, "health_transitions_total", state="Unhealthy",
                  reason="nvml_events") == 2
    assert sample(reg, "unhealthy_devices") == 5
    assert sample(reg, "health_transitions_total", state="Unhealthy", reason="gpu_lost") == 1
    assert sample(reg, "health_transitions_total", state="Unhealthy", reason="xid") == 2


# --- _carry: a reload keeps each device's reason and its bookkeeping ----------------------------


def test_reload_logs_each_carried_device_with_its_reason(
        caplog: pytest.LogCaptureFixture) -> None:
    old, _, prober, clock = monitor()
    old.handle_event(Event("GPU-1", xid=79))
    old.handle_wait_error(FakeNvmlError("NVML_ERROR_UNKNOWN"))
    old.handle_event(Event("GPU-2", xid=48))
    with caplog.at_level("INFO", logger=LOGGER):
        new = successor(old, prober, clock)
    assert [m for m in messages(caplog) if "reload" in m] == [
        "device GPU-0 stays unhealthy across the reload: NVML event wait failed: "
        "nvmlDeviceGetMemoryInfo: NVML_ERROR_UNKNOWN",
        "device GPU-1 stays unhealthy across the reload: NVML event wait failed: "
        "nvmlDeviceGetMemoryInfo: NVML_ERROR_UNKNOWN",
        "device GPU-2 stays unhealthy across the reload: critical XID 48",
    ]
    assert new.unhealthy == {"GPU-0", "GPU-1", "GPU-2"}


def test_first_reason_survives_a_reload(caplog: pytest.LogCaptureFixture) -> None:
    # One problem only: the reason logged is the one the device was first marked with.
    old, _, prober, clock = monitor()
    old.handle_event(Event("GPU-1", xid=79))
    with caplog.at_level("INFO", logger=LOGGER):
        successor(old, prober, clock)
    assert "device GPU-1 stays unhealthy across the reload: critical XID 79" in messages(caplog)


def test_a_carried_device_takes_new_problems_and_restarts_its_quiet_period(
        caplog: pytest.LogCaptureFixture) -> None:
    old, _, prober, clock = monitor()
    old.handle_event(Event("GPU-1", xid=79))
    new = successor(old, prober, clock)
    clock.now += 20
    with caplog.at_level("DEBUG", logger=LOGGER):
        new.handle_event(Event("GPU-1", xid=48))
    assert "device GPU-1 still unhealthy: critical XID 48" in messages(caplog)
    clock.now += 20  # 40 s after the first XID, 20 s after the second
    new.step()
    assert new.unhealthy == {"GPU-1"}
    clock.now += 10
    new.step()
    assert new.unhealthy == frozenset()

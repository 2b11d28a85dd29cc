"""Health monitor end to end: XIDs injected into the fake NVML beneath pynvml."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from health_support import WAIT_S, Changes, Clock

from deviceplugin.health import HealthMonitor
from gpus.model import Snapshot
from gpus.nvml import Nvml


@dataclass
class Rig:
    fake: Any
    monitor: HealthMonitor
    changes: Changes
    clock: Clock
    uuids: list[str]
    snapshot: Snapshot


@pytest.fixture
def rig(fake_nvml: Callable[..., Any], sysfs_root: Callable[..., str]) -> Iterator[RigFactory]:
    """Factory: fake NVML for a profile, a Snapshot read through it, a started monitor."""
    stack: list[tuple[HealthMonitor, Any]] = []

    def factory(profile: str = "dgx-a100",
                before_start: Callable[[Any], None] | None = None) -> Rig:
        fake = fake_nvml(profile)
        nvml = Nvml()
        nvml.init()
        snapshot = nvml.read_snapshot(sysfs_root(fake))
        changes, clock = Changes(), Clock()
        # recovery_interval 0: the test drives recovery with step() and the injected clock.
        monitor = HealthMonitor(nvml, snapshot, changes, {}, recovery_interval=0,
                                quiet_period=30.0, clock=clock, wait_timeout_ms=50)
        stack.append((monitor, nvml))
        if before_start is not None:
            before_start(fake)
        monitor.start()
        assert monitor.wait_watching(WAIT_S)
        return Rig(fake, monitor, changes, clock, [g.uuid for g in snapshot.gpus], snapshot)

    yield factory
    for monitor, nvml in reversed(stack):
        monitor.stop()
        nvml.shutdown()


RigFactory = Callable[..., Rig]


@pytest.fixture
def dgx(rig: RigFactory) -> Rig:
    return rig("dgx-a100")


@pytest.fixture
def mig(rig: RigFactory) -> Rig:
    return rig("a100-mig-mixed")


def test_critical_xid_marks_the_gpu_and_recovers(dgx: Rig) -> None:
    dgx.fake.inject_xid(3, 13)  # ignored by default
    dgx.fake.inject_xid(3, 79)
    dgx.changes.wait_for({dgx.uuids[3]})
    assert dgx.changes.seen == [frozenset({dgx.uuids[3]})]
    dgx.clock.now += 30
    dgx.monitor.step()
    dgx.changes.wait_for(set())


def test_ecc_event_does_not_act(dgx: Rig) -> None:
    dgx.fake.inject_ecc(1, double_bit=True)
    dgx.fake.inject_xid(2, 48)
    dgx.changes.wait_for({dgx.uuids[2]})
    assert dgx.uuids[1] not in dgx.monitor.unhealthy


def test_lost_gpu_stays_unhealthy_until_restored(dgx: Rig) -> None:
    dgx.fake.lose_gpu(5)
    dgx.changes.wait_for({dgx.uuids[5]})
    dgx.clock.now += 30
    dgx.monitor.step()  # the probe fails: still unhealthy, quiet period restarts
    assert dgx.monitor.unhealthy == {dgx.uuids[5]}
    dgx.fake.restore_gpu(5)
    dgx.clock.now += 30
    dgx.monitor.step()
    dgx.changes.wait_for(set())


def test_event_wait_failure_marks_all_then_recovers(dgx: Rig) -> None:
    dgx.fake.fail_event_wait("NVML_ERROR_UNKNOWN")
    dgx.changes.wait_for(set(dgx.uuids))
    dgx.fake.clear_faults()
    dgx.clock.now += 30
    dgx.monitor.step()
    dgx.changes.wait_for(set())
    dgx.fake.inject_xid(0, 79)  # still watching
    dgx.changes.wait_for({dgx.uuids[0]})


def test_xid_on_mig_device_marks_only_it(mig: Rig) -> None:
    parent = next(g for g in mig.snapshot.gpus if len(g.mig_devices) > 1)
    target = parent.mig_devices[1]
    mig.fake.inject_xid(target.uuid, 79)
    mig.changes.wait_for({target.uuid})


def test_failed_registration_marks_one_gpu_and_others_still_report(rig: RigFactory) -> None:
    def fail_first_registration(fake: Any) -> None:
        fake.fail("nvmlDeviceRegisterEvents", "NVML_ERROR_GPU_IS_LOST", count=1)

    setup = rig("dgx-a100", before_start=fail_first_registration)
    setup.changes.wait_for({setup.uuids[0]})
    setup.fake.inject_xid(6, 79)
    setup.changes.wait_for({setup.uuids[0], setup.uuids[6]})

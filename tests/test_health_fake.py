"""Health monitor end to end: XIDs injected into the fake NVML beneath pynvml."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from health_support import WAIT_S, Changes, Clock, watching_log

from deviceplugin.health import HealthMonitor, nvml_watcher
from gpus.model import Snapshot
from gpus.nvml import Nvml


class ProbeHook:
    """``Nvml.probe`` that runs a test's hook once, right after NVML answered for a UUID:
    something happening "while the probe runs", before the monitor acts on the answer."""

    def __init__(self, nvml: Nvml) -> None:
        self.nvml = nvml
        self.after: dict[str, Callable[[], None]] = {}

    def probe(self, uuid: str) -> None:
        self.nvml.probe(uuid)
        hook = self.after.pop(uuid, None)
        if hook is not None:
            hook()


@dataclass
class Rig:
    fake: Any
    monitor: HealthMonitor
    changes: Changes
    clock: Clock
    uuids: list[str]
    snapshot: Snapshot
    probes: ProbeHook


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
        changes, clock, probes = Changes(), Clock(), ProbeHook(nvml)
        # recovery_interval 0: the test drives recovery with step() and the injected clock.
        monitor = HealthMonitor(probes, snapshot, changes, {}, recovery_interval=0,
                                quiet_period=30.0, clock=clock, wait_timeout_ms=50,
                                watcher_factory=lambda _, uuids: nvml_watcher(nvml, uuids))
        stack.append((monitor, nvml))
        if before_start is not None:
            before_start(fake)
        monitor.start()
        assert monitor.wait_watching(WAIT_S)
        return Rig(fake, monitor, changes, clock, [g.uuid for g in snapshot.gpus], snapshot,
                   probes)

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


def test_xid_while_the_recovery_probe_runs_keeps_the_gpu_unhealthy(dgx: Rig) -> None:
    """The probe answers, then an XID arrives (through the event thread) before the pass acts
    on the answer: the GPU stays Unhealthy and its quiet period restarts from that XID."""
    target = dgx.uuids[4]
    dgx.fake.inject_xid(4, 79)
    dgx.changes.wait_for({target})
    dgx.clock.now += 30
    with watching_log("deviceplugin.health") as log:

        def xid_now() -> None:
            dgx.fake.inject_xid(4, 48)
            assert log.wait_for(f"device {target} still unhealthy: critical XID 48")

        dgx.probes.after[target] = xid_now
        dgx.monitor.step()
    assert target not in dgx.probes.after  # the XID did land inside the pass
    assert dgx.monitor.unhealthy == {target}
    assert dgx.changes.seen == [frozenset({target})]  # never reported Healthy in between
    dgx.clock.now += 29
    dgx.monitor.step()
    assert dgx.monitor.unhealthy == {target}
    dgx.clock.now += 1
    dgx.monitor.step()
    dgx.changes.wait_for(set())


@pytest.mark.parametrize(("profile", "gpu_instance", "compute_instance"), [
    ("dgx-a100", 1, 0),  # MIG disabled
    ("dgx-a100", 7, None),
    ("a100-mig-empty", 1, 0),  # MIG enabled, but no MIG device to blame
    ("a100-mig-partial", 2, None),  # GPU 5 has MIG disabled; GPUs 0-3 do have GI 2
])
def test_xid_with_instance_ids_on_a_gpu_without_mig_devices_marks_the_gpu(
        rig: RigFactory, profile: str, gpu_instance: int, compute_instance: int | None) -> None:
    setup = rig(profile)
    gpu = setup.snapshot.gpus[5]
    assert not gpu.mig_devices
    setup.fake.inject_xid(5, 79, gpu_instance_id=gpu_instance,
                          compute_instance_id=compute_instance)
    setup.changes.wait_for({gpu.uuid})

"""Device health: NVML events -> the set of unhealthy GPU and MIG UUIDs.

As NVIDIA's plugin does: one NVML event set over all GPUs (critical XID, single- and double-bit
ECC); only critical XIDs act; XIDs 13, 31, 43, 45, 68 and 109 (application errors) are ignored by
default, tuned by ``DP_DISABLE_HEALTHCHECKS`` / ``DP_ENABLE_HEALTHCHECKS`` (that policy is
:mod:`deviceplugin.healthpolicy`; its names are re-exported here). Where we improve:

- An XID on a MIG device (GPU/compute instance given) marks only that MIG device; on a whole GPU
  it marks the GPU UUID (the resource map then marks its MIG devices and replicas).
- A GPU whose event registration fails, or that is lost (``NVML_ERROR_GPU_IS_LOST``), is marked
  alone; the other GPUs keep serving. A wait error that cannot be pinned on some GPUs marks them
  all (as NVIDIA does), and the monitor keeps waiting with a backoff.
- Recovery: every ``recovery_interval`` seconds unhealthy devices are probed; a device is Healthy
  again once its probe succeeds and nothing bad (critical XID, failed probe, wait error) happened
  to it for ``quiet_period`` seconds. The same pass probes healthy GPUs so a GPU that fell off
  the bus is noticed even when no event says so. ``recovery_interval`` 0 disables both.

``on_change`` receives the whole new unhealthy set, from the monitor's threads, right after each
change; calls are serialised.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from deviceplugin.healthpolicy import DISABLE_ENV
from deviceplugin.healthpolicy import HealthPolicy as HealthPolicy
from deviceplugin.healthpolicy import health_policy as health_policy
from deviceplugin.healthpolicy import parse_health_env as parse_health_env
from gpus.backoff import Backoff
from gpus.model import Snapshot
from gpus.nvml import Nvml
from gpus.nvmlevents import EventWatcher

if TYPE_CHECKING:  # prometheus_client: imported only with --metrics-address
    from gpus.runtime.metrics import PluginMetrics

LOG = logging.getLogger(__name__)

# NVML event type bits (nvmlEventType*), as gpus.nvml exports them.
EVENT_SINGLE_BIT_ECC = 0x1
EVENT_DOUBLE_BIT_ECC = 0x2
EVENT_XID = 0x8

GPU_IS_LOST = "NVML_ERROR_GPU_IS_LOST"

# One NVML wait blocks this long at most: stop() cannot interrupt a wait in the driver, so this
# bounds how long it takes; a wake-up ten times a second costs nothing measurable.
WAIT_TIMEOUT_MS = 100
BACKOFF_INITIAL_S = 0.1
BACKOFF_MAX_S = 5.0
JOIN_TIMEOUT_S = 1.0


# --- what the monitor needs from the NVML layer ------------------------------------------------


class HealthEvent(Protocol):
    """The fields of ``gpus.nvmlevents.NvmlEvent`` the monitor reads."""

    @property
    def gpu_uuid(self) -> str: ...
    @property
    def event_type(self) -> int: ...
    @property
    def xid(self) -> int: ...
    @property
    def gpu_instance_id(self) -> int | None: ...
    @property
    def compute_instance_id(self) -> int | None: ...


class Watcher(Protocol):
    """The surface of ``gpus.nvmlevents.EventWatcher`` the monitor uses."""

    @property
    def registration_errors(self) -> Mapping[str, Exception]: ...
    def wait(self, timeout_ms: int) -> HealthEvent | None: ...
    def close(self) -> None: ...


class Prober(Protocol):
    """The surface of ``gpus.nvml.Nvml`` the monitor uses."""

    def probe(self, uuid: str) -> None: ...


WatcherFactory = Callable[[Prober, list[str]], Watcher]


def nvml_watcher(nvml: Prober, uuids: list[str]) -> Watcher:
    """The real watcher: ``gpus.nvmlevents.EventWatcher`` over ``uuids``."""
    if not isinstance(nvml, Nvml):
        raise TypeError(f"the NVML event watcher needs a gpus.nvml.Nvml, not {type(nvml)!r}")
    watcher: Watcher = EventWatcher(nvml, uuids)
    return watcher


def _error_name(err: BaseException) -> str:
    """NVML's error name (``NVML_ERROR_...``) when the error carries one."""
    return str(getattr(err, "name", "") or "")


def reason_kind(reason: str) -> str:
    """A bounded metric label for a free-text Unhealthy reason."""
    for prefix, kind in (("critical XID", "xid"), ("GPU lost", "gpu_lost"),
                         ("probe failed", "probe_failed")):
        if reason.startswith(prefix):
            return kind
    return "nvml_events"  # the event set could not be created, registered or waited on


# --- the monitor -------------------------------------------------------------------------------


@dataclass
class _Mark:
    """Why a UUID is unhealthy and when something last went wrong with it."""

    reason: str
    last_bad: float
    rewatch: bool = False  # its event registration failed: rebuild the watcher on recovery
    generation: int = 0  # bumped on every new problem, so a probe pass cannot race an XID


class HealthMonitor:
    """Watches NVML events and probes devices; reports the unhealthy UUID set on each change."""

    def __init__(
        self,
        nvml: Prober,
        snapshot: Snapshot,
        on_change: Callable[[frozenset[str]], None],
        policy: HealthPolicy | Mapping[str, str],
        recovery_interval: float = 5.0,
        quiet_period: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        *,
        watcher_factory: WatcherFactory = nvml_watcher,
        wait_timeout_ms: int = WAIT_TIMEOUT_MS,
        previous: HealthMonitor | None = None,
        metrics: PluginMetrics | None = None,
    ) -> None:
        """Nothing runs until :meth:`start`.

        ``policy`` says which XIDs are critical: a :class:`HealthPolicy` (the plugin builds it
        with :func:`health_policy` from its resolved configuration), or a mapping holding the
        two variables (:func:`parse_health_env`).

        ``previous`` is the monitor this one replaces (config reload): its unhealthy devices
        that still exist in ``snapshot`` start Unhealthy here, with their reasons and quiet
        periods, so a reload never turns a bad device Healthy. Stop ``previous`` first, so
        its set is final. ``watcher_factory`` and ``wait_timeout_ms`` (how long one NVML wait
        blocks, hence the longest :meth:`stop` waits for the event thread) exist for tests.
        """
        self._nvml = nvml
        self._snapshot = snapshot
        self._metrics = metrics
        self._on_change = on_change
        self._recovery_interval = recovery_interval
        self._quiet_period = quiet_period
        self._clock = clock
        self._watcher_factory = watcher_factory
        self._wait_timeout_ms = wait_timeout_ms
        self.policy = policy if isinstance(policy, HealthPolicy) else parse_health_env(policy)
        self._gpu_uuids = [gpu.uuid for gpu in snapshot.gpus]
        self._marks: dict[str, _Mark] = {} if previous is None else previous._carry(snapshot)
        # _lock guards _marks and is never held while calling out; _notify_lock serialises
        # on_change calls, so a listener that takes its own locks and reads .unhealthy from
        # another thread cannot deadlock with us.
        self._lock = threading.Lock()
        self._notify_lock = threading.Lock()
        # The carried-over set is what the listener already shows: only changes are news.
        self._last_notified: frozenset[str] = frozenset(self._marks)
        self._stop = threading.Event()
        self._rewatch = threading.Event()
        self._watching = threading.Event()
        self._threads: list[threading.Thread] = []

    @property
    def recovery_interval(self) -> float:
        """Seconds between probe passes (0: no recovery)."""
        return self._recovery_interval

    @property
    def quiet_period(self) -> float:
        """Seconds without a problem before an answering device is Healthy again."""
        return self._quiet_period

    @property
    def unhealthy(self) -> frozenset[str]:
        """GPU and MIG UUIDs currently unhealthy."""
        with self._lock:
            return frozenset(self._marks)

    def _carry(self, snapshot: Snapshot) -> dict[str, _Mark]:
        """Copies of our marks for the GPU and MIG UUIDs that ``snapshot`` still has."""
        known = {gpu.uuid for gpu in snapshot.gpus}
        known.update(mig.uuid for gpu in snapshot.gpus for mig in gpu.mig_devices)
        with self._lock:
            # Not ``rewatch``: the new monitor's first event set registers every GPU again (a
            # failure marks it again), so a carried flag would only rebuild that watcher once
            # more when the device recovers, with every GPU unwatched meanwhile.
            carried = {uuid: _Mark(mark.reason, mark.last_bad, generation=mark.generation)
                       for uuid, mark in self._marks.items() if uuid in known}
        for uuid, mark in sorted(carried.items()):
            LOG.info("device %s stays unhealthy across the reload: %s", uuid, mark.reason)
        return carried

    def start(self) -> None:
        """Start the event thread and, unless recovery is disabled, the probe thread."""
        for problem in self.policy.problems:
            LOG.warning("health checks: %s", problem)
        if not self.policy.enabled:
            LOG.info("health checks disabled by %s", DISABLE_ENV)
            return
        if not self._gpu_uuids or self._threads:
            return
        self._stop.clear()
        self._threads = [threading.Thread(target=self._event_loop, name="health-events",
                                          daemon=True)]
        if self._recovery_interval > 0:
            self._threads.append(threading.Thread(target=self._probe_loop, name="health-probe",
                                                  daemon=True))
        for thread in self._threads:
            thread.start()

    def wait_watching(self, timeout: float) -> bool:
        """Wait until the NVML event set exists and GPUs are registered; False on timeout.

        Events posted before that are not seen (NVML only queues events for registered sets),
        so tests and the demo wait here before injecting faults.
        """
        return self._watching.wait(timeout)

    def stop(self) -> None:
        """Stop both threads; returns within about one NVML wait (``wait_timeout_ms``)."""
        self._stop.set()
        self._watching.clear()
        for thread in self._threads:
            thread.join(JOIN_TIMEOUT_S)
            if thread.is_alive():
                LOG.warning("health thread %s did not stop within %.1fs", thread.name,
                            JOIN_TIMEOUT_S)
        self._threads = []

    # --- event side ----------------------------------------------------------------------------

    def _event_loop(self) -> None:
        watcher: Watcher | None = None
        backoff = Backoff(initial=BACKOFF_INITIAL_S, cap=BACKOFF_MAX_S)
        try:
            while not self._stop.is_set():
                if watcher is None or self._rewatch.is_set():
                    watcher = self._new_watcher(watcher)
                    if watcher is None:
                        self._stop.wait(backoff.next_delay())
                        continue
                try:
                    event = watcher.wait(self._wait_timeout_ms)
                except Exception as err:  # any wait failure is reported, not fatal
                    self.handle_wait_error(err)
                    self._stop.wait(backoff.next_delay())
                    continue
                backoff.reset()
                if event is not None:
                    self.handle_event(event)
        finally:
            if watcher is not None:
                _close_quietly(watcher)

    def _new_watcher(self, old: Watcher | None) -> Watcher | None:
        """(Re)create the event set; mark GPUs whose registration failed."""
        self._rewatch.clear()
        if old is not None:
            _close_quietly(old)
        try:
            watcher = self._watcher_factory(self._nvml, list(self._gpu_uuids))
        except Exception as err:
            self._mark(self._gpu_uuids, f"cannot create NVML event set: {err}")
            return None
        for uuid, problem in watcher.registration_errors.items():
            self._mark([uuid], f"NVML event registration failed: {problem}", rewatch=True)
        self._watching.set()
        return watcher

    def handle_event(self, event: HealthEvent) -> None:
        """Act on one NVML event (called by the event thread; public for tests)."""
        if not event.event_type & EVENT_XID:
            LOG.debug("ignoring non-XID health event type %#x on %s", event.event_type,
                      event.gpu_uuid)
            return
        if not self.policy.is_critical(event.xid):
            LOG.info("ignoring XID %d on %s (not critical by policy)", event.xid, event.gpu_uuid)
            return
        targets = self._xid_targets(event)
        if targets:
            self._mark(targets, f"critical XID {event.xid}")

    def _xid_targets(self, event: HealthEvent) -> list[str]:
        """The UUIDs an XID event applies to."""
        gpu = self._snapshot.gpu_by_uuid(event.gpu_uuid)
        if gpu is None:
            LOG.warning("XID %d on unknown GPU %s ignored", event.xid, event.gpu_uuid)
            return []
        gi, ci = event.gpu_instance_id, event.compute_instance_id
        if gi is None or not gpu.mig_devices:
            return [gpu.uuid]
        matches = [mig.uuid for mig in gpu.mig_devices
                   if mig.gpu_instance_id == gi and (ci is None or mig.compute_instance_id == ci)]
        if not matches:
            # Probably an instance created after our snapshot: not one we advertise.
            LOG.warning("XID %d on %s GI %s CI %s matches no known MIG device; ignored",
                        event.xid, gpu.uuid, gi, ci)
        return matches

    def handle_wait_error(self, err: BaseException) -> None:
        """An event wait failed: pin it on lost GPUs when possible, else mark every GPU."""
        if _error_name(err) == GPU_IS_LOST:
            lost = [uuid for uuid in self._gpu_uuids if self._probe(uuid) is not None]
            if lost:
                self._mark(lost, f"GPU lost ({err})")
                return
        LOG.error("waiting for NVML events failed: %s; marking all GPUs unhealthy", err)
        if self._metrics is not None:
            self._metrics.nvml_errors.labels(
                "nvmlEventSetWait", _error_name(err) or type(err).__name__).inc()
        self._mark(self._gpu_uuids, f"NVML event wait failed: {err}")

    # --- probe side ----------------------------------------------------------------------------

    def _probe_loop(self) -> None:
        while not self._stop.wait(self._recovery_interval):
            try:
                self.step()
            except Exception:  # keep probing whatever one pass hit
                LOG.exception("health probe pass failed")

    def step(self) -> None:
        """One probe pass: recover quiet, answering devices; mark lost GPUs. Public for tests."""
        now = self._clock()
        with self._lock:
            candidates = {uuid: (mark.last_bad, mark.generation)
                          for uuid, mark in self._marks.items()}
        recovered: dict[str, int] = {}
        for uuid, (last_bad, generation) in candidates.items():
            if now - last_bad < self._quiet_period:
                continue
            err = self._probe(uuid)
            if err is None:
                recovered[uuid] = generation
            else:
                self._mark([uuid], f"probe failed: {err}")
        self._recover(recovered, now)
        for uuid in self._gpu_uuids:
            if uuid in candidates:
                continue
            err = self._probe(uuid)
            if err is not None and _error_name(err) == GPU_IS_LOST:
                self._mark([uuid], f"GPU lost ({err})")

    def _probe(self, uuid: str) -> Exception | None:
        try:
            self._nvml.probe(uuid)
        except Exception as err:  # any failure means "does not answer"
            if self._metrics is not None:
                self._metrics.nvml_errors.labels(
                    "probe", _error_name(err) or type(err).__name__).inc()
            return err
        return None

    # --- state -----------------------------------------------------------------------------------

    def _mark(self, uuids: Iterable[str], reason: str, *, rewatch: bool = False) -> None:
        """Mark UUIDs unhealthy (restarting their quiet period); notify if the set grew."""
        now = self._clock()
        with self._lock:
            added = []
            for uuid in uuids:
                mark = self._marks.get(uuid)
                if mark is None:
                    self._marks[uuid] = _Mark(reason, now, rewatch)
                    added.append(uuid)
                    LOG.warning("device %s unhealthy: %s", uuid, reason)
                else:
                    mark.last_bad = now
                    mark.generation += 1
                    mark.reason = reason
                    mark.rewatch = mark.rewatch or rewatch
                    LOG.debug("device %s still unhealthy: %s", uuid, reason)
        if added:
            self._count("Unhealthy", reason_kind(reason), len(added))
            self._notify()

    def _recover(self, generations: Mapping[str, int], now: float) -> None:
        """Return UUIDs to Healthy unless something new went wrong since they were probed."""
        with self._lock:
            removed = []
            for uuid, generation in generations.items():
                mark = self._marks.get(uuid)
                if mark is None or mark.generation != generation:
                    continue
                del self._marks[uuid]
                removed.append(uuid)
                if mark.rewatch:
                    self._rewatch.set()
                LOG.info("device %s healthy again: probe answered and no critical event for "
                         "%.0fs (was: %s)", uuid, now - mark.last_bad, mark.reason)
        if removed:
            self._count("Healthy", "recovered", len(removed))
            self._notify()

    def _count(self, state: str, reason: str, devices: int) -> None:
        if self._metrics is None:
            return
        self._metrics.health_transitions.labels(state, reason).inc(devices)
        with self._lock:
            self._metrics.unhealthy_devices.set(len(self._marks))

    def _notify(self) -> None:
        """Call on_change with the whole current set, unless it was the last one reported.

        Reading the set inside the notify lock means the last call always carries the latest
        state, even when two threads change it at once.
        """
        with self._notify_lock:
            with self._lock:
                current = frozenset(self._marks)
            if current == self._last_notified:
                return
            if self._stop.is_set():
                # Stopped (e.g. replaced on reload): a late report would overwrite the
                # successor's view with stale state.
                LOG.debug("health monitor stopped; not reporting %s", sorted(current))
                return
            self._last_notified = current
            self._call_listener(current)

    def _call_listener(self, current: frozenset[str]) -> None:
        try:
            self._on_change(current)
        except Exception:  # a failing listener must not kill the monitor
            LOG.exception("health on_change callback failed")


def _close_quietly(watcher: Watcher) -> None:
    try:
        watcher.close()
    except Exception as err:
        LOG.debug("closing NVML event watcher failed: %s", err)

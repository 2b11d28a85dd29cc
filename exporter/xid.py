"""XID errors: one NVML event listener, the last XID per device and a sliding-window count.

``DCGM_FI_DEV_XID_ERRORS`` keeps dcgm-exporter's meaning: the last XID seen on the device, with
``err_code``/``err_msg``; absent before the first. ``DCGM_EXP_XID_ERRORS_COUNT`` counts XIDs
per value within the last ``--xid-count-window-size`` ms and, unlike dcgm-exporter's gauge that
never goes down, drops events as they leave the window, so an alert clears after recovery.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping

from exporter.attribution import DeviceKey
from gpus.nvml import EVENT_XID, Nvml, NvmlError
from gpus.nvmlevents import EventWatcher
from gpus.records import record

log = logging.getLogger(__name__)

DEFAULT_WINDOW_MS = 300_000
# One NVML event wait blocks this long at most, and so bounds how long stop() takes (a wait in
# the driver cannot be interrupted); the plugin's health monitor waits as long, for the same
# reason, and a wake-up ten times a second costs nothing measurable.
POLL_MS = 100
# NVIDIA's XID catalogue, as dcgm-exporter's table words the common ones.
XID_MESSAGES: Mapping[int, str] = {
    8: "GPU stopped processing",
    13: "Graphics Engine Exception",
    31: "GPU memory page fault",
    32: "Invalid or corrupted push buffer stream",
    43: "GPU stopped processing",
    45: "Preemptive cleanup, due to previous errors -- Most likely to see when running "
        "multiple cuda applications and hitting a DBE",
    48: "Double Bit ECC Error",
    61: "Internal micro-controller breakpoint/warning (newer drivers)",
    62: "Internal micro-controller halt (newer drivers)",
    63: "ECC page retirement or row remapping recording event",
    64: "ECC page retirement or row remapper recording failure",
    68: "NVDEC0 Exception",
    69: "Graphics Engine class error",
    74: "NVLINK Error",
    79: "GPU has fallen off the bus",
    92: "High single-bit ECC error rate",
    94: "Contained ECC error",
    95: "Uncontained ECC error",
    119: "GSP RPC Timeout",
    120: "GSP Error",
}


def xid_message(xid: int) -> str:
    """The catalogue text of an XID ("Unknown Error" for others, as dcgm-exporter)."""
    return XID_MESSAGES.get(xid, "Unknown Error")


@record
class XidView:
    """What a scrape reads: last XID and windowed counts per device."""

    last: Mapping[DeviceKey, int]
    counts: Mapping[DeviceKey, Mapping[int, int]]
    window_ms: int


class XidTracker:
    """Thread-safe record of XID events (the listener writes, scrapes read)."""

    def __init__(self, window_ms: int = DEFAULT_WINDOW_MS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if window_ms <= 0:
            raise ValueError(f"the XID count window must be > 0 ms, got {window_ms}")
        self.window_ms = window_ms
        self._clock = clock
        self._lock = threading.Lock()
        self._recorded = threading.Condition(self._lock)
        self._last: dict[DeviceKey, int] = {}
        self._events: dict[DeviceKey, deque[tuple[float, int]]] = {}

    def record(self, key: DeviceKey, xid: int) -> None:
        """An XID on a GPU (or one of its GPU instances)."""
        with self._lock:
            self._last[key] = xid
            self._events.setdefault(key, deque()).append((self._clock(), xid))
            self._recorded.notify_all()

    def wait_for_xid(self, key: DeviceKey, timeout: float) -> int | None:
        """Wait until ``key`` has an XID; returns it (None on timeout)."""
        with self._recorded:
            self._recorded.wait_for(lambda: key in self._last, timeout)
            return self._last.get(key)

    def view(self) -> XidView:
        """Last XIDs and the counts within the window now (old events are dropped)."""
        horizon = self._clock() - self.window_ms / 1000.0
        with self._lock:
            counts: dict[DeviceKey, dict[int, int]] = {}
            for key, events in self._events.items():
                while events and events[0][0] < horizon:
                    events.popleft()
                for _, xid in events:
                    per = counts.setdefault(key, {})
                    per[xid] = per.get(xid, 0) + 1
            return XidView(dict(self._last), counts, self.window_ms)


class XidListener:
    """The one NVML event listener: XIDs of ``uuids`` into a tracker, on a daemon thread."""

    def __init__(self, nvml: Nvml, uuids: Iterable[str], tracker: XidTracker,
                 poll_ms: int = POLL_MS) -> None:
        self._watcher = EventWatcher(nvml, uuids, EVENT_XID)
        self.tracker = tracker
        self._poll_ms = poll_ms
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.errors = 0

    def start(self) -> None:
        """Listen on a daemon thread."""
        self._thread = threading.Thread(target=self._run, name="xid-listener", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                event = self._watcher.wait(self._poll_ms)
            except NvmlError as exc:
                self.errors += 1
                log.warning("XID listener: %s", exc)
                self._stop.wait(1.0)
                continue
            if event is not None and event.event_type == EVENT_XID:
                self.tracker.record(DeviceKey(event.gpu_uuid), event.xid)
                if event.gpu_instance_id is not None:
                    self.tracker.record(DeviceKey(event.gpu_uuid, event.gpu_instance_id),
                                        event.xid)

    def stop(self) -> None:
        """Stop listening and free the event set."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(self._poll_ms / 1000.0 + 2.0)
        self._watcher.close()

"""The prometheus_client collector: one cached reading shared by every scrape.

A :class:`Sampler` thread reads NVML every ``-c`` interval into :class:`Reading` (immutable);
:class:`ExporterCollector.collect` only turns the latest reading, the latest pod mapping and the
XID view into families, so a scrape never waits on NVML or the kubelet, and concurrent scrapes
share one reading. The exporter's own metrics (NVML errors by call and error name, PodResources
refresh failures, mapping age, sample and scrape durations) come from the same collector.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import field
from types import MappingProxyType

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector as PromCollector

from exporter.attribution import Attribution, AttributionRefresher
from exporter.fields import Collector, ValueFormat
from exporter.pods import PidMapper, PodOwner
from exporter.series import Family, Inputs, SeriesOptions, build_families
from exporter.xid import XidTracker, XidView
from gpus.model import Snapshot
from gpus.records import record
from gpus.telemetry import Sample, TelemetryReader

log = logging.getLogger(__name__)

_NO_OWNERS: Mapping[int, PodOwner] = MappingProxyType({})


@record
class Reading:
    """One sample and the process owners found with it."""

    sample: Sample
    owners: Mapping[int, PodOwner] = field(default_factory=lambda: _NO_OWNERS)


class Sampler:
    """Reads a Sample every ``interval_s`` on its own thread; :meth:`latest` never blocks."""

    def __init__(self, snapshot: Snapshot, reader: TelemetryReader, interval_s: float,
                 pids: PidMapper | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.snapshot = snapshot
        self._reader = reader
        self.interval_s = interval_s
        self._pids = pids
        self._clock = clock
        self._latest: Reading | None = None
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.failures = 0
        # Called on the sampling thread with each new reading (the collector builds its
        # families there, so the first scrape after a sample does not).
        self.listeners: list[Callable[[Reading], None]] = []

    def latest(self) -> Reading | None:
        """The latest reading (None before the first)."""
        return self._latest

    def sample_now(self) -> Reading:
        """Read on this thread (the sampler thread, or a test)."""
        sample = self._reader.read(self.snapshot)
        owners: Mapping[int, PodOwner] = field(default_factory=lambda: _NO_OWNERS)
        if self._pids is not None:
            pids = {p.pid for d in sample.devices for p in d.processes or ()}
            owners = MappingProxyType(self._pids.owners(pids)) if pids else _NO_OWNERS
        reading = Reading(sample, owners)
        with self._changed:
            self._latest = reading
            self._changed.notify_all()
        for listener in self.listeners:
            try:
                listener(reading)
            except Exception:  # a rendering bug must not stop sampling
                log.exception("after a sample: %r failed", listener)
        return reading

    def wait_for(self, predicate: Callable[[Reading], bool], timeout: float) -> Reading | None:
        """Wait until a reading satisfies ``predicate``; None on timeout."""
        with self._changed:
            ok = self._changed.wait_for(
                lambda: self._latest is not None and predicate(self._latest), timeout)
            return self._latest if ok else None

    def fresh(self, now: float | None = None) -> bool:
        """The last sample is at most three intervals old (what /health reports)."""
        latest = self._latest
        if latest is None:
            return False
        now = self._clock() if now is None else now
        return now - latest.sample.taken_at <= 3 * self.interval_s + latest.sample.duration_s

    def start(self) -> None:
        """Sample now and then every interval on a daemon thread."""
        self._thread = threading.Thread(target=self._run, name="nvml-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        # A reading taken before start() (the exporter samples once before serving) counts
        # as this interval's: sampling again at once would race a caller's own sample_now.
        if self._latest is not None:
            self._stop.wait(self.interval_s)
        while not self._stop.is_set():
            try:
                self.sample_now()
            except Exception:  # a bug must not end sampling for the daemon's life
                self.failures += 1
                log.exception("sampling NVML failed")
            self._stop.wait(self.interval_s)

    def stop(self) -> None:
        """Stop the thread."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(self.interval_s + 5.0)


class ExporterCollector(PromCollector):
    """GPU families from the shared reading, then the exporter's own metrics."""

    def __init__(self, sampler: Sampler, collectors: Iterable[Collector],
                 options: SeriesOptions, refresher: AttributionRefresher | None = None,
                 xids: XidTracker | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.sampler = sampler
        self.collectors = tuple(collectors)
        self._collectors_version = 0
        self.options = options
        self.refresher = refresher
        self.xids = xids
        self._clock = clock
        self.formats: dict[str, ValueFormat] = {c.name: c.field.value for c in self.collectors}
        self._scrape_lock = threading.Lock()
        self._cached: tuple[tuple[Reading, int | None, XidView | None, int],
                            list[Family]] | None = None
        self._scrapes = 0
        self._scrape_seconds = 0.0
        sampler.listeners.append(self._prepare)

    def set_collectors(self, collectors: Iterable[Collector]) -> None:
        """Serve ``collectors`` from the next scrape on (a reloaded collectors file).

        ``formats`` only grows: a field's value format is the field's own, so a name keeps
        its format in every set, and a scrape rendering the old set still finds its names.
        """
        rows = tuple(collectors)
        self.formats.update({c.name: c.field.value for c in rows})
        self.collectors = rows
        self._collectors_version += 1  # cached families of the old set are not reused

    def _prepare(self, reading: Reading) -> None:
        """Build the new reading's families on the sampling thread."""
        self.families()

    def families(self) -> list[Family]:
        """The GPU families for the current reading (empty before the first sample)."""
        reading = self.sampler.latest()
        if reading is None:
            return []
        current = None if self.refresher is None else self.refresher.current()
        attribution = Attribution() if current is None else current.attribution
        xids = None if self.xids is None else self.xids.view()
        # Scrapes between two samples (and mapping or XID changes) render the same families:
        # built once, shared.
        key = (reading, None if current is None else current.generation, xids,
               self._collectors_version)
        collectors = self.collectors
        cached = self._cached
        if cached is not None and cached[0][0] is reading and cached[0][1:] == key[1:]:
            return cached[1]
        inputs = Inputs(self.sampler.snapshot, reading.sample, attribution, reading.owners, xids)
        families = build_families(inputs, collectors, self.options)
        self._cached = (key, families)
        return families

    def collect(self) -> Iterator[Metric]:
        """prometheus_client's entry point."""
        start = self._clock()
        for family in self.families():
            metric = Metric(family.name, family.help, family.type)
            for series in family.series:
                metric.add_sample(family.name, dict(series.labels), series.value)
            yield metric
        yield from self._own_metrics()
        with self._scrape_lock:
            self._scrapes += 1
            self._scrape_seconds += self._clock() - start

    def _own_metrics(self) -> Iterator[Metric]:
        reading = self.sampler.latest()
        errors = CounterMetricFamily(
            "gpu_exporter_nvml_errors", "NVML calls that failed, by call and NVML error.",
            labels=["call", "error"])
        if reading is not None:
            for (call, name), count in sorted(reading.sample.errors.items()):
                errors.add_metric([call, name], count)
            yield GaugeMetricFamily("gpu_exporter_sample_duration_seconds",
                                    "How long the last NVML sample took.",
                                    value=reading.sample.duration_s)
            yield GaugeMetricFamily("gpu_exporter_sample_age_seconds",
                                    "Seconds since the served NVML sample was taken.",
                                    value=max(0.0, self._clock() - reading.sample.taken_at))
            lost = GaugeMetricFamily("gpu_exporter_gpu_lost",
                                     "1 for a GPU that answered NVML_ERROR_GPU_IS_LOST.",
                                     labels=["UUID"])
            for uuid in reading.sample.lost:
                lost.add_metric([uuid], 1)
            yield lost
        yield errors
        with self._scrape_lock:
            scrapes, seconds = self._scrapes, self._scrape_seconds
        yield CounterMetricFamily("gpu_exporter_scrape_duration_seconds",
                                  "Server time spent rendering /metrics.", value=seconds)
        yield CounterMetricFamily("gpu_exporter_scrapes", "Scrapes served.", value=scrapes)
        if self.refresher is not None:
            yield from self._attribution_metrics(self.refresher)

    def _attribution_metrics(self, refresher: AttributionRefresher) -> Iterator[Metric]:
        counters = refresher.counters()
        failures = CounterMetricFamily(
            "gpu_exporter_podresources_failures",
            "PodResources refreshes that failed, by kind.", labels=["kind"])
        for kind, count in sorted(counters.failures_by_kind.items()):
            failures.add_metric([kind], count)
        yield failures
        current = refresher.current()
        age = current.age(self._clock())
        if age is not None:
            yield GaugeMetricFamily("gpu_exporter_pod_mapping_age_seconds",
                                    "Seconds since the kubelet gave the pod mapping served.",
                                    value=age)
        yield GaugeMetricFamily("gpu_exporter_pod_mapping_stale",
                                "1 while a failing kubelet's last good mapping is served.",
                                value=int(current.stale))

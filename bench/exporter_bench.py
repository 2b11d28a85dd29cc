"""gpu-metrics-exporter cost: one scrape of an 8-GPU node with 56 MIG instances, pods on all.

Set-up: the device plugin and the mock kubelet (PodResources) in this process on the fake
``a100-mig-1g`` (8 A100s, 7 x 1g.10gb each), MIG strategy mixed, one pod allocated on every MIG
device (56 pods); the exporter as its own process (``python -m exporter.main --nvml
fake:a100-mig-1g -k``, the default collectors, ``-c 1000``), so its RSS and CPU are its own.

- Scrape latency: ``GET /metrics`` over loopback, sequential, N scrapes: p50/p99 ms, beside an
  empty ``prometheus_client`` registry served by ``prometheus_client.start_http_server`` in its
  own process, scraped the same way in the same run. Server time also from the exporter's own
  ``gpu_exporter_scrape_duration_seconds`` (collect only, without HTTP and text writing).
- CPU per scrape: the exporter process's utime+stime over the N scrapes, less its idle rate
  (sampling every second) over as long a quiet period, divided by N.
- Series per GPU (all series with that ``gpu`` label, MIG instances included) and labels per
  series (the most on any series; Prometheus/Mimir's common limit is 30).
- RSS (``VmRSS``) after a soak of ``--minutes`` with one scrape a second: first, last, max.

Targets printed beside: p99 <= 10 ms; RSS <= 60 MiB and flat.
Run: ``python bench/exporter_bench.py [--scrapes N] [--minutes M]``.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from benchutil import rss_mib, short_dir  # noqa: E402
from test_plugin_mig_e2e import mig_config  # noqa: E402
from test_podresources import pod_resources_env  # noqa: E402

PROFILE = "a100-mig-1g"
TARGET_P99_MS = 10.0
TARGET_RSS_MIB = 60.0
TIMEOUT_S = 30.0
_LABELS = re.compile(r'(\w+)="')


@dataclass(frozen=True)
class Stats:
    """Latency percentiles in milliseconds."""

    p50: float
    p99: float

    def __str__(self) -> str:
        return f"p50 {self.p50:6.2f} ms  p99 {self.p99:6.2f} ms"


def stats(samples_s: list[float]) -> Stats:
    """p50/p99 of samples in seconds, as ms."""
    ordered = sorted(samples_s)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return Stats(statistics.median(ordered) * 1000, p99 * 1000)


def free_port() -> int:
    """A loopback port free now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def get(port: int) -> bytes:
    """One scrape."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=TIMEOUT_S) as resp:
        body: bytes = resp.read()
        return body


def wait_serving(port: int, proc: subprocess.Popen[bytes]) -> None:
    """Poll until ``port`` answers /metrics (the process is starting)."""
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode}")
        try:
            get(port)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def timed_scrapes(port: int, count: int) -> list[float]:
    """Seconds per scrape, ``count`` sequential scrapes."""
    out = []
    for _ in range(count):
        start = time.perf_counter()
        get(port)
        out.append(time.perf_counter() - start)
    return out


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def process(args: list[str]) -> Iterator[subprocess.Popen[bytes]]:
    """A child process, terminated afterwards."""
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def shape(body: str) -> tuple[int, float, int, int]:
    """(GPU series, series per GPU, most labels on a series, pod-labelled series)."""
    per_gpu: dict[str, int] = {}
    most = pods = 0
    for line in body.splitlines():
        if not line.startswith("DCGM_"):
            continue
        labels = _LABELS.findall(line.split("{", 1)[1]) if "{" in line else []
        most = max(most, len(labels))
        pods += "pod" in labels
        gpu = re.search(r'gpu="(\d+)"', line)
        if gpu:
            per_gpu[gpu.group(1)] = per_gpu.get(gpu.group(1), 0) + 1
    total = sum(per_gpu.values())
    return total, total / max(1, len(per_gpu)), most, pods


def own_scrape_seconds(body: str) -> tuple[float, float]:
    """The exporter's own (scrapes, seconds) counters."""
    values = {}
    for line in body.splitlines():
        for name in ("gpu_exporter_scrapes_total", "gpu_exporter_scrape_duration_seconds_total"):
            if line.startswith(name + " "):
                values[name] = float(line.split()[1])
    return (values["gpu_exporter_scrapes_total"],
            values["gpu_exporter_scrape_duration_seconds_total"])


def bench(scrapes: int, minutes: float) -> None:
    """Run everything and print the figures."""
    with short_dir("expb") as directory, pod_resources_env(
            mig_config(directory, PROFILE, "mixed"), directory) as (env, socket_path):
        resources = [r for r in env.kubelet.resources() if r.startswith("nvidia.com/mig-")]
        pods = 0
        for resource in resources:
            for _ in env.kubelet.devices(resource):
                env.kubelet.allocate(resource, 1, pod=f"pod-{pods}", namespace="bench")
                pods += 1
        snapshot = env.plugin.snapshot
        assert snapshot is not None, "the plugin has no snapshot"
        print(f"profile {PROFILE}: {len(snapshot.gpus)} GPUs, {pods} pods on "
              f"{pods} MIG devices ({', '.join(resources)})")
        port, empty_port = free_port(), free_port()
        exporter_args = [sys.executable, "-m", "exporter.main", "--nvml", f"fake:{PROFILE}",
                         "-k", "--pod-resources-kubelet-socket", socket_path,
                         "-a", f"127.0.0.1:{port}", "-c", "1000", "--log-level", "warning"]
        empty_args = [sys.executable, "-c",
                      "import sys, threading; from prometheus_client import CollectorRegistry, "
                      "start_http_server; start_http_server(int(sys.argv[1]), addr='127.0.0.1', "
                      "registry=CollectorRegistry()); threading.Event().wait()", str(empty_port)]
        with process(exporter_args) as proc, process(empty_args) as empty:
            wait_serving(port, proc)
            wait_serving(empty_port, empty)
            deadline = time.monotonic() + TIMEOUT_S
            while b'pod="' not in get(port):  # the first PodResources answer is in
                if time.monotonic() > deadline:
                    raise RuntimeError("no pod labels")
                time.sleep(0.1)
            for _ in range(20):  # warm both
                get(port), get(empty_port)
            before_own = own_scrape_seconds(get(port).decode())
            cpu0, wall0 = cpu_seconds(proc.pid), time.monotonic()
            ours = timed_scrapes(port, scrapes)
            cpu1, wall1 = cpu_seconds(proc.pid), time.monotonic()
            after_own = own_scrape_seconds(get(port).decode())
            time.sleep(wall1 - wall0)  # the idle rate over as long a quiet period
            idle = cpu_seconds(proc.pid) - cpu1
            empty_lat = timed_scrapes(empty_port, scrapes)
            body = get(port).decode()
            total, per_gpu, most, labelled = shape(body)
            own_ms = ((after_own[1] - before_own[1])
                      / max(1.0, after_own[0] - before_own[0]) * 1000)
            cpu_ms = max(0.0, (cpu1 - cpu0) - idle) / scrapes * 1000
            print(f"scrape, exporter ({len(body)} bytes):  {stats(ours)}  "
                  f"(target p99 <= {TARGET_P99_MS:g} ms)")
            print(f"scrape, empty prometheus_client registry: {stats(empty_lat)}")
            print(f"exporter's own collect time (gpu_exporter_scrape_duration_seconds): "
                  f"mean {own_ms:.2f} ms")
            print(f"CPU per scrape: {cpu_ms:.2f} ms (process {1000 * (cpu1 - cpu0) / scrapes:.2f}"
                  f" ms/scrape less idle sampling {1000 * idle / scrapes:.2f})")
            print(f"GPU series: {total}, per GPU {per_gpu:.1f}; most labels on a series: "
                  f"{most} (limit 30); series with pod labels: {labelled}")
            rss: list[float] = [rss_mib(proc.pid)]
            end = time.monotonic() + minutes * 60
            next_report = time.monotonic() + 60
            while time.monotonic() < end:
                tick = time.monotonic()
                get(port)
                if tick >= next_report:
                    rss.append(rss_mib(proc.pid))
                    next_report += 60
                time.sleep(max(0.0, 1.0 - (time.monotonic() - tick)))
            rss.append(rss_mib(proc.pid))
            print(f"RSS over a {minutes:g}-minute soak, one scrape a second: first "
                  f"{rss[0]:.1f} MiB, last {rss[-1]:.1f} MiB, max {max(rss):.1f} MiB "
                  f"(target <= {TARGET_RSS_MIB:g} MiB, flat); per minute: "
                  f"{' '.join(f'{r:.1f}' for r in rss)}")


def main() -> int:
    """Parse the options and run."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scrapes", type=int, default=300, help="timed scrapes (default 300)")
    parser.add_argument("--minutes", type=float, default=1.0,
                        help="soak length in minutes, one scrape a second (default 1)")
    args = parser.parse_args()
    bench(args.scrapes, args.minutes)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""GPU feature discovery cost: one labelling pass, a oneshot process, the Node-patch round trip.

- ``node_labels`` alone, and NVML read (init, snapshot, shutdown, as each GFD pass does) plus
  ``node_labels``, on the fake ``a100-mig-1g`` (8 GPUs, 56 MIG devices), strategies single and
  mixed: p50/p99 in ms.
- ``python -m gfd --oneshot`` in file mode as a subprocess: process start to exit (the file is
  written before exit), median ms, and the children's max RSS (``getrusage(RUSAGE_CHILDREN)``).
- Node-patch mode's extra cost per pass against the local API server stub (tests/apiserver.py):
  GET + PATCH when labels changed, GET only when nothing changed, p50/p99 ms.
- GFD as deployed (daemonset/base): loop mode, Node-label output through the kubernetes client,
  against the stub; ``VmRSS`` and ``VmHWM`` from ``/proc/<pid>/status`` after some passes. This
  is the basis of the GFD container's memory request and limit.

Targets printed beside: pass <= 50 ms; oneshot <= 300 ms; oneshot RSS <= 60 MiB; loop RSS
below the DaemonSet's memory request (LOOP_REQUEST_MIB).
Run: ``python bench/gfd_bench.py [--passes N] [--starts N]`` (a few seconds).
"""

from __future__ import annotations

import argparse
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
# The API-server stub is imported as the tests import it (tests/ on the path, no package), so
# mypy sees one module, `apiserver`, when it checks the bench and the tests together.
sys.path.insert(0, str(REPO / "tests"))

from apiserver import FakeApiServer  # noqa: E402

from gfd.labels import node_labels  # noqa: E402
from gfd.nodepatch import KubeNodeApi, NodePublisher  # noqa: E402
from gpus.config import Config, Flags, MigStrategy  # noqa: E402
from gpus.fake import install, load_profile, write_sysfs  # noqa: E402
from gpus.nvml import Nvml  # noqa: E402

PROFILE = "a100-mig-1g"
TARGET_PASS_MS = 50.0
TARGET_ONESHOT_MS = 300.0
TARGET_RSS_MIB = 60.0
LOOP_REQUEST_MIB = 96.0  # daemonset/base: the GFD container's memory request
LOOP_PASSES = 10


@dataclass(frozen=True)
class Stats:
    """Latency percentiles in milliseconds."""

    p50: float
    p99: float

    def __str__(self) -> str:
        return f"p50 {self.p50:7.2f} ms  p99 {self.p99:7.2f} ms"


def measure(fn: Callable[[], object], runs: int) -> Stats:
    """Run ``fn`` ``runs`` times (after one warm-up) and return its percentiles."""
    fn()
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1000)
    samples.sort()
    return Stats(statistics.median(samples), samples[min(len(samples) - 1,
                                                         int(len(samples) * 0.99))])


def verdict(value: float, target: float) -> str:
    """``ok`` or ``OVER`` against a target."""
    return "ok" if value <= target else "OVER"


def bench_pass(passes: int, sysfs: str) -> None:
    """node_labels alone, and read_snapshot + node_labels."""
    fake = install(PROFILE)
    try:
        with Nvml() as nvml:
            snapshot = nvml.read_snapshot(sysfs)
        devices = sum(len(g.mig_devices) for g in snapshot.gpus)
        print(f"profile {PROFILE}: {len(snapshot.gpus)} GPUs, {devices} MIG devices")
        for strategy in (MigStrategy.SINGLE, MigStrategy.MIXED):
            config = Config(flags=Flags(mig_strategy=strategy))

            def labels_only_pass(c: Config = config) -> None:
                node_labels(snapshot, c, timestamp=1)

            labels_only = measure(labels_only_pass, passes)

            def full_pass(c: Config = config) -> None:
                nvml = Nvml()
                nvml.init()
                try:
                    snap = nvml.read_snapshot(sysfs)
                finally:
                    nvml.shutdown()
                node_labels(snap, c, timestamp=1)

            with_read = measure(full_pass, passes)
            print(f"  node_labels ({strategy:6}):              {labels_only}")
            print(f"  read_snapshot+node_labels ({strategy:6}): {with_read}   "
                  f"target p99 <= {TARGET_PASS_MS:.0f} ms: "
                  f"{verdict(with_read.p99, TARGET_PASS_MS)}")
    finally:
        fake.uninstall()


def bench_oneshot(starts: int, sysfs: str, workdir: str) -> None:
    """A oneshot file-mode run as a subprocess: start to exit, and max RSS."""
    out = os.path.join(workdir, "features.d", "gfd")
    argv = [sys.executable, "-m", "gfd", "--oneshot", "--nvml", f"fake:{PROFILE}",
            "--sysfs-root", sysfs, "--mig-strategy", "mixed", "-o", out,
            "--machine-type-file", os.path.join(workdir, "none"),
            "--health-file", os.path.join(workdir, "health")]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    samples = []
    for _ in range(starts):
        if os.path.exists(out):
            os.unlink(out)
        start = time.perf_counter()
        subprocess.run(argv, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        samples.append((time.perf_counter() - start) * 1000)
        assert os.path.exists(out), "oneshot did not write the features file"
    median = statistics.median(samples)
    rss_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    bare = measure(lambda: subprocess.run([sys.executable, "-c", "pass"], check=True), 3)
    print(f"oneshot (file mode, {starts} runs): median {median:7.1f} ms   "
          f"target <= {TARGET_ONESHOT_MS:.0f} ms: {verdict(median, TARGET_ONESHOT_MS)}"
          f"   (bare interpreter start: {bare.p50:.1f} ms)")
    print(f"oneshot max RSS: {rss_mib:.1f} MiB   target <= {TARGET_RSS_MIB:.0f} MiB: "
          f"{verdict(rss_mib, TARGET_RSS_MIB)}")


def bench_node_patch(passes: int, workdir: str, labels: dict[str, str]) -> None:
    """GET+PATCH (labels changed) and GET only (unchanged) against the local stub."""
    with FakeApiServer() as server:
        server.add_node("bench-node", labels={"kubernetes.io/hostname": "bench-node"})
        api = KubeNodeApi.from_environment(server.kubeconfig(os.path.join(workdir, "kc")))
        publisher = NodePublisher(api, "bench-node")
        tick = iter(range(10**9))

        def changed() -> None:
            publisher.publish({**labels, "nvidia.com/gfd.timestamp": str(next(tick))})

        changed_stats = measure(changed, passes)
        unchanged_stats = measure(lambda: publisher.publish(labels), passes)
        assert publisher.converged
    print(f"node patch, labels changed (GET+PATCH, {len(labels)} labels): {changed_stats}")
    print(f"node patch, nothing changed (GET only):                    {unchanged_stats}")


def proc_status_mib(pid: int) -> dict[str, float]:
    """``VmRSS`` and ``VmHWM`` (peak RSS) of ``pid`` in MiB, from /proc/<pid>/status."""
    values: dict[str, float] = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) / 1024  # kB
    return values


def bench_loop_rss(sysfs: str, workdir: str) -> None:
    """GFD as deployed (loop, node-api) against the stub: RSS after LOOP_PASSES passes."""
    with FakeApiServer() as server:
        server.add_node("bench-node", labels={"kubernetes.io/hostname": "bench-node"})
        argv = [sys.executable, "-m", "gfd", "--nvml", f"fake:{PROFILE}", "--sysfs-root", sysfs,
                "--mig-strategy", "mixed", "--output-mode", "node-api",
                "--node-name", "bench-node",
                "--kubeconfig", server.kubeconfig(os.path.join(workdir, "kc-loop")),
                "--sleep-interval", "0.1s", "--health-file", os.path.join(workdir, "health"),
                "--machine-type-file", os.path.join(workdir, "none")]
        env = dict(os.environ, PYTHONPATH=str(REPO))
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            # Every pass GETs the Node once (and PATCHes it when the timestamp changed).
            done = server.wait_for(lambda s: len(s.requests("GET")) >= LOOP_PASSES, timeout=60)
            assert done, "GFD did not complete its passes"
            mib = proc_status_mib(proc.pid)
            patches = len(server.requests("PATCH"))
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=10)
    print(f"loop, node-api via the kubernetes client ({LOOP_PASSES} passes, {patches} patches): "
          f"VmRSS {mib['VmRSS']:.1f} MiB, VmHWM {mib['VmHWM']:.1f} MiB   "
          f"below the {LOOP_REQUEST_MIB:.0f} MiB request: "
          f"{verdict(mib['VmHWM'], LOOP_REQUEST_MIB)}")


def main() -> int:
    """Run the measurements and print them beside their targets."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--passes", type=int, default=200)
    parser.add_argument("--starts", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="gfdbench") as workdir:
        write_sysfs(load_profile(PROFILE), Path(workdir))
        bench_pass(args.passes, workdir)
        bench_oneshot(args.starts, workdir, workdir)
        fake = install(PROFILE)
        try:
            with Nvml() as nvml:
                snapshot = nvml.read_snapshot(workdir)
        finally:
            fake.uninstall()
        labels = node_labels(snapshot, Config(flags=Flags(mig_strategy=MigStrategy.MIXED)))
        bench_node_patch(args.passes, workdir, labels)
        bench_loop_rss(workdir, workdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Device plugin latency and footprint, each beside a floor measured in the same run.

- Allocate / GetPreferredAllocation p50/p99 through a gRPC client on the plugin's Unix socket
  (fake dgx-a100), vs a bare grpcio server with an empty handler on the same kind of socket.
- Process start to Register at the (mock) kubelet, vs ``python -c "import grpc, pynvml"``.
- XID injected (fake NVML, in-process) to Unhealthy seen by the kubelet's ListAndWatch.
- The daemon's RSS, vs a bare interpreter that imported grpc and pynvml.

Run: ``python bench/plugin_bench.py [--calls N] [--xids N] [--starts N]`` (about a minute).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import grpc  # noqa: E402

from deviceplugin.main import DevicePlugin, replace_flags, replace_plugin_flags  # noqa: E402
from deviceplugin.mockkubelet import DeviceInfo, MockKubelet  # noqa: E402
from gpus.config import Config  # noqa: E402
from protos.deviceplugin.v1beta1 import api_pb2, api_pb2_grpc  # noqa: E402

GPU = "nvidia.com/gpu"
TARGET_START_MS = 200.0
TARGET_ALLOCATE_RATIO = 1.1
TARGET_XID_P99_MS = 50.0
TARGET_RSS_MIB = 50.0


@dataclass(frozen=True)
class Stats:
    """Latency percentiles in milliseconds."""

    p50: float
    p99: float

    @classmethod
    def of(cls, samples_ns: list[int]) -> Stats:
        """Percentiles of nanosecond samples."""
        ordered = sorted(samples_ns)

        def pick(q: float) -> float:
            return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1e6

        return cls(pick(0.50), pick(0.99))


@contextmanager
def short_dir() -> Iterator[str]:
    """A short /tmp directory for sockets."""
    path = tempfile.mkdtemp(prefix="nvkb", dir="/tmp")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def time_pair(
    ours: Callable[[], object], floor: Callable[[], object], count: int, warmup: int = 200
) -> tuple[Stats, Stats]:
    """Latency of ``count`` calls each, alternating call by call so drift (CPU frequency,
    other load on the machine) hits both sides equally."""
    for _ in range(warmup):
        ours()
        floor()
    ours_ns, floor_ns = [], []
    clock = time.perf_counter_ns
    for _ in range(count):
        start = clock()
        ours()
        middle = clock()
        floor()
        ours_ns.append(middle - start)
        floor_ns.append(clock() - middle)
    return Stats.of(ours_ns), Stats.of(floor_ns)


def bench_config(directory: str, kubelet_socket: str = "") -> Config:
    """The fake DGX A100 with sockets in ``directory`` and fast health recovery."""
    config = replace_flags(
        Config(), nvml="fake:dgx-a100", sysfs_root=os.path.join(directory, "root")
    )
    return replace_plugin_flags(
        config,
        kubelet_socket=kubelet_socket,
        cdi_spec_dir=os.path.join(directory, "cdi"),
        health_recovery_interval=0.01,
        health_quiet_period=0.05,
    )


def start_plugin(config: Config, socket_dir: str) -> DevicePlugin:
    """An in-process plugin with the fake's sysfs written first."""
    plugin = DevicePlugin(config, {}, socket_dir=socket_dir)
    controller = plugin.select_backend()
    if controller is None:
        raise RuntimeError("the bench needs a fake NVML backend")
    controller.write_sysfs(Path(config.flags.sysfs_root))
    plugin.start()
    return plugin


def allocate_request(ids: list[str]) -> api_pb2.AllocateRequest:
    return api_pb2.AllocateRequest(
        container_requests=[api_pb2.ContainerAllocateRequest(devices_ids=ids)]
    )


def preferred_request(ids: list[str], size: int) -> api_pb2.PreferredAllocationRequest:
    return api_pb2.PreferredAllocationRequest(
        container_requests=[
            api_pb2.ContainerPreferredAllocationRequest(
                available_deviceIDs=ids, allocation_size=size
            )
        ]
    )


class _EmptyPlugin(api_pb2_grpc.DevicePluginServicer):
    """The floor: the same service and messages, handlers that do nothing."""

    def Allocate(
        self, request: api_pb2.AllocateRequest, context: grpc.ServicerContext
    ) -> api_pb2.AllocateResponse:
        return api_pb2.AllocateResponse()

    def GetPreferredAllocation(
        self, request: api_pb2.PreferredAllocationRequest, context: grpc.ServicerContext
    ) -> api_pb2.PreferredAllocationResponse:
        return api_pb2.PreferredAllocationResponse()


def bench_rpc(calls: int) -> list[str]:
    """Allocate and GetPreferredAllocation vs the empty-handler floor."""
    lines = []
    with short_dir() as directory:
        floor_sock = os.path.join(directory, "floor.sock")
        floor = grpc.server(ThreadPoolExecutor(max_workers=16))
        api_pb2_grpc.add_DevicePluginServicer_to_server(_EmptyPlugin(), floor)
        floor.add_insecure_port(f"unix:{floor_sock}")
        floor.start()
        plugin = start_plugin(bench_config(directory), directory)
        try:
            controller = plugin.controller
            if plugin.snapshot is None or controller is None:
                raise RuntimeError("the plugin did not start on the fake NVML")
            uuids = [g.uuid for g in plugin.snapshot.gpus]
            ours_channel = grpc.insecure_channel(f"unix:{directory}/nvidia-gpu.sock")
            floor_channel = grpc.insecure_channel(f"unix:{floor_sock}")
            ours = api_pb2_grpc.DevicePluginStub(ours_channel)
            base = api_pb2_grpc.DevicePluginStub(floor_channel)
            alloc = allocate_request(uuids[:2])
            pref = preferred_request(uuids, 2)
            cases: list[tuple[str, Callable[[], object], Callable[[], object]]] = [
                ("Allocate (2 GPUs)", lambda: ours.Allocate(alloc), lambda: base.Allocate(alloc)),
                (
                    "GetPreferredAllocation (2 of 8)",
                    lambda: ours.GetPreferredAllocation(pref),
                    lambda: base.GetPreferredAllocation(pref),
                ),
            ]
            for name, ours_call, floor_call in cases:
                o, f = time_pair(ours_call, floor_call, calls)
                ratio = o.p50 / f.p50
                target = (
                    f"target p50 <= {TARGET_ALLOCATE_RATIO}x floor"
                    if name.startswith("Allocate")
                    else "(no target)"
                )
                lines.append(
                    f"{name:34s} p50 {o.p50:7.3f} ms  p99 {o.p99:7.3f} ms | floor p50 "
                    f"{f.p50:7.3f} ms  p99 {f.p99:7.3f} ms | ratio {ratio:5.2f}x  {target}"
                )
            ours_channel.close()
            floor_channel.close()
        finally:
            plugin.close()
            floor.stop(None)
    return lines


def rss_mib(pid: int) -> float:
    """Resident set size of a process in MiB (Linux /proc)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def bare_import(env: dict[str, str]) -> tuple[float, float]:
    """(wall ms, RSS MiB) of a bare interpreter importing grpc and pynvml."""
    code = (
        "import grpc, pynvml\n"
        "for l in open('/proc/self/status'):\n"
        "    l.startswith('VmRSS:') and print(int(l.split()[1]) / 1024)\n"
    )
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    return (time.perf_counter() - start) * 1000, float(out.stdout.strip())


def bytecode_env(pycache: str) -> dict[str, str]:
    """The environment for timed child processes: the repo importable, and bytecode cached.

    The image compiles our bytecode at install time; a source checkout run with
    ``PYTHONDONTWRITEBYTECODE`` would instead compile every module of ours on every start
    (~100 ms), which no deployed daemon pays. The cache goes to ``pycache``, not the checkout.
    """
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p
    ), "PYTHONPYCACHEPREFIX": pycache}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def bench_start(starts: int) -> list[str]:
    """Process start to Register at the kubelet, and the daemon's RSS once registered.

    One untimed start first fills the bytecode cache (see :func:`bytecode_env`).
    """
    with short_dir() as pycache:
        return _bench_start(starts, bytecode_env(pycache))


def _bench_start(starts: int, env: dict[str, str]) -> list[str]:
    start_ms, rss = [], []
    for run in range(starts + 1):
        with short_dir() as directory, MockKubelet(directory) as kubelet:
            begin = time.perf_counter()
            proc = subprocess.Popen(
                [sys.executable, "-m", "deviceplugin.main", "--nvml", "fake:dgx-a100",
                 "--kubelet-socket", kubelet.socket_path],
                cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            try:
                if not kubelet.wait_for_registration_request(GPU, 30):
                    raise RuntimeError("the daemon did not register within 30 s")
                elapsed_ms = (time.perf_counter() - begin) * 1000
                kubelet.wait_for_registration(GPU, 10)
                if run > 0:  # run 0 only fills the bytecode cache
                    start_ms.append(elapsed_ms)
                    rss.append(rss_mib(proc.pid))
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=10)
    floors = [bare_import(env) for _ in range(starts)]
    floor_ms = statistics.median(f[0] for f in floors)
    floor_rss = statistics.median(f[1] for f in floors)
    ours_ms, ours_rss = statistics.median(start_ms), statistics.median(rss)
    return [
        f"{'start -> registered':34s} median {ours_ms:7.1f} ms (n={starts}) | floor (import "
        f"grpc, pynvml) {floor_ms:7.1f} ms | target <= {TARGET_START_MS:.0f} ms",
        f"{'daemon RSS':34s} median {ours_rss:7.1f} MiB | floor (bare import) {floor_rss:7.1f} "
        f"MiB | target <= {TARGET_RSS_MIB:.0f} MiB",
    ]


def has_health(device_id: str, health: str) -> Callable[[list[DeviceInfo]], bool]:
    """A predicate on a ListAndWatch list: ``device_id`` reports ``health``."""
    return lambda devices: any(d.id == device_id and d.health == health for d in devices)


def bench_xid(samples: int) -> list[str]:
    """Fake XID injected -> Unhealthy in the kubelet's ListAndWatch."""
    latencies = []
    with short_dir() as directory, MockKubelet(directory) as kubelet:
        plugin = start_plugin(bench_config(directory, kubelet.socket_path), directory)
        try:
            if not kubelet.wait_for_registration(GPU, 30):
                raise RuntimeError("the plugin did not register")
            controller = plugin.controller
            if plugin.snapshot is None or controller is None:
                raise RuntimeError("the plugin did not start on the fake NVML")
            uuids = [g.uuid for g in plugin.snapshot.gpus]
            for n in range(samples):
                index = n % len(uuids)
                if kubelet.wait_for_devices(GPU, has_health(uuids[index], "Healthy"), 10) is None:
                    raise RuntimeError(f"{uuids[index]} did not recover")
                begin = time.perf_counter_ns()
                controller.inject_xid(index, 79)
                seen = kubelet.wait_for_devices(GPU, has_health(uuids[index], "Unhealthy"), 10)
                if seen is None:
                    raise RuntimeError(f"XID on {uuids[index]} never reached the kubelet")
                latencies.append(time.perf_counter_ns() - begin)
        finally:
            plugin.close()
    stats = Stats.of(latencies)
    return [
        f"{'XID -> Unhealthy at kubelet':34s} p50 {stats.p50:7.3f} ms  p99 {stats.p99:7.3f} ms "
        f"(n={samples}) | target p99 <= {TARGET_XID_P99_MS:.0f} ms"
    ]


def main(argv: list[str] | None = None) -> int:
    """Run every measurement and print one line each."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=4000, help="RPCs per latency case")
    parser.add_argument("--xids", type=int, default=200, help="XID samples")
    parser.add_argument("--starts", type=int, default=5, help="daemon starts")
    args = parser.parse_args(argv)
    # The XID samples mark devices unhealthy on purpose: keep their warnings out of the table.
    logging.basicConfig(level=logging.ERROR)
    print(f"device plugin bench (python {sys.version.split()[0]}, grpcio {grpc.__version__})")
    for section in (bench_rpc(args.calls), bench_xid(args.xids), bench_start(args.starts)):
        for line in section:
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

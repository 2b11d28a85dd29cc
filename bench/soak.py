"""Soak: the device plugin under mixed load for N minutes, in its own process, RSS watched.

The plugin runs as ``python -m deviceplugin.main`` on the fake ``dgx-a100-mig`` profile with MIG
strategy mixed and fast health recovery; a mock kubelet in this process registers it. A single
client thread then loops for ``--minutes``:

- at ``--rate`` rounds per second, a round picks a random MIG resource and a count, asks
  GetPreferredAllocation over the devices the kubelet sees as Healthy, then Allocates the answer
  (as the kubelet does);
- every ``--xid-every`` seconds a critical XID goes in through the fake's control socket, on a
  random MIG device or a whole GPU; recovery brings it back after the quiet period;
- every ``--restart-every`` seconds the mock kubelet restarts (every socket in its directory is
  deleted) and the loop waits until every resource has registered again.

Each ``--interval`` it prints calls served, errors and p50/p99 per RPC, XIDs, restarts (with the
slowest re-registration) and the plugin's VmRSS, threads and open fds; at the end RSS at start,
after the first interval and at the end. "refused" counts Allocates answered INVALID_ARGUMENT
because an XID marked a chosen device Unhealthy between the kubelet's list and the call (a race
the real kubelet has too); anything else is an error. Exit status 1 if any error occurred, the
plugin died, devices did not all recover, or it did not stop cleanly on SIGTERM.

Only Unix sockets in a private temporary directory are used; the run stops by itself.

Run: ``python bench/soak.py [--minutes 10] [--interval 60] [--rate 50]``
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import grpc  # noqa: E402
from benchutil import short_dir  # noqa: E402

from deviceplugin.mockkubelet import MockKubelet  # noqa: E402
from gpus.fake.control import ControlError, send  # noqa: E402
from protos.deviceplugin.v1beta1 import api_pb2  # noqa: E402

PROFILE = "dgx-a100-mig"
MIG_PREFIX = "nvidia.com/mig-"
CRITICAL_XIDS = (48, 63, 64, 74, 79, 94, 95)
START_TIMEOUT_S = 60.0
REREGISTER_TIMEOUT_S = 30.0
RPC_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 15.0
RECOVERY_SLACK_S = 10.0
RPCS = ("GetPreferredAllocation", "Allocate")

log = logging.getLogger("soak")


# --- measurements ------------------------------------------------------------------------------


def percentile(samples_ns: list[int], q: float) -> float:
    """The q-quantile of nanosecond samples, in milliseconds (nan when empty)."""
    if not samples_ns:
        return float("nan")
    ordered = sorted(samples_ns)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1e6


@dataclass
class RpcStats:
    """One RPC's outcomes during one interval."""

    latencies_ns: list[int] = field(default_factory=list)
    refused: int = 0
    errors: int = 0


@dataclass
class Interval:
    """Everything counted during one reporting interval."""

    rpcs: dict[str, RpcStats] = field(default_factory=lambda: {n: RpcStats() for n in RPCS})
    xids: int = 0
    restarts: int = 0
    reregister_ms: list[float] = field(default_factory=list)
    other_errors: int = 0  # XID injection, re-registration, lost connections
    error_samples: list[str] = field(default_factory=list)

    def error(self, rpc: str | None, message: str) -> None:
        """Count an error (of an RPC, or None for the rest) and keep the first few messages."""
        if rpc is None:
            self.other_errors += 1
        else:
            self.rpcs[rpc].errors += 1
        if len(self.error_samples) < 3:
            self.error_samples.append(f"{rpc or 'soak'}: {message}")

    @property
    def errors(self) -> int:
        """Errors of every kind in this interval."""
        return self.other_errors + sum(s.errors for s in self.rpcs.values())


@dataclass(frozen=True)
class ProcStatus:
    """What /proc says about the plugin process."""

    rss_mib: float
    threads: int
    fds: int

    @classmethod
    def of(cls, pid: int) -> ProcStatus:
        """Read VmRSS and Threads from /proc/<pid>/status and count /proc/<pid>/fd."""
        fields: dict[str, str] = {}
        with open(f"/proc/{pid}/status", encoding="ascii") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        rss_kib = int(fields.get("VmRSS", "0 kB").split()[0])
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        return cls(rss_kib / 1024, int(fields.get("Threads", "0")), fds)

    def __str__(self) -> str:
        return f"RSS {self.rss_mib:6.1f} MiB, {self.threads} threads, {self.fds} fds"


# --- the plugin process -----------------------------------------------------------------------


def control_socket(directory: str) -> str:
    """The fake's control socket: outside the kubelet's directory, which a restart wipes."""
    return os.path.join(directory, "ctl", "control.sock")


def spawn_plugin(directory: str, args: argparse.Namespace) -> subprocess.Popen[bytes]:
    """``python -m deviceplugin.main`` on the fake profile, its log in ``<dir>/plugin.log``."""
    control = control_socket(directory)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    command = [
        sys.executable, "-m", "deviceplugin.main",
        "--nvml", f"fake:{PROFILE}?control={control}",
        "--mig-strategy", "mixed",
        "--kubelet-socket", os.path.join(directory, "kubelet.sock"),
        "--cdi-spec-dir", os.path.join(directory, "cdi"),
        "--health-recovery-interval", str(args.recovery_interval),
        "--health-quiet-period", str(args.quiet_period),
        "--log-level", "warning",
    ]
    os.makedirs(os.path.dirname(control), mode=0o700, exist_ok=True)
    with open(os.path.join(directory, "plugin.log"), "wb") as log_file:
        return subprocess.Popen(command, cwd=REPO, env=env, stdout=log_file,
                                stderr=subprocess.STDOUT)


def expected_resources() -> list[str]:
    """The resources the plugin will serve for the profile (read through the fake, here)."""
    from deviceplugin.main import replace_flags
    from gpus.config import Config
    from gpus.fake import install
    from gpus.nvml import Nvml
    from gpus.resources import build_resource_map

    config = replace_flags(Config(), mig_strategy="mixed")
    with short_dir("nvks") as root, install(PROFILE) as fake:
        fake.write_sysfs(root)
        with Nvml() as nvml:
            snapshot = nvml.read_snapshot(root)
    return sorted(n for n, r in build_resource_map(snapshot, config).resources.items()
                  if r.devices)


def stop_plugin(proc: subprocess.Popen[bytes]) -> int | None:
    """SIGTERM, then the exit status; kill (and None) if it does not stop in time."""
    if proc.poll() is not None:
        return proc.returncode
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return None


# --- the load ----------------------------------------------------------------------------------


class Soak:
    """The client side: allocation rounds, XIDs and kubelet restarts, one thread."""

    def __init__(self, kubelet: MockKubelet, resources: list[str], control: str,
                 rng: random.Random) -> None:
        self.kubelet = kubelet
        self.resources = resources
        self.control = control
        self.rng = rng
        self.registrations = {r: len(kubelet.registrations(r)) for r in resources}

    def timed(self, interval: Interval, rpc: str, call: Callable[[], object]) -> object | None:
        """Run one RPC, record its latency or its failure; None on failure."""
        start = time.perf_counter_ns()
        try:
            result = call()
        except grpc.RpcError as err:
            code = err.code() if isinstance(err, grpc.Call) else None
            details = err.details() if isinstance(err, grpc.Call) else str(err)
            if code == grpc.StatusCode.INVALID_ARGUMENT and "unhealthy device" in (details or ""):
                interval.rpcs[rpc].refused += 1
            else:
                interval.error(rpc, f"{code}: {details}")
            return None
        interval.rpcs[rpc].latencies_ns.append(time.perf_counter_ns() - start)
        return result

    def round(self, interval: Interval) -> None:
        """One kubelet-style allocation: preferred set over the healthy devices, then Allocate."""
        resource = self.rng.choice(self.resources)
        healthy = [d.id for d in self.kubelet.devices(resource) if d.health == "Healthy"]
        if not healthy:
            return  # every device of it is recovering from an XID
        size = self.rng.randint(1, min(3, len(healthy)))
        try:
            stub = self.kubelet.stub(resource)
        except KeyError:
            interval.error(None, f"{resource} is not connected")
            return
        request = api_pb2.PreferredAllocationRequest(container_requests=[
            api_pb2.ContainerPreferredAllocationRequest(
                available_deviceIDs=healthy, allocation_size=size)])
        preferred = self.timed(interval, "GetPreferredAllocation",
                               lambda: stub.GetPreferredAllocation(request, timeout=RPC_TIMEOUT_S))
        chosen = list(preferred.container_responses[0].deviceIDs) if isinstance(
            preferred, api_pb2.PreferredAllocationResponse) else []
        if len(chosen) != size:
            chosen = healthy[:size]  # the kubelet's own pick when the plugin has no preference
        allocate = api_pb2.AllocateRequest(container_requests=[
            api_pb2.ContainerAllocateRequest(devices_ids=chosen)])
        self.timed(interval, "Allocate", lambda: stub.Allocate(allocate, timeout=RPC_TIMEOUT_S))

    def xid(self, interval: Interval) -> None:
        """A critical XID on a random MIG device (by UUID) or, one time in four, a whole GPU."""
        request: dict[str, object] = {"op": "xid", "xid": self.rng.choice(CRITICAL_XIDS)}
        devices = [d.id for r in self.resources for d in self.kubelet.devices(r)]
        if devices and self.rng.random() < 0.75:
            request["gpu"] = self.rng.choice(devices)
        else:
            request["gpu"] = self.rng.randrange(8)
        try:
            send(self.control, request)
        except ControlError as err:
            interval.error(None, f"XID injection failed: {err}")
            return
        interval.xids += 1

    def restart_kubelet(self, interval: Interval) -> None:
        """Restart the mock kubelet and wait for every resource to register and list again."""
        start = time.perf_counter()
        self.kubelet.restart()
        for resource in self.resources:
            want = self.registrations[resource] + 1
            if not self.kubelet.wait_for_registration(resource, REREGISTER_TIMEOUT_S, want):
                interval.error(None, f"{resource} did not re-register in "
                               f"{REREGISTER_TIMEOUT_S:.0f} s")
            self.registrations[resource] = len(self.kubelet.registrations(resource))
        interval.restarts += 1
        interval.reregister_ms.append((time.perf_counter() - start) * 1000)

    def all_healthy(self, timeout: float) -> bool:
        """Wait until every device of every resource is Healthy again."""
        deadline = time.monotonic() + timeout
        for resource in self.resources:
            left = max(0.0, deadline - time.monotonic())
            ok = self.kubelet.wait_for_devices(
                resource, lambda ds: all(d.health == "Healthy" for d in ds), left)
            if ok is None:
                return False
        return True


def report(number: int, interval: Interval, status: ProcStatus) -> str:
    """One interval as printable lines."""
    lines = [f"[{number:3d}] xids {interval.xids:4d}  kubelet restarts {interval.restarts:2d}"
             + (f" (re-registered all in <= {max(interval.reregister_ms):.0f} ms)"
                if interval.reregister_ms else "")
             + f"  other errors {interval.other_errors}  plugin {status}"]
    for name, stats in interval.rpcs.items():
        lines.append(
            f"      {name:22s} served {len(stats.latencies_ns):6d}  refused {stats.refused:3d}  "
            f"errors {stats.errors:3d}  p50 {percentile(stats.latencies_ns, 0.5):6.3f} ms  "
            f"p99 {percentile(stats.latencies_ns, 0.99):6.3f} ms")
    lines += [f"      error: {sample}" for sample in interval.error_samples]
    return "\n".join(lines)


def print_log_errors(plugin_log: list[str]) -> None:
    """The plugin log's size and its first ERROR/Traceback lines."""
    errors = [line for line in plugin_log if " ERROR " in line or "Traceback" in line]
    print(f"plugin log: {len(plugin_log)} lines, {len(errors)} ERROR/Traceback lines")
    for line in errors[:5]:
        print(f"    {line}")


def run(args: argparse.Namespace) -> int:
    """The whole soak; returns the exit status."""
    rng = random.Random(args.seed)
    resources = [r for r in expected_resources() if r.startswith(MIG_PREFIX)]
    duration = args.minutes * 60
    failures: list[str] = []
    with short_dir("nvks") as directory, MockKubelet(directory) as kubelet:
        proc = spawn_plugin(directory, args)
        try:
            for resource in resources:
                if not kubelet.wait_for_registration(resource, START_TIMEOUT_S):
                    raise RuntimeError(f"{resource} did not register within {START_TIMEOUT_S} s; "
                                       f"see {directory}/plugin.log")
            soak = Soak(kubelet, resources, control_socket(directory), rng)
            start_status = ProcStatus.of(proc.pid)
            print(f"soak: {args.minutes:g} min, profile {PROFILE} (MIG mixed, "
                  f"{len(resources)} resources), {args.rate:g} rounds/s, XID every "
                  f"{args.xid_every:g} s, kubelet restart every {args.restart_every:g} s, "
                  f"recovery {args.recovery_interval:g}/{args.quiet_period:g} s", flush=True)
            print(f"start: plugin pid {proc.pid}, {start_status}", flush=True)
            statuses = [start_status]
            began = time.monotonic()
            end = began + duration
            next_report = began + args.interval
            next_xid = began + args.xid_every
            next_restart = began + args.restart_every
            period = 1.0 / args.rate
            next_round = began
            interval, number, total_errors = Interval(), 1, 0
            while True:
                now = time.monotonic()
                if proc.poll() is not None:
                    failures.append(f"the plugin exited with {proc.returncode}")
                    break
                if now >= next_report or now >= end:
                    status = ProcStatus.of(proc.pid)
                    statuses.append(status)
                    print(report(number, interval, status), flush=True)
                    total_errors += interval.errors
                    interval, number = Interval(), number + 1
                    next_report += args.interval
                    if now >= end:
                        break
                if now >= next_restart:
                    soak.restart_kubelet(interval)
                    next_restart = time.monotonic() + args.restart_every
                elif now >= next_xid:
                    soak.xid(interval)
                    next_xid += args.xid_every
                elif now >= next_round:
                    soak.round(interval)
                    # Never try to catch up after a restart: keep the rate, not the count.
                    next_round = max(next_round + period, time.monotonic() - period)
                else:
                    time.sleep(min(next_round, next_xid, next_restart, next_report) - now)
            if total_errors:
                failures.append(f"{total_errors} errors")
            if proc.poll() is None and not soak.all_healthy(args.quiet_period + RECOVERY_SLACK_S):
                failures.append("not every device was Healthy again after the quiet period")
            final = ProcStatus.of(proc.pid) if proc.poll() is None else statuses[-1]
            warm = statuses[1] if len(statuses) > 1 else start_status
            print(f"RSS: start {start_status.rss_mib:.1f} MiB, after the first interval "
                  f"{warm.rss_mib:.1f} MiB, end {final.rss_mib:.1f} MiB (growth "
                  f"{final.rss_mib - start_status.rss_mib:+.1f} MiB from start, "
                  f"{final.rss_mib - warm.rss_mib:+.1f} MiB after warm-up); threads "
                  f"{start_status.threads} -> {final.threads}, fds {start_status.fds} -> "
                  f"{final.fds}", flush=True)
        finally:
            code = stop_plugin(proc)
        if code != 0:
            failures.append(f"SIGTERM: exit status {code}")
        leftover = sorted(n for n in os.listdir(directory) if n.endswith(".sock")
                          and n not in ("kubelet.sock",))
        if leftover:
            failures.append(f"sockets left behind: {', '.join(leftover)}")
        with open(os.path.join(directory, "plugin.log"), encoding="utf-8",
                  errors="replace") as handle:
            plugin_log = handle.read().splitlines()
    print_log_errors(plugin_log)
    if failures:
        print("FAILED: " + "; ".join(failures))
        return 1
    print("OK")
    return 0


def positive(text: str) -> float:
    """An argparse type: a float > 0."""
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def main(argv: list[str] | None = None) -> int:
    """Parse the flags and run the soak."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=positive, default=10.0, help="duration (default 10)")
    parser.add_argument("--interval", type=positive, default=60.0,
                        help="seconds between reports (default 60)")
    parser.add_argument("--rate", type=positive, default=50.0,
                        help="allocation rounds per second (default 50: 100 RPC/s)")
    parser.add_argument("--xid-every", type=positive, default=2.0,
                        help="seconds between injected XIDs (default 2)")
    parser.add_argument("--restart-every", type=positive, default=30.0,
                        help="seconds between kubelet restarts (default 30)")
    parser.add_argument("--recovery-interval", type=positive, default=0.5,
                        help="plugin --health-recovery-interval (default 0.5)")
    parser.add_argument("--quiet-period", type=positive, default=2.0,
                        help="plugin --health-quiet-period (default 2)")
    parser.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    args = parser.parse_args(argv)
    # The mock kubelet logs every registration; keep the report readable.
    logging.basicConfig(level=logging.ERROR)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())

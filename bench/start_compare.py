"""Device plugin start-up of several source checkouts, interleaved one start at a time.

For comparing builds (say this one and the commit before a change, checked out with ``git
worktree add --detach ../old <commit>``): each round starts every checkout's daemon once, in
turn, so the machine's load drifts over all of them alike. Per start, on the fake dgx-a100:

- wall time from spawning ``python -m deviceplugin.main`` to its Register at the mock kubelet
  (as ``plugin_bench.py --sections start``);
- CPU time the daemon's threads had used by then (``/proc/<pid>/task/*/schedstat``): it moves
  far less than wall time when other work shares the machine;
- RSS once registered and listed (as ``plugin_bench.py``).

Every checkout runs with this interpreter, its own directory first on ``PYTHONPATH`` and its
own bytecode cache (one untimed start fills it), against this checkout's mock kubelet.

Run: ``python bench/start_compare.py [--starts N] CHECKOUT...`` (default: this checkout only).
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchutil import rss_mib, short_dir  # noqa: E402

from deviceplugin.mockkubelet import MockKubelet  # noqa: E402

GPU = "nvidia.com/gpu"
PROFILE = "dgx-a100"


def checkout_env(checkout: Path, pycache: str) -> dict[str, str]:
    """``checkout`` importable first, with a bytecode cache (the image has one too)."""
    env = {**os.environ, "PYTHONPATH": str(checkout), "PYTHONPYCACHEPREFIX": pycache}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def cpu_ms(pid: int) -> float:
    """CPU time used so far by every thread of ``pid``, in ms."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat", encoding="ascii") as handle:
                total += int(handle.read().split()[0])  # ns on the CPU
        except (OSError, ValueError, IndexError):
            continue  # a thread that ended meanwhile
    return total / 1e6


def one_start(checkout: Path, env: dict[str, str]) -> tuple[float, float, float]:
    """(wall ms, CPU ms at Register, RSS MiB once listed) of one daemon start."""
    with short_dir("nvsc") as directory, MockKubelet(directory) as kubelet:
        begin = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-m", "deviceplugin.main", "--nvml", f"fake:{PROFILE}",
             "--kubelet-socket", kubelet.socket_path],
            cwd=checkout, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            if not kubelet.wait_for_registration_request(GPU, 30):
                raise RuntimeError(f"{checkout}: the daemon did not register within 30 s")
            wall = (time.perf_counter() - begin) * 1000
            cpu = cpu_ms(proc.pid)
            if not kubelet.wait_for_registration(GPU, 10):
                raise RuntimeError(f"{checkout}: no device list after Register")
            return wall, cpu, rss_mib(proc.pid)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=10)


def main(argv: list[str] | None = None) -> int:
    """Start each checkout's daemon ``--starts`` times, interleaved; print medians."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--starts", type=int, default=20, help="timed starts per checkout")
    parser.add_argument("checkouts", nargs="*", type=Path, default=[REPO],
                        help="source trees to compare (default: this one)")
    args = parser.parse_args(argv)
    checkouts = [path.resolve() for path in args.checkouts]
    results: dict[Path, list[tuple[float, float, float]]] = {path: [] for path in checkouts}
    with short_dir("nvscc") as caches:
        envs = {path: checkout_env(path, os.path.join(caches, str(n)))
                for n, path in enumerate(checkouts)}
        for path in checkouts:
            one_start(path, envs[path])  # untimed: fills the bytecode cache
        for _ in range(args.starts):
            for path in checkouts:
                results[path].append(one_start(path, envs[path]))
    print(f"start -> Register on fake {PROFILE}, {args.starts} starts each, interleaved "
          f"(load average {os.getloadavg()[0]:.1f} at the end)")
    for path in checkouts:
        wall, cpu, rss = zip(*results[path], strict=True)
        print(f"  wall median {statistics.median(wall):6.1f} ms (min {min(wall):6.1f})  "
              f"CPU at Register median {statistics.median(cpu):6.1f} ms (min {min(cpu):6.1f})  "
              f"RSS median {statistics.median(rss):5.1f} MiB  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

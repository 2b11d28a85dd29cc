"""Latency of the whole-GPU preferred allocation (Allocator.preferred) per request size.

Topologies: a DGX A100 (8 GPUs, NVLink all-to-all through NVSwitch: every set scores alike,
the easy case), a DGX-1 (8 GPUs, hybrid cube-mesh, the case NVIDIA's tests use), 16 GPUs made
of two DGX-1 cube meshes joined across CPUs (non-uniform links, the largest exact case), the
fake ``hgx-16-pcie`` profile's matrix (the same, but NODE rather than SYS between the quads of
a half), and 16 GPUs all NVLinked alike (``hgx-16``-like: sets differ only by PCIe, so the
best-first walk meets many near-ties).

For every size 1..N: the first call (which builds that size's packing table when the node is
too large for the constructor to build them all), then CALLS more calls with random available
subsets (size uniform in [k, N]) and, half the time, one or two must-include devices; p50/p99/
max of those. Then the constructor time and the tracemalloc peak of constructing the allocator
and of building every table. Run: ``python bench/allocator_bench.py`` (under a minute).
"""

from __future__ import annotations

import os
import platform
import random
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from deviceplugin.allocator import LEVEL_SCORES, NVLINK_SCORE, Allocator  # noqa: E402
from gpus.model import TopologyLevel  # noqa: E402

CALLS = 300  # per size
SEED = 7
# nvidia-compat.md: DGX-1 NVLink counts per pair.
DGX1_NVLINKS = (
    "0-1:1 0-2:1 0-3:2 0-4:2 1-2:2 1-3:1 1-5:2 2-3:2 2-6:1 3-7:1 "
    "4-5:1 4-6:1 4-7:2 5-6:2 5-7:1 6-7:2"
)

Scores = list[list[int]]


def score(level: TopologyLevel, nvlinks: int = 0) -> int:
    """NVIDIA's pair score (same as deviceplugin.allocator.pair_score)."""
    return LEVEL_SCORES[level] + NVLINK_SCORE * nvlinks


def pcie_level(i: int, j: int) -> TopologyLevel:
    """DGX-style PCIe: pairs share a switch, quads a host bridge, halves a CPU."""
    if i // 2 == j // 2:
        return TopologyLevel.SINGLE
    if i // 4 == j // 4:
        return TopologyLevel.HOSTBRIDGE
    return TopologyLevel.SYSTEM


def dgx_a100() -> Scores:
    """8 GPUs, 12 NVLinks between every pair (NVSwitch)."""
    return [[0 if i == j else score(pcie_level(i, j), 12) for j in range(8)] for i in range(8)]


def dgx1() -> Scores:
    """8 GPUs, hybrid cube-mesh NVLink."""
    nvlinks: dict[tuple[int, int], int] = {}
    for token in DGX1_NVLINKS.split():
        pair, count = token.split(":")
        a, b = (int(x) for x in pair.split("-"))
        nvlinks[a, b] = nvlinks[b, a] = int(count)
    return [
        [0 if i == j else score(pcie_level(i, j), nvlinks.get((i, j), 0)) for j in range(8)]
        for i in range(8)
    ]


def two_dgx1() -> Scores:
    """16 GPUs: two cube meshes, no NVLink and cross-CPU between them."""
    mesh = dgx1()
    return [
        [mesh[i % 8][j % 8] if i // 8 == j // 8 else score(TopologyLevel.SYSTEM) for j in range(16)]
        for i in range(16)
    ]


def hgx_16_pcie() -> Scores:
    """The fake hgx-16-pcie profile: two DGX-1 halves, NODE between a half's quads."""
    mesh = dgx1()

    def pair(i: int, j: int) -> int:
        if i // 8 != j // 8:
            return score(TopologyLevel.SYSTEM)
        level = pcie_level(i % 8, j % 8)
        nvlinks = (mesh[i % 8][j % 8] - score(level)) // NVLINK_SCORE
        return score(TopologyLevel.NODE if level is TopologyLevel.SYSTEM else level, nvlinks)

    return [[0 if i == j else pair(i, j) for j in range(16)] for i in range(16)]


def nvswitch_16() -> Scores:
    """16 GPUs, 12 NVLinks between every pair; PCIe as two DGX-style halves."""
    return [
        [0 if i == j else score(pcie_level(i % 8, j % 8) if i // 8 == j // 8
                                else TopologyLevel.SYSTEM, 12) for j in range(16)]
        for i in range(16)
    ]


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def bench_topology(name: str, make: Callable[[], Scores], rng: random.Random) -> None:
    """Print one table: per size, the first call and the steady-state latencies."""
    weights = make()
    n = len(weights)
    ids = [f"GPU-{i:02d}" for i in range(n)]
    start = time.perf_counter()
    alloc = Allocator(ids, weights)
    ctor_ms = (time.perf_counter() - start) * 1e3
    print(f"\n{name}: {n} GPUs, constructor {ctor_ms:.1f} ms")
    print(f"{'size':>4} {'first ms':>9} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    worst_p99 = 0.0
    for size in range(1, n + 1):
        start = time.perf_counter()
        alloc.preferred(ids, [], size)
        first = (time.perf_counter() - start) * 1e3
        samples = []
        for _ in range(CALLS):
            available = rng.sample(ids, rng.randint(size, n))
            must = rng.sample(available, rng.randint(0, min(2, size))) if rng.random() < 0.5 else []
            start = time.perf_counter()
            chosen = alloc.preferred(available, must, size)
            samples.append((time.perf_counter() - start) * 1e3)
            assert len(chosen) == size, (available, must, size, chosen)
        p99 = percentile(samples, 0.99)
        worst_p99 = max(worst_p99, p99)
        print(
            f"{size:>4} {first:>9.2f} {statistics.median(samples):>8.3f} {p99:>8.3f} "
            f"{max(samples):>8.3f}"
        )
    print(f"worst p99 over sizes: {worst_p99:.3f} ms ({CALLS} calls per size)")
    memory(name, ids, weights)


def memory(name: str, ids: list[str], weights: Scores) -> None:
    """Start-up time and memory: constructor, then every table (warm()).

    tracemalloc slows table builds tenfold, so it traces the constructor and one table build
    (the largest size that has a table, whose transient lists are the longest); warm() of
    every size is timed untraced and its memory is the tables' exact size.
    """
    tracemalloc.start()
    alloc = Allocator(ids, weights)
    _, ctor_peak = tracemalloc.get_traced_memory()
    tracemalloc.reset_peak()
    n = len(ids)
    table_sizes = [k for k in range(2, n + 1) if 2 * k < n]
    if table_sizes:
        alloc.warm([table_sizes[-1]])
    held, one_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    start = time.perf_counter()
    alloc.warm()
    warm_s = time.perf_counter() - start
    stats = alloc.stats()
    print(
        f"{name}: constructor traced peak {ctor_peak / 2**20:.2f} MiB; "
        f"building size {table_sizes[-1] if table_sizes else '-'} traced peak "
        f"{one_peak / 2**20:.2f} MiB (held {held / 2**20:.2f} MiB); "
        f"warm() of all sizes {warm_s:.2f} s, tables {stats.table_bytes / 2**20:.2f} MiB "
        f"for sizes {list(stats.sizes_built)}"
    )


def main() -> int:
    """Run every topology and print its table."""
    rng = random.Random(SEED)
    started = time.perf_counter()
    for name, make in (
        ("DGX A100", dgx_a100),
        ("DGX-1", dgx1),
        ("2 x DGX-1", two_dgx1),
        ("hgx-16-pcie", hgx_16_pcie),
        ("16 x NVSwitch", nvswitch_16),
    ):
        bench_topology(name, make, rng)
    print(
        f"\ntotal {time.perf_counter() - started:.1f} s, Python {platform.python_version()}, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

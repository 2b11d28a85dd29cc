"""Preferred allocation: which devices to offer the kubelet for a container (pure functions).

Whole GPUs
    NVIDIA's objective (k8s-device-plugin's best-effort policy), computed exactly. Pairs of GPUs
    score by their PCIe common ancestor plus 100 per NVLink (:func:`pair_score`); a set scores the
    sum over its pairs. For a request of ``k`` devices out of the available set ``A`` we choose
    the ``k``-set ``S`` (holding the must-include devices) that maximises::

        score(S) + pack(A - S)

    where ``pack(X)`` is the best total score of cutting ``X`` into groups of ``k`` plus one
    leftover group of ``|X| mod k`` members. Ties go to the higher ``score(S)``, then to the
    lexicographically smallest tuple of device positions (the order of ``Allocator.ids``). NVIDIA
    gets there by enumerating partitions of the padded device list (seconds to minutes on 16
    GPUs) and can return a padding slot; we never do.

    ``pack`` depends only on the topology and ``k``, so it is tabulated once per size over every
    subset of the node's GPUs (int bitmasks) by dynamic programming on the lowest member: the
    lowest GPU of ``X`` is either in a full group or in the leftover group, whose members are as
    free to choose as any group's.

    A query walks every ``k``-set of the node best-first (score descending, then positions
    ascending: the tie-break order), skipping at C speed those that are not inside ``A`` or
    miss a must-include device, and stops once ``score(S)`` plus the largest ``pack`` of any
    ``|A| - k`` GPUs cannot reach the best total so far: later sets can at most tie, and ties
    go to the earlier. On non-uniform topologies the walk ends within tens of sets where a
    full pass would look at thousands. Costs (bench/allocator_bench.py): 8 GPUs, tables
    built in the constructor in a few ms, queries p99 < 0.1 ms; 16 GPUs, 256 KiB per size
    (1.75 MiB for all) plus 256 KiB of walk orders, 0.2-1.9 s of CPU to build one size's
    table on its first request (or in :meth:`Allocator.warm`), then queries p99 < 1 ms for
    every size, on NVLink-uniform and non-uniform 16-GPU topologies alike (was 2-4.5 ms with
    one pass over every candidate, which requests with few candidates still use).

Shared replicas and MIG devices
    :mod:`deviceplugin.shared_policy`: NVIDIA's ``distributed`` and ``packed`` policies.
"""

from __future__ import annotations

import logging
import threading
from array import array
from collections.abc import Callable, Container, Iterable, Mapping, Sequence
from itertools import combinations, compress, repeat
from math import comb
from operator import add, and_, eq, sub

from gpus.model import Link, Snapshot, TopologyLevel
from gpus.records import record

log = logging.getLogger(__name__)

# NVIDIA's pair scores per PCIe common ancestor; closer is better.
LEVEL_SCORES: Mapping[TopologyLevel, int] = {
    TopologyLevel.SYSTEM: 10,
    TopologyLevel.NODE: 20,
    TopologyLevel.HOSTBRIDGE: 30,
    TopologyLevel.MULTIPLE: 40,
    TopologyLevel.SINGLE: 50,
    TopologyLevel.INTERNAL: 60,
}
NVLINK_SCORE = 100

# Tables hold one entry per subset of the node's GPUs: 2**16 entries of 4 bytes per request
# size. Larger nodes fall back to a greedy choice, logged once.
MAX_EXACT_GPUS = 16
# Below this many DP steps the constructor builds every table at once (N <= 12: about 0.1 s);
# above it (N = 13..16) each request size builds its table on first use, or in warm().
EAGER_STEPS = 200_000
# Answers remembered per allocator (FIFO); each entry is a few hundred bytes.
RESULT_CACHE_SIZE = 256
# A request with at most 1/SCAN_RATIO as many candidate sets as the node has k-sets lists its
# candidates (about 5x the cost per set of skipping one in the best-first walk's filter).
SCAN_RATIO = 5



def pair_score(link: Link) -> int:
    """NVIDIA's score of a GPU pair: PCIe proximity (10..60) plus 100 per NVLink."""
    return LEVEL_SCORES[link.level] + NVLINK_SCORE * link.nvlinks


@record
class _SizePlan:
    """What queries of one request size ``k`` use, built once per size.

    ``pack``: pack() per subset. ``order``: every ``k``-subset mask of the node, best-first
    (score descending, then lexicographic positions). ``pack_bound[r]``: the largest pack() of
    any ``r`` GPUs, for ``r <= n - k`` (the most the rest of a request can add).
    """

    pack: array[int]
    order: array[int]
    pack_bound: tuple[int, ...]


@record
class TableStats:
    """What the allocator has precomputed, for reports and benchmarks."""

    gpus: int
    exact: bool
    sizes_built: tuple[int, ...]
    table_bytes: int


class Allocator:
    """Exact, fast preferred allocation of whole GPUs over one node's topology.

    Immutable after construction except for caches: the packing tables, built lazily per
    request size under a lock, and recent answers; concurrent gRPC handlers can share one.
    """

    def __init__(self, ids: Sequence[str], scores: Sequence[Sequence[int]]) -> None:
        """``ids[i]`` is GPU ``i``; ``scores[i][j]`` its pair score with GPU ``j`` (symmetric).

        Raises ValueError for duplicate ids, a non-square or asymmetric matrix, or negative
        scores; nothing is built in that case.
        """
        self._ids: tuple[str, ...] = tuple(ids)
        self._weights = _checked_weights(self._ids, scores)
        self._position = {gpu_id: i for i, gpu_id in enumerate(self._ids)}
        n = len(self._ids)
        self._exact = n <= MAX_EXACT_GPUS
        self._lock = threading.Lock()  # guards the result cache
        self._build_lock = threading.Lock()  # serialises table builds
        self._tables: dict[int, array[int]] = {}
        self._plans: dict[int, _SizePlan] = {}
        # Answers to the free node's request (everything available, nothing required) per
        # size, kept apart from the FIFO so random requests never evict them.
        self._idle: dict[int, int] = {}
        # Recent answers: the kubelet repeats requests, and a free node always asks the same.
        self._results: dict[tuple[int, int, int], int] = {}
        if not self._exact:
            log.warning(
                "%d GPUs exceed the exact allocator's limit of %d: preferred allocations "
                "will be greedy (best-connected set, packing of the rest ignored)",
                n,
                MAX_EXACT_GPUS,
            )
            self._scores: array[int] = array("q")
            return
        self._scores = subset_scores(self._weights)
        if not lazy_tables(n):
            self.warm()

    @classmethod
    def from_snapshot(cls, snapshot: Snapshot) -> Allocator:
        """An allocator keyed by GPU UUID, with pair scores from the snapshot's links.

        A snapshot without a full link matrix (topology unreadable) scores every pair alike,
        so choices fall back to the lowest positions.
        """
        ids = [gpu.uuid for gpu in snapshot.gpus]
        n = len(ids)
        links = snapshot.links
        if len(links) != n or any(len(row) != n for row in links):
            if n > 1:
                log.warning("no topology for %d GPUs: every pair scores the same", n)
            return cls(ids, [[0] * n for _ in range(n)])
        scores = [[0 if i == j else pair_score(links[i][j]) for j in range(n)] for i in range(n)]
        return cls(ids, scores)

    @property
    def lazy(self) -> bool:
        """True when tables are left to first use or :meth:`warm` (see :func:`lazy_tables`)."""
        return lazy_tables(len(self._ids))

    @property
    def ids(self) -> tuple[str, ...]:
        """Device ids by position (the tie-break order)."""
        return self._ids

    def score(self, devices: Iterable[str]) -> int:
        """The score of a set of known devices: the sum of its pair scores."""
        positions = sorted({self._position[d] for d in devices})
        return sum(self._weights[i][j] for i, j in combinations(positions, 2))

    def stats(self) -> TableStats:
        """Which tables exist and how much memory they hold."""
        built = dict(self._tables)  # copies: a build may add one meanwhile
        plans = list(self._plans.values())
        tables = [self._scores, *built.values(), *(plan.order for plan in plans)]
        sizes = tuple(sorted(built))
        nbytes = sum(t.itemsize * len(t) for t in tables)
        return TableStats(len(self._ids), self._exact, sizes, nbytes)

    def warm(self, sizes: Iterable[int] | None = None) -> None:
        """Build the packing tables for ``sizes`` (default: every size) now rather than lazily.

        Also answers the free node's request (everything available, nothing required) of each
        size, the one a node without allocations always asks. At 16 GPUs every size together
        takes a few seconds of CPU; a daemon can call this in a background thread after
        start-up.
        """
        if not self._exact:
            return
        n = len(self._ids)
        everything = (1 << n) - 1
        for k in range(2, n + 1) if sizes is None else sizes:
            if 2 <= k < n and k not in self._idle:
                self._idle[k] = self._best_set(everything, 0, k)

    def preferred(
        self, available: Sequence[str], must_include: Sequence[str], size: int
    ) -> list[str]:
        """The best ``size`` devices out of ``available`` holding ``must_include``, by position.

        Impossible requests (size out of range, unknown ids, must-include devices that are not
        available or more than ``size``) return [] and log a warning.
        """
        request = self._parse(available, must_include, size)
        if request is None:
            return []
        avail_mask, must_mask, n = request
        if size == n:
            chosen = avail_mask
        elif not self._exact:
            chosen = self._greedy(avail_mask, must_mask, size)
        elif size == 1:
            # Every singleton scores 0 and so does packing the rest into singletons.
            chosen = must_mask or (avail_mask & -avail_mask)
        else:
            chosen = self._best_set(avail_mask, must_mask, size)
        return [self._ids[i] for i in _positions(chosen)]

    def _parse(
        self, available: Sequence[str], must_include: Sequence[str], size: int
    ) -> tuple[int, int, int] | None:
        """(available mask, must-include mask, available count), or None when impossible."""
        unknown = [d for d in (*available, *must_include) if d not in self._position]
        if unknown:
            log.warning("preferred allocation: unknown devices %s", sorted(set(unknown)))
            return None
        avail_mask = _mask(self._position[d] for d in available)
        must_mask = _mask(self._position[d] for d in must_include)
        n = avail_mask.bit_count()
        problem = impossible_request(n, list(dict.fromkeys(must_include)), size, set(available))
        if problem:
            log.warning(
                "preferred allocation impossible: %s (available=%s must_include=%s)",
                problem,
                list(available),
                list(must_include),
            )
            return None
        return avail_mask, must_mask, n

    def _best_set(self, avail_mask: int, must_mask: int, size: int) -> int:
        """The optimal set as a mask (answers are cached)."""
        if must_mask == 0 and avail_mask == (1 << len(self._ids)) - 1:
            idle = self._idle.get(size)
            if idle is not None:
                return idle
        key = (avail_mask, must_mask, size)
        with self._lock:
            cached = self._results.get(key)
        if cached is not None:
            return cached
        plan = self._plan(size)
        free = avail_mask & ~must_mask
        picks = size - must_mask.bit_count()
        if comb(free.bit_count(), picks) * SCAN_RATIO <= len(plan.order):
            # Few candidates (a small node, or many must-include devices): listing them costs
            # less than filtering the node's every k-set on the way to them.
            chosen = _scan(plan, self._scores, avail_mask, must_mask, size)
        else:
            chosen = _walk(plan, self._scores, avail_mask, must_mask, size)
        with self._lock:
            if len(self._results) >= RESULT_CACHE_SIZE:
                self._results.pop(next(iter(self._results)))  # oldest first
            self._results[key] = chosen
        return chosen

    def _plan(self, size: int) -> _SizePlan:
        """The size's table, walk order and bounds, built on first use."""
        plan = self._plans.get(size)
        if plan is None:
            # One builder at a time; requests of other, built sizes go on meanwhile.
            with self._build_lock:
                plan = self._plans.get(size)
                if plan is None:
                    plan = self._build_plan(size)
                    self._plans[size] = plan
        return plan

    def _build_plan(self, size: int) -> _SizePlan:
        """Build one size's plan (the caller holds the build lock)."""
        n = len(self._ids)
        scores = self._scores
        if 2 * size >= n:
            # Whatever is left after taking ``size`` devices fits in one group.
            pack = scores
        else:
            pack = packing_table(scores, n, size)
            self._tables[size] = pack
        bits = [1 << i for i in range(n)]
        sets = sorted(map(sum, combinations(bits, size)), key=scores.__getitem__, reverse=True)
        bound = tuple(
            max(map(pack.__getitem__, map(sum, combinations(bits, r))))
            for r in range(n - size + 1)
        )
        return _SizePlan(pack, array(_typecode(1 << n), sets), bound)

    def _greedy(self, avail_mask: int, must_mask: int, size: int) -> int:
        """Beyond MAX_EXACT_GPUS: grow the set by the device adding the most score."""
        chosen = must_mask
        rest = _positions(avail_mask & ~must_mask)
        while chosen.bit_count() < size:
            members = _positions(chosen)
            gain = [sum(self._weights[p][q] for q in members) for p in rest]
            pick = rest.pop(gain.index(max(gain)))
            chosen |= 1 << pick
        return chosen


def _scan(plan: _SizePlan, scores: array[int], avail_mask: int, must_mask: int, size: int) -> int:
    """The same answer as :func:`_walk`, by one pass over every candidate set.

    Candidates in lexicographic order of positions (combinations() order), so the first of
    equal keys wins the tie-break. Whichever of the picked / unpicked devices is fewer is
    enumerated: shorter tuples, and the complements of lexicographically ordered j-subsets
    are the (f - j)-subsets in reverse lexicographic order.
    """
    free_bits = list(_bits(avail_mask & ~must_mask))
    picks = size - must_mask.bit_count()
    unpicked = len(free_bits) - picks
    if picks <= unpicked:
        candidates = list(map(sum, combinations(free_bits, picks), repeat(must_mask)))
        rests = list(map(sub, repeat(avail_mask), candidates))
    else:
        rests = list(map(sum, combinations(free_bits, unpicked)))
        rests.reverse()
        candidates = list(map(sub, repeat(avail_mask), rests))
    set_score = scores.__getitem__
    totals = list(map(add, map(set_score, candidates), map(plan.pack.__getitem__, rests)))
    best_total = max(totals)
    if totals.count(best_total) == 1:
        return candidates[totals.index(best_total)]
    tied = list(compress(candidates, map(eq, totals, repeat(best_total))))
    tied_scores = list(map(set_score, tied))
    return tied[tied_scores.index(max(tied_scores))]


def _walk(plan: _SizePlan, scores: array[int], avail_mask: int, must_mask: int, size: int) -> int:
    """The best ``size``-set inside ``avail_mask`` holding ``must_mask`` (see the module doc).

    Sets come best-first, so the first to reach a total keeps it on ties; the walk ends once
    no later set can reach the best total (its score, plus the most any rest can pack, is
    below it).
    """
    order = plan.order
    # S fits iff S & (~A | M) == M: no device outside A, every must-include device in.
    outside = ~avail_mask | must_mask
    fitting = compress(order, map(eq, map(and_, order, repeat(outside)), repeat(must_mask)))
    rest_bound = plan.pack_bound[avail_mask.bit_count() - size]
    pack = plan.pack
    best_total = -1
    chosen = 0
    for candidate in fitting:
        set_score = scores[candidate]
        if set_score + rest_bound <= best_total:
            break
        total = set_score + pack[avail_mask ^ candidate]
        if total > best_total:
            best_total = total
            chosen = candidate
    return chosen


def _checked_weights(ids: tuple[str, ...], scores: Sequence[Sequence[int]]) -> list[list[int]]:
    """The score matrix as lists, validated; the diagonal is ignored (set to 0)."""
    n = len(ids)
    if len(set(ids)) != n:
        raise ValueError(f"duplicate device ids: {sorted(i for i in set(ids) if ids.count(i) > 1)}")
    if len(scores) != n or any(len(row) != n for row in scores):
        raise ValueError(f"scores must be a {n}x{n} matrix")
    weights = [[0 if i == j else int(scores[i][j]) for j in range(n)] for i in range(n)]
    for i in range(n):
        for j in range(i + 1, n):
            if weights[i][j] != weights[j][i]:
                raise ValueError(f"scores are not symmetric at ({i}, {j})")
            if weights[i][j] < 0:
                raise ValueError(f"negative score at ({i}, {j})")
    return weights


def subset_scores(weights: Sequence[Sequence[int]]) -> array[int]:
    """score(X) for every subset X of the GPUs, indexed by bitmask.

    Built by doubling: the subsets holding GPU i as highest member are those without it plus
    the sums of i's scores with their members.
    """
    total = sum(sum(row) for row in weights) // 2
    scores: array[int] = array(_typecode(total), [0])
    for i, row in enumerate(weights):
        row_sums = [0]
        for j in range(i):
            weight = row[j]
            row_sums += [s + weight for s in row_sums]
        scores.extend(map(add, scores, row_sums))
    return scores


def lazy_tables(gpus: int) -> bool:
    """Whether an allocator of ``gpus`` GPUs leaves its tables to first use or warm()
    (N = 13..16: 0.2-1.9 s per size) rather than building them all in its constructor."""
    if gpus > MAX_EXACT_GPUS:
        return False  # greedy: no tables at all
    return sum(packing_steps(gpus, k) for k in range(2, gpus + 1)) > EAGER_STEPS


def impossible_request(
    available: int, must_include: Sequence[str], size: int, offered: Container[str]
) -> str | None:
    """Why no preferred set exists, or None: ``available`` distinct devices are ``offered``;
    ``must_include`` is distinct. The one check of every preferred-allocation path."""
    if size <= 0:
        return f"allocation size {size} is not positive"
    if size > available:
        return f"allocation size {size} exceeds the {available} available devices"
    missing = [i for i in must_include if i not in offered]
    if missing:
        return f"must-include devices not available: {', '.join(missing)}"
    if len(must_include) > size:
        return f"{len(must_include)} must-include devices exceed allocation size {size}"
    return None


def packing_steps(n: int, size: int) -> int:
    """How many candidate groups packing_table(n, size) examines (its cost model)."""
    steps = 0
    for s in range(size + 1, n - size + 1):
        leftover = s % size
        per_set = comb(s - 1, size - 1) + (comb(s - 1, leftover - 1) if leftover else 0)
        steps += comb(n, s) * per_set
    return steps


def packing_table(scores: array[int], n: int, size: int) -> array[int]:
    """pack(X) for every subset X of ``n`` GPUs: groups of ``size`` plus one leftover group.

    ``pack(X) = score(X)`` while ``|X| <= size`` (one group, full or leftover). Beyond that the
    lowest member of ``X`` is either in a full group G (pack(X - G), same leftover to come) or
    in the leftover group L (pack(X - L), a perfect packing); subsets are visited by size, so
    both are known. Only sizes up to ``n - size`` are ever looked up.
    """
    table = array(scores.typecode, scores)
    set_score = scores.__getitem__
    packed = table.__getitem__
    bits = [1 << i for i in range(n)]
    for s in range(size + 1, n - size + 1):
        leftover = s % size
        for members in combinations(bits, s):
            subset = sum(members)
            low, rest = members[0], members[1:]
            best = _best_split(subset, low, rest, size - 1, set_score, packed)
            if leftover:
                best = max(best, _best_split(subset, low, rest, leftover - 1, set_score, packed))
            table[subset] = best
    return table


def _best_split(
    subset: int,
    low: int,
    rest: tuple[int, ...],
    partners: int,
    set_score: Callable[[int], int],
    packed: Callable[[int], int],
) -> int:
    """max score(G) + packed(subset - G) over groups G = low + ``partners`` members of rest."""
    remaining = len(rest) - partners
    # Enumerate whichever side is smaller; the C-level map pipeline keeps this the hot loop.
    if partners <= remaining:
        groups = list(map(sum, combinations(rest, partners), repeat(low)))
        # Annotated rather than int()-ed: operator.add is untyped, and this is the hot loop.
        best: int = max(map(add, map(set_score, groups),
                            map(packed, map(sub, repeat(subset), groups))))
        return best
    others = list(map(sum, combinations(rest, remaining)))
    best = max(map(add, map(set_score, map(sub, repeat(subset), others)), map(packed, others)))
    return best


def _typecode(bound: int) -> str:
    """The smallest array typecode holding 0..bound."""
    return "i" if bound < 2**31 else "q"


def _mask(positions: Iterable[int]) -> int:
    mask = 0
    for p in positions:
        mask |= 1 << p
    return mask


def _bits(mask: int) -> Iterable[int]:
    """The single-bit masks of ``mask``, lowest first."""
    while mask:
        low = mask & -mask
        yield low
        mask ^= low


def _positions(mask: int) -> list[int]:
    return [b.bit_length() - 1 for b in _bits(mask)]

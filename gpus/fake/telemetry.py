"""The fake NVML's telemetry: values that move plausibly and deterministically.

Everything is a function of the GPU's UUID (a phase, so GPUs differ) and a step counter that
only moves when told (:meth:`Telemetry.advance`, ``FakeNvml.advance_telemetry``), so tests see
the same numbers on every run. With ``follow_time`` the counter also advances one step per
wall-clock second, for demos. Counters (energy, PCIe replays, NVLink traffic, ECC errors,
remapped rows) only grow; injected XIDs and ECC events bump the counters they concern.

Per-model figures (power range, clocks, which sensors exist) are keyed by architecture: what
real parts of each generation report, not any one board's exact numbers.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from gpus.model import MIB
from gpus.records import record

STEP_S = 1.0  # one step is one second of simulated time (energy = power x time)


@record
class ArchFigures:
    """What a generation's data-center parts report."""

    idle_w: float
    max_w: float
    sm_clock_max: int  # MHz
    mem_clock: int  # MHz
    memory_temp: bool  # HBM parts report a memory temperature; GDDR parts do not
    row_remapping: bool  # Ampere and later remap rows; older parts retire pages instead
    gpm: bool  # NVML GPM (nvmlGpmQueryDeviceSupport): Hopper and later
    decoders: bool = True


ARCH_FIGURES: dict[str, ArchFigures] = {
    "blackwell": ArchFigures(120.0, 1000.0, 1965, 3996, True, True, True),
    "hopper": ArchFigures(70.0, 700.0, 1980, 2619, True, True, True),
    "ampere": ArchFigures(50.0, 400.0, 1410, 1593, True, True, False),
    "ada": ArchFigures(30.0, 350.0, 2520, 9001, False, True, False),
    "volta": ArchFigures(40.0, 300.0, 1530, 877, True, False, False),
    "turing": ArchFigures(10.0, 70.0, 1590, 5001, False, False, False),
}
_DEFAULT_FIGURES = ArchFigures(30.0, 250.0, 1500, 5000, False, False, False)

# XIDs that concern memory errors (NVIDIA's XID catalogue): 48 double-bit ECC, 63 a row
# remapping was recorded, 64 recording a remapping failed, 94/95 contained/uncontained ECC.
XID_DBE = 48
XID_ROW_REMAP = 63
XID_ROW_REMAP_FAILURE = 64
XID_ECC = (94, 95)


def figures(architecture: str) -> ArchFigures:
    """The figures of an architecture (a generic part for unknown ones)."""
    return ARCH_FIGURES.get(architecture, _DEFAULT_FIGURES)


@record
class FakeProcess:
    """A process the fake says runs on a GPU or MIG device."""

    pid: int
    used_mib: int
    sm_util: int = 0  # percent of the device's SMs this process kept busy


@dataclass
class GpuCounters:
    """A GPU's counters: they only grow."""

    energy_mj: int = 0
    pcie_replays: int = 0
    nvlink_rx_kib: int = 0
    nvlink_tx_kib: int = 0
    # (corrected?, aggregate?) -> count; volatile counts reset with the driver, aggregate never
    ecc: dict[tuple[bool, bool], int] = field(default_factory=dict)
    remapped_correctable: int = 0
    remapped_uncorrectable: int = 0
    remap_pending: bool = False
    remap_failure: bool = False


def _phase(uuid: str) -> float:
    digest = hashlib.sha256(uuid.encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 * 2 * math.pi


class Telemetry:
    """Telemetry for a profile's GPUs (by UUID); the caller holds the fake's lock."""

    def __init__(self, uuids: list[str], clock: Callable[[], float] = time.monotonic) -> None:
        self._phases = {uuid: _phase(uuid) for uuid in uuids}
        self.counters: dict[str, GpuCounters] = {uuid: GpuCounters() for uuid in uuids}
        # device UUID (GPU or MIG) -> its processes; set by tests and the control socket
        self.processes: dict[str, list[FakeProcess]] = {}
        self._manual_steps = 0
        self._accounted = 0  # steps already added to the counters
        self._clock = clock
        self._since: float | None = None

    # -- the step counter -----------------------------------------------------------------------

    @property
    def step(self) -> int:
        """Steps so far: advanced by hand, plus wall-clock seconds while following time."""
        followed = 0 if self._since is None else int((self._clock() - self._since) / STEP_S)
        return self._manual_steps + followed

    def advance(self, steps: int = 1) -> None:
        """Move every value ``steps`` steps on."""
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        self._manual_steps += steps

    def follow_time(self, on: bool = True) -> None:
        """Also advance one step per second of wall-clock time (for demos), or stop doing so."""
        if on and self._since is None:
            self._since = self._clock()
        elif not on and self._since is not None:
            self._manual_steps = self.step
            self._since = None

    # -- values ---------------------------------------------------------------------------------

    def gpu_util(self, uuid: str, mig_uuids: list[str], step: int | None = None) -> int:
        """GPU utilisation in percent: the processes' SM use if any run, else a slow wave."""
        procs = [p for u in (uuid, *mig_uuids) for p in self.processes.get(u, [])]
        if procs:
            return min(100, sum(p.sm_util for p in procs))
        k = self.step if step is None else step
        return max(0, min(100, round(50 + 45 * math.sin(k * 0.3 + self._phases[uuid]))))

    def power_mw(self, uuid: str, util: int, fig: ArchFigures) -> int:
        """Power draw in mW: idle plus a share of the range by utilisation, a little ripple."""
        ripple = 0.01 * fig.max_w * math.sin(self.step * 1.7 + self._phases[uuid])
        watts = fig.idle_w + (fig.max_w - fig.idle_w) * util / 100 + ripple
        return max(0, round(watts * 1000))

    def gpu_temp(self, uuid: str, util: int) -> int:
        """Degrees C: warmer with load."""
        return round(32 + util * 0.4 + 2 * math.sin(self.step * 0.11 + self._phases[uuid]))

    def sm_clock(self, util: int, fig: ArchFigures) -> int:
        """MHz: boosts with load."""
        return round(fig.sm_clock_max * (0.3 + 0.7 * util / 100))

    def used_bytes(self, device_uuid: str, total: int, wave_uuid: str | None = None) -> int:
        """Memory in use: the processes' memory if any run, else a share that follows the wave."""
        procs = self.processes.get(device_uuid, [])
        if procs:
            return min(total, sum(p.used_mib for p in procs) * MIB)
        if wave_uuid is None:
            return 0
        share = (math.sin(self.step * 0.05 + self._phases[wave_uuid]) + 1) / 4  # 0..50 %
        return int(total * share) // MIB * MIB

    @staticmethod
    def reserved_bytes(total: int) -> int:
        """What the driver keeps for itself (about 0.6 %, as recent drivers report)."""
        return (total // 160) // MIB * MIB

    # -- counters -------------------------------------------------------------------------------

    def catch_up(self, power_of: Callable[[str, int], tuple[int, int, bool]]) -> None:
        """Add the steps not yet counted: ``power_of(uuid, step)`` -> (mW, util, nvlink?)."""
        now = self.step
        for k in range(self._accounted, now):
            for uuid, counters in self.counters.items():
                milliwatts, util, nvlink = power_of(uuid, k)
                counters.energy_mj += round(milliwatts * STEP_S)
                if nvlink:
                    counters.nvlink_rx_kib += util * 2048
                    counters.nvlink_tx_kib += util * 1536
                # a replay now and then on some GPUs, as on real PCIe links
                if (k + int(self._phases[uuid] * 100)) % 97 == 0:
                    counters.pcie_replays += 1
        self._accounted = max(self._accounted, now)

    def on_xid(self, uuid: str, xid: int) -> None:
        """An injected XID bumps the counters it concerns."""
        counters = self.counters[uuid]
        if xid == XID_DBE or xid in XID_ECC:
            self.on_ecc(uuid, double_bit=True)
        elif xid == XID_ROW_REMAP:
            counters.remapped_uncorrectable += 1
            counters.remap_pending = True
        elif xid == XID_ROW_REMAP_FAILURE:
            counters.remap_failure = True

    def on_ecc(self, uuid: str, double_bit: bool) -> None:
        """An injected ECC error: volatile and aggregate counts, and a remapped row."""
        counters = self.counters[uuid]
        corrected = not double_bit
        for aggregate in (False, True):
            key = (corrected, aggregate)
            counters.ecc[key] = counters.ecc.get(key, 0) + 1
        if double_bit:
            counters.remapped_uncorrectable += 1
        else:
            counters.remapped_correctable += 1


__all__ = ["ARCH_FIGURES", "ArchFigures", "FakeProcess", "GpuCounters", "Telemetry", "figures"]

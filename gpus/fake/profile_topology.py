"""A profile's ``topology`` section: PCIe levels, direct NVLinks and NVSwitches between GPUs."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from gpus.fake.profile_fields import FieldReader
from gpus.fake.profile_model import (
    NVSWITCH_PCI_DEVICE_IDS,
    TOPOLOGY_LEVELS,
    GpuSpec,
    NvSwitchSpec,
    Topology,
)


class TopologyReader(FieldReader):
    """The ``topology`` section, checked against the profile's GPUs."""

    def topology(self, gpus: tuple[GpuSpec, ...]) -> Topology:
        """Pairwise levels and NVLink counts from the compact ``topology`` section."""
        data = self.get(self.raw, "topology", "topology", dict, {})
        self.check_keys(data, ("pcie", "default", "nvlink", "nvswitch"), "topology")
        n = len(gpus)
        default = self.get(data, "default", "topology.default", str, "numa")
        if default != "numa" and default not in TOPOLOGY_LEVELS:
            raise self.fail(
                "topology.default", f"expected 'numa' or one of {', '.join(TOPOLOGY_LEVELS)}"
            )
        levels = [
            [0 if i == j else self.default_level(default, gpus[i], gpus[j]) for j in range(n)]
            for i in range(n)
        ]
        pcie = self.get(data, "pcie", "topology.pcie", dict, {})
        for level_name, groups in pcie.items():
            field = f"topology.pcie.{level_name}"
            if level_name not in TOPOLOGY_LEVELS:
                raise self.fail(field, f"unknown level (one of {', '.join(TOPOLOGY_LEVELS)})")
            for group in self.groups(groups, n, field):
                for i in group:
                    for j in group:
                        if i != j:
                            levels[i][j] = min(levels[i][j], TOPOLOGY_LEVELS[level_name])
        nvlinks = self.nvlinks(data, gpus)
        switch = self.nvswitch(data, gpus, nvlinks)
        return Topology(
            levels=tuple(map(tuple, levels)), nvlinks=tuple(map(tuple, nvlinks)), nvswitch=switch
        )

    @staticmethod
    def default_level(default: str, a: GpuSpec, b: GpuSpec) -> int:
        """The level of a pair no group mentions."""
        if default != "numa":
            return TOPOLOGY_LEVELS[default]
        same = a.numa_node is not None and a.numa_node == b.numa_node
        return TOPOLOGY_LEVELS["node" if same else "system"]

    def groups(self, groups: Any, n: int, field: str) -> list[list[int]]:
        """A list of lists of GPU indices."""
        if not isinstance(groups, list):
            raise self.fail(field, "expected a list of GPU index lists")
        for k, group in enumerate(groups):
            if not isinstance(group, list) or not all(
                isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n for i in group
            ):
                raise self.fail(f"{field}[{k}]", f"expected a list of GPU indices 0..{n - 1}")
        return groups

    def nvlinks(self, data: Mapping[str, Any], gpus: tuple[GpuSpec, ...]) -> list[list[int]]:
        """Direct GPU-to-GPU NVLink counts from "i-j: count" entries."""
        n = len(gpus)
        counts = [[0] * n for _ in range(n)]
        raw = self.get(data, "nvlink", "topology.nvlink", dict, {})
        for key, count in raw.items():
            field = f"topology.nvlink.{key}"
            match = re.fullmatch(r"(\d+)-(\d+)", str(key))
            if not match:
                raise self.fail(field, "keys are GPU index pairs like 0-1")
            i, j = int(match.group(1)), int(match.group(2))
            if i == j or i >= n or j >= n:
                raise self.fail(field, f"expected two different GPU indices 0..{n - 1}")
            if not isinstance(count, int) or isinstance(count, bool) or count < 1:
                raise self.fail(field, "expected a positive link count")
            counts[i][j] = counts[j][i] = count
        for gpu in gpus:
            used = sum(counts[gpu.index])
            if used > gpu.model.nvlinks:
                raise self.fail(
                    "topology.nvlink",
                    f"GPU {gpu.index} ({gpu.model.name}) has "
                    f"{gpu.model.nvlinks} NVLinks, the profile uses {used}",
                )
        return counts

    def nvswitch(
        self, data: Mapping[str, Any], gpus: tuple[GpuSpec, ...], nvlinks: list[list[int]]
    ) -> NvSwitchSpec | None:
        """The NVSwitch fabric, if any (exclusive with direct links)."""
        raw = self.get(data, "nvswitch", "topology.nvswitch", dict, None)
        if raw is None:
            return None
        self.check_keys(raw, ("bus_ids", "pci_device_id"), "topology.nvswitch")
        if any(any(row) for row in nvlinks):
            raise self.fail("topology.nvswitch", "cannot be combined with direct topology.nvlink")
        bus_ids = self.get(raw, "bus_ids", "topology.nvswitch.bus_ids", list)
        if not bus_ids:
            raise self.fail("topology.nvswitch.bus_ids", "at least one switch is required")
        ids = tuple(
            self.bus_id(str(b), f"topology.nvswitch.bus_ids[{k}]") for k, b in enumerate(bus_ids)
        )
        clash = set(ids) & {g.bus_id for g in gpus}
        if clash:
            raise self.fail("topology.nvswitch.bus_ids", f"{sorted(clash)[0]} is also a GPU")
        dev_id = self.get(raw, "pci_device_id", "topology.nvswitch.pci_device_id", int)
        if dev_id not in NVSWITCH_PCI_DEVICE_IDS:
            raise self.fail(
                "topology.nvswitch.pci_device_id", f"{dev_id:#010x} is not a known NVSwitch"
            )
        return NvSwitchSpec(bus_ids=ids, pci_device_id=dev_id)

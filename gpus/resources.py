"""The resource map: Snapshot + Config (+ current health) -> {resource name: devices}.

Recomputed, never patched: a health change or a config reload builds a new map, and the device
plugin's manager applies the difference. GFD labels read the same map, so both daemons agree on
what a node offers.

SKELETON: the dataclasses below are the agreed interface; build_resource_map is being implemented.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from gpus.model import GPU, MigDevice

HEALTHY = "Healthy"
UNHEALTHY = "Unhealthy"


@dataclass(frozen=True)
class Device:
    """One advertised device: a whole GPU, a MIG device, or a time-slicing replica of either."""

    id: str  # what the kubelet sees: "GPU-…", "MIG-…", or "<uuid>::<n>" for replicas
    uuid: str  # the physical GPU's or MIG device's UUID (id without the replica suffix)
    gpu: GPU  # the physical GPU (the parent, for MIG devices)
    mig: MigDevice | None = None
    replica: int | None = None
    healthy: bool = True

    @property
    def numa_node(self) -> int | None:
        """NUMA node for ListAndWatch topology; MIG devices and replicas inherit the GPU's."""
        return self.gpu.numa_node

    @property
    def index(self) -> str:
        """NVIDIA's device index: "<gpu>" or "<gpu>:<mig index>" (for --device-id-strategy=index)."""
        if self.mig is not None:
            return f"{self.gpu.index}:{self.mig.index}"
        return str(self.gpu.index)


@dataclass(frozen=True)
class Resource:
    """One advertised resource: what one gRPC server serves."""

    name: str  # "nvidia.com/gpu", "nvidia.com/mig-1g.5gb", "nvidia.com/gpu.shared"
    devices: tuple[Device, ...]
    replicas: int = 1  # 1 when not shared
    fail_requests_greater_than_one: bool = False

    @property
    def shared(self) -> bool:
        """True when devices are time-slicing replicas."""
        return self.replicas > 1


@dataclass(frozen=True)
class ResourceMap:
    """All resources of a node plus the problems found while building them."""

    resources: Mapping[str, Resource] = field(default_factory=dict)
    # Human-readable problems (invalid MIG layouts for the strategy, unknown devices in the
    # sharing config...). Each names the GPUs and the reason; the daemons log and expose them.
    problems: tuple[str, ...] = ()

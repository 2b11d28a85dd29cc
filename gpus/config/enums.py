"""The strategies and policies a setting chooses from, as str-valued Enums.

Members are ``str`` subclasses, so ``flags.mig_strategy == "mixed"``, dictionary look-ups by
the plain string and ``",".join(...)`` keep working; ``str()`` and f-strings give the value
("mixed", never "MigStrategy.MIXED"), so labels, env values and messages are unchanged.
"""

from __future__ import annotations

import enum


class Choice(str, enum.Enum):
    """Base of the choice Enums: prints as its value. (format() follows an overridden __str__
    on 3.10 and later, so f-strings need nothing more.)"""

    def __str__(self) -> str:
        return str.__str__(self)


class MigStrategy(Choice):
    """``--mig-strategy``: how MIG devices are advertised."""

    NONE = "none"
    SINGLE = "single"
    MIXED = "mixed"


class DeviceListStrategy(Choice):
    """``--device-list-strategy``: how Allocate hands devices to the runtime."""

    ENVVAR = "envvar"
    VOLUME_MOUNTS = "volume-mounts"
    CDI_ANNOTATIONS = "cdi-annotations"
    CDI_CRI = "cdi-cri"


class DeviceIdStrategy(Choice):
    """``--device-id-strategy``: the ids handed to the runtime."""

    UUID = "uuid"
    INDEX = "index"


class AllocationPolicy(Choice):
    """``--shared-devices-allocation-policy`` (ours): preferred allocation of shared devices."""

    DISTRIBUTED = "distributed"
    PACKED = "packed"


class DeviceDiscoveryStrategy(Choice):
    """``--device-discovery-strategy``: how GPUs are found. NVIDIA's ``tegra`` (integrated
    GPUs, found through CSV files) is refused with a reason (see the row in model.py)."""

    AUTO = "auto"
    NVML = "nvml"


class LogLevel(Choice):
    """``--log-level`` (ours, both daemons): logging verbosity; read in any case."""

    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


class OutputMode(Choice):
    """GFD's ``--output-mode`` (ours): where labels go."""

    FILE = "file"
    NODE_API = "node-api"
    BOTH = "both"
    NODE_FEATURE = "node-feature"


class GpuIdType(Choice):
    """``--kubernetes-gpu-id-type`` (the exporter): how device ids in PodResources name GPUs."""

    UID = "uid"
    DEVICE_NAME = "device-name"


class SharingStrategy(Choice):
    """How GPUs are shared (``gpu.sharing-strategy``); derived from ``sharing``, not a flag."""

    NONE = "none"
    TIME_SLICING = "time-slicing"
    MPS = "mps"


def values(choice: type[Choice]) -> tuple[str, ...]:
    """The plain strings of ``choice``'s members, in declaration order."""
    return tuple(member.value for member in choice)


MIG_STRATEGIES = values(MigStrategy)
DEVICE_LIST_STRATEGIES = values(DeviceListStrategy)
DEVICE_ID_STRATEGIES = values(DeviceIdStrategy)
ALLOCATION_POLICIES = values(AllocationPolicy)
DEVICE_DISCOVERY_STRATEGIES = values(DeviceDiscoveryStrategy)
LOG_LEVELS = values(LogLevel)
OUTPUT_MODES = values(OutputMode)

"""The configuration's frozen dataclasses (NVIDIA's ``api/config/v1`` types)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

MIG_STRATEGIES = ("none", "single", "mixed")
DEVICE_LIST_STRATEGIES = ("envvar", "volume-mounts", "cdi-annotations", "cdi-cri")
DEVICE_ID_STRATEGIES = ("uuid", "index")
ALLOCATION_POLICIES = ("distributed", "packed")
# Ours (NVIDIA has no bound): a typo such as 1000000 would otherwise build millions of devices
# and take the plugin down; 1024 per GPU is far beyond any useful time-slicing factor.
MAX_REPLICAS = 1024

VERSION = "v1"
RESOURCE_PREFIX = "nvidia.com"
SHARED_SUFFIX = ".shared"  # NVIDIA's DefaultSharedResourceNameSuffix
MAX_RESOURCE_NAME_LENGTH = 63

Program = Literal["plugin", "gfd"]
PROGRAM_DEST = "nvk_program"  # hidden argparse default telling resolve() which daemon it serves


@dataclass(frozen=True)
class PluginFlags:
    """``flags.plugin``: options only the device plugin reads."""

    pass_device_specs: bool = False
    device_list_strategy: tuple[str, ...] = ("envvar",)
    device_id_strategy: str = "uuid"
    shared_devices_allocation_policy: str = "distributed"
    kubelet_socket: str = "/var/lib/kubelet/device-plugins/kubelet.sock"
    cdi_spec_dir: str = "/var/run/cdi"
    # Ours (NVIDIA never recovers): seconds between probes of an unhealthy device, and the
    # quiet period with no new critical XID before it is Healthy again. 0 disables recovery.
    health_recovery_interval: float = 5.0
    health_quiet_period: float = 30.0


@dataclass(frozen=True)
class GfdFlags:
    """``flags.gfd``: options only GPU feature discovery reads."""

    oneshot: bool = False
    no_timestamp: bool = False
    sleep_interval: float = 60.0  # seconds; the file accepts Go durations like "60s"
    output_file: str = "/etc/kubernetes/node-feature-discovery/features.d/gfd"
    machine_type_file: str = "/sys/class/dmi/id/product_name"


@dataclass(frozen=True)
class Flags:
    """``flags``: options both daemons read."""

    mig_strategy: str = "none"
    fail_on_init_error: bool = True
    nvidia_driver_root: str = "/"
    nvidia_dev_root: str = ""  # empty: same as the driver root
    nvml: str = "real"  # ours: "real" or "fake:<profile name or path>"
    sysfs_root: str = "/"  # ours: where /sys is read from (tests and simulation point it elsewhere)
    plugin: PluginFlags = field(default_factory=PluginFlags)
    gfd: GfdFlags = field(default_factory=GfdFlags)

    @property
    def dev_root(self) -> str:
        """Where device nodes live: the dev root, else the driver root."""
        return self.nvidia_dev_root or self.nvidia_driver_root


@dataclass(frozen=True)
class ReplicatedResource:
    """One ``sharing.timeSlicing.resources[]`` entry."""

    name: str  # "nvidia.com/gpu" or "nvidia.com/mig-1g.5gb"
    replicas: int  # >= 2
    rename: str = ""  # advertise under this name instead
    # Which devices are shared: None = all; an int = the first N; a tuple = GPU indices ("0"),
    # MIG indices ("0:1") or UUIDs ("GPU-...", "MIG-...").
    devices: int | tuple[str, ...] | None = None


@dataclass(frozen=True)
class TimeSlicing:
    """``sharing.timeSlicing``."""

    rename_by_default: bool = False
    fail_requests_greater_than_one: bool = False
    resources: tuple[ReplicatedResource, ...] = ()

    def shared_name(self, resource: ReplicatedResource) -> str:
        """The name ``resource``'s replicas are advertised under.

        An explicit ``rename`` wins; else ``<name>.shared`` with ``renameByDefault``; else the
        unchanged name.
        """
        if resource.rename:
            return resource.rename
        if self.rename_by_default:
            return resource.name + SHARED_SUFFIX
        return resource.name


@dataclass(frozen=True)
class Sharing:
    """``sharing``."""

    time_slicing: TimeSlicing = field(default_factory=TimeSlicing)


@dataclass(frozen=True)
class Config:
    """A whole, validated configuration."""

    version: str = "v1"
    flags: Flags = field(default_factory=Flags)
    sharing: Sharing = field(default_factory=Sharing)
    config_file: str = ""  # the file this came from ("" when none); for logs and reloads


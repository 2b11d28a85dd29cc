"""The configuration table: NVIDIA's ``api/config/v1`` as frozen dataclasses.

Every setting is one field written with :func:`~gpus.config.table.setting`: adding a setting is
one row here plus the code that uses it (see docs/config.md, "Adding a setting").
Field names are snake_case; the file's keys are NVIDIA's camelCase.
"""

from __future__ import annotations

from dataclasses import field

from gpus.records import record

from .enums import (
    AllocationPolicy,
    DeviceDiscoveryStrategy,
    DeviceIdStrategy,
    DeviceListStrategy,
    GpuIdType,
    LogLevel,
    MigStrategy,
    OutputMode,
    SharingStrategy,
)
from .sharing import (
    ReplicatedResource,
    ResourceListKind,
    check_mps,
    check_names,
    check_sharing,
    shared_name,
)
from .table import Section, coerce_settings, section, setting
from .values import (
    BoolKind,
    ChoiceKind,
    ChoiceListKind,
    DurationKind,
    ImexChannelsKind,
    NumberKind,
    TextKind,
    TextListKind,
    VersionKind,
)

VERSION = "v1"
PROGRAM_DEST = "nvk_program"  # hidden argparse default telling resolve() which daemon it serves

BOOL = BoolKind()
TEXT = TextKind()
NONEMPTY = TextKind(nonempty=True)
SECONDS = DurationKind()
POSITIVE_SECONDS = DurationKind(allow_zero=False)

# NVIDIA's keys that we accept but do not implement: each is a warning naming file and line.
_TOP_IGNORED = ("resources",)  # NVIDIA ignores it too
_FLAGS_IGNORED = ("restartOnDeviceUnhealthy",)
_PLUGIN_IGNORED: tuple[str, ...] = ()
TEGRA_UNSUPPORTED = "Tegra (integrated GPUs) is not supported"
_TIME_SLICING_IGNORED = ("strategy",)  # an early NVIDIA field


def _plugin(*names: str) -> dict[str, tuple[str, ...]]:
    return {"plugin": names}


def _gfd(*names: str) -> dict[str, tuple[str, ...]]:
    return {"gfd": names}


def _both(*names: str) -> dict[str, tuple[str, ...]]:
    return {"plugin": names, "gfd": names}


def _exporter(*names: str) -> dict[str, tuple[str, ...]]:
    return {"exporter": names}


def _all(*names: str) -> dict[str, tuple[str, ...]]:
    return {"plugin": names, "gfd": names, "exporter": names}


@record(shared_init=True)
class PluginFlags:
    """``flags.plugin``: options only the device plugin reads."""

    pass_device_specs: bool = setting(
        False, kind=BOOL, flags=("--pass-device-specs",), env=_plugin("PASS_DEVICE_SPECS"),
        file="passDeviceSpecs", help="pass device specs to the kubelet in Allocate "
        "(default {default})")
    device_list_strategy: tuple[DeviceListStrategy, ...] = setting(
        (DeviceListStrategy.ENVVAR,), kind=ChoiceListKind(DeviceListStrategy),
        flags=("--device-list-strategy",), env=_plugin("DEVICE_LIST_STRATEGY"),
        file="deviceListStrategy",
        help="how Allocate passes devices: comma list of {choices} (default {default})")
    device_id_strategy: DeviceIdStrategy = setting(
        DeviceIdStrategy.UUID, kind=ChoiceKind(DeviceIdStrategy),
        flags=("--device-id-strategy",), env=_plugin("DEVICE_ID_STRATEGY"),
        file="deviceIDStrategy",
        help="device ids handed to the runtime: uuid or index (default {default})")
    # Ours: NVIDIA always distributes.
    shared_devices_allocation_policy: AllocationPolicy = setting(
        AllocationPolicy.DISTRIBUTED, kind=ChoiceKind(AllocationPolicy),
        flags=("--shared-devices-allocation-policy",),
        env=_plugin("SHARED_DEVICES_ALLOCATION_POLICY"), file="sharedDevicesAllocationPolicy",
        help="preferred allocation of replicas and MIG devices: distributed or packed "
        "(default {default})")
    kubelet_socket: str = setting(
        "/var/lib/kubelet/device-plugins/kubelet.sock", kind=TEXT, flags=("--kubelet-socket",),
        env=_plugin("KUBELET_SOCKET"), file="kubeletSocket", empty_is_value=True,
        help="kubelet registration socket; empty skips registration (default {default})")
    cdi_spec_dir: str = setting(  # ours
        "/var/run/cdi", kind=NONEMPTY, flags=("--cdi-spec-dir",), env=_plugin("CDI_SPEC_DIR"),
        file="cdiSpecDir", help="where the CDI spec is written (default {default})")
    # Ours (NVIDIA never recovers): seconds between probes of an unhealthy device, and the
    # quiet period with no new critical XID before it is Healthy again. 0 disables recovery.
    health_recovery_interval: float = setting(
        5.0, kind=SECONDS, flags=("--health-recovery-interval",),
        env=_plugin("HEALTH_RECOVERY_INTERVAL"), file="healthRecoveryInterval",
        help="seconds between probes of unhealthy devices; 0 disables recovery "
        "(default {default})")
    health_quiet_period: float = setting(
        30.0, kind=SECONDS, flags=("--health-quiet-period",),
        env=_plugin("HEALTH_QUIET_PERIOD"), file="healthQuietPeriod",
        help="seconds without a critical XID before a device is Healthy again "
        "(default {default})")
    # -- the CDI spec's settings (deviceplugin/cdi.py: CdiOptions); rows kept together -------
    cdi_annotation_prefix: str = setting(
        "cdi.k8s.io/", kind=NONEMPTY, flags=("--cdi-annotation-prefix",),
        env=_plugin("CDI_ANNOTATION_PREFIX"), file="cdiAnnotationPrefix",
        help="prefix of the CDI annotation keys Allocate returns (default {default})")
    nvidia_cdi_hook_path: str = setting(
        "/usr/bin/nvidia-ctk", kind=NONEMPTY,
        flags=("--nvidia-cdi-hook-path", "--nvidia-ctk-path"),
        env=_plugin("NVIDIA_CDI_HOOK_PATH", "NVIDIA_CTK_PATH"), file="nvidiaCTKPath",
        help="nvidia-cdi-hook (or nvidia-ctk) the CDI spec's hooks run (default {default})")
    # Read by GFD too (NVIDIA's GFD accepts it); the file key is NVIDIA's, under plugin.
    container_driver_root: str = setting(
        "/driver-root", kind=NONEMPTY, flags=("--driver-root-ctr-path", "--container-driver-root"),
        env=_both("DRIVER_ROOT_CTR_PATH", "CONTAINER_DRIVER_ROOT"), file="containerDriverRoot",
        help="where the host's driver root (--driver-root) is mounted in this container; "
        "the CDI spec's driver is read there (default {default})")
    cdi_feature_flags: tuple[str, ...] = setting(
        (), kind=TextListKind(), flags=("--cdi-feature-flags",),
        env=_plugin("CDI_FEATURE_FLAGS"), file="cdiFeatureFlags",
        help="container-toolkit CDI feature flags, comma list (default none)")
    cdi_disable_hooks: tuple[str, ...] = setting(  # NVIDIA's has no file key
        (), kind=TextListKind(), flags=("--cdi-disable-hooks",),
        env=_plugin("CDI_DISABLE_HOOKS"),
        help="CDI hooks to leave out of the spec, comma list, or all (default none)")
    # -- end of the CDI rows ------------------------------------------------------------------

    def __post_init__(self) -> None:
        coerce_settings(self)


@record(shared_init=True)
class GfdFlags:
    """``flags.gfd``: options only GPU feature discovery reads."""

    oneshot: bool = setting(
        False, kind=BOOL, flags=("--oneshot",), env=_gfd("GFD_ONESHOT"), file="oneshot",
        help="label once and exit (default {default})")
    no_timestamp: bool = setting(
        False, kind=BOOL, flags=("--no-timestamp",), env=_gfd("GFD_NO_TIMESTAMP"),
        file="noTimestamp", help="omit the timestamp label (default {default})")
    sleep_interval: float = setting(  # seconds; the file accepts Go durations like "60s"
        60.0, kind=POSITIVE_SECONDS, flags=("--sleep-interval",), env=_gfd("GFD_SLEEP_INTERVAL"),
        file="sleepInterval", help='time between labelling passes: Go duration ("60s", '
        '"1m30s") or seconds (default {default})')
    output_file: str = setting(
        "/etc/kubernetes/node-feature-discovery/features.d/gfd", kind=TEXT,
        flags=("--output-file", "--output", "-o"), env=_gfd("GFD_OUTPUT_FILE"),
        file="outputFile", help="features file to write (default {default})")
    machine_type_file: str = setting(
        "/sys/class/dmi/id/product_name", kind=NONEMPTY, flags=("--machine-type-file",),
        env=_gfd("GFD_MACHINE_TYPE_FILE"), file="machineTypeFile",
        help="file holding the machine type (default {default})")


@record(shared_init=True)
class Imex:
    """``imex``: the IMEX channels every allocation gets (deviceplugin/extras.py)."""

    channel_ids: tuple[str, ...] = setting(
        (), kind=ImexChannelsKind(), flags=("--imex-channel-ids",),
        env=_plugin("IMEX_CHANNEL_IDS"), file="channelIDs",
        help="IMEX channels added to every allocation: all, or a comma list of numbers "
        "(default none)")
    required: bool = setting(
        False, kind=BOOL, flags=("--imex-required",), env=_plugin("IMEX_REQUIRED"),
        file="required", help="a missing IMEX channel is a start-up error (default {default})")

    def __post_init__(self) -> None:
        coerce_settings(self)


@record(shared_init=True)
class Flags:
    """``flags``: options both daemons read."""

    mig_strategy: MigStrategy = setting(
        MigStrategy.NONE, kind=ChoiceKind(MigStrategy), flags=("--mig-strategy",),
        env={"plugin": ("MIG_STRATEGY",), "gfd": ("GFD_MIG_STRATEGY", "MIG_STRATEGY")},
        file="migStrategy",
        help="how MIG devices are advertised: none, single or mixed (default {default})")
    fail_on_init_error: bool = setting(
        True, kind=BOOL, flags=("--fail-on-init-error",),
        # GFD: NVIDIA's GFD reads both names, its own first.
        env={"plugin": ("FAIL_ON_INIT_ERROR",),
             "gfd": ("GFD_FAIL_ON_INIT_ERROR", "FAIL_ON_INIT_ERROR")},
        file="failOnInitError",
        help="exit on NVML initialisation errors; false logs and idles (default {default})")
    nvidia_driver_root: str = setting(
        "/", kind=TEXT, flags=("--driver-root", "--nvidia-driver-root"),
        env=_both("NVIDIA_DRIVER_ROOT"), file="nvidiaDriverRoot",
        help="root of the NVIDIA driver installation (default {default})")
    nvidia_dev_root: str = setting(  # empty: same as the driver root
        "", kind=TEXT, flags=("--dev-root", "--nvidia-dev-root"), env=_both("NVIDIA_DEV_ROOT"),
        file="nvidiaDevRoot", help="root of the NVIDIA device nodes (default: the driver root)")
    nvml: str = setting(  # ours: "real" or "fake:<profile name or path>"; not in the file
        "real", kind=NONEMPTY, flags=("--nvml",), env=_all("NVML_BACKEND"),
        help='NVML backend: "real" or "fake:<profile>" (default {default})')
    sysfs_root: str = setting(  # ours: tests and simulation point it elsewhere; not in the file
        "/", kind=NONEMPTY, flags=("--sysfs-root",), env=_all("SYSFS_ROOT"),
        help="where /sys is read from (default {default})")
    # "tegra" refused with one line (exit 2): integrated GPUs have no NVML device list.
    device_discovery_strategy: DeviceDiscoveryStrategy = setting(
        DeviceDiscoveryStrategy.AUTO,
        kind=ChoiceKind(DeviceDiscoveryStrategy, unsupported={"tegra": TEGRA_UNSUPPORTED}),
        flags=("--device-discovery-strategy",), env=_both("DEVICE_DISCOVERY_STRATEGY"),
        file="deviceDiscoveryStrategy",
        help="how GPUs are found: {choices} (both NVML here; default {default})")
    # -- what Allocate adds besides the GPUs (deviceplugin/extras.py) --------------------------
    gdrcopy_enabled: bool = setting(
        False, kind=BOOL, flags=("--gdrcopy-enabled",), env=_plugin("GDRCOPY_ENABLED"),
        file="gdrcopyEnabled",
        help="give containers gdrcopy (/dev/gdrdrv, NVIDIA_GDRCOPY=enabled) (default {default})")
    gds_enabled: bool = setting(
        False, kind=BOOL, flags=("--gds-enabled",), env=_plugin("GDS_ENABLED"),
        file="gdsEnabled", help="give containers GPUDirect Storage (/dev/nvidia-fs*, "
        "NVIDIA_GDS=enabled) (default {default})")
    mofed_enabled: bool = setting(
        False, kind=BOOL, flags=("--mofed-enabled",), env=_plugin("MOFED_ENABLED"),
        file="mofedEnabled", help="give containers MOFED (/dev/infiniband/*, "
        "NVIDIA_MOFED=enabled) (default {default})")
    # NVIDIA's flag has no default (its Helm chart passes /run/nvidia/mps); MPS sharing needs it.
    mps_root: str = setting(
        "", kind=TEXT, flags=("--mps-root",), env=_plugin("MPS_ROOT"), file="mpsRoot",
        help="host directory the MPS control daemon keeps its per-resource pipe and log "
        "directories and its shm under; required with sharing.mps (default: none)")
    # -- GFD's NodeFeature output (gfd/nodefeature.py); rows kept together ------------------
    # None: not set. NVIDIA's default is true; unset, ours writes the features file, so a bare
    # run needs no cluster (docs/gfd.md). Our manifests choose the output mode explicitly.
    use_node_feature_api: bool | None = setting(
        None, kind=BOOL, flags=("--use-node-feature-api",),
        env=_gfd("GFD_USE_NODE_FEATURE_API", "USE_NODE_FEATURE_API"), file="useNodeFeatureAPI",
        help="publish labels as an NFD NodeFeature object when --output-mode is not given "
        "(default: unset, the features file; NVIDIA's default is true)")
    namespace: str = setting(
        "default", kind=NONEMPTY, flags=("--namespace",), env=_gfd("NAMESPACE"),
        help="namespace of the NodeFeature object (default {default})")
    pod_name: str = setting(
        "", kind=TEXT, flags=("--pod-name",), env=_gfd("POD_NAME"),
        help="this pod's name: the NodeFeature is owned by its DaemonSet (default: no owner)")
    kube_api_qps: float = setting(
        5.0, kind=NumberKind(minimum=0.01), flags=("--kube-api-qps",), env=_gfd("KUBE_API_QPS"),
        help="client-side rate limit of Kubernetes API requests per second (default {default})")
    kube_api_burst: int = setting(
        10, kind=NumberKind(integer=True, minimum=1), flags=("--kube-api-burst",),
        env=_gfd("KUBE_API_BURST"),
        help="burst of the client-side API rate limit (default {default})")
    # -- end of the NodeFeature rows ----------------------------------------------------------
    plugin: PluginFlags = section(PluginFlags, file="plugin", ignored=_PLUGIN_IGNORED)
    gfd: GfdFlags = section(GfdFlags, file="gfd")

    def __post_init__(self) -> None:
        coerce_settings(self)

    @property
    def dev_root(self) -> str:
        """Where device nodes live: the dev root, else the driver root."""
        return self.nvidia_dev_root or self.nvidia_driver_root


# --- the daemons' own options: flags and env vars only, not part of NVIDIA's file format ---------

DEFAULT_READY_FILE = "/run/nvidia-device-plugin/ready"  # where daemonset/base's probes look
DEFAULT_HEALTH_FILE = "/run/gfd/last-pass-ok"  # idem, for GFD


@record(shared_init=True)
class PluginOptions:
    """``daemon.plugin``: the device plugin process's own options (not in the file)."""

    socket_dir: str = setting(  # "": the kubelet socket's directory
        "", kind=TEXT, flags=("--socket-dir",), env=_plugin("PLUGIN_SOCKET_DIR"),
        help="directory for the plugin sockets (default: the kubelet socket's directory); "
        'another directory only with --kubelet-socket "" (no registration)')
    ready_file: str = setting(
        DEFAULT_READY_FILE, kind=TEXT, flags=("--ready-file",), env=_plugin("DP_READY_FILE"),
        empty_is_value=True, help="readiness file for the DaemonSet's probes, created once "
        "every resource is registered; empty disables it (default {default})")
    metrics_address: str = setting(
        "", kind=TEXT, flags=("--metrics-address",), env=_plugin("DP_METRICS_ADDRESS"),
        help="serve the plugin's own metrics at [host]:port, e.g. :9401 (default: off)")
    status_file: str = setting(
        "", kind=TEXT, flags=("--status-file",), env=_plugin("DP_STATUS_FILE"),
        empty_is_value=True, help="status file, always present: JSON with readiness, device "
        "counts and problems (invalid MIG layouts...); empty disables it (default empty)")
    # NVIDIA's health-check variables (no flags): XIDs to ignore ("all"/"xids": no checks),
    # and XIDs critical whatever is ignored. Parsed by deviceplugin.health, which reports
    # (rather than refuses) entries it cannot read, as NVIDIA does.
    disable_healthchecks: str = setting(
        "", kind=TEXT, env=_plugin("DP_DISABLE_HEALTHCHECKS"),
        help="XIDs to ignore, or all/xids to disable health checks")
    enable_healthchecks: str = setting(
        "", kind=TEXT, env=_plugin("DP_ENABLE_HEALTHCHECKS"),
        help="XIDs that are critical even if ignored, or all")


@record(shared_init=True)
class GfdOptions:
    """``daemon.gfd``: GPU feature discovery's own options (not in the file).

    The outputs' settings go here: a new output (e.g. a NodeFeature object) adds its rows
    beside ``output_mode``.
    """

    # None: not given; then --use-node-feature-api decides (gfd.daemon.Options.from_config).
    output_mode: OutputMode | None = setting(
        None, kind=ChoiceKind(OutputMode), flags=("--output-mode",),
        env=_gfd("GFD_OUTPUT_MODE"),
        help="file: the NFD features file (or stdout with --output-file -); node-api: patch "
        "the Node's labels; both; node-feature: an NFD NodeFeature object (default: "
        "node-feature when --use-node-feature-api is true, else file)")
    node_name: str = setting(
        "", kind=TEXT, flags=("--node-name",), env=_gfd("NODE_NAME"),
        help="the Node to label in node-api mode")
    kubeconfig: str = setting(
        "", kind=TEXT, flags=("--kubeconfig",), env=_gfd("GFD_KUBECONFIG", "KUBECONFIG"),
        help="kubeconfig for node-api mode (default: in-cluster config, then $KUBECONFIG or "
        "~/.kube/config)")
    health_file: str = setting(
        DEFAULT_HEALTH_FILE, kind=TEXT, flags=("--health-file",), env=_gfd("GFD_HEALTH_FILE"),
        empty_is_value=True, help="file rewritten with the Unix time after every successful "
        "pass, for liveness probes; empty disables (default {default})")
    dry_run: bool = setting(
        False, kind=BOOL, flags=("--dry-run",), env=_gfd(),
        help="print the labels as a table and exit; write nothing")
    metrics_address: str = setting(
        "", kind=TEXT, flags=("--metrics-address",), env=_gfd("GFD_METRICS_ADDRESS"),
        help="serve GFD's own metrics at [host]:port, e.g. :9402 (default: off)")

    def __post_init__(self) -> None:
        coerce_settings(self)


DEFAULT_EXPORTER_INTERVAL_MS = 30000  # dcgm-exporter's -c default
DEFAULT_XID_WINDOW_MS = 300000  # dcgm-exporter's -x default
DEFAULT_POD_RESOURCES_SOCKET = "/var/lib/kubelet/pod-resources/kubelet.sock"


@record(shared_init=True)
class ExporterOptions:
    """``daemon.exporter``: gpu-metrics-exporter's options, dcgm-exporter's flags and variables
    where they mean something without DCGM (the others are refused by exporter.main)."""

    collectors: str = setting(  # "": the built-in set, dcgm-exporter's default-counters.csv
        "", kind=TEXT, flags=("-f", "--collectors"), env=_exporter("DCGM_EXPORTER_COLLECTORS"),
        help="collectors CSV file (FIELD, gauge|counter|label, help); SIGHUP re-reads it "
        "(default: the built-in copy of dcgm-exporter's default-counters.csv)")
    address: str = setting(
        ":9400", kind=NONEMPTY, flags=("-a", "--address"), env=_exporter("DCGM_EXPORTER_LISTEN"),
        help="address to serve /metrics and /health on, [host]:port (default {default})")
    collect_interval: int = setting(
        DEFAULT_EXPORTER_INTERVAL_MS, kind=NumberKind(integer=True, minimum=1),
        flags=("-c", "--collect-interval"), env=_exporter("DCGM_EXPORTER_INTERVAL"),
        help="milliseconds between NVML samples (default {default})")
    kubernetes: bool = setting(
        False, kind=BOOL, flags=("-k", "--kubernetes"), env=_exporter("DCGM_EXPORTER_KUBERNETES"),
        help="label series with the pods holding each device (default {default})")
    kubernetes_gpu_id_type: GpuIdType = setting(
        GpuIdType.UID, kind=ChoiceKind(GpuIdType), flags=("--kubernetes-gpu-id-type",),
        env=_exporter("DCGM_EXPORTER_KUBERNETES_GPU_ID_TYPE"),
        help="device ids the device plugin hands the kubelet: {choices} (default {default})")
    pod_resources_kubelet_socket: str = setting(
        DEFAULT_POD_RESOURCES_SOCKET, kind=NONEMPTY, flags=("--pod-resources-kubelet-socket",),
        env=_exporter("DCGM_POD_RESOURCES_KUBELET_SOCKET"),
        help="the kubelet's PodResources socket (default {default})")
    nvidia_resource_names: tuple[str, ...] = setting(
        (), kind=TextListKind(), flags=("--nvidia-resource-names",),
        env=_exporter("NVIDIA_RESOURCE_NAMES"),
        help="more resource names to attribute, comma list (default: nvidia.com/ names)")
    no_hostname: bool = setting(
        False, kind=BOOL, flags=("-n", "--no-hostname"), env=_exporter("DCGM_EXPORTER_NO_HOSTNAME"),
        help="leave out the Hostname label (default {default})")
    replace_blanks_in_model_name: bool = setting(
        False, kind=BOOL, flags=("--replace-blanks-in-model-name", "-rbmn"),
        env=_exporter("DCGM_EXPORTER_REPLACE_BLANKS_IN_MODEL_NAME"),
        help="spaces in modelName become '-' (default {default})")
    use_old_namespace: bool = setting(
        False, kind=BOOL, flags=("--use-old-namespace", "-o"),
        env=_exporter("DCGM_EXPORTER_USE_OLD_NAMESPACE"),
        help="dcgm-exporter 1.x label names: uuid, pod_name, pod_namespace, container_name "
        "(default {default})")
    xid_count_window_size: int = setting(
        DEFAULT_XID_WINDOW_MS, kind=NumberKind(integer=True, minimum=1),
        flags=("-x", "--xid-count-window-size"),
        env=_exporter("DCGM_EXPORTER_XID_COUNT_WINDOW_SIZE"),
        help="milliseconds DCGM_EXP_XID_ERRORS_COUNT counts over (default {default})")
    web_config_file: str = setting(
        "", kind=TEXT, flags=("--web-config-file",), env=_exporter("DCGM_EXPORTER_WEB_CONFIG_FILE"),
        help="exporter-toolkit web config (TLS) (default: plain HTTP)")
    node_name: str = setting(  # variable only, as dcgm-exporter's
        "", kind=TEXT, env=_exporter("NODE_NAME"),
        help="the Hostname label's value (default: the host's name)")

    def __post_init__(self) -> None:
        coerce_settings(self)


@record(shared_init=True)
class DaemonOptions:
    """``daemon``: options of the daemon processes themselves, not of NVIDIA's format."""

    log_level: LogLevel = setting(
        LogLevel.INFO, kind=ChoiceKind(LogLevel, any_case=True), flags=("--log-level",),
        env={"plugin": ("DP_LOG_LEVEL",), "gfd": ("GFD_LOG_LEVEL",),
             "exporter": ("GPU_EXPORTER_LOG_LEVEL",)},
        help="logging verbosity, any case: {choices} (default {default})")
    plugin: PluginOptions = section(PluginOptions, file=None)
    gfd: GfdOptions = section(GfdOptions, file=None)
    exporter: ExporterOptions = section(ExporterOptions, file=None)

    def __post_init__(self) -> None:
        coerce_settings(self)


@record(shared_init=True)
class TimeSlicing:
    """``sharing.timeSlicing``."""

    rename_by_default: bool = setting(
        False, kind=BOOL, file="renameByDefault",
        help="advertise shared resources as <name>.shared unless renamed")
    fail_requests_greater_than_one: bool = setting(
        False, kind=BOOL, file="failRequestsGreaterThanOne",
        help="refuse requests for more than one replica")
    resources: tuple[ReplicatedResource, ...] = setting(
        (), kind=ResourceListKind(), file="resources", help="the resources to time-slice")

    def shared_name(self, resource: ReplicatedResource) -> str:
        """The name ``resource``'s replicas are advertised under.

        An explicit ``rename`` wins; else ``<name>.shared`` with ``renameByDefault``; else the
        unchanged name.
        """
        return shared_name(resource, self.rename_by_default)


@record(shared_init=True)
class Mps:
    """``sharing.mps``: CUDA MPS, one MPS server per shared resource (see docs/sharing.md)."""

    rename_by_default: bool = setting(
        False, kind=BOOL, file="renameByDefault",
        help="advertise shared resources as <name>.shared unless renamed")
    # NVIDIA (v0.20) defaults this to true for MPS when the key is absent.
    fail_requests_greater_than_one: bool = setting(
        True, kind=BOOL, file="failRequestsGreaterThanOne",
        help="refuse requests for more than one replica")
    resources: tuple[ReplicatedResource, ...] = setting(
        (), kind=ResourceListKind(), file="resources", help="the resources to share with MPS")

    def shared_name(self, resource: ReplicatedResource) -> str:
        """The name ``resource``'s replicas are advertised under (as for time-slicing)."""
        return shared_name(resource, self.rename_by_default)


@record(shared_init=True)
class Sharing:
    """``sharing``: time-slicing or MPS; MPS wins when it has resources, as NVIDIA decides."""

    time_slicing: TimeSlicing = section(TimeSlicing, file="timeSlicing",
                                        ignored=_TIME_SLICING_IGNORED, check=check_names)
    mps: Mps = section(Mps, file="mps", check=check_mps)

    @property
    def strategy(self) -> SharingStrategy:
        """The active strategy: ``mps`` if ``sharing.mps`` has resources, else
        ``time-slicing`` if ``sharing.timeSlicing`` has, else ``none``."""
        if self.mps.resources:
            return SharingStrategy.MPS
        if self.time_slicing.resources:
            return SharingStrategy.TIME_SLICING
        return SharingStrategy.NONE

    @property
    def active(self) -> TimeSlicing | Mps:
        """The section whose resources are shared (time-slicing when nothing is)."""
        return self.mps if self.strategy is SharingStrategy.MPS else self.time_slicing


@record(shared_init=True)
class Config:
    """A whole, validated configuration."""

    version: str = setting(VERSION, kind=VersionKind(VERSION), file="version",
                           help="the format's version; a missing one means v1")
    flags: Flags = section(Flags, file="flags", ignored=_FLAGS_IGNORED)
    sharing: Sharing = section(Sharing, file="sharing", check=check_sharing)
    imex: Imex = section(Imex, file="imex")
    # The file this came from ("" when none), for logs and reloads; read before the rest.
    config_file: str = setting(
        "", kind=TEXT, flags=("--config-file",),
        env={"plugin": ("CONFIG_FILE",), "gfd": ("GFD_CONFIG_FILE", "CONFIG_FILE")},
        help="v1 config file, YAML or JSON (default: none, built-in defaults)")
    daemon: DaemonOptions = section(DaemonOptions, file=None)
    # Where each field path of the file was ("config.yaml:5"), for checks made after flags and
    # variables are applied (resolve). Not a setting, and not part of equality.
    # Pairs, not a dict: the Config stays immutable, hashable and deep-copyable.
    locations: tuple[tuple[str, str], ...] = field(default=(), compare=False, repr=False)

    def where(self, path: str) -> str:
        """``file:line`` of a field path of the file, the file alone, or "" without one."""
        return next((at for key, at in self.locations if key == path), self.config_file)


# The document itself, as a section: its keys and the NVIDIA keys it ignores.
ROOT = Section(Config, file="", ignored=_TOP_IGNORED)

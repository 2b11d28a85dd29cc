"""The v1 configuration shared by the device plugin and GFD (NVIDIA's ``api/config/v1``).

Precedence: command-line flag > environment variable > config file > default.
Field names in the file are NVIDIA's (camelCase); the dataclasses use snake_case.

Typical use by a daemon::

    parser = argparse.ArgumentParser()
    add_flags(parser, "plugin")
    args = parser.parse_args()
    config = resolve(args, os.environ)           # raises ConfigError with a one-line message
    ...
    config, error = reload(config, args, os.environ)   # on SIGHUP: keeps the old one on error

A :class:`Config` is immutable (frozen dataclasses and tuples all the way down), so a failed
load can never leave a half-applied configuration behind.

Modules, one job each: ``model`` (the table: the dataclasses, one field per setting),
``table`` (what a row holds and how the table is walked), ``values`` (value kinds: parsing a
flag/env string or a file value), ``enums`` (typed strategies), ``sharing`` (time-slicing
entries and MPS entries), ``fileformat`` (YAML/JSON text with line numbers), ``parse``
(file data -> Config), ``resolve`` (flags and env vars over the file), ``checks``
(combinations the plugin refuses, checked after resolving).

Besides NVIDIA's settings the table holds each daemon's own options (``Config.daemon``: log
level, readiness/health files, outputs): flags and env vars only, never in the file.
"""

from .checks import check_plugin
from .enums import (
    ALLOCATION_POLICIES,
    DEVICE_DISCOVERY_STRATEGIES,
    DEVICE_ID_STRATEGIES,
    DEVICE_LIST_STRATEGIES,
    LOG_LEVELS,
    MIG_STRATEGIES,
    OUTPUT_MODES,
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
from .errors import ConfigError
from .fileformat import MAX_EXPANDED_NODES, load_config_file
from .model import (
    DEFAULT_HEALTH_FILE,
    DEFAULT_READY_FILE,
    PROGRAM_DEST,
    VERSION,
    Config,
    DaemonOptions,
    ExporterOptions,
    Flags,
    GfdFlags,
    GfdOptions,
    Imex,
    Mps,
    PluginFlags,
    PluginOptions,
    Sharing,
    TimeSlicing,
)
from .parse import load_config, parse_config
from .resolve import add_flags, reload, resolve, resolve_section, resolve_setting
from .sharing import (
    MAX_REPLICAS,
    MAX_RESOURCE_NAME_LENGTH,
    MPS_NOT_FOR_MIG,
    RESOURCE_PREFIX,
    SHARED_SUFFIX,
    ReplicatedResource,
    normalize_resource_name,
)
from .table import Program
from .values import (
    duration_seconds,
    parse_bool,
    parse_choice,
    parse_device_list_strategy,
    parse_duration,
)

__all__ = [
    "ALLOCATION_POLICIES",
    "DEVICE_DISCOVERY_STRATEGIES",
    "DEFAULT_HEALTH_FILE",
    "DEFAULT_READY_FILE",
    "DEVICE_ID_STRATEGIES",
    "DEVICE_LIST_STRATEGIES",
    "LOG_LEVELS",
    "MAX_EXPANDED_NODES",
    "MAX_REPLICAS",
    "MAX_RESOURCE_NAME_LENGTH",
    "MIG_STRATEGIES",
    "OUTPUT_MODES",
    "MPS_NOT_FOR_MIG",
    "PROGRAM_DEST",
    "RESOURCE_PREFIX",
    "SHARED_SUFFIX",
    "VERSION",
    "AllocationPolicy",
    "Config",
    "ConfigError",
    "DeviceDiscoveryStrategy",
    "DaemonOptions",
    "DeviceIdStrategy",
    "DeviceListStrategy",
    "ExporterOptions",
    "Flags",
    "GfdFlags",
    "GfdOptions",
    "GpuIdType",
    "Imex",
    "LogLevel",
    "MigStrategy",
    "OutputMode",
    "Mps",
    "PluginFlags",
    "PluginOptions",
    "Program",
    "ReplicatedResource",
    "Sharing",
    "SharingStrategy",
    "TimeSlicing",
    "add_flags",
    "check_plugin",
    "duration_seconds",
    "load_config",
    "load_config_file",
    "normalize_resource_name",
    "parse_bool",
    "parse_choice",
    "parse_config",
    "parse_device_list_strategy",
    "parse_duration",
    "reload",
    "resolve",
    "resolve_section",
    "resolve_setting",
]

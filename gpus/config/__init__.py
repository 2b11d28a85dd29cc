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
Modules: ``model`` (the dataclasses), ``values`` (scalar parsers), ``fileformat`` (YAML/JSON
text with line numbers), ``parse`` (file data -> Config), ``resolve`` (flags and env vars).
"""

from .errors import ConfigError
from .fileformat import MAX_EXPANDED_NODES, load_config_file
from .model import (
    ALLOCATION_POLICIES,
    DEVICE_ID_STRATEGIES,
    DEVICE_LIST_STRATEGIES,
    MAX_REPLICAS,
    MAX_RESOURCE_NAME_LENGTH,
    MIG_STRATEGIES,
    PROGRAM_DEST,
    RESOURCE_PREFIX,
    SHARED_SUFFIX,
    VERSION,
    Config,
    Flags,
    GfdFlags,
    PluginFlags,
    Program,
    ReplicatedResource,
    Sharing,
    TimeSlicing,
)
from .parse import load_config, parse_config
from .resolve import add_flags, reload, resolve
from .values import (
    duration_seconds,
    normalize_resource_name,
    parse_bool,
    parse_choice,
    parse_device_list_strategy,
    parse_duration,
)

__all__ = [
    "ALLOCATION_POLICIES",
    "DEVICE_ID_STRATEGIES",
    "DEVICE_LIST_STRATEGIES",
    "MAX_EXPANDED_NODES",
    "MAX_REPLICAS",
    "MAX_RESOURCE_NAME_LENGTH",
    "MIG_STRATEGIES",
    "PROGRAM_DEST",
    "RESOURCE_PREFIX",
    "SHARED_SUFFIX",
    "VERSION",
    "Config",
    "ConfigError",
    "Flags",
    "GfdFlags",
    "PluginFlags",
    "Program",
    "ReplicatedResource",
    "Sharing",
    "TimeSlicing",
    "add_flags",
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
]

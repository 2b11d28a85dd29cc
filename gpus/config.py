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
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # imported where a config file is parsed: most starts read none (start-up time)
    import yaml

LOG = logging.getLogger(__name__)

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


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the source, field and reason."""


# --------------------------------------------------------------------------------------------
# Scalar parsers shared by flags, environment variables and the file.
# Each takes the raw value and a label ("--mig-strategy", "MIG_STRATEGY") for its message.

_TRUE = ("true", "1", "yes")
_FALSE = ("false", "0", "no")
_GO_DURATION_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "\u00b5s": 1e-6,  # micro sign
    "\u03bcs": 1e-6,  # Greek mu
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_GO_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|\u00b5s|\u03bcs|ms|s|m|h)")
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_UUID = r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
_DEVICE_REF = re.compile(
    rf"\d+|\d+:\d+|GPU-{_UUID}|MIG-{_UUID}|MIG-GPU-{_UUID}/\d+/\d+",
)


def _invalid(label: str, raw: object, reason: str) -> ConfigError:
    return ConfigError(f"invalid {label} {raw!r}: {reason}")


def parse_bool(raw: str, label: str) -> bool:
    """true/false/1/0/yes/no, case-insensitive."""
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise _invalid(label, raw, "must be one of true, false, 1, 0, yes, no")


def parse_choice(raw: str, label: str, choices: Sequence[str]) -> str:
    """One of ``choices``, exactly."""
    value = raw.strip()
    if value not in choices:
        raise _invalid(label, raw, f"must be one of {', '.join(choices)}")
    return value


def parse_duration(raw: str, label: str, allow_zero: bool = True) -> float:
    """A Go duration ("60s", "1m30s", "500ms") or a number of seconds ("60", "2.5") -> seconds."""
    try:
        return duration_seconds(raw, allow_zero)
    except ValueError as error:
        raise _invalid(label, raw, str(error)) from None


def duration_seconds(raw: str, allow_zero: bool = True) -> float:
    """Like :func:`parse_duration` but raises ValueError carrying only the reason."""
    text = raw.strip()
    seconds: float
    try:
        seconds = float(text)
    except ValueError:
        seconds = _parse_go_duration(text)
    if seconds != seconds or seconds in (float("inf"), float("-inf")):  # NaN / inf
        raise ValueError("must be a finite duration")
    if seconds < 0 or (seconds == 0 and not allow_zero):
        raise ValueError("must be >= 0" if allow_zero else "must be > 0")
    return seconds


def _parse_go_duration(text: str) -> float:
    body = text[1:] if text[:1] in "+-" else text
    sign = -1.0 if text.startswith("-") else 1.0
    position, total = 0, 0.0
    while position < len(body):
        match = _GO_DURATION_PART.match(body, position)
        if match is None:
            break
        total += float(match.group(1)) * _GO_DURATION_UNITS[match.group(2)]
        position = match.end()
    if not body or position != len(body):
        raise ValueError('must be a duration like "60s", "1m30s", "500ms" or seconds')
    return sign * total


def parse_device_list_strategy(raw: Sequence[str], label: str) -> tuple[str, ...]:
    """A comma list (or several values) of device-list strategies, duplicates dropped."""
    items: list[str] = []
    for chunk in raw:
        items.extend(part.strip() for part in chunk.split(",") if part.strip())
    if not items:
        raise _invalid(label, ",".join(raw), "must name at least one strategy")
    result: list[str] = []
    for item in items:
        if item not in DEVICE_LIST_STRATEGIES:
            raise _invalid(label, item, f"must be one of {', '.join(DEVICE_LIST_STRATEGIES)}")
        if item not in result:
            result.append(item)
    return tuple(result)


def normalize_resource_name(raw: str) -> str:
    """NVIDIA's rule: prefix a bare name with ``nvidia.com/``; the name must be a DNS subdomain.

    Raises ValueError with the reason.
    """
    name = raw if raw.startswith(RESOURCE_PREFIX + "/") else f"{RESOURCE_PREFIX}/{raw}"
    if len(name) > MAX_RESOURCE_NAME_LENGTH:
        raise ValueError(
            f"fully-qualified resource name must be {MAX_RESOURCE_NAME_LENGTH} characters or "
            f"less, got {name!r} ({len(name)})"
        )
    short = name.split("/", 1)[1]
    if not short or not all(_DNS_LABEL.fullmatch(label) for label in short.split(".")):
        raise ValueError(
            f"resource name {name!r} must be lower-case letters, digits, '-' and '.' "
            "(a DNS subdomain after 'nvidia.com/')"
        )
    return name


# --------------------------------------------------------------------------------------------
# Flags and environment variables.


@dataclass(frozen=True)
class _Setting:
    """One scalar setting reachable from a flag and environment variables."""

    dest: str  # argparse dest
    flags: tuple[str, ...]  # first is the canonical name used in messages
    env: Mapping[str, tuple[str, ...]]  # program -> env var names, first wins
    section: Literal["flags", "plugin", "gfd"]
    attr: str  # dataclass field in that section
    parse: Callable[[Any, str], object]
    help: str
    is_bool: bool = False
    multi: bool = False  # may repeat (device-list-strategy)
    # A variable set to "" is a value, not unset (KUBELET_SOCKET="" skips registration).
    empty_is_value: bool = False


def _choice(choices: Sequence[str]) -> Callable[[Any, str], object]:
    return lambda raw, label: parse_choice(raw, label, choices)


def _text(raw: Any, label: str) -> object:
    return str(raw)


def _nonempty(raw: Any, label: str) -> object:
    if not str(raw).strip():
        raise _invalid(label, raw, "must not be empty")
    return str(raw)


def _seconds(raw: Any, label: str) -> object:
    return parse_duration(raw, label)


def _positive_seconds(raw: Any, label: str) -> object:
    return parse_duration(raw, label, allow_zero=False)


def _device_list(raw: Any, label: str) -> object:
    return parse_device_list_strategy([raw] if isinstance(raw, str) else list(raw), label)


_BOTH = ("plugin", "gfd")


def _env(plugin: tuple[str, ...], gfd: tuple[str, ...] | None = None) -> dict[str, tuple[str, ...]]:
    return {"plugin": plugin, "gfd": plugin if gfd is None else gfd}


_SETTINGS: tuple[_Setting, ...] = (
    _Setting("mig_strategy", ("--mig-strategy",),
             _env(("MIG_STRATEGY",), ("GFD_MIG_STRATEGY", "MIG_STRATEGY")),
             "flags", "mig_strategy", _choice(MIG_STRATEGIES),
             "how MIG devices are advertised: none, single or mixed (default none)"),
    _Setting("fail_on_init_error", ("--fail-on-init-error",),
             # GFD: NVIDIA's GFD reads both names, its own first.
             _env(("FAIL_ON_INIT_ERROR",), ("GFD_FAIL_ON_INIT_ERROR", "FAIL_ON_INIT_ERROR")),
             "flags", "fail_on_init_error", parse_bool,
             "exit on NVML initialisation errors; false logs and idles (default true)",
             is_bool=True),
    _Setting("driver_root", ("--driver-root", "--nvidia-driver-root"),
             _env(("NVIDIA_DRIVER_ROOT",)), "flags", "nvidia_driver_root", _text,
             "root of the NVIDIA driver installation (default /)"),
    _Setting("dev_root", ("--dev-root", "--nvidia-dev-root"), _env(("NVIDIA_DEV_ROOT",)),
             "flags", "nvidia_dev_root", _text,
             "root of the NVIDIA device nodes (default: the driver root)"),
    _Setting("nvml", ("--nvml",), _env(("NVML_BACKEND",)), "flags", "nvml", _nonempty,
             'NVML backend: "real" or "fake:<profile>" (default real)'),
    _Setting("sysfs_root", ("--sysfs-root",), _env(("SYSFS_ROOT",)), "flags", "sysfs_root",
             _nonempty, "where /sys is read from (default /)"),
    # Device plugin only.
    _Setting("pass_device_specs", ("--pass-device-specs",), {"plugin": ("PASS_DEVICE_SPECS",)},
             "plugin", "pass_device_specs", parse_bool,
             "pass device specs to the kubelet in Allocate (default false)", is_bool=True),
    _Setting("device_list_strategy", ("--device-list-strategy",),
             {"plugin": ("DEVICE_LIST_STRATEGY",)}, "plugin", "device_list_strategy",
             _device_list,
             "how Allocate passes devices: comma list of " + ", ".join(DEVICE_LIST_STRATEGIES)
             + " (default envvar)", multi=True),
    _Setting("device_id_strategy", ("--device-id-strategy",),
             {"plugin": ("DEVICE_ID_STRATEGY",)}, "plugin", "device_id_strategy",
             _choice(DEVICE_ID_STRATEGIES),
             f"device ids handed to the runtime: uuid or index (default "
             f"{PluginFlags.device_id_strategy})"),
    _Setting("shared_devices_allocation_policy", ("--shared-devices-allocation-policy",),
             {"plugin": ("SHARED_DEVICES_ALLOCATION_POLICY",)}, "plugin",
             "shared_devices_allocation_policy", _choice(ALLOCATION_POLICIES),
             "preferred allocation of replicas and MIG devices: distributed or packed (default "
             f"{PluginFlags.shared_devices_allocation_policy})"),
    _Setting("kubelet_socket", ("--kubelet-socket",), {"plugin": ("KUBELET_SOCKET",)},
             "plugin", "kubelet_socket", _text,
             "kubelet registration socket; empty skips registration (default "
             f"{PluginFlags.kubelet_socket})", empty_is_value=True),
    _Setting("cdi_spec_dir", ("--cdi-spec-dir",), {"plugin": ("CDI_SPEC_DIR",)}, "plugin",
             "cdi_spec_dir", _nonempty, "where the CDI spec is written (default /var/run/cdi)"),
    _Setting("health_recovery_interval", ("--health-recovery-interval",),
             {"plugin": ("HEALTH_RECOVERY_INTERVAL",)}, "plugin", "health_recovery_interval",
             _seconds, "seconds between probes of unhealthy devices; 0 disables recovery (default "
             f"{PluginFlags.health_recovery_interval:g}s)"),
    _Setting("health_quiet_period", ("--health-quiet-period",),
             {"plugin": ("HEALTH_QUIET_PERIOD",)}, "plugin", "health_quiet_period", _seconds,
             "seconds without a critical XID before a device is Healthy again (default "
             f"{PluginFlags.health_quiet_period:g}s)"),
    # GFD only.
    _Setting("oneshot", ("--oneshot",), {"gfd": ("GFD_ONESHOT",)}, "gfd", "oneshot",
             parse_bool, "label once and exit (default false)", is_bool=True),
    _Setting("no_timestamp", ("--no-timestamp",), {"gfd": ("GFD_NO_TIMESTAMP",)}, "gfd",
             "no_timestamp", parse_bool, "omit the timestamp label (default false)", is_bool=True),
    _Setting("sleep_interval", ("--sleep-interval",), {"gfd": ("GFD_SLEEP_INTERVAL",)}, "gfd",
             "sleep_interval", _positive_seconds,
             'time between labelling passes: Go duration ("60s", "1m30s") or seconds (default '
             f"{GfdFlags.sleep_interval:g}s)"),
    _Setting("output_file", ("--output-file", "--output", "-o"), {"gfd": ("GFD_OUTPUT_FILE",)},
             "gfd", "output_file", _text,
             f"features file to write (default {GfdFlags.output_file})"),
    _Setting("machine_type_file", ("--machine-type-file",), {"gfd": ("GFD_MACHINE_TYPE_FILE",)},
             "gfd", "machine_type_file", _nonempty,
             f"file holding the machine type (default {GfdFlags.machine_type_file})"),
)

_CONFIG_FILE_ENV: Mapping[str, tuple[str, ...]] = {
    "plugin": ("CONFIG_FILE",),
    "gfd": ("GFD_CONFIG_FILE", "CONFIG_FILE"),
}


def _settings_for(program: str) -> tuple[_Setting, ...]:
    return tuple(s for s in _SETTINGS if program in s.env)


def add_flags(parser: argparse.ArgumentParser, program: Program) -> None:
    """Define the shared flags of ``program`` ("plugin" or "gfd") on ``parser``.

    Every default is None so :func:`resolve` can tell an unset flag from one set to the default.
    Values are validated by :func:`resolve`, not argparse, so errors are ConfigErrors.
    Boolean flags accept ``--flag``, ``--flag=false`` and ``--flag false``.
    """
    if program not in _BOTH:
        raise ValueError(f"program must be one of {', '.join(_BOTH)}, got {program!r}")
    parser.set_defaults(**{PROGRAM_DEST: program})
    group = parser.add_argument_group("configuration (flag > env > config file > default)")
    for setting in _settings_for(program):
        envs = "/".join(setting.env[program])
        help_text = f"{setting.help} [env {envs}]"
        if setting.is_bool:
            group.add_argument(*setting.flags, dest=setting.dest, nargs="?", const="true",
                               default=None, metavar="BOOL", help=help_text)
        elif setting.multi:
            group.add_argument(*setting.flags, dest=setting.dest, action="append",
                               default=None, help=help_text)
        else:
            group.add_argument(*setting.flags, dest=setting.dest, default=None, help=help_text)
    group.add_argument("--config-file", dest="config_file", default=None,
                       help="v1 config file, YAML or JSON (default: none, built-in defaults) "
                       f"[env {'/'.join(_CONFIG_FILE_ENV[program])}]")


def _from_env(environ: Mapping[str, str], names: Sequence[str],
              empty_is_value: bool = False) -> tuple[str, str] | None:
    """The first non-empty variable among ``names`` as (name, value); empty counts as unset,
    unless ``empty_is_value``: then the first variable set at all, blank meaning ""."""
    for name in names:
        value = environ.get(name, "")
        if value.strip():
            return name, value
        if empty_is_value and name in environ:
            return name, ""
    return None


def _config_file_path(args: argparse.Namespace, environ: Mapping[str, str],
                      program: str) -> str:
    flag = getattr(args, "config_file", None)
    if flag is not None:
        return str(flag)
    found = _from_env(environ, _CONFIG_FILE_ENV[program])
    return found[1] if found else ""


def resolve(args: argparse.Namespace, environ: Mapping[str, str]) -> Config:
    """Build the effective Config: flag > env var > config file > default.

    ``args`` comes from a parser prepared by :func:`add_flags`. Raises ConfigError naming the
    flag, environment variable or file field that is wrong.
    """
    program = getattr(args, PROGRAM_DEST, "plugin")
    path = _config_file_path(args, environ, program)
    base = load_config(path) if path else Config()
    sections: dict[str, dict[str, object]] = {"flags": {}, "plugin": {}, "gfd": {}}
    for setting in _settings_for(program):
        raw = getattr(args, setting.dest, None)
        if raw is not None:
            value = setting.parse(raw, setting.flags[0])
        else:
            found = _from_env(environ, setting.env[program], setting.empty_is_value)
            if found is None:
                continue
            value = setting.parse(found[1], found[0])
        sections[setting.section][setting.attr] = value
    flags = base.flags
    flags = dataclasses.replace(
        flags,
        plugin=dataclasses.replace(flags.plugin, **sections["plugin"]),  # type: ignore[arg-type]
        gfd=dataclasses.replace(flags.gfd, **sections["gfd"]),  # type: ignore[arg-type]
        **sections["flags"],  # type: ignore[arg-type]
    )
    return dataclasses.replace(base, flags=flags)


def reload(current: Config, args: argparse.Namespace,
           environ: Mapping[str, str]) -> tuple[Config, str | None]:
    """Resolve again (e.g. on SIGHUP); on any error keep ``current`` and return the message.

    Returns ``(new_config, None)`` on success, ``(current, message)`` when the file is bad or
    vanished, so the caller never runs with a half-applied configuration.
    """
    try:
        return resolve(args, environ), None
    except ConfigError as error:
        LOG.error("config reload failed, keeping the running configuration: %s", error)
        return current, str(error)


# --------------------------------------------------------------------------------------------
# The config file.


@dataclass(frozen=True)
class _Doc:
    """A parsed file: plain data plus the line of every field path (for error messages)."""

    source: str
    lines: Mapping[str, int]

    def where(self, path: str) -> str:
        line = self.lines.get(path)
        return f"{self.source}:{line}" if line is not None else self.source

    def error(self, path: str, reason: str) -> ConfigError:
        return ConfigError(f"{self.where(path)}: {path}: {reason}")

    def warn_ignored(self, path: str) -> None:
        LOG.warning("%s: %s is part of NVIDIA's v1 config but not implemented here; ignored",
                    self.where(path), path)


def _compose(text: str, source: str) -> tuple[Any, dict[str, int]]:
    """YAML (or JSON) text -> (data, {field path: line}); duplicate keys are errors."""
    import yaml

    if text.lstrip().startswith(("{", "[")):
        # JSON may indent with tabs, which YAML forbids; JSON strings cannot hold a raw tab,
        # so turning them into spaces changes nothing but keeps the line numbers.
        text = text.replace("\t", " ")
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as error:
        if text.lstrip().startswith(("{", "[")):
            return _parse_json(text, source), {}
        raise ConfigError(f"{_yaml_where(error, source)}: not valid YAML or JSON: "
                          f"{_yaml_problem(error)}") from None
    except RecursionError:  # PyYAML's composer recurses once per nesting level
        raise ConfigError(f"{source}: not valid YAML: nested too deeply") from None
    if node is None:
        return None, {}
    lines: dict[str, int] = {}
    _record_lines(node, "", lines, source, _Walk())
    loader = yaml.SafeLoader("")
    try:
        data = loader.construct_document(node)
    except yaml.YAMLError as error:
        raise ConfigError(f"{_yaml_where(error, source)}: not valid YAML: "
                          f"{_yaml_problem(error)}") from None
    except RecursionError:
        raise ConfigError(f"{source}: not valid YAML: nested too deeply") from None
    finally:
        loader.dispose()
    return data, lines


def _yaml_where(error: yaml.YAMLError, source: str) -> str:
    mark = getattr(error, "problem_mark", None)
    return f"{source}:{mark.line + 1}" if mark is not None else source


def _yaml_problem(error: yaml.YAMLError) -> str:
    """The one-line reason of a PyYAML error (its str() spans several lines)."""
    return getattr(error, "problem", None) or str(error).splitlines()[0]


def _parse_json(text: str, source: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError(f"{source}:{error.lineno}: not valid JSON: {error.msg}") from None
    except RecursionError:
        raise ConfigError(f"{source}: not valid JSON: nested too deeply") from None


# Nodes walked once aliases are expanded: far above any real config, far below the billion
# laughs (Go's yaml refuses "excessive aliasing" the same way).
MAX_EXPANDED_NODES = 100_000


@dataclass
class _Walk:
    """Bookkeeping of one :func:`_record_lines` walk: the alias expansion budget and the
    nodes on the current path (an alias to one of them is a cycle)."""

    visited: int = 0
    ancestors: set[int] = field(default_factory=set)


def _record_lines(node: yaml.Node, path: str, lines: dict[str, int], source: str,
                  walk: _Walk) -> None:
    import yaml  # already loaded by _compose: a dictionary look-up

    walk.visited += 1
    if walk.visited > MAX_EXPANDED_NODES:
        raise ConfigError(f"{source}: excessive aliasing: more than {MAX_EXPANDED_NODES} "
                          "values once YAML aliases are expanded")
    if id(node) in walk.ancestors:
        raise ConfigError(f"{source}:{node.start_mark.line + 1}: {path or 'document'}: "
                          "recursive YAML alias (an anchor used inside itself)")
    if not isinstance(node, (yaml.MappingNode, yaml.SequenceNode)):
        return
    walk.ancestors.add(id(node))
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            key = str(key_node.value)
            child = f"{path}.{key}" if path else key
            if key in seen:
                raise ConfigError(
                    f"{source}:{key_node.start_mark.line + 1}: {child}: duplicate key"
                )
            seen.add(key)
            lines[child] = key_node.start_mark.line + 1
            _record_lines(value_node, child, lines, source, walk)
    else:
        for index, item in enumerate(node.value):
            child = f"{path}[{index}]"
            lines[child] = item.start_mark.line + 1
            _record_lines(item, child, lines, source, walk)
    walk.ancestors.discard(id(node))


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a config file (YAML or JSON) into plain data; ConfigError if unreadable or invalid.

    An empty file gives ``{}``. Use :func:`load_config` for a validated Config.
    """
    text = _read(path)
    data, _ = _compose(text, str(path))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the document must be a mapping, got {_type_name(data)}")
    return data


def load_config(path: str | Path) -> Config:
    """Read and validate a config file; flags and env vars are NOT applied (see resolve)."""
    config = parse_config(_read(path), str(path))
    return dataclasses.replace(config, config_file=str(path))


def _read(path: str | Path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}: {error.strerror or error}") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"cannot read config file {path}: not UTF-8 text ({error.reason})"
                          ) from None


def parse_config(data: str | Mapping[str, Any] | None, source: str = "<config>") -> Config:
    """Validate a v1 config given as file text (YAML/JSON, with line numbers in errors) or as
    already-parsed data (no line numbers). Raises ConfigError on the first problem."""
    if isinstance(data, str):
        parsed, lines = _compose(data, source)
    else:
        parsed, lines = data, {}
    doc = _Doc(source, lines)
    if parsed is None:
        return Config()
    if not isinstance(parsed, Mapping):
        raise ConfigError(f"{source}: the document must be a mapping, got {_type_name(parsed)}")
    top = _fields(doc, parsed, "", known=("version", "flags", "sharing"),
                  ignored=("resources", "imex"))
    version = top.get("version")
    if version is None:
        version = VERSION  # NVIDIA defaults a missing version to v1
    if version != VERSION:
        raise doc.error("version", f"unknown version {version!r}: must be {VERSION}")
    return Config(
        version=VERSION,
        flags=_parse_flags(doc, top.get("flags")),
        sharing=_parse_sharing(doc, top.get("sharing")),
    )


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return type(value).__name__


def _fields(doc: _Doc, value: object, path: str, known: Sequence[str],
            ignored: Sequence[str] = ()) -> dict[str, Any]:
    """Check a mapping's keys: known ones are returned (None values dropped), NVIDIA-only ones
    are warned about and dropped, anything else is an error."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise doc.error(path, f"must be a mapping, got {_type_name(value)}")
    result: dict[str, Any] = {}
    for key, item in value.items():
        child = f"{path}.{key}" if path else str(key)
        if key in known:
            if item is not None:
                result[key] = item
        elif key in ignored:
            doc.warn_ignored(child)
        else:
            allowed = ", ".join(known)
            raise doc.error(child, f"unknown key {key!r} (allowed: {allowed})")
    return result


def _bool(doc: _Doc, value: object, path: str) -> bool:
    if not isinstance(value, bool):
        raise doc.error(path, f"must be a boolean (true or false), got {value!r}")
    return value


def _str(doc: _Doc, value: object, path: str, choices: Sequence[str] = ()) -> str:
    if not isinstance(value, str):
        raise doc.error(path, f"must be a string, got {_type_name(value)} {value!r}")
    if choices and value not in choices:
        raise doc.error(path, f"must be one of {', '.join(choices)}, got {value!r}")
    return value


def _duration(doc: _Doc, value: object, path: str, allow_zero: bool) -> float:
    """A Go duration string or a number of seconds (NVIDIA reads a bare number as nanoseconds,
    which is never what anyone meant)."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise doc.error(path, f'must be a duration like "60s", got {_type_name(value)}')
    try:
        return duration_seconds(str(value), allow_zero=allow_zero)
    except ValueError as error:
        raise doc.error(path, f"{error}, got {value!r}") from None


_FLAGS_KNOWN = ("migStrategy", "failOnInitError", "nvidiaDriverRoot", "nvidiaDevRoot", "plugin",
                "gfd")
_FLAGS_IGNORED = ("mpsRoot", "gdrcopyEnabled", "gdsEnabled", "mofedEnabled", "useNodeFeatureAPI",
                  "deviceDiscoveryStrategy", "restartOnDeviceUnhealthy")
_PLUGIN_KNOWN = ("passDeviceSpecs", "deviceListStrategy", "deviceIDStrategy", "kubeletSocket",
                 # ours:
                 "sharedDevicesAllocationPolicy", "cdiSpecDir", "healthRecoveryInterval",
                 "healthQuietPeriod")
_PLUGIN_IGNORED = ("cdiAnnotationPrefix", "nvidiaCTKPath", "containerDriverRoot",
                   "cdiFeatureFlags")
_GFD_KNOWN = ("oneshot", "noTimestamp", "sleepInterval", "outputFile", "machineTypeFile")


def _parse_flags(doc: _Doc, value: object) -> Flags:
    raw = _fields(doc, value, "flags", _FLAGS_KNOWN, _FLAGS_IGNORED)
    kwargs: dict[str, Any] = {}
    if "migStrategy" in raw:
        kwargs["mig_strategy"] = _str(doc, raw["migStrategy"], "flags.migStrategy",
                                      MIG_STRATEGIES)
    if "failOnInitError" in raw:
        kwargs["fail_on_init_error"] = _bool(doc, raw["failOnInitError"],
                                             "flags.failOnInitError")
    if "nvidiaDriverRoot" in raw:
        kwargs["nvidia_driver_root"] = _str(doc, raw["nvidiaDriverRoot"],
                                            "flags.nvidiaDriverRoot")
    if "nvidiaDevRoot" in raw:
        kwargs["nvidia_dev_root"] = _str(doc, raw["nvidiaDevRoot"], "flags.nvidiaDevRoot")
    return Flags(plugin=_parse_plugin(doc, raw.get("plugin")),
                 gfd=_parse_gfd(doc, raw.get("gfd")), **kwargs)


def _parse_plugin(doc: _Doc, value: object) -> PluginFlags:
    raw = _fields(doc, value, "flags.plugin", _PLUGIN_KNOWN, _PLUGIN_IGNORED)
    kwargs: dict[str, Any] = {}
    path = "flags.plugin."
    if "passDeviceSpecs" in raw:
        kwargs["pass_device_specs"] = _bool(doc, raw["passDeviceSpecs"], path + "passDeviceSpecs")
    if "deviceListStrategy" in raw:
        kwargs["device_list_strategy"] = _file_device_list(doc, raw["deviceListStrategy"],
                                                           path + "deviceListStrategy")
    if "deviceIDStrategy" in raw:
        kwargs["device_id_strategy"] = _str(doc, raw["deviceIDStrategy"],
                                            path + "deviceIDStrategy", DEVICE_ID_STRATEGIES)
    if "kubeletSocket" in raw:
        kwargs["kubelet_socket"] = _str(doc, raw["kubeletSocket"], path + "kubeletSocket")
    if "sharedDevicesAllocationPolicy" in raw:
        kwargs["shared_devices_allocation_policy"] = _str(
            doc, raw["sharedDevicesAllocationPolicy"], path + "sharedDevicesAllocationPolicy",
            ALLOCATION_POLICIES)
    if "cdiSpecDir" in raw:
        kwargs["cdi_spec_dir"] = _str(doc, raw["cdiSpecDir"], path + "cdiSpecDir")
    for key, attr in (("healthRecoveryInterval", "health_recovery_interval"),
                      ("healthQuietPeriod", "health_quiet_period")):
        if key in raw:
            kwargs[attr] = _duration(doc, raw[key], path + key, allow_zero=True)
    return PluginFlags(**kwargs)


def _file_device_list(doc: _Doc, value: object, path: str) -> tuple[str, ...]:
    """NVIDIA accepts a single string or a list of strings."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
        raise doc.error(path, f"must be a string or a list of strings, got {_type_name(value)}")
    if not items:
        raise doc.error(path, "must name at least one strategy")
    result: list[str] = []
    for index, item in enumerate(items):
        if item not in DEVICE_LIST_STRATEGIES:
            where = path if isinstance(value, str) else f"{path}[{index}]"
            raise doc.error(where, f"must be one of {', '.join(DEVICE_LIST_STRATEGIES)}, "
                                   f"got {item!r}")
        if item not in result:
            result.append(item)
    return tuple(result)


def _parse_gfd(doc: _Doc, value: object) -> GfdFlags:
    raw = _fields(doc, value, "flags.gfd", _GFD_KNOWN)
    kwargs: dict[str, Any] = {}
    path = "flags.gfd."
    if "oneshot" in raw:
        kwargs["oneshot"] = _bool(doc, raw["oneshot"], path + "oneshot")
    if "noTimestamp" in raw:
        kwargs["no_timestamp"] = _bool(doc, raw["noTimestamp"], path + "noTimestamp")
    if "sleepInterval" in raw:
        kwargs["sleep_interval"] = _duration(doc, raw["sleepInterval"], path + "sleepInterval",
                                             allow_zero=False)
    if "outputFile" in raw:
        kwargs["output_file"] = _str(doc, raw["outputFile"], path + "outputFile")
    if "machineTypeFile" in raw:
        kwargs["machine_type_file"] = _str(doc, raw["machineTypeFile"], path + "machineTypeFile")
    return GfdFlags(**kwargs)


def _parse_sharing(doc: _Doc, value: object) -> Sharing:
    raw = _fields(doc, value, "sharing", ("timeSlicing",), ("mps",))
    return Sharing(time_slicing=_parse_time_slicing(doc, raw.get("timeSlicing")))


def _parse_time_slicing(doc: _Doc, value: object) -> TimeSlicing:
    path = "sharing.timeSlicing"
    raw = _fields(doc, value, path,
                  ("renameByDefault", "failRequestsGreaterThanOne", "resources"), ("strategy",))
    rename_by_default = _bool(doc, raw.get("renameByDefault", False), path + ".renameByDefault")
    fail = _bool(doc, raw.get("failRequestsGreaterThanOne", False),
                 path + ".failRequestsGreaterThanOne")
    items = raw.get("resources", [])
    if not isinstance(items, list):
        raise doc.error(path + ".resources", f"must be a list, got {_type_name(items)}")
    resources = tuple(_parse_replicated(doc, item, f"{path}.resources[{index}]")
                      for index, item in enumerate(items))
    time_slicing = TimeSlicing(rename_by_default, fail, resources)
    _check_names(doc, time_slicing, path + ".resources")
    return time_slicing


def _parse_replicated(doc: _Doc, value: object, path: str) -> ReplicatedResource:
    if not isinstance(value, Mapping):
        raise doc.error(path, f"must be a mapping, got {_type_name(value)}")
    raw = _fields(doc, value, path, ("name", "replicas", "rename", "devices"))
    if "name" not in raw:
        raise doc.error(path, "name is required")
    if "replicas" not in raw:
        raise doc.error(path, "replicas is required")
    name = _resource_name(doc, raw["name"], path + ".name")
    replicas = raw["replicas"]
    if isinstance(replicas, bool) or not isinstance(replicas, int):
        raise doc.error(path + ".replicas", f"must be an integer, got {replicas!r}")
    if replicas < 2:
        raise doc.error(path + ".replicas", f"must be >= 2, got {replicas}")
    if replicas > MAX_REPLICAS:
        raise doc.error(path + ".replicas", f"must be <= {MAX_REPLICAS}, got {replicas}")
    rename = _resource_name(doc, raw["rename"], path + ".rename") if "rename" in raw else ""
    devices = _devices(doc, raw.get("devices", "all"), path + ".devices")
    return ReplicatedResource(name=name, replicas=replicas, rename=rename, devices=devices)


def _resource_name(doc: _Doc, value: object, path: str) -> str:
    text = _str(doc, value, path)
    try:
        return normalize_resource_name(text)
    except ValueError as error:
        raise doc.error(path, str(error)) from None


def _devices(doc: _Doc, value: object, path: str) -> int | tuple[str, ...] | None:
    expected = ("must be 'all', a count > 0, or a list of GPU indices, MIG indices "
                "(<gpu>:<mig>) or UUIDs")
    if value == "all":
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        if value <= 0:
            raise doc.error(path, f"a count of devices must be > 0, got {value}")
        return value
    if not isinstance(value, list):
        raise doc.error(path, f"{expected}, got {value!r}")
    if not value:
        raise doc.error(path, f"{expected}, got an empty list")
    refs: list[str] = []
    for index, item in enumerate(value):
        if isinstance(item, int) and not isinstance(item, bool) and item >= 0:
            ref = str(item)
        elif isinstance(item, str) and _DEVICE_REF.fullmatch(item):
            ref = item
        else:
            raise doc.error(f"{path}[{index}]", f"{expected}, got {item!r}")
        if ref not in refs:
            refs.append(ref)
    return tuple(refs)


def _check_names(doc: _Doc, time_slicing: TimeSlicing, path: str) -> None:
    """Names must be unique, and no advertised (shared) name may collide with another entry's."""
    first_by_name: dict[str, int] = {}
    for index, resource in enumerate(time_slicing.resources):
        if resource.name in first_by_name:
            raise doc.error(f"{path}[{index}].name",
                            f"duplicate resource name {resource.name!r} "
                            f"(also {path}[{first_by_name[resource.name]}])")
        first_by_name[resource.name] = index
    shared_by: dict[str, int] = {}
    for index, resource in enumerate(time_slicing.resources):
        shared = time_slicing.shared_name(resource)
        field_path = f"{path}[{index}].rename" if resource.rename else f"{path}[{index}].name"
        other = first_by_name.get(shared)
        if other is not None and other != index:
            raise doc.error(field_path,
                            f"rename {shared!r} conflicts with {path}[{other}].name")
        if shared in shared_by:
            raise doc.error(field_path,
                            f"rename {shared!r} conflicts with {path}[{shared_by[shared]}], "
                            "which is advertised under the same name")
        shared_by[shared] = index

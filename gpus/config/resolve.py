"""Flags and environment variables over the file: ``add_flags``, ``resolve``, ``reload``."""

from __future__ import annotations

import argparse
import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from .errors import ConfigError
from .model import (
    ALLOCATION_POLICIES,
    DEVICE_ID_STRATEGIES,
    DEVICE_LIST_STRATEGIES,
    MIG_STRATEGIES,
    PROGRAM_DEST,
    Config,
    GfdFlags,
    PluginFlags,
    Program,
)
from .parse import load_config
from .values import _invalid, parse_bool, parse_choice, parse_device_list_strategy, parse_duration

LOG = logging.getLogger(__package__)


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

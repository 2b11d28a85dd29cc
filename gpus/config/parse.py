"""Validating a parsed config file into a :class:`Config`."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import ConfigError, type_name
from .fileformat import _compose, _Doc, _read
from .model import (
    ALLOCATION_POLICIES,
    DEVICE_ID_STRATEGIES,
    DEVICE_LIST_STRATEGIES,
    MAX_REPLICAS,
    MIG_STRATEGIES,
    VERSION,
    Config,
    Flags,
    GfdFlags,
    PluginFlags,
    ReplicatedResource,
    Sharing,
    TimeSlicing,
)
from .values import _DEVICE_REF, duration_seconds, normalize_resource_name


def load_config(path: str | Path) -> Config:
    """Read and validate a config file; flags and env vars are NOT applied (see resolve)."""
    config = parse_config(_read(path), str(path))
    return dataclasses.replace(config, config_file=str(path))



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
        raise ConfigError(f"{source}: the document must be a mapping, got {type_name(parsed)}")
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




def _fields(doc: _Doc, value: object, path: str, known: Sequence[str],
            ignored: Sequence[str] = ()) -> dict[str, Any]:
    """Check a mapping's keys: known ones are returned (None values dropped), NVIDIA-only ones
    are warned about and dropped, anything else is an error."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise doc.error(path, f"must be a mapping, got {type_name(value)}")
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
        raise doc.error(path, f"must be a string, got {type_name(value)} {value!r}")
    if choices and value not in choices:
        raise doc.error(path, f"must be one of {', '.join(choices)}, got {value!r}")
    return value


def _duration(doc: _Doc, value: object, path: str, allow_zero: bool) -> float:
    """A Go duration string or a number of seconds (NVIDIA reads a bare number as nanoseconds,
    which is never what anyone meant)."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise doc.error(path, f'must be a duration like "60s", got {type_name(value)}')
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
        raise doc.error(path, f"must be a string or a list of strings, got {type_name(value)}")
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
        raise doc.error(path + ".resources", f"must be a list, got {type_name(items)}")
    resources = tuple(_parse_replicated(doc, item, f"{path}.resources[{index}]")
                      for index, item in enumerate(items))
    time_slicing = TimeSlicing(rename_by_default, fail, resources)
    _check_names(doc, time_slicing, path + ".resources")
    return time_slicing


def _parse_replicated(doc: _Doc, value: object, path: str) -> ReplicatedResource:
    if not isinstance(value, Mapping):
        raise doc.error(path, f"must be a mapping, got {type_name(value)}")
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

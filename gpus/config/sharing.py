"""``sharing.timeSlicing`` and ``sharing.mps`` resources: the entries, names and their checks."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from gpus.records import record

from .errors import type_name
from .values import Kind, ValueProblem, split_keys

LOG = logging.getLogger(__package__)
RESOURCE_PREFIX = "nvidia.com"
SHARED_SUFFIX = ".shared"  # NVIDIA's DefaultSharedResourceNameSuffix
MAX_RESOURCE_NAME_LENGTH = 63
# Ours (NVIDIA has no bound): a typo such as 1000000 would otherwise build millions of devices
# and take the plugin down; 1024 per GPU is far beyond any useful time-slicing factor.
MAX_REPLICAS = 1024

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_UUID = r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
_DEVICE_REF = re.compile(
    rf"\d+|\d+:\d+|GPU-{_UUID}|MIG-{_UUID}|MIG-GPU-{_UUID}/\d+/\d+",
)
_RESOURCE_KEYS = ("name", "replicas", "rename", "devices")
MIG_RESOURCE_PREFIX = f"{RESOURCE_PREFIX}/mig-"
MPS_NOT_FOR_MIG = "MPS sharing is not supported for MIG devices"
_DEVICES_EXPECTED = ("must be 'all', a count > 0, or a list of GPU indices, MIG indices "
                     "(<gpu>:<mig>) or UUIDs")


@record(shared_init=True)
class ReplicatedResource:
    """One ``sharing.timeSlicing.resources[]`` entry."""

    name: str  # "nvidia.com/gpu" or "nvidia.com/mig-1g.5gb"
    replicas: int  # >= 2
    rename: str = ""  # advertise under this name instead
    # Which devices are shared: None = all; an int = the first N; a tuple = GPU indices ("0"),
    # MIG indices ("0:1") or UUIDs ("GPU-...", "MIG-...").
    devices: int | tuple[str, ...] | None = None


def shared_name(resource: ReplicatedResource, rename_by_default: bool) -> str:
    """The name ``resource``'s replicas are advertised under: an explicit ``rename`` wins; else
    ``<name>.shared`` with ``renameByDefault``; else the unchanged name."""
    if resource.rename:
        return resource.rename
    if rename_by_default:
        return resource.name + SHARED_SUFFIX
    return resource.name


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


class ResourceListKind(Kind):
    """The file-only list of :class:`ReplicatedResource` entries (no flag or env var)."""

    __slots__ = ()

    def from_text(self, raw: Any, label: str) -> Any:
        raise NotImplementedError("sharing.timeSlicing.resources is read from the file only")

    def from_file(self, value: object) -> tuple[ReplicatedResource, ...]:
        if not isinstance(value, list):
            raise ValueProblem(f"must be a list, got {type_name(value)}")
        resources: list[ReplicatedResource] = []
        for index, item in enumerate(value):
            try:
                resources.append(_replicated(item))
            except ValueProblem as problem:
                raise ValueProblem(problem.reason, f"[{index}]{problem.suffix}") from None
        return tuple(resources)


def _replicated(value: object) -> ReplicatedResource:
    if not isinstance(value, Mapping):
        raise ValueProblem(f"must be a mapping, got {type_name(value)}")
    raw = split_keys(value, _RESOURCE_KEYS)
    if "name" not in raw:
        raise ValueProblem("name is required")
    if "replicas" not in raw:
        raise ValueProblem("replicas is required")
    name = _resource_name(raw["name"], ".name")
    replicas = raw["replicas"]
    if isinstance(replicas, bool) or not isinstance(replicas, int):
        raise ValueProblem(f"must be an integer, got {replicas!r}", ".replicas")
    if replicas < 2:
        raise ValueProblem(f"must be >= 2, got {replicas}", ".replicas")
    if replicas > MAX_REPLICAS:
        raise ValueProblem(f"must be <= {MAX_REPLICAS}, got {replicas}", ".replicas")
    rename = _resource_name(raw["rename"], ".rename") if "rename" in raw else ""
    devices = _devices(raw.get("devices", "all"))
    return ReplicatedResource(name=name, replicas=replicas, rename=rename, devices=devices)


def _resource_name(value: object, suffix: str) -> str:
    if not isinstance(value, str):
        raise ValueProblem(f"must be a string, got {type_name(value)} {value!r}", suffix)
    try:
        return normalize_resource_name(value)
    except ValueError as error:
        raise ValueProblem(str(error), suffix) from None


def _devices(value: object) -> int | tuple[str, ...] | None:
    if value == "all":
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        if value <= 0:
            raise ValueProblem(f"a count of devices must be > 0, got {value}", ".devices")
        return value
    if not isinstance(value, list):
        raise ValueProblem(f"{_DEVICES_EXPECTED}, got {value!r}", ".devices")
    if not value:
        raise ValueProblem(f"{_DEVICES_EXPECTED}, got an empty list", ".devices")
    refs: list[str] = []
    for index, item in enumerate(value):
        if isinstance(item, int) and not isinstance(item, bool) and item >= 0:
            ref = str(item)
        elif isinstance(item, str) and _DEVICE_REF.fullmatch(item):
            ref = item
        else:
            raise ValueProblem(f"{_DEVICES_EXPECTED}, got {item!r}", f".devices[{index}]")
        if ref not in refs:
            refs.append(ref)
    return tuple(refs)


class _TimeSlicingLike(Protocol):
    @property
    def rename_by_default(self) -> bool: ...

    @property
    def resources(self) -> Sequence[ReplicatedResource]: ...


def check_names(time_slicing: _TimeSlicingLike, path: str) -> None:
    """Names must be unique, and no advertised (shared) name may collide with another entry's.

    ``path`` is the section's (for the message); ValueProblem suffixes are relative to it.
    """
    where = f"{path}.resources"
    first_by_name: dict[str, int] = {}
    for index, resource in enumerate(time_slicing.resources):
        if resource.name in first_by_name:
            raise ValueProblem(f"duplicate resource name {resource.name!r} "
                               f"(also {where}[{first_by_name[resource.name]}])",
                               f".resources[{index}].name")
        first_by_name[resource.name] = index
    shared_by: dict[str, int] = {}
    for index, resource in enumerate(time_slicing.resources):
        shared = shared_name(resource, time_slicing.rename_by_default)
        suffix = f".resources[{index}].rename" if resource.rename else f".resources[{index}].name"
        other = first_by_name.get(shared)
        if other is not None and other != index:
            raise ValueProblem(f"rename {shared!r} conflicts with {where}[{other}].name", suffix)
        if shared in shared_by:
            raise ValueProblem(f"rename {shared!r} conflicts with {where}[{shared_by[shared]}], "
                               "which is advertised under the same name", suffix)
        shared_by[shared] = index


def _is_mig_ref(ref: str) -> bool:
    """A devices entry naming a MIG device ("0:1", "MIG-<uuid>", "MIG-GPU-<uuid>/1/0")."""
    return ":" in ref or ref.startswith("MIG-")


def check_mps(mps: _TimeSlicingLike, path: str) -> None:
    """``sharing.mps``: the name checks of time-slicing, and no MIG device (NVIDIA's plugin
    refuses MIG devices in an MPS resource and its control daemon skips them)."""
    check_names(mps, path)
    for index, resource in enumerate(mps.resources):
        if resource.name.startswith(MIG_RESOURCE_PREFIX):
            raise ValueProblem(f"{MPS_NOT_FOR_MIG} ({resource.name!r} is a MIG resource)",
                               f".resources[{index}].name")
        if isinstance(resource.devices, tuple):
            for ref_index, ref in enumerate(resource.devices):
                if _is_mig_ref(ref):
                    raise ValueProblem(f"{MPS_NOT_FOR_MIG} ({ref!r} is a MIG device)",
                                       f".resources[{index}].devices[{ref_index}]")


class _SharingLike(Protocol):
    @property
    def time_slicing(self) -> _TimeSlicingLike: ...

    @property
    def mps(self) -> _TimeSlicingLike: ...


def check_sharing(sharing: _SharingLike, path: str) -> None:
    """Both strategies configured: MPS wins (as NVIDIA decides); say that time-slicing is not
    applied rather than leave it silently unused."""
    if sharing.mps.resources and sharing.time_slicing.resources:
        LOG.warning("%s.timeSlicing is ignored: %s.mps has resources and MPS takes precedence",
                    path, path)

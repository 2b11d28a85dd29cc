"""Machine profiles: YAML descriptions of real node shapes that the fake NVML serves.

A profile names its GPUs' models (figures in ``gpus/profiles/_models.yaml``), their PCI bus ids,
NUMA nodes, MIG layouts and the topology between them. The loader validates everything and
reports errors as ``<file>: <field path>: <reason>``. The format is documented in
``docs/profiles.md``.

This module finds and reads profile files (``extends`` included) and is where callers import
from; the data model is in ``profile_model``, the bounds in ``profile_limits`` and the
validation in ``profile_build`` (with ``profile_fields``, ``profile_mig``, ``profile_topology``).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from gpus.fake.profile_build import ProfileBuilder
from gpus.fake.profile_limits import (
    C_INT_MAX,
    C_UINT_MAX,
    C_ULLONG_MAX,
    DRIVER_VERSION_BUFFER,
    MAX_EXTENDS_DEPTH,
    MAX_GPU_INSTANCE_ID,
    MAX_GPUS,
    MAX_MIG_SLICES,
    MAX_MINOR,
    MAX_NUMA_NODE,
    MAX_PROFILE_BYTES,
    NAME_BUFFER,
    NVLINK_MAX_LINKS,
    UUID_BUFFER,
)
from gpus.fake.profile_model import (
    ARCHITECTURES,
    BRANDS,
    FABRIC_STATES,
    GI_PROFILES,
    NVSWITCH_PCI_DEVICE_IDS,
    TOPOLOGY_LEVELS,
    VGPU_FIELD_BYTES,
    ComputeInstance,
    FabricSpec,
    GpuInstance,
    GpuSpec,
    MigProfile,
    Model,
    NvSwitchSpec,
    Profile,
    ProfileError,
    Topology,
    VgpuSpec,
)

PROFILES_DIR = Path(__file__).resolve().parent.parent / "profiles"
MODELS_FILE = PROFILES_DIR / "_models.yaml"
# libyaml's loader when PyYAML was built with it: parsing is ~7x faster, which is most of the
# fake backend's start-up cost; same safe constructors, same results.
_SAFE_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def list_profiles() -> list[str]:
    """Names of the shipped profiles."""
    return sorted(p.stem for p in PROFILES_DIR.glob("*.yaml") if not p.name.startswith("_"))


def load_profile(name_or_path: str | Path, *, max_bytes: int = MAX_PROFILE_BYTES) -> Profile:
    """Load and validate a shipped profile by name, or any profile file by path.

    A file (or a file it ``extends``) larger than ``max_bytes`` is refused before it is read.
    """
    path = _resolve(name_or_path)
    raw = _load_raw(path, (), max_bytes)
    return ProfileBuilder(str(path), raw, _shipped_models).build()


def _resolve(name_or_path: str | Path) -> Path:
    text = str(name_or_path)
    if isinstance(name_or_path, Path) or "/" in text or text.endswith((".yaml", ".yml")):
        path = Path(text)
        if not path.is_file():
            raise ProfileError(f"{text}: no such profile file")
        return path
    path = PROFILES_DIR / f"{text}.yaml"
    if text.startswith("_") or not path.is_file():
        raise ProfileError(
            f"{text}: unknown profile (shipped: {', '.join(list_profiles())}; "
            "'fake-nvml list' describes them; or give a path to a .yaml file)"
        )
    return path


def _read_text(path: Path, max_bytes: int) -> str:
    """The file's text; ProfileError for a file over ``max_bytes``, checked before reading."""
    too_big = f"{path}: larger than the {max_bytes} bytes a profile may have"
    with open(path, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        if size > max_bytes:
            raise ProfileError(f"{too_big} ({size} bytes)")
        # The size can lie (a file still growing, /proc): never read more than the limit.
        data = file.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ProfileError(too_big)
    return data.decode()


def _read_yaml(path: Path, max_bytes: int = MAX_PROFILE_BYTES) -> dict[str, Any]:
    try:
        data = yaml.load(_read_text(path, max_bytes), Loader=_SAFE_LOADER)
    # Not UTF-8, nested deeper than the parser recurses, or too big even within the size limit:
    # still the profile's fault.
    except (OSError, UnicodeDecodeError, RecursionError, MemoryError, yaml.YAMLError) as exc:
        raise ProfileError(f"{path}: cannot read: {exc}") from exc
    if not isinstance(data, dict):
        raise ProfileError(f"{path}: top level must be a mapping")
    return data


def _shipped_models() -> Mapping[str, Any]:
    """The raw shipped model table, parsed once per version of ``_models.yaml``."""
    try:
        mtime_ns = MODELS_FILE.stat().st_mtime_ns
    except OSError as exc:
        raise ProfileError(f"{MODELS_FILE}: cannot read: {exc}") from exc
    return _parse_models(MODELS_FILE, mtime_ns)


@functools.lru_cache(maxsize=2)
def _parse_models(path: Path, mtime_ns: int) -> Mapping[str, Any]:
    """``models`` of a model table file; cached by (path, mtime), callers must not mutate it."""
    models: Mapping[str, Any] = _read_yaml(path).get("models", {})
    return models


def _load_raw(path: Path, seen: tuple[Path, ...], max_bytes: int) -> dict[str, Any]:
    """Read a profile, resolving ``extends`` (the child's top-level keys win)."""
    if path.resolve() in seen:
        raise ProfileError(f"{path}: extends: cycle through {', '.join(map(str, seen))}")
    if len(seen) >= MAX_EXTENDS_DEPTH:
        raise ProfileError(f"{path}: extends: more than {MAX_EXTENDS_DEPTH} levels")
    data = _read_yaml(path, max_bytes)
    parent_ref = data.pop("extends", None)
    if parent_ref is None:
        return data
    if not isinstance(parent_ref, str):
        raise ProfileError(f"{path}: extends: must be a profile name or path")
    try:
        parent_path = _resolve(parent_ref)
    except ProfileError as exc:
        raise ProfileError(f"{path}: extends: {exc}") from exc
    merged = _load_raw(parent_path, (*seen, path.resolve()), max_bytes)
    merged.pop("name", None)
    merged.pop("description", None)
    merged.update(data)
    return merged


__all__ = [
    "ARCHITECTURES",
    "BRANDS",
    "C_INT_MAX",
    "C_UINT_MAX",
    "C_ULLONG_MAX",
    "DRIVER_VERSION_BUFFER",
    "FABRIC_STATES",
    "GI_PROFILES",
    "MAX_EXTENDS_DEPTH",
    "MAX_GPUS",
    "MAX_GPU_INSTANCE_ID",
    "MAX_MIG_SLICES",
    "MAX_MINOR",
    "MAX_NUMA_NODE",
    "MAX_PROFILE_BYTES",
    "MODELS_FILE",
    "NAME_BUFFER",
    "NVLINK_MAX_LINKS",
    "NVSWITCH_PCI_DEVICE_IDS",
    "PROFILES_DIR",
    "TOPOLOGY_LEVELS",
    "UUID_BUFFER",
    "VGPU_FIELD_BYTES",
    "ComputeInstance",
    "FabricSpec",
    "GpuInstance",
    "GpuSpec",
    "MigProfile",
    "Model",
    "NvSwitchSpec",
    "Profile",
    "ProfileError",
    "Topology",
    "VgpuSpec",
    "list_profiles",
    "load_profile",
]

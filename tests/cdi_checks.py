"""Checks every CDI spec the tests produce must pass: the CDI JSON schema and runtime invariants.

The schema is the CDI project's own (vendored under tests/data/cdi-schema, see its README),
validated with ``jsonschema`` (draft-07, cross-file ``$ref`` resolved through a
``referencing`` registry). The invariants are what a container runtime relies on and the
schema cannot express: mounts' host paths exist, hook paths are absolute, device names are
unique and valid, the stated ``cdiVersion`` covers the content, and the names Allocate hands
out resolve to devices of the spec.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT7

from deviceplugin.cdi import minimum_cdi_version

SCHEMA_DIR = Path(__file__).parent / "data" / "cdi-schema"
VERSIONS = ("0.3.0", "0.4.0", "0.5.0", "0.6.0", "0.7.0", "0.8.0", "1.0.0", "1.1.0")
# The fields of CDI's Go types (specs-go/config.go): the schema leaves extra keys open.
SPEC_KEYS = frozenset({"cdiVersion", "kind", "annotations", "devices", "containerEdits"})
DEVICE_KEYS = frozenset({"name", "annotations", "containerEdits"})
# CDI's device-name rule (parser.go ValidateDeviceName): alphanumerics first and last, then
# also '-', '_', '.', ':'.
DEVICE_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9_.:-]*[A-Za-z0-9])?$")


@cache
def _validator() -> jsonschema.Draft7Validator:
    def load(name: str) -> Any:
        return json.loads((SCHEMA_DIR / name).read_text())

    # schema.json refers to "defs.json#/..." relative to its own (empty) base URI.
    registry: Registry = Registry().with_resources(
        (name, Resource.from_contents(load(name), default_specification=DRAFT7))
        for name in ("schema.json", "defs.json"))
    return jsonschema.Draft7Validator(load("schema.json"), registry=registry)


def schema_errors(spec: Mapping[str, Any]) -> list[str]:
    """Every schema violation, as 'path: message'."""
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in _validator().iter_errors(spec)]


def check_spec(spec: Mapping[str, Any], *, host_exists: Callable[[str], bool] = os.path.lexists,
               allocated: Iterable[str] = ()) -> None:
    """Assert ``spec`` passes the schema and the invariants; ``allocated`` are fully qualified
    names (``kind=name``) an Allocate returned, each of which must name a device here."""
    assert schema_errors(spec) == []
    assert set(spec) <= SPEC_KEYS, set(spec) - SPEC_KEYS
    for device in spec["devices"]:
        assert set(device) <= DEVICE_KEYS, set(device) - DEVICE_KEYS
    json.dumps(spec)  # serialisable as is
    assert spec["cdiVersion"] in VERSIONS
    assert VERSIONS.index(spec["cdiVersion"]) >= VERSIONS.index(minimum_cdi_version(spec)), (
        f"cdiVersion {spec['cdiVersion']} below what the content needs")
    names = [d["name"] for d in spec["devices"]]
    assert len(names) == len(set(names)), f"duplicate device names: {names}"
    for name in names:
        assert DEVICE_NAME.match(name), f"invalid CDI device name {name!r}"
    for edits in _all_edits(spec):
        for mount in edits.get("mounts", ()):
            assert os.path.isabs(mount["containerPath"]), mount
            assert host_exists(mount["hostPath"]), f"mount source missing: {mount['hostPath']}"
        for hook in edits.get("hooks", ()):
            assert os.path.isabs(hook["path"]), f"hook path not absolute: {hook['path']}"
            assert hook["hookName"] == "createContainer"
            assert hook["args"], hook
        for node in edits.get("deviceNodes", ()):
            assert os.path.isabs(node["path"]), node
        gids = edits.get("additionalGids", [])
        assert all(isinstance(g, int) and 0 <= g < 1 << 32 for g in gids), gids
    known = {f"{spec['kind']}={name}" for name in names}
    for qualified in allocated:
        assert qualified in known, f"{qualified} is not a device of the spec"


def allocated_names(annotations: Mapping[str, str], cdi_devices: Iterable[str],
                    prefix: str = "cdi.k8s.io/") -> list[str]:
    """The CDI names an Allocate answer carries, from its annotations or CRI devices."""
    names = list(cdi_devices)
    for key, value in annotations.items():
        if key.startswith(prefix):
            names += value.split(",")
    return names


def _all_edits(spec: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return [spec.get("containerEdits") or {}] + [d["containerEdits"] for d in spec["devices"]]

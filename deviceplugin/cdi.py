"""The CDI spec that makes ``k8s.device-plugin.nvidia.com/gpu=<id>`` names resolvable.

With a CDI device-list strategy (``cdi-annotations``, ``cdi-cri``) Allocate hands the runtime
fully qualified CDI names instead of ``NVIDIA_VISIBLE_DEVICES``; the runtime looks them up in the
JSON specs under ``/var/run/cdi``. We write one spec per node: a device per GPU / MIG device,
named both by UUID and by NVIDIA's index (so either ``--device-id-strategy`` resolves), whose
edits add its device nodes, plus common edits with the control nodes and
``NVIDIA_VISIBLE_DEVICES=void`` (so the NVIDIA runtime hook does not inject devices itself).

Format facts (CDI spec): ``cdiVersion`` 0.5.0 is the first with ``deviceNodes[].hostPath`` and
device names that start with a digit (our index names, "0", "3:1").
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from deviceplugin.allocate import (
    CDI_KIND,
    CDI_STRATEGIES,
    CONTROL_DEVICE_NODES,
    MIG_MINORS_FILE,
    VISIBLE_DEVICES_ENV,
    device_node_paths,
    host_path,
    read_mig_minors,
)
from gpus.atomicfile import replace_file
from gpus.config import Config
from gpus.resources import Device, ResourceMap

LOG = logging.getLogger(__name__)

CDI_VERSION = "0.5.0"
SPEC_FILE_NAME = CDI_KIND.replace("/", "-") + ".json"  # k8s.device-plugin.nvidia.com-gpu.json


class CdiError(RuntimeError):
    """The CDI spec could not be built or written; the message says where and why."""


def cdi_enabled(config: Config) -> bool:
    """True when a CDI device-list strategy is configured."""
    return bool(CDI_STRATEGIES.intersection(config.flags.plugin.device_list_strategy))


def build_cdi_spec(
    resource_map: ResourceMap,
    config: Config,
    *,
    path_exists: Callable[[str], bool] = os.path.exists,
    mig_minors: Callable[[str], Mapping[str, int]] = read_mig_minors,
    problems: list[str] | None = None,
) -> dict[str, Any]:
    """The CDI spec as a JSON-ready dict (pure apart from the injected look-ups).

    Devices are ordered by GPU index, then MIG index; each appears once even when several
    resources (replicas, renames) advertise it. A MIG device whose capability minors cannot
    be read (the mig-minors file unreadable or without it) is left out, so whole GPUs stay
    usable: why is appended to ``problems`` (once per cause) and logged as an error. Allocate
    refuses those MIG devices with the same reason.
    """
    dev_root = config.flags.dev_root
    driver_root = config.flags.nvidia_driver_root
    minors_path = host_path(driver_root, MIG_MINORS_FILE)
    cache: dict[str, Mapping[str, int] | CdiError] = {}
    found: list[str] = [] if problems is None else problems

    def report(problem: str) -> None:
        if problem not in found:
            found.append(problem)
            LOG.error("%s", problem)

    def minors() -> Mapping[str, int]:
        if "table" not in cache:  # read once, and a failure once: it is the same for all
            try:
                cache["table"] = mig_minors(driver_root)
            except (OSError, ValueError) as err:
                cache["table"] = CdiError(
                    f"MIG devices left out of the CDI spec: reading {minors_path} failed: {err}"
                )
        table = cache["table"]
        if isinstance(table, CdiError):
            raise table
        return table

    def node(path: str) -> dict[str, str]:
        entry = {"path": path}
        host = host_path(dev_root, path)
        if host != path:
            entry["hostPath"] = host
        return entry

    cdi_devices: list[dict[str, Any]] = []
    for device in _physical_devices(resource_map):
        try:
            paths = device_node_paths(device, minors)
        except CdiError as err:
            report(str(err))
            continue
        except KeyError as err:
            report(f"MIG device {device.uuid} left out of the CDI spec: {err.args[0]} is not "
                   f"listed in {minors_path}")
            continue
        edits = {"deviceNodes": [node(path) for path in paths]}
        for name in dict.fromkeys((device.uuid, device.index)):
            cdi_devices.append({"name": name, "containerEdits": edits})

    control = [node(path) for path in CONTROL_DEVICE_NODES
               if path_exists(host_path(dev_root, path))]
    common: dict[str, Any] = {"env": [f"{VISIBLE_DEVICES_ENV}=void"]}
    if control:
        common["deviceNodes"] = control
    return {
        "cdiVersion": CDI_VERSION,
        "kind": CDI_KIND,
        "devices": cdi_devices,
        "containerEdits": common,
    }


def write_cdi_spec(
    resource_map: ResourceMap,
    config: Config,
    *,
    path_exists: Callable[[str], bool] = os.path.exists,
    mig_minors: Callable[[str], Mapping[str, int]] = read_mig_minors,
    problems: list[str] | None = None,
) -> Path | None:
    """Write the spec into ``flags.plugin.cdiSpecDir`` atomically; None when CDI is not in use.

    The file (``k8s.device-plugin.nvidia.com-gpu.json``) is replaced in one step (temporary file
    in the same directory, then ``os.replace``), so a runtime never reads half a spec. Raises
    CdiError when the directory cannot be created or written; the previous file, if any, is
    then left as it was. MIG devices that cannot be described are left out and reported in
    ``problems`` (see :func:`build_cdi_spec`).
    """
    if not cdi_enabled(config):
        return None
    spec = build_cdi_spec(resource_map, config, path_exists=path_exists, mig_minors=mig_minors,
                          problems=problems)
    directory = Path(config.flags.plugin.cdi_spec_dir)
    target = directory / SPEC_FILE_NAME
    try:
        _make_dirs(directory)
        _atomic_write(target, json.dumps(spec, indent=2) + "\n")
    except OSError as err:
        raise CdiError(f"cannot write CDI spec {target}: {err.strerror or err}") from err
    LOG.info("wrote CDI spec %s (%d device names)", target, len(spec["devices"]))
    return target


def _make_dirs(directory: Path) -> None:
    """``mkdir -p`` with every new level 0755 whatever the umask (Path.mkdir gives parents
    the umask's mode): whoever can write in the spec directory can inject mounts into
    containers."""
    missing = []
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent
    for level in reversed(missing):
        with contextlib.suppress(FileExistsError):
            level.mkdir(mode=0o755)
            os.chmod(level, 0o755)  # mkdir's mode is masked by the umask too


def _physical_devices(resource_map: ResourceMap) -> list[Device]:
    """One Device per GPU / MIG UUID across all resources, by GPU index then MIG index."""
    unique: dict[str, Device] = {}
    for resource in resource_map.resources.values():
        for device in resource.devices:
            unique.setdefault(device.uuid, device)
    return sorted(unique.values(),
                  key=lambda d: (d.gpu.index, -1 if d.mig is None else d.mig.index))


def _atomic_write(target: Path, text: str) -> None:
    """Write ``text`` to ``target`` atomically (see :func:`gpus.atomicfile.replace_file`)."""
    replace_file(target, text)


"""Allocate: which environment, mounts, device nodes and CDI names a container gets.

A pure function of the resource, the requested device IDs and the configuration (file-system
look-ups are injected), so every device-list strategy is tested with plain data. The gRPC server
only converts the :class:`ContainerAllocation` into a ``ContainerAllocateResponse``.

Strategies (``flags.plugin.deviceListStrategy``, combinable), as NVIDIA's plugin does them:

- ``envvar``: ``NVIDIA_VISIBLE_DEVICES=<id1>,<id2>``.
- ``volume-mounts``: ``NVIDIA_VISIBLE_DEVICES=/var/run/nvidia-container-devices`` plus a
  ``/dev/null`` mount per device at ``/var/run/nvidia-container-devices/<id>``. When combined with
  ``envvar``, NVIDIA's plugin sets the ``envvar`` value first and then overwrites it with the
  ``volume-mounts`` one, so the environment variable names the directory and the mounts list the
  devices; we do the same.
- ``cdi-annotations``: one ``cdi.k8s.io/nvidia-device-plugin_<uuid>`` annotation naming the CDI
  devices; ``cdi-cri``: the same names in the response's ``cdi_devices``.
- Only CDI strategies: no environment variable and no mounts.

MPS resources (``Resource.mps``) get, whatever the strategies (NVIDIA's ``updateReponse`` runs
after them, CDI included), ``CUDA_MPS_PIPE_DIRECTORY`` and two read-write mounts: the
resource's pipe directory and the MPS shm at ``/dev/shm`` (:func:`gpus.mps.client_env`,
:func:`gpus.mps.client_mounts`, host paths under ``--mps-root``).
"""

from __future__ import annotations

import dataclasses
import os
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import field
from typing import Any

from deviceplugin import extras as extras_mod
from gpus import mps
from gpus.config import Config
from gpus.records import record
from gpus.resources import Device, Resource

VISIBLE_DEVICES_ENV = "NVIDIA_VISIBLE_DEVICES"
VOLUME_MOUNTS_ROOT = "/var/run/nvidia-container-devices"
VOLUME_MOUNTS_HOST_PATH = "/dev/null"
CDI_KIND = "k8s.device-plugin.nvidia.com/gpu"
CDI_ANNOTATION_PREFIX = "cdi.k8s.io/"
CDI_ANNOTATION_PLUGIN = "nvidia-device-plugin"
CDI_STRATEGIES = frozenset({"cdi-annotations", "cdi-cri"})
# Control nodes every GPU container needs; each is passed only when present on the host.
CONTROL_DEVICE_NODES = (
    "/dev/nvidiactl",
    "/dev/nvidia-uvm",
    "/dev/nvidia-uvm-tools",
    "/dev/nvidia-modeset",
)
MIG_MINORS_FILE = "proc/driver/nvidia-caps/mig-minors"
NVIDIA_CAPS_DIR = "/dev/nvidia-caps"


def cdi_enabled(config: Config) -> bool:
    """True when a CDI device-list strategy is configured."""
    return bool(CDI_STRATEGIES.intersection(config.flags.plugin.device_list_strategy))


@record
class Mount:
    """A bind mount for the container (kubelet ``Mount``)."""

    container_path: str
    host_path: str
    read_only: bool = True


@record
class DeviceSpec:
    """A device node for the container (kubelet ``DeviceSpec``)."""

    container_path: str
    host_path: str
    permissions: str = "rw"


@record
class ContainerAllocation:
    """Everything one container gets for its share of a resource."""

    envs: Mapping[str, str] = field(default_factory=dict)
    mounts: tuple[Mount, ...] = ()
    devices: tuple[DeviceSpec, ...] = ()
    annotations: Mapping[str, str] = field(default_factory=dict)
    cdi_devices: tuple[str, ...] = ()


class AllocationError(ValueError):
    """An Allocate request that cannot be served; ``str()`` is the message the kubelet sees."""


def invalid_request(resource_name: str, reason: str) -> AllocationError:
    """NVIDIA's wording: ``invalid allocation request for "<name>": invalid request: <reason>``."""
    return AllocationError(f'invalid allocation request for "{resource_name}": '
                           f"invalid request: {reason}")


def cdi_device_name(device_id: str) -> str:
    """The fully qualified CDI name of one device: ``k8s.device-plugin.nvidia.com/gpu=<id>``."""
    return f"{CDI_KIND}={device_id}"


def host_path(root: str, path: str) -> str:
    """``path`` (absolute, as seen in the container) under the host directory ``root``."""
    return os.path.join(root or "/", path.lstrip("/"))


def read_mig_minors(driver_root: str) -> dict[str, int]:
    """Parse ``<driver root>/proc/driver/nvidia-caps/mig-minors``.

    Lines look like ``gpu0/gi1/access 12`` and ``gpu0/gi1/ci0/access 13`` (the key uses the
    parent GPU's minor number); the number is the minor of ``/dev/nvidia-caps/nvidia-cap<N>``.
    Raises OSError when the file cannot be read and ValueError (naming the line) when a line is
    malformed.
    """
    path = host_path(driver_root, MIG_MINORS_FILE)
    minors: dict[str, int] = {}
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 2 or not fields[1].isdigit():
                raise ValueError(f"{path}:{number}: expected '<capability> <minor>', "
                                 f"got {line.strip()!r}")
            minors[fields[0]] = int(fields[1])
    return minors


def build_allocation(
    resource: Resource,
    requested_ids: Sequence[str],
    config: Config,
    *,
    uuid_factory: Callable[[], str] = lambda: str(uuid.uuid4()),
    path_exists: Callable[[str], bool] = os.path.exists,
    mig_minors: Callable[[str], Mapping[str, int]] = read_mig_minors,
    index: Mapping[str, Device] | None = None,
) -> ContainerAllocation:
    """Build one container's allocation for ``requested_ids`` of ``resource``.

    Errors (all :class:`AllocationError`, message as the kubelet will show it):

    - empty request: ``invalid allocation request for "<name>": invalid request: no devices
      requested``;
    - an ID the resource does not have: ``... invalid request: unknown device: <id>``;
    - an Unhealthy device (ours; NVIDIA leaves this to the kubelet): ``... invalid request:
      unhealthy device: <id>``;
    - more than one replica of a shared resource with ``failRequestsGreaterThanOne``:
      ``... invalid request: maximum request size for shared resources is 1; found <n>``;
    - ``passDeviceSpecs`` for a MIG device when the MIG capability minors cannot be read or do
      not list the device.

    ``mig_minors`` is called (with the driver root) only when MIG device specs are needed.
    ``index`` is :func:`device_index` of ``resource`` when the caller keeps one (Allocate is on
    the pod start path; :class:`deviceplugin.rm.GpuResourceManager` builds it once per resource
    version).
    """
    ids = tuple(requested_ids)  # once: a protobuf repeated field makes new str objects per pass
    devices = _requested_devices(resource, ids, device_index(resource) if index is None else index)
    plugin = config.flags.plugin
    # Distinct physical devices have distinct UUIDs and indexes: no de-duplication needed.
    if plugin.device_id_strategy == "index":
        runtime_ids = [device.index for device in devices]
    else:
        runtime_ids = [device.uuid for device in devices]
    strategies = plugin.device_list_strategy

    envs: dict[str, str] = {}
    mounts: tuple[Mount, ...] = ()
    if "envvar" in strategies:
        envs[VISIBLE_DEVICES_ENV] = ",".join(runtime_ids)
    if "volume-mounts" in strategies:
        envs[VISIBLE_DEVICES_ENV] = VOLUME_MOUNTS_ROOT
        mounts = tuple(
            Mount(container_path=f"{VOLUME_MOUNTS_ROOT}/{device_id}",
                  host_path=VOLUME_MOUNTS_HOST_PATH, read_only=False)  # as NVIDIA's
            for device_id in runtime_ids
        )

    annotations: dict[str, str] = {}
    cdi_devices: tuple[str, ...] = ()
    if "cdi-annotations" in strategies or "cdi-cri" in strategies:
        cdi_names = tuple(cdi_device_name(device_id) for device_id in runtime_ids)
        if "cdi-annotations" in strategies:
            key = f"{plugin.cdi_annotation_prefix}{CDI_ANNOTATION_PLUGIN}_{uuid_factory()}"
            annotations[key] = ",".join(cdi_names)
        if "cdi-cri" in strategies:
            cdi_devices = cdi_names

    if resource.mps:
        envs.update(mps.client_env(resource.name))
        mounts += mps_mounts(resource.name, config.flags.mps_root)

    specs: tuple[DeviceSpec, ...] = ()
    if plugin.pass_device_specs:
        specs = _device_specs(resource.name, devices, config, path_exists, mig_minors)

    return add_extras(ContainerAllocation(envs=envs, mounts=mounts, devices=specs,
                                          annotations=annotations, cdi_devices=cdi_devices),
                      config)  # GDS, MOFED, gdrcopy, IMEX channels (deviceplugin/extras.py)


def mps_mounts(resource_name: str, mps_root: str) -> tuple[Mount, ...]:
    """The pipe and shm mounts of an MPS client, read-write as NVIDIA's (``mps_root`` is the
    host's ``--mps-root``)."""
    return tuple(Mount(container_path=m.container_path, host_path=m.host_path, read_only=False)
                 for m in mps.client_mounts(resource_name, mps_root))


def device_index(resource: Resource) -> dict[str, Device]:
    """``resource``'s devices by kubelet device ID."""
    return {device.id: device for device in resource.devices}


def _requested_devices(
    resource: Resource, requested_ids: Sequence[str], by_id: Mapping[str, Device]
) -> list[Device]:
    """Validate the request; return the distinct physical devices in request order."""
    if not requested_ids:
        raise invalid_request(resource.name, "no devices requested")
    physical: dict[str, Device] = {}
    for device_id in requested_ids:
        device = by_id.get(device_id)
        if device is None:
            raise invalid_request(resource.name, f"unknown device: {device_id}")
        if not device.healthy:
            raise invalid_request(resource.name, f"unhealthy device: {device_id}")
        # device.uuid is the ID without its replica suffix: replicas of one GPU collapse.
        physical.setdefault(device.uuid, device)
    if resource.shared and resource.fail_requests_greater_than_one and len(requested_ids) > 1:
        raise invalid_request(
            resource.name,
            f"maximum request size for shared resources is 1; found {len(requested_ids)}",
        )
    return list(physical.values())


def _unique(items: Iterable[str]) -> list[str]:
    """Distinct strings, first occurrence order."""
    return list(dict.fromkeys(items))


def device_node_paths(device: Device, minors: Callable[[], Mapping[str, int]]) -> list[str]:
    """Container paths of one device's own nodes: ``/dev/nvidia<minor>`` (+ MIG caps).

    ``minors`` returns the parsed mig-minors table and is only called for MIG devices. A MIG
    device missing from the table raises KeyError naming the capability.
    """
    paths = [f"/dev/nvidia{device.gpu.minor}"]
    if device.mig is not None:
        table = minors()
        prefix = f"gpu{device.gpu.minor}/gi{device.mig.gpu_instance_id}"
        compute = f"{prefix}/ci{device.mig.compute_instance_id}/access"
        for capability in (f"{prefix}/access", compute):
            if capability not in table:
                raise KeyError(capability)
            paths.append(f"{NVIDIA_CAPS_DIR}/nvidia-cap{table[capability]}")
    return paths


def _device_specs(
    resource_name: str,
    devices: Sequence[Device],
    config: Config,
    path_exists: Callable[[str], bool],
    mig_minors: Callable[[str], Mapping[str, int]],
) -> tuple[DeviceSpec, ...]:
    """Control nodes present under the dev root, then each device's nodes, without repeats."""
    dev_root = config.flags.dev_root
    driver_root = config.flags.nvidia_driver_root
    cache: dict[str, Mapping[str, int]] = {}

    def minors() -> Mapping[str, int]:
        # Read lazily and once: only MIG allocations need the file.
        if "table" not in cache:
            try:
                cache["table"] = mig_minors(driver_root)
            except (OSError, ValueError) as err:
                raise AllocationError(
                    f'cannot allocate MIG devices of "{resource_name}" with device specs: '
                    f"reading MIG capability minors under {driver_root!r} failed: {err}"
                ) from err
        return cache["table"]

    paths = [path for path in CONTROL_DEVICE_NODES if path_exists(host_path(dev_root, path))]
    for device in devices:
        try:
            paths.extend(device_node_paths(device, minors))
        except KeyError as err:
            raise AllocationError(
                f'cannot allocate MIG device {device.uuid} of "{resource_name}" with device '
                f"specs: {err.args[0]} is not listed in "
                f"{host_path(driver_root, MIG_MINORS_FILE)}"
            ) from err
    return tuple(DeviceSpec(container_path=path, host_path=host_path(dev_root, path))
                 for path in _unique(paths))


def add_extras(allocation: ContainerAllocation, config: Config) -> ContainerAllocation:
    """``allocation`` with the configuration's extras (GDS, MOFED, gdrcopy, IMEX channels:
    :mod:`deviceplugin.extras` decides which) added as each device-list strategy carries them."""
    if not extras_mod.wants_extras(config):
        return allocation
    extras = extras_mod.compute_extras(config)
    if extras.empty:
        return allocation
    plugin = config.flags.plugin
    strategies = set(plugin.device_list_strategy)
    changes: dict[str, Any] = {}
    if extras.cdi_names:
        joined = ",".join(extras.cdi_names)
        changes["annotations"] = {key: f"{value},{joined}"
                                  for key, value in allocation.annotations.items()}
        if allocation.cdi_devices:
            changes["cdi_devices"] = allocation.cdi_devices + extras.cdi_names
    if not strategies <= CDI_STRATEGIES:  # NVIDIA adds env vars only with a non-CDI strategy
        envs = dict(allocation.envs)
        envs.update(extras.envs)
        if "envvar" in strategies and extras.imex_env:
            envs[extras_mod.IMEX_ENV] = extras.imex_env
        changes["envs"] = envs
        if plugin.pass_device_specs and extras.device_paths:
            dev_root = config.flags.dev_root
            known = {spec.container_path for spec in allocation.devices}
            changes["devices"] = allocation.devices + tuple(
                DeviceSpec(container_path=path, host_path=host_path(dev_root, path))
                for path in extras.device_paths if path not in known)
    return dataclasses.replace(allocation, **changes)

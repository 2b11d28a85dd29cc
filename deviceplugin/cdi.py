"""The CDI spec that makes ``k8s.device-plugin.nvidia.com/gpu=<id>`` names resolvable.

With a CDI device-list strategy (``cdi-annotations``, ``cdi-cri``) Allocate hands the runtime
fully qualified CDI names instead of ``NVIDIA_VISIBLE_DEVICES``; the runtime looks them up in the
JSON specs under ``/var/run/cdi``. We write one spec per node, as NVIDIA's plugin does through
the container toolkit's nvcdi library: a device per GPU / MIG device named by the configured
``--device-id-strategy`` (UUID, or index "0" / "3:1"), whose edits add its device nodes, plus
common edits that give the container the driver (see :func:`common_edits`): control device
nodes, the driver's libraries, binaries, firmware and IPC sockets as read-only bind mounts,
``NVIDIA_VISIBLE_DEVICES=void`` (so the NVIDIA runtime hook does not inject devices itself) and
the toolkit's ``createContainer`` hooks (symlinks, ldcache, CUDA compat, ...).

The saved ``cdiVersion`` is the lowest the content needs (CDI's ``MinimumRequiredVersion``):
0.5.0 as soon as a device node has a ``hostPath`` (always: the host-root transform fills it) or
a device name starts with a digit. Devices are sorted by name; mounts and device nodes by path
depth, then path.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from deviceplugin.allocate import (
    CDI_KIND,
    CDI_STRATEGIES,
    CONTROL_DEVICE_NODES,
    MIG_MINORS_FILE,
    VISIBLE_DEVICES_ENV,
    cdi_enabled,  # its home is allocate, beside CDI_STRATEGIES
    device_node_paths,
    host_path,
    read_mig_minors,
)
from deviceplugin.extras import CDI_VENDOR, EXTRA_CLASSES, extra_cdi_specs
from gpus.atomicfile import replace_file
from gpus.config import Config
from gpus.driver.discover import (
    DeviceNode,
    DriverError,
    DriverFile,
    DriverInfo,
    DriverRoots,
    Link,
    discover_driver,
)
from gpus.records import record
from gpus.resources import Device, ResourceMap

LOG = logging.getLogger(__name__)

CDI_VERSION = "0.5.0"  # what our specs need: device nodes carry hostPath
MIN_CDI_VERSION = "0.3.0"  # CDI never computes a lower minimum
SPEC_FILE_NAME = CDI_KIND.replace("/", "-") + ".json"  # k8s.device-plugin.nvidia.com-gpu.json


class CdiError(RuntimeError):
    """The CDI spec could not be built or written; the message says where and why."""


FILE_MOUNT_OPTIONS = ("ro", "nosuid", "nodev", "rbind", "rprivate")
SOCKET_MOUNT_OPTIONS = ("nosuid", "nodev", "rbind", "rprivate", "noexec")
HOOK_STAGE = "createContainer"
HOOK_ENV = ("NVIDIA_CTK_DEBUG=false",)
LIBCUDA_DIR_ENV = "NVIDIA_CTK_LIBCUDA_DIR"
HOOK_NAMES = ("create-symlinks", "update-ldcache", "enable-cuda-compat",
              "disable-device-node-modification", "update-application-profile", "chmod")
DISABLED_BY_DEFAULT = frozenset({"chmod"})
FEATURE_FLAGS = frozenset({
    "enable-explicit-driver-libraries", "disable-nvsandboxutils", "disable-nvsandbox-utils",
    "enable-coherent-annotations", "disable-multiple-csv-devices",
    "no-additional-gids-for-device-nodes", "disable-ipc-discoverer",
})
# CDI's version rules (specs-go/version.go) for what this module can emit.
_VERSIONS = ("0.3.0", "0.4.0", "0.5.0", "0.6.0", "0.7.0")


@record
class CdiOptions:
    """The CDI settings of NVIDIA's plugin, with its defaults (the caller maps the flags).

    ``driver_root`` is ``--driver-root`` (the host's driver root), ``driver_root_ctr_path``
    ``--driver-root-ctr-path`` (where it is mounted in the plugin's container), ``hook_path``
    ``--nvidia-cdi-hook-path`` / ``--nvidia-ctk-path``, ``feature_flags``
    ``--cdi-feature-flags``, ``disabled_hooks`` ``--cdi-disable-hooks`` (``all`` disables all)
    and ``annotation_prefix`` ``--cdi-annotation-prefix``.
    """

    driver_root: str = "/"
    driver_root_ctr_path: str = "/driver-root"
    hook_path: str = "/usr/bin/nvidia-ctk"
    feature_flags: tuple[str, ...] = ()
    disabled_hooks: tuple[str, ...] = ()
    annotation_prefix: str = "cdi.k8s.io/"

    def host_hook_path(self) -> str:
        """The hook path as the runtime (on the host) runs it: a path inside the plugin's view
        of the driver root is rewritten onto the host driver root, as NVIDIA's transform does."""
        prefix = self.driver_root_ctr_path.rstrip("/")
        if prefix and (self.hook_path == prefix or self.hook_path.startswith(prefix + "/")):
            return os.path.join(self.driver_root or "/",
                                self.hook_path[len(prefix):].lstrip("/"))
        return self.hook_path

    def hook_enabled(self, name: str) -> bool:
        """NVIDIA's rule: ``all`` or the name in ``--cdi-disable-hooks`` drops a hook; chmod
        is off unless asked for (nothing asks for it in the plugin)."""
        disabled = set(self.disabled_hooks)
        return not ({"all", name} & disabled) and name not in DISABLED_BY_DEFAULT

    def feature(self, name: str) -> bool:
        """True when feature flag ``name`` is set."""
        return name in self.feature_flags

    @classmethod
    def from_config(cls, config: Config) -> CdiOptions:
        """The options as the configuration's rows give them (``flags.plugin.cdi_*``,
        ``--driver-root``, ``--driver-root-ctr-path``, ``--nvidia-cdi-hook-path``)."""
        plugin = config.flags.plugin
        return cls(driver_root=config.flags.nvidia_driver_root,
                   driver_root_ctr_path=plugin.container_driver_root,
                   hook_path=plugin.nvidia_cdi_hook_path,
                   feature_flags=tuple(plugin.cdi_feature_flags),
                   disabled_hooks=tuple(plugin.cdi_disable_hooks),
                   annotation_prefix=plugin.cdi_annotation_prefix)


def unknown_feature_flags(options: CdiOptions) -> list[str]:
    """Feature flags NVIDIA's toolkit does not know (it ignores them; callers may warn)."""
    return [flag for flag in options.feature_flags if flag not in FEATURE_FLAGS]


def discover_for_cdi(config: Config, options: CdiOptions, driver_version: str | None, *,
                     allow_plain_device_files: bool = False,
                     kernel_release: str | None = None) -> DriverInfo | None:
    """The driver a CDI spec needs, or None when no CDI strategy is configured.

    Only CDI strategies read the driver root (``envvar`` / ``volume-mounts`` leave the driver
    to the NVIDIA runtime), so a missing driver changes nothing there. With a CDI strategy a
    missing libcuda / libnvidia-ml is a CdiError naming what was looked for and where, as
    NVIDIA's plugin refuses to start then. ``driver_version`` is NVML's (inferred if None).
    """
    if not cdi_enabled(config):
        return None
    for flag in unknown_feature_flags(options):
        LOG.warning("ignoring unknown CDI feature flag %r (known: %s)", flag,
                    ", ".join(sorted(FEATURE_FLAGS)))
    for hook in options.disabled_hooks:
        if hook not in HOOK_NAMES and hook != "all":
            LOG.warning("--cdi-disable-hooks: unknown hook %r ignored (known: %s, all)", hook,
                        ", ".join(HOOK_NAMES))
    roots = DriverRoots(driver_root=options.driver_root,
                        driver_root_ctr_path=options.driver_root_ctr_path,
                        dev_root=config.flags.nvidia_dev_root)
    try:
        return discover_driver(
            roots, driver_version, kernel_release=kernel_release,
            ipc=not options.feature("disable-ipc-discoverer"),
            explicit_libraries=options.feature("enable-explicit-driver-libraries"),
            allow_plain_device_files=allow_plain_device_files)
    except DriverError as err:
        raise CdiError(f"CDI device-list strategy {'/'.join(_cdi_strategies(config))}: "
                       f"{err}") from err


def _cdi_strategies(config: Config) -> list[str]:
    return [s for s in config.flags.plugin.device_list_strategy if s in CDI_STRATEGIES]


def build_cdi_spec(
    resource_map: ResourceMap,
    config: Config,
    *,
    path_exists: Callable[[str], bool] = os.path.exists,
    mig_minors: Callable[[str], Mapping[str, int]] = read_mig_minors,
    problems: list[str] | None = None,
    driver: DriverInfo | None = None,
    options: CdiOptions | None = None,
) -> dict[str, Any]:
    """The CDI spec as a JSON-ready dict (pure apart from the injected look-ups).

    Each physical device appears once (replicas and renamed resources share it), named by
    ``--device-id-strategy``. A MIG device whose capability minors cannot be read (the
    mig-minors file unreadable or without it) is left out, so whole GPUs stay usable: why is
    appended to ``problems`` (once per cause) and logged as an error. Allocate refuses those
    MIG devices with the same reason.

    With ``driver`` (see :func:`gpus.driver.discover.discover_driver`) the common edits carry
    the driver as NVIDIA's do; without it only device nodes and the env (the control nodes
    then come from ``path_exists`` under the dev root).
    """
    options = options or CdiOptions()
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

    def node(path: str) -> dict[str, Any]:
        known = driver.device_node(path) if driver is not None else None
        if known is not None:
            return _device_node(known)
        # NVIDIA's host-root transform fills hostPath from path, so it is always present.
        return {"path": path, "hostPath": host_path(dev_root, path)}

    by_index = config.flags.plugin.device_id_strategy == "index"
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
        nodes = _sorted_by_path([node(path) for path in paths])
        cdi_devices.append({"name": device.index if by_index else device.uuid,
                            "containerEdits": {"deviceNodes": nodes}})

    if driver is None:
        control = [node(path) for path in CONTROL_DEVICE_NODES
                   if path_exists(host_path(dev_root, path))]
        common: dict[str, Any] = {"env": [f"{VISIBLE_DEVICES_ENV}=void"]}
        if control:
            common["deviceNodes"] = _sorted_by_path(control)
    else:
        common = common_edits(driver, options)
    spec: dict[str, Any] = {
        "cdiVersion": CDI_VERSION,
        "kind": CDI_KIND,
        "devices": sorted(cdi_devices, key=lambda d: str(d["name"])),
        "containerEdits": common,
    }
    spec["cdiVersion"] = minimum_cdi_version(spec)
    return spec


def common_edits(driver: DriverInfo, options: CdiOptions) -> dict[str, Any]:
    """The edits every container of the spec gets, as nvcdi builds them in nvml mode."""
    env = [f"{LIBCUDA_DIR_ENV}={':'.join(driver.library_dirs)}", f"{VISIBLE_DEVICES_ENV}=void"]
    nodes = [n for n in driver.device_nodes if n.path in CONTROL_DEVICE_NODES]
    mounts = [_mount(f, FILE_MOUNT_OPTIONS) for f in (
        *driver.libraries, *driver.configs, *driver.firmware, *driver.binaries)]
    if not options.feature("disable-ipc-discoverer"):
        mounts += [_mount(f, SOCKET_MOUNT_OPTIONS) for f in driver.sockets]
    edits: dict[str, Any] = {
        "env": env,
        "deviceNodes": _sorted_by_path([_device_node(n) for n in nodes]),
        "mounts": _sorted_by_path(list({m["containerPath"]: m for m in mounts}.values()),
                                  key="containerPath"),
        "hooks": _hooks(driver, options),
    }
    gids = sorted({n.gid for n in nodes if _needs_gid(n)})
    if gids and not options.feature("no-additional-gids-for-device-nodes"):
        edits["additionalGids"] = gids
    return {key: value for key, value in edits.items() if value}


def minimum_cdi_version(spec: Mapping[str, Any]) -> str:
    """The lowest ``cdiVersion`` whose features cover ``spec`` (CDI's rules; never < 0.3.0)."""
    edits = [spec.get("containerEdits") or {}]
    edits += [d.get("containerEdits") or {} for d in spec.get("devices", ())]
    needed = MIN_CDI_VERSION
    if any("type" in m for e in edits for m in e.get("mounts", ())):
        needed = "0.4.0"
    if (any(str(d.get("name", "")).startswith(tuple("0123456789"))
            for d in spec.get("devices", ()))
            or any("hostPath" in n for e in edits for n in e.get("deviceNodes", ()))):
        needed = "0.5.0"
    if (spec.get("annotations") or any(d.get("annotations") for d in spec.get("devices", ()))
            or "." in str(spec.get("kind", "")).partition("/")[2]):
        needed = "0.6.0"
    if any("intelRdt" in e or "additionalGids" in e for e in edits):
        needed = "0.7.0"
    return max(needed, MIN_CDI_VERSION, key=_VERSIONS.index)


def _hooks(driver: DriverInfo, options: CdiOptions) -> list[dict[str, Any]]:
    """nvcdi's hooks, in its order; each only when enabled and not empty."""
    wanted: list[tuple[str, list[str]]] = []
    if driver.graphics_links:
        wanted.append(("create-symlinks", _link_args(driver.graphics_links)))
    if driver.library_links:
        wanted.append(("create-symlinks", _link_args(driver.library_links)))
    wanted.append(("enable-cuda-compat", [f"--host-driver-version={driver.version}"]))
    folders = sorted({os.path.dirname(f.path) for f in driver.libraries})
    if folders:
        wanted.append(("update-ldcache", [a for d in folders for a in ("--folder", d)]))
    wanted.append(("disable-device-node-modification", []))
    wanted.append(("update-application-profile", []))
    return [_hook(options, name, args) for name, args in wanted if options.hook_enabled(name)]


def _hook(options: CdiOptions, subcommand: str, args: list[str]) -> dict[str, Any]:
    """One hook: ``[basename, subcommand, ...]``, or ``nvidia-ctk hook ...`` for nvidia-ctk."""
    base = os.path.basename(options.hook_path)
    argv = [base, "hook", subcommand] if base == "nvidia-ctk" else [base, subcommand]
    return {"hookName": HOOK_STAGE, "path": options.host_hook_path(), "args": argv + args,
            "env": list(HOOK_ENV)}


def _link_args(links: Iterable[Link]) -> list[str]:
    return [a for link in links for a in ("--link", f"{link.target}::{link.link}")]


def _mount(file: DriverFile, options: tuple[str, ...]) -> dict[str, Any]:
    return {"hostPath": file.host_path, "containerPath": file.path, "options": list(options)}


def _device_node(node: DeviceNode) -> dict[str, Any]:
    """A discovered node as nvcdi writes it (zero values omitted, hostPath always)."""
    entry: dict[str, Any] = {"path": node.path, "hostPath": node.host_path}
    if node.major:
        entry["major"] = node.major
    if node.minor:
        entry["minor"] = node.minor
    if node.file_mode:
        entry["fileMode"] = node.file_mode
    entry["permissions"] = "rwm"
    if node.gid:
        entry["gid"] = node.gid
    return entry


def _needs_gid(node: DeviceNode) -> bool:
    """A node the container can only use through its group (nvcdi's additionalGids rule)."""
    world_rw = node.file_mode is not None and node.file_mode & 0o006 == 0o006
    return node.gid != 0 and not world_rw


def _sorted_by_path(entries: list[dict[str, Any]], key: str = "path") -> list[dict[str, Any]]:
    """nvcdi's order: by path depth (number of '/'), then lexically."""
    return sorted(entries, key=lambda e: (str(e[key]).count("/"), str(e[key])))


def write_cdi_spec(
    resource_map: ResourceMap,
    config: Config,
    *,
    path_exists: Callable[[str], bool] = os.path.exists,
    mig_minors: Callable[[str], Mapping[str, int]] = read_mig_minors,
    problems: list[str] | None = None,
    driver: DriverInfo | None = None,
    options: CdiOptions | None = None,
) -> Path | None:
    """Write the spec into ``flags.plugin.cdiSpecDir`` atomically; None when CDI is not in use.

    The file (``k8s.device-plugin.nvidia.com-gpu.json``) is replaced in one step (temporary file
    in the same directory, then ``os.replace``), so a runtime never reads half a spec. Raises
    CdiError when the directory cannot be created or written; the previous file, if any, is
    then left as it was. MIG devices that cannot be described are left out and reported in
    ``problems`` (see :func:`build_cdi_spec`). The file is world-readable (0644): every
    runtime on the node reads it.
    """
    if not cdi_enabled(config):
        return None
    spec = build_cdi_spec(resource_map, config, path_exists=path_exists, mig_minors=mig_minors,
                          problems=problems, driver=driver, options=options)
    directory = Path(config.flags.plugin.cdi_spec_dir)
    target = directory / SPEC_FILE_NAME
    try:
        _make_dirs(directory)
        _atomic_write(target, json.dumps(spec, indent=2) + "\n")
    except OSError as err:
        raise CdiError(f"cannot write CDI spec {target}: {err.strerror or err}") from err
    LOG.info("wrote CDI spec %s (%d device names)", target, len(spec["devices"]))
    write_extra_cdi_specs(config)
    return target


def extra_spec_files(config: Config) -> dict[str, Path]:
    """Where the extra classes' specs go (``k8s.device-plugin.nvidia.com-<class>.json``)."""
    directory = Path(config.flags.plugin.cdi_spec_dir)
    return {name: directory / f"{CDI_VENDOR}-{name}.json" for name in EXTRA_CLASSES}


def write_extra_cdi_specs(config: Config) -> list[Path]:
    """Write the specs of the IMEX-channel, GDS, MOFED and gdrcopy classes that have device
    nodes (deviceplugin/extras.py), and remove those of classes that no longer have any, so
    Allocate never names a device no spec holds. CdiError when one cannot be written."""
    specs = extra_cdi_specs(config)
    written = []
    for name, target in extra_spec_files(config).items():
        spec = specs.get(name)
        if spec is None:
            with contextlib.suppress(FileNotFoundError):
                target.unlink()
            continue
        spec = {"cdiVersion": CDI_VERSION, **spec}
        spec["cdiVersion"] = minimum_cdi_version(spec)
        try:
            _atomic_write(target, json.dumps(spec, indent=2) + "\n")
        except OSError as err:
            raise CdiError(f"cannot write CDI spec {target}: {err.strerror or err}") from err
        LOG.info("wrote CDI spec %s (%d device names)", target, len(spec["devices"]))
        written.append(target)
    return written


def remove_cdi_spec(config: Config) -> bool:
    """Remove our spec on a clean stop (no runtime should resolve our names once the plugin
    is gone); True when a file was removed. Errors other than "already gone" are logged, not
    raised: stopping goes on."""
    target = Path(config.flags.plugin.cdi_spec_dir) / SPEC_FILE_NAME
    for extra in extra_spec_files(config).values():
        with contextlib.suppress(OSError):
            extra.unlink()
    try:
        target.unlink()
    except FileNotFoundError:
        return False
    except OSError as err:
        LOG.warning("cannot remove CDI spec %s: %s", target, err.strerror or err)
        return False
    LOG.info("removed CDI spec %s", target)
    return True


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


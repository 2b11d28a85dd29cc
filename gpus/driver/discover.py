"""Find the NVIDIA driver's files under a driver root, as NVIDIA's container toolkit v1.20 does.

Three views of one path: the *container path* (``/usr/lib/x86_64-linux-gnu/libcuda.so.550.1``,
where a workload sees it), the *local path* (under ``driver_root_ctr_path``, where this plugin
reads it) and the *host path* (under ``driver_root``, what the container runtime mounts). The
selection follows the toolkit (see docs/cdi.md): every ``*.so.<version>`` in the directories
that hold the driver's versioned libraries and their ``vdpau/``; the legacy NVVM; graphics
libraries and configuration files; the driver's binaries; GSP firmware for the running
version; IPC sockets when present; control and MIG capability device nodes from the dev root.

Missing ``libcuda`` or ``libnvidia-ml`` is a :class:`DriverError`; optional pieces that are
missing are logged once per discovery.
"""

from __future__ import annotations

import fnmatch
import glob
import logging
import os
import stat
from collections.abc import Iterable
from dataclasses import field

from gpus.driver.elf import ElfError, read_soname
from gpus.driver.ldcache import LdCacheError, read_ld_cache
from gpus.records import record

LOG = logging.getLogger(__name__)

LIBRARY_SEARCH_DIRS = (
    "/",
    "/usr/lib64",
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/usr/lib/x86_64-linux-gnu/nvidia/current",
    "/usr/lib/aarch64-linux-gnu/nvidia/current",
    "/lib64",
    "/lib/x86_64-linux-gnu",
    "/lib/aarch64-linux-gnu",
    "/lib/x86_64-linux-gnu/nvidia/current",
    "/lib/aarch64-linux-gnu/nvidia/current",
)
LD_CACHE = "/etc/ld.so.cache"
BINARIES = ("nvidia-smi", "nvidia-debugdump", "nvidia-persistenced", "nvidia-cuda-mps-control",
            "nvidia-cuda-mps-server", "nvidia-imex", "nvidia-imex-ctl")
BINARY_SEARCH_DIRS = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")
IPC_SOCKETS = ("nvidia-persistenced/socket", "nvidia-fabricmanager/socket")
IPC_SOCKET_DIRS = ("/run", "/var/run")
MPS_PIPE_DIR = "/tmp/nvidia-mps"
CONTROL_DEVICE_NODES = ("/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools",
                        "/dev/nvidia-modeset")
CAPS_DIR = "/dev/nvidia-caps"
EXPLICIT_LIBRARIES = ("libEGL.so", "libGL.so", "libGLESv1_CM.so", "libGLESv2.so", "libGLX.so",
                      "libGLdispatch.so", "libOpenCL.so", "libOpenGL.so", "libnvidia-api.so",
                      "libnvidia-egl-xcb.so", "libnvidia-egl-xlib.so")
GRAPHICS_LIBRARIES = ("libnvidia-egl-gbm.so.*.*", "libnvidia-egl-wayland.so.*.*",
                      "libnvidia-egl-wayland2.so.*.*")
CONFIG_DIRS = ("/etc", "/usr/local/share", "/usr/share")
GRAPHICS_CONFIGS = (
    "glvnd/egl_vendor.d/10_nvidia.json",
    "egl/egl_external_platform.d/15_nvidia_gbm.json",
    "egl/egl_external_platform.d/10_nvidia_wayland.json",
    "egl/egl_external_platform.d/09_nvidia_wayland2.json",
    "nvidia/nvoptix.bin",
    "X11/xorg.conf.d/10-nvidia.conf",
    "X11/xorg.conf.d/nvidia-drm-outputclass.conf",
    "OpenCL/vendors/nvidia.icd",
)
# Mounted under /etc in the container wherever they are found (the toolkit's choice).
VULKAN_CONFIGS = ("vulkan/icd.d/nvidia_icd.json", "vulkan/icd.d/nvidia_layers.json",
                  "vulkan/implicit_layer.d/nvidia_layers.json",
                  "vulkan/icd.d/nvidia_icd.x86_64.json")
FIRMWARE_CLASS_PATH = "/sys/module/firmware_class/parameters/path"
COMPAT_LIBS = "/usr/local/cuda/compat/lib*.so.*"
MAX_SYMLINK_HOPS = 40


class DriverError(RuntimeError):
    """The driver root lacks a required piece; the message names what and where."""


@record
class DriverFile:
    """One file to mount: where the workload sees it, and where the runtime finds it."""

    path: str  # in the workload container
    host_path: str  # on the host (under --driver-root)
    local_path: str  # where this plugin reads it (under --driver-root-ctr-path)


@record
class DeviceNode:
    """A device node under the dev root; numbers are None for a plain stand-in file."""

    path: str  # in the workload container, e.g. /dev/nvidiactl
    host_path: str
    major: int | None = None
    minor: int | None = None
    file_mode: int | None = None  # permission bits, as the toolkit writes them (438 = 0666)
    gid: int = 0

    @property
    def char_device(self) -> bool:
        """True for a real character device (numbers known)."""
        return self.major is not None


@record
class Link:
    """A symlink the ``create-symlinks`` hook makes in the container: ``link`` -> ``target``."""

    target: str
    link: str


@record
class DriverInfo:
    """Everything of the driver a CDI spec mounts or names (all tuples sorted, no duplicates)."""

    version: str
    libraries: tuple[DriverFile, ...]
    library_dirs: tuple[str, ...]  # container paths of the dirs holding lib*.so.<version>
    binaries: tuple[DriverFile, ...] = ()
    firmware: tuple[DriverFile, ...] = ()
    sockets: tuple[DriverFile, ...] = ()
    configs: tuple[DriverFile, ...] = ()
    device_nodes: tuple[DeviceNode, ...] = ()
    library_links: tuple[Link, ...] = ()
    graphics_links: tuple[Link, ...] = ()
    compat_libs: tuple[DriverFile, ...] = ()
    missing: tuple[str, ...] = field(default=(), compare=False)  # optional pieces not found

    def device_node(self, path: str) -> DeviceNode | None:
        """The discovered node with container path ``path``, if any."""
        for node in self.device_nodes:
            if node.path == path:
                return node
        return None


@record
class DriverRoots:
    """Where the driver is: on the host, and as this plugin sees it (NVIDIA's defaults)."""

    driver_root: str = "/"  # --driver-root (host)
    driver_root_ctr_path: str = "/driver-root"  # --driver-root-ctr-path (plugin container)
    dev_root: str = ""  # --dev-root (host); empty: the driver root

    def host(self, path: str) -> str:
        """``path`` (container view) under the host driver root."""
        return _join(self.driver_root, path)

    def local(self, path: str) -> str:
        """``path`` (container view) under the plugin's view of the driver root."""
        return _join(self.driver_root_ctr_path, path)

    def local_dev_root(self) -> str:
        """NVIDIA's rule: the plugin's view of the driver root if it holds ``dev/``, else /."""
        return self.driver_root_ctr_path if os.path.isdir(self.local("/dev")) else "/"

    def host_dev(self, path: str) -> str:
        """A ``/dev`` path on the host (under --dev-root, else the driver root)."""
        return _join(self.dev_root or self.driver_root, path)


def discover_driver(roots: DriverRoots, version: str | None = None, *,
                    kernel_release: str | None = None, ipc: bool = True,
                    explicit_libraries: bool = False,
                    allow_plain_device_files: bool = False) -> DriverInfo:
    """Discover the driver under ``roots`` (``version`` from NVML; inferred when None).

    ``allow_plain_device_files`` accepts regular files as device nodes (a simulated root,
    where mknod is not possible); NVIDIA accepts character devices only.
    Raises DriverError when libcuda or libnvidia-ml cannot be found.
    """
    finder = _Finder(roots)
    version = version or finder.infer_version()
    missing: list[str] = []
    libraries, lib_dirs = finder.version_libraries(version, explicit_libraries)
    graphics = finder.locate_all(GRAPHICS_LIBRARIES)
    producer = finder.locate(f"libnvidia-vulkan-producer.so.{version}")
    configs = finder.configs()
    binaries = finder.binaries(missing)
    firmware = finder.firmware(version, kernel_release or os.uname().release)
    if not firmware:
        missing.append(f"GSP firmware nvidia/{version}/gsp*.bin under "
                       f"{roots.local('/lib/firmware')}")
    sockets = finder.sockets() if ipc else []
    nodes = finder.device_nodes(allow_plain_device_files, missing)
    all_libs = _unique_files(libraries + graphics + producer)
    info = DriverInfo(
        version=version,
        libraries=all_libs,
        library_dirs=tuple(lib_dirs),
        binaries=_unique_files(binaries),
        firmware=_unique_files(firmware),
        sockets=_unique_files(sockets),
        configs=_unique_files(configs),
        device_nodes=tuple(sorted(nodes, key=lambda n: n.path)),
        library_links=tuple(finder.library_links(libraries, version)),
        graphics_links=tuple(_graphics_links(all_libs, version)),
        compat_libs=_unique_files(finder.glob(COMPAT_LIBS)),
        missing=tuple(missing),
    )
    if missing:
        LOG.warning("NVIDIA driver %s under %s: optional pieces not found (the CDI spec leaves "
                    "them out): %s", version, roots.driver_root_ctr_path, "; ".join(missing))
    LOG.info("NVIDIA driver %s under %s: %d libraries, %d binaries, %d firmware files, "
             "%d sockets, %d device nodes", version, roots.driver_root_ctr_path,
             len(info.libraries), len(info.binaries), len(info.firmware), len(info.sockets),
             len(info.device_nodes))
    return info


class _Finder:
    """File look-ups under one driver root (container paths in, DriverFiles out)."""

    def __init__(self, roots: DriverRoots) -> None:
        self.roots = roots
        self._cache: list[str] | None = None

    def file(self, path: str) -> DriverFile:
        return DriverFile(path=path, host_path=self.roots.host(path),
                          local_path=self.roots.local(path))

    def resolve(self, path: str) -> str | None:
        """The container path of the final target of ``path`` (symlinks followed inside the
        root; absolute link targets are taken relative to it); None if missing."""
        for _ in range(MAX_SYMLINK_HOPS):
            local = self.roots.local(path)
            if not os.path.islink(local):
                return path if os.path.lexists(local) else None
            target = os.readlink(local)
            path = os.path.normpath(target if target.startswith("/")
                                    else os.path.join(os.path.dirname(path), target))
        return None

    def glob(self, pattern: str) -> list[DriverFile]:
        """Files (not directories) matching a container-path glob, symlinks resolved."""
        found = []
        for local in sorted(glob.glob(_join(glob.escape(self.roots.driver_root_ctr_path),
                                              pattern))):
            rel = "/" + os.path.relpath(local, self.roots.driver_root_ctr_path)
            final = self.resolve(rel)
            if final is not None and not os.path.isdir(self.roots.local(final)):
                found.append(self.file(final))
        return found

    def locate(self, pattern: str) -> list[DriverFile]:
        """The toolkit's library locator: the standard directories first; the ld.so.cache only
        if they hold no match."""
        found = [hit for directory in LIBRARY_SEARCH_DIRS
                 for hit in self.glob(os.path.join(directory, pattern))]
        if found:
            return _unique_list(found)
        return _unique_list(self._from_cache(pattern))

    def locate_all(self, patterns: Iterable[str]) -> list[DriverFile]:
        return [hit for pattern in patterns for hit in self.locate(pattern)]

    def _from_cache(self, pattern: str) -> list[DriverFile]:
        return [self.file(path) for path in self._cache_paths()
                if fnmatch.fnmatch(os.path.basename(path), pattern)]

    def _cache_paths(self) -> list[str]:
        """The cache's 64-bit paths with their symlinks resolved (the toolkit matches the
        pattern against the resolved file's name), read once."""
        if self._cache is None:
            local = self.roots.local(LD_CACHE)
            try:
                paths = read_ld_cache(local).paths64()
            except FileNotFoundError:
                paths = []
            except (OSError, LdCacheError) as err:
                LOG.warning("ignoring unreadable ld.so.cache %s: %s", local, err)
                paths = []
            resolved = (self.resolve(path) for path in paths)
            self._cache = list(dict.fromkeys(p for p in resolved if p is not None))
        return self._cache

    def infer_version(self) -> str:
        for prefix in ("libcuda.so.", "libnvidia-ml.so."):
            for hit in self.locate(prefix + "*.*"):
                name = os.path.basename(hit.path)
                if name.startswith(prefix):
                    return name[len(prefix):]
        raise DriverError(self._not_found("libcuda.so.*.* or libnvidia-ml.so.*.*"))

    def version_libraries(self, version: str,
                          explicit: bool) -> tuple[list[DriverFile], list[str]]:
        """Every ``*.so.<version>`` in the driver library dirs and their ``vdpau/``."""
        for required in ("libcuda.so", "libnvidia-ml.so"):
            if not self.locate(f"{required}.{version}"):
                raise DriverError(self._not_found(f"{required}.{version}"))
        dirs = sorted({os.path.dirname(f.path) for f in self.locate(f"lib*.so.{version}")})
        libs: list[DriverFile] = []
        for directory in dirs:
            for sub in (directory, os.path.join(directory, "vdpau")):
                libs += self.glob(os.path.join(sub, f"*.so.{version}"))
            libs += self.glob(os.path.join(directory, "libnvidia-nvvm70.so.*"))
            if explicit:
                for name in EXPLICIT_LIBRARIES:
                    libs += self.glob(os.path.join(directory, name + "*"))
        return libs, dirs

    def _not_found(self, what: str) -> str:
        return (f"NVIDIA driver not found: no {what} under {self.roots.driver_root_ctr_path} "
                f"(searched {', '.join(LIBRARY_SEARCH_DIRS)} and {LD_CACHE}); set "
                f"--driver-root to the host's driver root and --driver-root-ctr-path to where "
                f"it is mounted in this container")

    def binaries(self, missing: list[str]) -> list[DriverFile]:
        found = []
        for name in BINARIES:
            for directory in BINARY_SEARCH_DIRS:
                path = os.path.join(directory, name)
                local = self.roots.local(path)
                if os.path.isfile(local) and os.access(local, os.X_OK):
                    found.append(self.file(path))
                    break
            else:
                if not name.startswith("nvidia-imex"):  # only on IMEX systems
                    missing.append(f"binary {name}")
        return found

    def firmware(self, version: str, kernel_release: str) -> list[DriverFile]:
        dirs = [f"/lib/firmware/updates/{kernel_release}", "/lib/firmware/updates",
                f"/lib/firmware/{kernel_release}", "/lib/firmware"]
        custom = _read_first_line(FIRMWARE_CLASS_PATH)
        if custom:
            dirs.insert(0, custom)
        return [hit for directory in dirs
                for hit in self.glob(os.path.join(directory, f"nvidia/{version}/gsp*.bin"))]

    def sockets(self) -> list[DriverFile]:
        found = []
        for name in IPC_SOCKETS:
            for directory in IPC_SOCKET_DIRS:
                path = os.path.join(directory, name)
                local = self.roots.local(path)
                if os.path.exists(local) and not os.path.isdir(local):
                    found.append(self.file(path))
                    break
        mps = self.roots.local(MPS_PIPE_DIR)
        if os.path.exists(mps) and not os.path.isdir(mps):  # the toolkit rejects directories
            found.append(self.file(MPS_PIPE_DIR))
        return found

    def configs(self) -> list[DriverFile]:
        found = []
        for name in GRAPHICS_CONFIGS + VULKAN_CONFIGS:
            for directory in CONFIG_DIRS:
                path = os.path.join(directory, name)
                if os.path.isfile(self.roots.local(path)):
                    mounted = self.file(path)
                    if name in VULKAN_CONFIGS:
                        mounted = DriverFile(path=os.path.join("/etc", name),
                                             host_path=mounted.host_path,
                                             local_path=mounted.local_path)
                    found.append(mounted)
                    break
        return found

    def device_nodes(self, allow_plain: bool, missing: list[str]) -> list[DeviceNode]:
        dev_root = self.roots.local_dev_root()
        paths = list(CONTROL_DEVICE_NODES)
        paths += sorted("/dev/" + os.path.basename(p)
                        for p in glob.glob(_join(glob.escape(dev_root), "/dev/nvidia[0-9]*")))
        paths += sorted(CAPS_DIR + "/" + os.path.basename(p)
                        for p in glob.glob(_join(glob.escape(dev_root), CAPS_DIR + "/nvidia-cap*")))
        nodes = []
        for path in paths:
            node = _device_node(_join(dev_root, path), path, self.roots.host_dev(path),
                                allow_plain)
            if node is not None:
                nodes.append(node)
            elif path in CONTROL_DEVICE_NODES:
                missing.append(f"device node {path} under {dev_root}")
        return nodes

    def library_links(self, libraries: list[DriverFile], version: str) -> list[Link]:
        """The toolkit's library links: each library's SONAME and ``.so`` links that exist
        next to it on the host, plus the three it always adds."""
        links: list[Link] = []
        for lib in libraries:
            directory, name = os.path.split(lib.path)
            soname = _soname(lib.local_path)
            if soname and soname != name and os.path.islink(self.roots.local(
                    os.path.join(directory, soname))):
                links.append(Link(name, os.path.join(directory, soname)))
            dev_link = os.path.join(directory, name.split(".so", 1)[0] + ".so")
            if os.path.islink(self.roots.local(dev_link)):
                links.append(Link(os.readlink(self.roots.local(dev_link)), dev_link))
            always = {f"libcuda.so.{version}": ("libcuda.so.1", "libcuda.so"),
                      f"libnvidia-opticalflow.so.{version}":
                          ("libnvidia-opticalflow.so.1", "libnvidia-opticalflow.so"),
                      f"libGLX_nvidia.so.{version}": (name, "libGLX_indirect.so.0")}
            if name in always:
                target, link = always[name]
                links.append(Link(target, os.path.join(directory, link)))
        return list(dict.fromkeys(links))


def _graphics_links(libraries: Iterable[DriverFile], version: str) -> list[Link]:
    links = []
    for lib in libraries:
        directory, name = os.path.split(lib.path)
        if name == f"libnvidia-allocator.so.{version}":
            links.append(Link("../libnvidia-allocator.so.1",
                              os.path.join(directory, "gbm/nvidia-drm_gbm.so")))
        elif name == f"libnvidia-vulkan-producer.so.{version}":
            links.append(Link(name, os.path.join(directory, "libnvidia-vulkan-producer.so")))
    return links


def _device_node(local: str, path: str, host: str, allow_plain: bool) -> DeviceNode | None:
    try:
        info = os.stat(local)
    except OSError:
        return None
    if stat.S_ISCHR(info.st_mode):
        return DeviceNode(path=path, host_path=host, major=os.major(info.st_rdev),
                          minor=os.minor(info.st_rdev), file_mode=stat.S_IMODE(info.st_mode),
                          gid=info.st_gid)
    if allow_plain and stat.S_ISREG(info.st_mode):
        return DeviceNode(path=path, host_path=host)
    return None


def _soname(local: str) -> str | None:
    try:
        return read_soname(local)
    except (OSError, ElfError) as err:
        LOG.debug("no SONAME for %s: %s", local, err)
        return None


def _read_first_line(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.readline().strip()
    except OSError:
        return ""


def _join(root: str, path: str) -> str:
    return os.path.join(root or "/", path.lstrip("/"))


def _unique_list(files: Iterable[DriverFile]) -> list[DriverFile]:
    return list(dict.fromkeys(files))


def _unique_files(files: Iterable[DriverFile]) -> tuple[DriverFile, ...]:
    return tuple(sorted(dict.fromkeys(files), key=lambda f: f.path))

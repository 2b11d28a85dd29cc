"""A fake NVIDIA driver root for a machine profile: what a CDI spec mounts, without a driver.

The layout is that of a Debian/Ubuntu driver install: libraries in ``/usr/lib/x86_64-linux-gnu``
(each a stub ELF64 shared object carrying the library's real SONAME, since ldconfig and the
``create-symlinks`` hook read SONAMEs) with their SONAME links and the ``.so`` links the driver
packages ship, ``/etc/ld.so.cache`` listing them (written by the project, in the format glibc
>= 2.32 writes), binaries in ``/usr/bin`` (shell scripts), GSP firmware in
``/lib/firmware/nvidia/<version>``, the persistenced socket (a plain file: a bound Unix socket
would vanish with the process that made it), graphics configuration files, and the
``mig-minors`` file and device nodes of :func:`gpus.fake.controller.write_driver_root` (plain
files: mknod needs privileges).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from gpus.driver.elf import stub_shared_object
from gpus.driver.ldcache import build_ld_cache
from gpus.fake.controller import write_driver_root
from gpus.fake.profile import Profile, ProfileError, load_profile
from gpus.records import record

LIB_DIR = "usr/lib/x86_64-linux-gnu"
# (file name stem, SONAME; "{v}" is the driver version): the libraries of a 5xx driver
# package, as NVIDIA's toolkit observed them under a driver root.
LIBRARIES = (
    ("libcuda.so", "libcuda.so.1"),
    ("libcudadebugger.so", "libcudadebugger.so.1"),
    ("libnvidia-ml.so", "libnvidia-ml.so.1"),
    ("libnvidia-ptxjitcompiler.so", "libnvidia-ptxjitcompiler.so.1"),
    ("libnvidia-nvvm.so", "libnvidia-nvvm.so.4"),
    ("libnvidia-gpucomp.so", "libnvidia-gpucomp.so.{v}"),
    ("libnvidia-opencl.so", "libnvidia-opencl.so.1"),
    ("libnvidia-cfg.so", "libnvidia-cfg.so.1"),
    ("libnvidia-encode.so", "libnvidia-encode.so.1"),
    ("libnvidia-opticalflow.so", "libnvidia-opticalflow.so.1"),
    ("libnvidia-fbc.so", "libnvidia-fbc.so.1"),
    ("libnvidia-ngx.so", "libnvidia-ngx.so.1"),
    ("libnvidia-allocator.so", "libnvidia-allocator.so.1"),
    ("libnvidia-eglcore.so", "libnvidia-eglcore.so.{v}"),
    ("libnvidia-glcore.so", "libnvidia-glcore.so.{v}"),
    ("libnvidia-tls.so", "libnvidia-tls.so.{v}"),
    ("libnvidia-glsi.so", "libnvidia-glsi.so.{v}"),
    ("libnvidia-rtcore.so", "libnvidia-rtcore.so.{v}"),
    ("libnvidia-glvkspirv.so", "libnvidia-glvkspirv.so.{v}"),
    ("libnvidia-pkcs11.so", "libnvidia-pkcs11.so.{v}"),
    ("libnvidia-pkcs11-openssl3.so", "libnvidia-pkcs11-openssl3.so.{v}"),
    ("libnvcuvid.so", "libnvcuvid.so.1"),
    ("libnvoptix.so", "libnvoptix.so.1"),
    ("libGLX_nvidia.so", "libGLX_nvidia.so.0"),
    ("libEGL_nvidia.so", "libEGL_nvidia.so.0"),
    ("libGLESv2_nvidia.so", "libGLESv2_nvidia.so.2"),
    ("libGLESv1_CM_nvidia.so", "libGLESv1_CM_nvidia.so.1"),
    ("vdpau/libvdpau_nvidia.so", "libvdpau_nvidia.so.1"),
)
# The development links the driver packages install (libcuda1 / libnvidia-ml1 and friends).
DEV_LINKS = ("libcuda.so", "libnvidia-ml.so", "libnvcuvid.so", "libnvidia-encode.so")
BINARIES = ("nvidia-smi", "nvidia-debugdump", "nvidia-persistenced", "nvidia-cuda-mps-control",
            "nvidia-cuda-mps-server")
FIRMWARE = ("gsp_ga10x.bin", "gsp_tu10x.bin")
SOCKETS = ("run/nvidia-persistenced/socket",)
CONFIGS = {
    "usr/share/glvnd/egl_vendor.d/10_nvidia.json":
        '{"file_format_version": "1.0.0", "ICD": {"library_path": "libEGL_nvidia.so.0"}}\n',
    "usr/share/vulkan/icd.d/nvidia_icd.json":
        '{"file_format_version": "1.0.0", "ICD": {"library_path": "libGLX_nvidia.so.0", '
        '"api_version": "1.3.242"}}\n',
    "etc/OpenCL/vendors/nvidia.icd": "libnvidia-opencl.so.1\n",
}


@record
class FakeDriverRoot:
    """What :func:`write_fake_driver_root` made (container paths, i.e. relative to the root)."""

    root: Path
    version: str
    libraries: tuple[str, ...]
    binaries: tuple[str, ...]
    firmware: tuple[str, ...]


def write_fake_driver_root(profile: Profile, root: Path | str,
                           dev_root: Path | str | None = None) -> FakeDriverRoot:
    """Write a driver root for ``profile``'s driver version under ``root`` (idempotent).

    Device nodes go under ``dev_root`` (default ``root``), as plain files.
    """
    root = Path(root)
    version = profile.driver_version
    libraries = tuple(_write_libraries(root, version))
    binaries = tuple(_write_binaries(root, version))
    firmware = tuple(_write(root, f"lib/firmware/nvidia/{version}/{name}", b"\0fake GSP\0")
                     for name in FIRMWARE)
    for socket in SOCKETS:
        _write(root, socket, b"")
    for path, text in CONFIGS.items():
        _write(root, path, text.encode())
    write_driver_root(profile, root, None if dev_root is None else Path(dev_root))
    return FakeDriverRoot(root=root, version=version, libraries=libraries, binaries=binaries,
                          firmware=firmware)


def _write_libraries(root: Path, version: str) -> list[str]:
    written = []
    cache: list[tuple[str, str]] = []
    for stem, soname_pattern in LIBRARIES:
        soname = soname_pattern.format(v=version)
        path = f"/{LIB_DIR}/{stem}.{version}"
        _write(root, path, stub_shared_object(soname))
        directory = os.path.dirname(path)
        if soname != os.path.basename(path):
            _link(root, f"{directory}/{soname}", os.path.basename(path))
        cache.append((soname, f"{directory}/{soname}"))
        written.append(path)
    for name in DEV_LINKS:
        soname = dict(LIBRARIES)[name]
        _link(root, f"/{LIB_DIR}/{name}", soname)
        cache.append((name, f"/{LIB_DIR}/{name}"))
    # ldconfig sorts by name, newest-looking first; lookups do not depend on the order.
    _write(root, "etc/ld.so.cache", build_ld_cache(sorted(cache, reverse=True)))
    return written


def _write_binaries(root: Path, version: str) -> list[str]:
    written = []
    for name in BINARIES:
        path = f"/usr/bin/{name}"
        target = root / path.lstrip("/")
        _write(root, path, f"#!/bin/sh\necho '{name}: fake NVIDIA driver {version}'\n".encode())
        target.chmod(0o755)
        written.append(path)
    return written


def _write(root: Path, path: str, data: bytes) -> str:
    target = root / path.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    return "/" + path.lstrip("/")


def _link(root: Path, path: str, target: str) -> None:
    link = root / path.lstrip("/")
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(target)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m gpus.fake.driverroot <profile> <dir> [--dev-root DIR]``: write a fake root."""
    parser = argparse.ArgumentParser(prog="python -m gpus.fake.driverroot",
                                     description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("profile", help="shipped profile name or path to a profile YAML")
    parser.add_argument("directory", help="the driver root to create or refresh")
    parser.add_argument("--dev-root", help="where dev/ goes (default: the driver root)")
    args = parser.parse_args(argv)
    try:
        made = write_fake_driver_root(load_profile(args.profile), args.directory, args.dev_root)
    except (ProfileError, OSError) as err:
        print(f"driver-root: {err}", file=sys.stderr)
        return 1
    print(f"fake NVIDIA driver {made.version} in {made.root}: {len(made.libraries)} libraries, "
          f"{len(made.binaries)} binaries, {len(made.firmware)} firmware files")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The fake NVML's controller: installs the fake beneath pynvml and injects faults.

Every method is thread-safe and takes effect immediately for threads blocked in NVML calls.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import pynvml

from gpus.fake.lib import FakeNvmlLib, NvmlFunctions
from gpus.fake.profile import VGPU_FIELD_BYTES, GpuSpec, Profile, VgpuSpec, load_profile
from gpus.fake.state import NOT_APPLICABLE, XID_FALLEN_OFF_BUS, FakeGpu, FakeState, error_code
from gpus.fake.telemetry import FakeProcess

if TYPE_CHECKING:
    from gpus.fake.control import ControlServer

log = logging.getLogger(__name__)


class FakeNvml:
    """A fake NVML for one machine profile; ``install()`` puts it beneath pynvml."""

    def __init__(self, profile: Profile) -> None:
        self.profile = profile
        self._state = FakeState(profile)
        self.lib = FakeNvmlLib(self._state)
        self._saved: dict[str, Any] | None = None
        self._control: ControlServer | None = None
        # Where this profile's sysfs files were written for the reader, if anywhere; a scratch
        # directory made by use_scratch_sysfs() is removed again at uninstall.
        self.sysfs_root: str | None = None
        self._scratch: str | None = None

    # -- installation ---------------------------------------------------------------------------

    @property
    def installed(self) -> bool:
        """Whether this fake is pynvml's library right now."""
        return self._saved is not None

    @property
    def functions(self) -> NvmlFunctions:
        """The Python bodies of the C functions (tests may monkeypatch them)."""
        return self.lib.functions

    def install(self, control_socket: str | None = None) -> FakeNvml:
        """Make pynvml call this fake; optionally serve the control socket."""
        if self._saved is not None:
            raise RuntimeError("this fake NVML is already installed")
        with pynvml.libLoadLock:
            self._saved = {
                "nvmlLib": pynvml.nvmlLib,
                "cache": dict(pynvml._nvmlGetFunctionPointer_cache),
                "refcount": pynvml._nvmlLib_refcount,
                "errors": dict(pynvml.NVMLError._errcode_to_string),
            }
            pynvml.nvmlLib = self.lib
            pynvml._nvmlGetFunctionPointer_cache.clear()
            pynvml._nvmlLib_refcount = 0
        with self._state.lock:
            self._state.closed = False
        log.info(
            "fake NVML installed: profile %s (%d GPUs)", self.profile.name, len(self.profile.gpus)
        )
        if control_socket:
            try:
                self.start_control(control_socket)
            except BaseException:
                self.uninstall()
                raise
        return self

    def uninstall(self) -> None:
        """Restore pynvml's previous library and caches; wake and fail any waiter."""
        self.stop_control()
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = self.sysfs_root = None
        with self._state.lock:
            self._state.closed = True
            self._state.notify_all_event_sets()
        saved, self._saved = self._saved, None
        if saved is None:
            return
        with pynvml.libLoadLock:
            if pynvml.nvmlLib is not self.lib:
                log.warning("fake NVML %s uninstalled out of order", self.profile.name)
            pynvml.nvmlLib = saved["nvmlLib"]
            pynvml._nvmlGetFunctionPointer_cache.clear()
            pynvml._nvmlGetFunctionPointer_cache.update(saved["cache"])
            pynvml._nvmlLib_refcount = saved["refcount"]
            pynvml.NVMLError._errcode_to_string.clear()
            pynvml.NVMLError._errcode_to_string.update(saved["errors"])
        log.info("fake NVML uninstalled: profile %s", self.profile.name)

    def __enter__(self) -> FakeNvml:
        if not self.installed:
            self.install()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.uninstall()

    def start_control(self, path: str) -> None:
        """Serve the JSON-lines fault-injection socket at ``path`` on a daemon thread."""
        # Imported only for ``?control=``: the socket server is ~0.2 ms and ~40 KiB of every
        # fake start (-X importtime, best of 10; tracemalloc) that most runs never use.
        from gpus.fake.control import ControlServer

        if self._control is not None:
            raise RuntimeError(f"control socket already served at {self._control.path}")
        server = ControlServer(self, path)
        server.start()
        self._control = server

    def stop_control(self) -> None:
        """Stop the control socket, if any."""
        control, self._control = self._control, None
        if control is not None:
            control.stop()

    # -- queries --------------------------------------------------------------------------------

    def uuids(self) -> list[str]:
        """GPU UUIDs in index order."""
        return [gpu.spec.uuid for gpu in self._state.gpus]

    def mig_uuids(self, gpu: int | str) -> list[str]:
        """A GPU's MIG device UUIDs in slot order."""
        with self._state.lock:
            found, _ = self._state.find(gpu)
            return [mig.uuid for mig in found.mig_slots if mig is not None]

    def compute_mode(self, gpu: int | str) -> int:
        """A GPU's compute mode (NVML_COMPUTEMODE_*), as the fake NVML holds it."""
        with self._state.lock:
            return self._gpu(gpu).compute_mode

    def compute_mode_changes(self) -> list[tuple[str, int]]:
        """Every nvmlDeviceSetComputeMode that succeeded, in order: (GPU UUID, mode)."""
        with self._state.lock:
            return list(self._state.compute_mode_changes)

    def status(self) -> dict[str, Any]:
        """Active faults, for the control socket and the CLI."""
        with self._state.lock:
            return {
                "profile": self.profile.name,
                "lost": [g.spec.index for g in self._state.gpus if g.lost],
                "failures": {
                    name: {"error": code, "remaining": remaining}
                    for name, (code, remaining) in self._state.failures.items()
                },
                "initialized": self._state.init_count,
            }

    # -- fault injection ------------------------------------------------------------------------

    def inject_xid(
        self,
        gpu: int | str,
        xid: int,
        gpu_instance_id: int | None = None,
        compute_instance_id: int | None = None,
        wait: float = 0.0,
    ) -> int:
        """Deliver a critical-XID event; a MIG UUID carries its GI/CI ids. Returns sets reached.

        ``wait``: seconds to wait first for a daemon to watch the GPU's XIDs (0: post at once).
        """
        with self._state.lock:
            target, mig = self._state.find(gpu)
            if mig is not None:
                gpu_instance_id = mig.gpu_instance.spec.id
                compute_instance_id = mig.compute_instance.id
            gi = NOT_APPLICABLE if gpu_instance_id is None else gpu_instance_id
            ci = NOT_APPLICABLE if compute_instance_id is None else compute_instance_id
            event = pynvml.nvmlEventTypeXidCriticalError
            if wait > 0:
                self._state.wait_watched(target, event, wait)
            log.info("fake NVML: XID %d on GPU %d (gi=%#x ci=%#x)", xid, target.spec.index, gi, ci)
            self._state.telemetry.on_xid(target.spec.uuid, xid)
            return self._state.post(target, event, xid, gi, ci)

    def inject_ecc(self, gpu: int | str, double_bit: bool = True, wait: float = 0.0) -> int:
        """Deliver a double- (default) or single-bit ECC event. Returns sets reached.

        ``wait`` as for :meth:`inject_xid`.
        """
        event = (
            pynvml.nvmlEventTypeDoubleBitEccError
            if double_bit
            else pynvml.nvmlEventTypeSingleBitEccError
        )
        with self._state.lock:
            target = self._gpu(gpu)
            if wait > 0:
                self._state.wait_watched(target, event, wait)
            log.info(
                "fake NVML: %s-bit ECC error on GPU %d",
                "double" if double_bit else "single",
                target.spec.index,
            )
            self._state.telemetry.on_ecc(target.spec.uuid, double_bit)
            return self._state.post(target, event, 0, NOT_APPLICABLE, NOT_APPLICABLE)

    def lose_gpu(self, gpu: int | str, xid: int | None = XID_FALLEN_OFF_BUS) -> None:
        """The GPU falls off the bus: every call on it returns NVML_ERROR_GPU_IS_LOST.

        Like the driver, it also reports XID 79 to registered event sets (``xid=None``: silent).
        """
        with self._state.lock:
            target = self._gpu(gpu)
            target.lost = True
            log.info("fake NVML: GPU %d lost", target.spec.index)
            if xid is not None:
                self._state.post(
                    target,
                    pynvml.nvmlEventTypeXidCriticalError,
                    xid,
                    NOT_APPLICABLE,
                    NOT_APPLICABLE,
                )

    def restore_gpu(self, gpu: int | str) -> None:
        """Bring a lost GPU back."""
        with self._state.lock:
            target = self._gpu(gpu)
            target.lost = False
            log.info("fake NVML: GPU %d restored", target.spec.index)

    def fail(self, function: str, error: str | int, count: int | None = None) -> None:
        """Make ``function`` (any version suffix: "nvmlDeviceGetCount" covers _v2) return
        ``error``, ``count`` times or until cleared."""
        if not isinstance(function, str) or not function.startswith("nvml"):
            raise ValueError(f"not an NVML function name: {function!r}")
        code = error_code(error)
        if code == pynvml.NVML_SUCCESS:
            raise ValueError("cannot inject NVML_SUCCESS as a failure")
        if count is not None and count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        key = "nvmlInit" if function.startswith("nvmlInit") else function
        with self._state.lock:
            self._state.failures[key] = [code, count]
            self._state.notify_all_event_sets()
        log.info(
            "fake NVML: %s will return %d (%s)",
            key,
            code,
            "until cleared" if count is None else f"{count} time(s)",
        )

    def fail_event_wait(self, error: str | int = "NVML_ERROR_UNKNOWN") -> None:
        """Every nvmlEventSetWait (including those blocked now) returns ``error``."""
        self.fail("nvmlEventSetWait", error)

    def fail_init(self, error: str | int = "NVML_ERROR_DRIVER_NOT_LOADED") -> None:
        """nvmlInit returns ``error`` until cleared."""
        self.fail("nvmlInit", error)

    def clear_faults(self) -> None:
        """Remove injected failures and restore lost GPUs (queued events stay)."""
        with self._state.lock:
            self._state.failures.clear()
            for gpu in self._state.gpus:
                gpu.lost = False
        log.info("fake NVML: faults cleared")

    # -- telemetry ------------------------------------------------------------------------------

    def advance_telemetry(self, steps: int = 1) -> int:
        """Move the telemetry ``steps`` simulated seconds on; returns the step now."""
        with self._state.lock:
            self._state.telemetry.advance(steps)
            return self._state.telemetry.step

    def telemetry_follows_time(self, on: bool = True) -> None:
        """Also advance the telemetry one step per wall-clock second (demos), or stop."""
        with self._state.lock:
            self._state.telemetry.follow_time(on)

    def set_processes(self, device: int | str, processes: list[FakeProcess]) -> None:
        """The processes running on a GPU (index or UUID) or a MIG device (MIG UUID)."""
        for proc in processes:
            if proc.pid <= 0 or proc.used_mib < 0 or not 0 <= proc.sm_util <= 100:
                raise ValueError(f"implausible process {proc!r}")
        with self._state.lock:
            target, mig = self._state.find(device)
            uuid = mig.uuid if mig is not None else target.spec.uuid
            if processes:
                self._state.telemetry.processes[uuid] = list(processes)
            else:
                self._state.telemetry.processes.pop(uuid, None)

    def _gpu(self, gpu: int | str) -> FakeGpu:
        return self._state.find(gpu)[0]

    # -- sysfs ----------------------------------------------------------------------------------

    def write_sysfs(self, root: Path | str) -> None:
        """Create ``<root>/sys/bus/pci/devices/<bus>/{numa_node,class,vendor,config}`` per GPU."""
        write_sysfs(self.profile, Path(root))
        self.sysfs_root = str(root)

    def use_scratch_sysfs(self) -> str:
        """Write the sysfs files into a new temporary directory (removed at uninstall)."""
        if self._scratch is None:
            scratch = tempfile.mkdtemp(prefix="fake-nvml-sysfs-")
            write_sysfs(self.profile, Path(scratch))
            self._scratch = scratch
        self.sysfs_root = self._scratch
        return self._scratch

    def write_driver_root(self, root: Path | str, dev_root: Path | str | None = None) -> None:
        """Create the driver's files and device nodes for this profile (see the function)."""
        write_driver_root(self.profile, Path(root), None if dev_root is None else Path(dev_root))


def write_sysfs(profile: Profile, root: Path) -> None:
    """The sysfs files the reader and the device plugin read, for ``profile``'s GPUs."""
    for gpu in profile.gpus:
        directory = root / "sys" / "bus" / "pci" / "devices" / gpu.sysfs_bus_id
        os.makedirs(directory, exist_ok=True)
        numa = -1 if gpu.numa_node is None else gpu.numa_node
        (directory / "numa_node").write_text(f"{numa}\n")
        (directory / "class").write_text(f"0x{gpu.pci_class:06x}\n")
        (directory / "vendor").write_text("0x10de\n")
        (directory / "config").write_bytes(config_space(gpu, profile.vgpu))


def config_space(gpu: GpuSpec, vgpu: VgpuSpec | None) -> bytes:
    """256 bytes of PCI config space: header, a power-management capability, then the
    vendor-specific one, which on a vGPU guest carries the "VF" signature and the host driver
    record (as NVIDIA's GFD reads it; see gpus/vgpu.py)."""
    config = bytearray(256)
    config[0:2] = (0x10DE).to_bytes(2, "little")
    config[2:4] = (gpu.model.pci_device_id >> 16).to_bytes(2, "little")
    config[0x06] = 0x10  # status: capability list present
    config[0x09:0x0C] = gpu.pci_class.to_bytes(3, "little")  # prog-if, subclass, class
    config[0x34] = 0x60
    config[0x60:0x62] = bytes((0x01, 0x68))  # power management, next: vendor-specific
    if vgpu is None:
        config[0x68:0x6B] = bytes((0x09, 0x00, 0x14))  # vendor-specific, no vGPU signature
        return bytes(config)
    record = bytes((0x00, 2 + 2 * VGPU_FIELD_BYTES)) + _field(vgpu.host_driver_version) \
        + _field(vgpu.host_driver_branch)
    capability = bytes((0x09, 0x00, 5 + len(record))) + b"VF" + record
    config[0x68 : 0x68 + len(capability)] = capability
    return bytes(config)


def _field(text: str) -> bytes:
    return text.encode("ascii").ljust(VGPU_FIELD_BYTES, b"\0")


# /proc/driver/nvidia-caps/mig-minors as the driver numbers it: "config 1", "monitor 2", then
# per GPU minor number 15 GPU instance slots of 9 minors each (the GI's own access capability,
# then its compute instances 0..7): gpu<g>/gi<i>/access = 3 + (15 g + i) * 9 and
# gpu<g>/gi<i>/ci<c>/access = that + 1 + c (gpu1/gi0/access is 138, as on a real node).
MIG_MINORS_FILE = "proc/driver/nvidia-caps/mig-minors"
MIG_GI_SLOTS = 15
MIG_CI_SLOTS = 8
# Control nodes the fake creates; /dev/nvidia-modeset is left out on purpose (a node without
# the modeset driver), so "passed only when present" stays visible in Allocate responses.
CONTROL_NODES = ("nvidiactl", "nvidia-uvm", "nvidia-uvm-tools")


def mig_gi_minor(gpu_minor: int, gi: int) -> int:
    """The nvidia-cap minor of ``gpu<gpu_minor>/gi<gi>/access``."""
    return 3 + (gpu_minor * MIG_GI_SLOTS + gi) * (MIG_CI_SLOTS + 1)


def mig_ci_minor(gpu_minor: int, gi: int, ci: int) -> int:
    """The nvidia-cap minor of ``gpu<gpu_minor>/gi<gi>/ci<ci>/access``."""
    return mig_gi_minor(gpu_minor, gi) + 1 + ci


def mig_minors_text(profile: Profile) -> str:
    """The mig-minors file for ``profile``'s GPUs (every GI/CI slot, as the driver lists)."""
    lines = ["config 1", "monitor 2"]
    for gpu in sorted(profile.gpus, key=lambda g: g.minor):
        for gi in range(MIG_GI_SLOTS):
            lines.append(f"gpu{gpu.minor}/gi{gi}/access {mig_gi_minor(gpu.minor, gi)}")
            lines.extend(
                f"gpu{gpu.minor}/gi{gi}/ci{ci}/access {mig_ci_minor(gpu.minor, gi, ci)}"
                for ci in range(MIG_CI_SLOTS)
            )
    return "\n".join(lines) + "\n"


def write_driver_root(profile: Profile, root: Path, dev_root: Path | None = None) -> None:
    """The files ``--pass-device-specs`` reads, for ``profile``, as plain files.

    Under ``root`` (the driver root): ``proc/driver/nvidia-caps/mig-minors``. Under
    ``dev_root`` (default ``root``): ``dev/nvidiactl``, ``dev/nvidia-uvm``,
    ``dev/nvidia-uvm-tools``, ``dev/nvidia<minor>`` per GPU and
    ``dev/nvidia-caps/nvidia-cap<N>`` for every GPU and compute instance of the profile.
    """
    dev = (root if dev_root is None else dev_root) / "dev"
    minors = root / MIG_MINORS_FILE
    os.makedirs(minors.parent, exist_ok=True)
    minors.write_text(mig_minors_text(profile))
    os.makedirs(dev / "nvidia-caps", exist_ok=True)
    for name in CONTROL_NODES:
        (dev / name).touch()
    for gpu in profile.gpus:
        (dev / f"nvidia{gpu.minor}").touch()
        for gi in gpu.gpu_instances:
            (dev / "nvidia-caps" / f"nvidia-cap{mig_gi_minor(gpu.minor, gi.id)}").touch()
            for ci in gi.compute_instances:
                cap = mig_ci_minor(gpu.minor, gi.id, ci.id)
                (dev / "nvidia-caps" / f"nvidia-cap{cap}").touch()


def install(profile: str | Path | Profile, control_socket: str | None = None) -> FakeNvml:
    """Load ``profile`` (name, path or Profile) and install a fake NVML for it beneath pynvml."""
    loaded = profile if isinstance(profile, Profile) else load_profile(profile)
    return FakeNvml(loaded).install(control_socket)

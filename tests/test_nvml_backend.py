"""Backend selection: real / fake:<profile>[?control=...], and the real driver's absence."""

from __future__ import annotations

import ctypes
import shutil
import tempfile
from pathlib import Path

import pynvml
import pytest

from gpus.backend import backend_from_env, parse_backend, select_backend
from gpus.fake import FakeNvml
from gpus.fake.control import send
from gpus.nvml import Nvml, NvmlError


def _has_driver() -> bool:
    try:
        ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return False
    return True


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "unknown NVML backend"),
        ("mock", "expected 'real' or 'fake:<profile"),
        ("fake:", "names no profile"),
        ("fake:dgx-a100?sock=/x", "unknown option 'sock'"),
        ("fake:dgx-a100?control=", "control= needs a socket path"),
        ("fake:no-such-profile", "unknown profile"),
        ("fake:/no/such/file.yaml", "no such profile file"),
    ],
)
def test_bad_specs_are_clear_and_install_nothing(spec: str, message: str) -> None:
    before = pynvml.nvmlLib
    with pytest.raises(ValueError, match=message.replace("?", r"\?").replace("(", r"\(")):
        select_backend(spec)
    assert pynvml.nvmlLib is before


def test_real_returns_none_and_installs_nothing() -> None:
    before = pynvml.nvmlLib
    assert select_backend("real") is None
    assert pynvml.nvmlLib is before


def test_fake_spec_installs_a_profile() -> None:
    fake = select_backend("fake:t4")
    assert isinstance(fake, FakeNvml)
    try:
        with Nvml() as nvml:
            assert len(nvml.read_snapshot().gpus) == 4
    finally:
        fake.uninstall()


def test_fake_spec_with_path_and_control_socket() -> None:
    from gpus.fake.profile import PROFILES_DIR

    directory = tempfile.mkdtemp(prefix="nvk", dir="/tmp")
    sock = f"{directory}/c.sock"
    try:
        fake = select_backend(f"fake:{PROFILES_DIR / 'hetero.yaml'}?control={sock}")
        assert isinstance(fake, FakeNvml)
        try:
            assert send(sock, {"op": "ping"}) == {"ok": True}
        finally:
            fake.uninstall()
    finally:
        shutil.rmtree(directory)


def test_parse_and_env() -> None:
    assert parse_backend(" real ") is None
    assert parse_backend("fake:dgx-a100?control=/tmp/x.sock") == ("dgx-a100", "/tmp/x.sock")
    assert backend_from_env({}) == "real"
    assert backend_from_env({"NVML_BACKEND": "fake:t4"}) == "fake:t4"


@pytest.mark.skipif(_has_driver(), reason="this machine has an NVIDIA driver")
def test_real_backend_without_driver_says_so_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    # Whatever an earlier test left behind, start from pynvml's pristine state: no library loaded.
    monkeypatch.setattr(pynvml, "nvmlLib", None)
    monkeypatch.setattr(pynvml, "_nvmlGetFunctionPointer_cache", {})
    assert select_backend("real") is None
    with pytest.raises(NvmlError) as info:
        Nvml().init()
    message = str(info.value)
    assert info.value.name == "NVML_ERROR_LIBRARY_NOT_FOUND"
    assert "libnvidia-ml.so.1" in message and "driver" in message
    assert "\n" not in message
    assert pynvml.nvmlLib is None


def _pci_device(root: Path, address: str, vendor: str, pci_class: str) -> None:
    device = root / "sys" / "bus" / "pci" / "devices" / address
    device.mkdir(parents=True)
    (device / "vendor").write_text(vendor + "\n")
    (device / "class").write_text(pci_class + "\n")


@pytest.fixture
def gpu_node_sysfs(tmp_path: Path) -> Path:
    _pci_device(tmp_path, "0000:00:1f.0", "0x8086", "0x060100")  # an Intel bridge
    _pci_device(tmp_path, "0000:07:00.0", "0x10de", "0x030200")  # an NVIDIA 3D controller
    return tmp_path


def test_fake_refused_in_a_pod_on_a_real_gpu_node(gpu_node_sysfs: Path) -> None:
    env = {"KUBERNETES_SERVICE_HOST": "10.0.0.1"}
    before = pynvml.nvmlLib
    with pytest.raises(ValueError) as err:
        select_backend("fake:dgx-a100", environ=env, host_sysfs=str(gpu_node_sysfs))
    message = str(err.value)
    assert "refused" in message and "0000:07:00.0" in message
    assert "ALLOW_FAKE_NVML_ON_GPU_NODE=true" in message
    assert "\n" not in message
    assert pynvml.nvmlLib is before  # nothing installed


def test_fake_allowed_off_cluster_without_gpus_or_when_overridden(
        gpu_node_sysfs: Path, tmp_path: Path) -> None:
    cases = [
        ({}, str(gpu_node_sysfs)),  # a developer's laptop with an NVIDIA GPU
        ({"KUBERNETES_SERVICE_HOST": "10.0.0.1"}, str(tmp_path / "empty")),  # CPU-only node
        ({"KUBERNETES_SERVICE_HOST": "10.0.0.1", "ALLOW_FAKE_NVML_ON_GPU_NODE": "true"},
         str(gpu_node_sysfs)),
    ]
    for env, root in cases:
        fake = select_backend("fake:t4", environ=env, host_sysfs=root)
        assert fake is not None
        fake.uninstall()


def test_nvidia_bridges_and_audio_are_not_gpus(tmp_path: Path) -> None:
    from gpus.backend import nvidia_gpus_in_sysfs

    _pci_device(tmp_path, "0000:07:00.1", "0x10de", "0x040300")  # HDMI audio function
    _pci_device(tmp_path, "0000:08:00.0", "0x10de", "0x068000")  # NVSwitch (bridge class)
    _pci_device(tmp_path, "0000:09:00.0", "0x10de", "0x030000")  # VGA
    assert nvidia_gpus_in_sysfs(str(tmp_path)) == ["0000:09:00.0"]


def test_fake_writes_the_profiles_sysfs_under_a_scratch_root(tmp_path: Path) -> None:
    root = tmp_path / "sysfs"
    fake = select_backend("fake:dgx-a100", sysfs_root=str(root))
    assert fake is not None
    try:
        with Nvml() as nvml:
            gpus = nvml.read_snapshot(str(root)).gpus
        assert [g.pci_class for g in gpus] == [0x0302] * 8
        assert [g.numa_node for g in gpus] == [3, 3, 1, 1, 7, 7, 5, 5]
    finally:
        fake.uninstall()


def test_fake_with_the_default_root_uses_a_private_scratch_tree() -> None:
    import os

    from gpus.backend import effective_config
    from gpus.config import Config

    fake = select_backend("fake:dgx-a100")  # --sysfs-root left at "/": never write the host's
    assert fake is not None
    try:
        config = effective_config(Config(), fake)
        root = config.flags.sysfs_root
        assert root != "/" and root == fake.sysfs_root
        with Nvml() as nvml:
            gpus = nvml.read_snapshot(root).gpus
        assert [g.numa_node for g in gpus] == [3, 3, 1, 1, 7, 7, 5, 5]
        assert effective_config(Config(), None) == Config()
    finally:
        fake.uninstall()
    assert not os.path.exists(root)  # the scratch tree goes with the fake


def test_unwritable_sysfs_root_is_a_clear_error_and_installs_nothing(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    before = pynvml.nvmlLib
    with pytest.raises(ValueError, match="cannot write the fake sysfs tree"):
        select_backend("fake:t4", sysfs_root=str(blocker / "sysfs"))
    assert pynvml.nvmlLib is before

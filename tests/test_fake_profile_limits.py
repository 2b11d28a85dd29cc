"""The fake NVML does not trust its profile: size, GPU count, MIG, uniqueness and C-type limits.

Each limit is one ProfileError line naming the file and the field; the device plugin and GFD
turn it into exit 2 with that line, whatever ``--fail-on-init-error`` says.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pynvml
import pytest

from deviceplugin.main import main as plugin_main
from gfd.main import main as gfd_main
from gpus.fake import FakeNvml, ProfileError, load_profile
from gpus.fake.profile import (
    C_ULLONG_MAX,
    MAX_GPUS,
    MAX_PROFILE_BYTES,
)
from gpus.model import MIB

REPO = Path(__file__).resolve().parent.parent
HEADER = """\
name: limits
driver_version: "550.54.15"
cuda_driver_version: 12040
"""
T4 = "{model: T4, bus_id: '07:00.0'}"
A30_MODEL = """
models:
  A30:
    name: NVIDIA A30
    memory_bytes: {memory}
    compute_capability: [8, 0]
    architecture: ampere
    brand: nvidia
    pci_device_id: 0x20B710DE
    mig_slices: {slices}
    mig:
      - {{profile: 1_SLICE, id: 14, name: 1g.6gb, slices: 1, instances: 4,
         memory_mib: {mig_mib}, multiprocessors: 14}}
"""


def write(tmp_path: Path, body: str, name: str = "p.yaml", header: str = HEADER) -> Path:
    path = tmp_path / name
    path.write_text(header + textwrap.dedent(body))
    return path


def gpu_lines(count: int, extra: str = "") -> str:
    """``count`` T4 entries with distinct bus ids (bus 0x01.. then device numbers)."""
    entries = [
        f"  - {{model: T4, bus_id: '{1 + i // 32:02X}:{i % 32:02X}.0'{extra}}}"
        for i in range(count)
    ]
    return "gpus:\n" + "\n".join(entries) + "\n"


def error_of(path: Path, **kwargs: int) -> str:
    with pytest.raises(ProfileError) as info:
        load_profile(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: "), message
    return message


# -- file size ------------------------------------------------------------------------------------


def test_a_2gb_profile_is_refused_before_it_is_read(tmp_path: Path) -> None:
    path = tmp_path / "huge.yaml"
    with open(path, "wb") as file:
        file.truncate(2 << 30)  # sparse: nothing is allocated, on disk or by the test
    message = error_of(path)
    assert f"larger than the {MAX_PROFILE_BYTES} bytes" in message and str(2 << 30) in message


def test_size_limit_is_exact(tmp_path: Path) -> None:
    path = write(tmp_path, f"gpus: [{T4}]\n")
    size = path.stat().st_size
    assert load_profile(path, max_bytes=size).name == "limits"
    assert "larger than the" in error_of(path, max_bytes=size - 1)


def test_a_file_whose_size_lies_is_read_only_up_to_the_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Files under /proc report size 0, a file may still be growing: the read is bounded too."""
    path = write(tmp_path, f"gpus: [{T4}]\n")
    size = path.stat().st_size
    real_fstat = os.fstat
    monkeypatch.setattr(
        os, "fstat", lambda fd: os.stat_result((*real_fstat(fd)[:6], 0, 0, 0, 0))
    )
    assert load_profile(path, max_bytes=size).name == "limits"
    message = error_of(path, max_bytes=size - 1)
    assert message.endswith(f"larger than the {size - 1} bytes a profile may have")


def test_size_limit_covers_the_parent_of_extends(tmp_path: Path) -> None:
    parent = write(tmp_path, f"gpus: [{T4}]\n", name="parent.yaml")
    child = tmp_path / "child.yaml"
    child.write_text(f"name: child\nextends: {parent}\n")
    with pytest.raises(ProfileError, match=f"^{parent}: larger than the"):
        load_profile(child, max_bytes=child.stat().st_size)


def test_extends_depth_is_bounded(tmp_path: Path) -> None:
    previous = write(tmp_path, f"gpus: [{T4}]\n", name="p0.yaml")
    for level in range(1, 10):
        path = tmp_path / f"p{level}.yaml"
        path.write_text(f"extends: {previous}\n")
        previous = path
    with pytest.raises(ProfileError, match="extends: more than 8 levels"):
        load_profile(previous)


# -- GPU count ----------------------------------------------------------------------------------


def test_gpu_count_limit_is_exact(tmp_path: Path) -> None:
    assert len(load_profile(write(tmp_path, gpu_lines(MAX_GPUS))).gpus) == MAX_GPUS
    message = error_of(write(tmp_path, gpu_lines(MAX_GPUS + 1)))
    assert f": gpus: {MAX_GPUS + 1} GPUs, more than the {MAX_GPUS}" in message


def test_ten_thousand_gpus_are_refused_without_building_them(tmp_path: Path) -> None:
    path = write(tmp_path, gpu_lines(10_000))
    assert path.stat().st_size < MAX_PROFILE_BYTES  # the count, not the size, refuses it
    assert ": gpus: 10000 GPUs, more than the 64" in error_of(path)


# -- MIG ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field", "reason"),
    [
        (A30_MODEL.format(memory=25769803776, slices=9, mig_mib=5836), "models.A30.mig_slices",
         "9 is out of range 0..8"),
        (A30_MODEL.format(memory=25769803776, slices=4, mig_mib=1 << 60),
         "models.A30.mig[0].memory_mib", "out of range 1..17592186044415"),
        (A30_MODEL.format(memory=25769803776, slices=4, mig_mib=5836).replace(
            "slices: 1,", "slices: 0,"), "models.A30.mig[0].slices", "0 is out of range 1..8"),
        (A30_MODEL.format(memory=25769803776, slices=4, mig_mib=5836).replace(
            "instances: 4", "instances: 1000000000"), "models.A30.mig[0].instances",
         "out of range 1..8"),
        (A30_MODEL.format(memory=25769803776, slices=4, mig_mib=5836).replace(
            "name: 1g.6gb", "name: " + "x" * 92), "models.A30.mig[0].name", "longer than the 95"),
        ("gpus: [{model: A100-SXM4-40GB, bus_id: '07:00.0',"
         " mig: [{profile: 1g.5gb, count: 1000000000}]}]\n", "gpus[0].mig[0].count",
         "must be 1..8"),
        ("gpus: [{model: A100-SXM4-40GB, bus_id: '07:00.0', mig: [{profile: 1g.5gb, gi: 15}]}]\n",
         "gpus[0].mig[0].gi", "15 is out of range 0..14"),
        ("gpus: [{model: A100-SXM4-40GB, bus_id: '07:00.0', mig: [{profile: 1g.5gb, gi: -1}]}]\n",
         "gpus[0].mig[0].gi", "-1 is out of range 0..14"),
    ],
)
def test_mig_limits(tmp_path: Path, body: str, field: str, reason: str) -> None:
    if body.startswith("\nmodels"):
        body += "gpus: [{model: A30, bus_id: '07:00.0'}]\n"
    message = error_of(write(tmp_path, body))
    assert f": {field}: " in message and reason in message, message


# -- uniqueness ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("gpus", "field", "reason"),
    [
        ("[{model: T4, bus_id: '07:00.0', uuid: GPU-same}, {model: T4, bus_id: '08:00.0',"
         " uuid: GPU-same}]", "gpus[1].uuid", "duplicate UUID GPU-same (GPU 0)"),
        ("[{model: T4, bus_id: '07:00.0', minor: 3}, {model: T4, bus_id: '08:00.0', minor: 3}]",
         "gpus[1].minor", "duplicate minor number 3 (GPU 0)"),
        ("[{model: T4, bus_id: '07:00.0'}, {model: T4, bus_id: '08:00.0', minor: 0}]",
         "gpus[1].minor", "duplicate minor number 0 (GPU 0)"),  # against a defaulted minor
        ("[{model: T4, bus_id: '07:00.0'}, {model: T4, bus_id: '0000:07:00.0'}]",
         "gpus[1].bus_id", "duplicate bus id"),
        ("[{model: T4, bus_id: '07:00.0', uuid: 'GPU-a,GPU-b'}]", "gpus[0].uuid",
         "is not like GPU-"),
        ("[{model: T4, bus_id: '07:00.0', uuid: MIG-1234}]", "gpus[0].uuid", "is not like GPU-"),
        (f"[{{model: T4, bus_id: '07:00.0', uuid: GPU-{'a' * 92}}}]", "gpus[0].uuid",
         "longer than the 95 bytes"),
    ],
)
def test_uniqueness_and_uuid_form(tmp_path: Path, gpus: str, field: str, reason: str) -> None:
    message = error_of(write(tmp_path, f"gpus: {gpus}\n"))
    assert f": {field}: " in message and reason in message, message


def test_duplicate_uuids_of_a_profile_built_in_code_are_refused() -> None:
    profile = load_profile("t4")
    first = profile.gpus[0]
    twin = dataclasses.replace(profile.gpus[1], uuid=first.uuid)
    bad = dataclasses.replace(profile, gpus=(first, twin, *profile.gpus[2:]))
    with pytest.raises(ProfileError, match=r"gpus\[1\]: duplicate UUID"):
        FakeNvml(bad)


# -- values NVML's C types can carry --------------------------------------------------------------


def model(**fields: object) -> str:
    values: dict[str, object] = {
        "name": "NVIDIA X", "memory_bytes": 16 * MIB, "compute_capability": "[7, 5]",
        "architecture": "turing", "brand": "tesla", "pci_device_id": "0x1EB810DE",
    }
    values.update(fields)
    inner = ", ".join(f"{k}: {v}" for k, v in values.items())
    return f"models: {{X: {{{inner}}}}}\ngpus: [{{model: X, bus_id: '07:00.0'}}]\n"


@pytest.mark.parametrize(
    ("body", "field", "reason"),
    [
        (model(memory_bytes=1 << 70), "models.X.memory_bytes", "unsigned long long"),
        (model(memory_bytes=1 << 64), "models.X.memory_bytes", "unsigned long long"),
        (model(pci_device_id=1 << 32), "models.X.pci_device_id", "unsigned int"),
        (model(pci_device_id=-1), "models.X.pci_device_id", "unsigned int"),
        (model(pci_subsystem_id=1 << 32), "models.X.pci_subsystem_id", "unsigned int"),
        (model(pci_class=0x1000000), "models.X.pci_class", "24-bit PCI class"),
        (model(nvlinks=19), "models.X.nvlinks", "19 is out of range 0..18"),
        (model(compute_capability="[7, 2147483648]"), "models.X.compute_capability", "each 0.."),
        (model(compute_capability="[-1, 0]"), "models.X.compute_capability", "each 0.."),
        (model(name="N" * 96), "models.X.name", "longer than the 95 bytes"),
        ("gpus: [{model: T4, bus_id: '07:00.0', minor: 255}]\n", "gpus[0].minor",
         "255 is nvidiactl"),
        ("gpus: [{model: T4, bus_id: '07:00.0', numa_node: 1024}]\n", "gpus[0].numa_node",
         "out of range"),
        ("gpus: [{model: T4, bus_id: '07:00.0', pci_class: 0x1000000}]\n", "gpus[0].pci_class",
         "24-bit PCI class"),
    ],
)
def test_values_must_fit_nvml_types(tmp_path: Path, body: str, field: str, reason: str) -> None:
    message = error_of(write(tmp_path, body))
    assert f": {field}: " in message and reason in message, message


@pytest.mark.parametrize(
    ("header", "field", "reason"),
    [
        (HEADER.replace("12040", "2147483648"), "cuda_driver_version", "as an int"),
        (HEADER.replace("550.54.15", "5" * 80), "driver_version", "longer than the 79 bytes"),
        (HEADER + f"nvml_version: '{'1' * 80}'\n", "nvml_version", "longer than the 79 bytes"),
    ],
)
def test_system_values_must_fit(tmp_path: Path, header: str, field: str, reason: str) -> None:
    message = error_of(write(tmp_path, f"gpus: [{T4}]\n", header=header))
    assert f": {field}: " in message and reason in message, message


def test_largest_memory_nvml_can_report_reads_back_exactly(tmp_path: Path) -> None:
    biggest = C_ULLONG_MAX - (MIB - 1)  # the largest whole number of MiB that fits
    profile = load_profile(write(tmp_path, model(memory_bytes=biggest)))
    with FakeNvml(profile):
        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            assert pynvml.nvmlDeviceGetMemoryInfo(handle).total == biggest
        finally:
            pynvml.nvmlShutdown()


def test_a_value_that_does_not_fit_is_an_nvml_error_not_a_wrapped_number() -> None:
    """Belt and braces under the loader: ctypes would turn 2^70 into 0 silently."""
    profile = load_profile("t4")
    gpu = profile.gpus[0]
    huge = dataclasses.replace(gpu, model=dataclasses.replace(gpu.model, memory_bytes=1 << 70))
    with FakeNvml(dataclasses.replace(profile, gpus=(huge, *profile.gpus[1:]))):
        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            with pytest.raises(pynvml.NVMLError) as info:
                pynvml.nvmlDeviceGetMemoryInfo(handle)
            assert info.value.value == pynvml.NVML_ERROR_UNKNOWN
        finally:
            pynvml.nvmlShutdown()


# -- the daemons: exit 2 with the one line ------------------------------------------------------


def bad_profiles(tmp_path: Path) -> list[tuple[Path, str]]:
    """(profile file, field its error names): a duplicate UUID and 2^70 bytes of memory."""
    dup = write(tmp_path, "gpus: [{model: T4, bus_id: '07:00.0', uuid: GPU-x},"
                " {model: T4, bus_id: '08:00.0', uuid: GPU-x}]\n", name="dup.yaml")
    wrap = write(tmp_path, model(memory_bytes=1 << 70), name="wrap.yaml")
    return [(dup, "gpus[1].uuid"), (wrap, "models.X.memory_bytes")]


def test_plugin_exits_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for path, field in bad_profiles(tmp_path):
        status = plugin_main(["--nvml", f"fake:{path}", "--kubelet-socket", "",
                              "--ready-file", ""])
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("nvidia-device-plugin:")]
        assert status == 2, err
        assert len(lines) == 1 and f"{path}: {field}: " in lines[0], err


def test_plugin_exits_2_even_when_told_to_idle(tmp_path: Path) -> None:
    """--fail-on-init-error=false idles after init errors; a bad profile is not one. In its own
    process: were it to idle, the run times out and the test fails instead of hanging."""
    for path, field in bad_profiles(tmp_path):
        result = run_daemon("deviceplugin.main", "--nvml", f"fake:{path}", "--kubelet-socket", "",
                            "--ready-file", "", "--fail-on-init-error=false")
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 2, result.stderr
        assert len(lines) == 1 and f"{path}: {field}: " in lines[0], result.stderr
        assert "Traceback" not in result.stderr


def test_gfd_exits_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for path, field in bad_profiles(tmp_path):
        status = gfd_main(["--oneshot", "--nvml", f"fake:{path}", "-o", str(tmp_path / "f")],
                          environ={})
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("gpu-feature-discovery:")]
        assert status == 2, err
        assert len(lines) == 1 and f"{path}: {field}: " in lines[0], err


# -- a typo'd profile name: a usage error in both daemons, whatever fail-on-init-error says -------


def run_daemon(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    """A daemon as its own process: with the old behaviour the plugin would idle until the
    timeout, so the test fails (TimeoutExpired) rather than hangs."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("module", "args"),
    [
        ("deviceplugin.main", ("--kubelet-socket", "", "--ready-file", "",
                               "--fail-on-init-error=false")),
        ("deviceplugin.main", ("--kubelet-socket", "", "--ready-file", "")),
        ("gfd", ("--oneshot", "--fail-on-init-error=false", "--output-file", "-")),
    ],
)
def test_unknown_profile_is_a_usage_error(module: str, args: tuple[str, ...]) -> None:
    result = run_daemon(module, "--nvml", "fake:dgx-a10", *args)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1, result.stderr
    assert "dgx-a10: unknown profile" in lines[0] and "'fake-nvml list'" in lines[0]
    assert "dgx-a100" in lines[0]

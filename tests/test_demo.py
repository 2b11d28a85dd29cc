"""``make run``: the demo prints the advertised GPUs, an allocation and the GFD labels."""

from __future__ import annotations

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_demo(*args: str) -> str:
    """Run the demo with ``args``; assert it exited 0 and return what it printed."""
    result = subprocess.run(
        [sys.executable, "-m", "demo", *args],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": REPO},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_demo_runs_and_exits() -> None:
    out = run_demo("--exit-after", "2")
    assert "[ListAndWatch] nvidia.com/gpu: 8 devices, 8 healthy" in out
    assert "[GetPreferredAllocation] nvidia.com/gpu: GPU-" in out
    assert "[Allocate] nvidia.com/gpu: GPU-" in out
    assert "env NVIDIA_VISIBLE_DEVICES=GPU-" in out
    assert "nvidia.com/gpu.count=8" in out
    assert "nvidia.com/gpu.product=NVIDIA-A100-SXM4-40GB" in out
    assert "[demo] stopping" in out


def test_demo_mig_with_device_specs() -> None:
    out = run_demo("--profile", "a100-mig-1g", "--mig-strategy", "mixed", "--pass-device-specs",
                   "--allocate", "1", "--exit-after", "0")
    assert "[ListAndWatch] nvidia.com/mig-1g.5gb: 56 devices, 56 healthy" in out
    assert "[Allocate] nvidia.com/mig-1g.5gb: MIG-" in out
    assert "/driver/dev/nvidia0 -> /dev/nvidia0 (rw)" in out
    assert out.count("-> /dev/nvidia-caps/nvidia-cap") == 2


def test_demo_labels_the_profiles_machine() -> None:
    out = run_demo("--profile", "t4", "--allocate", "1", "--exit-after", "0")
    assert "nvidia.com/gpu.machine=g4dn.12xlarge-simulated" in out
    assert "DGX-A100" not in out


def test_machine_type_comes_from_the_profile() -> None:
    from demo.node import machine_type
    from gpus.fake import load_profile

    assert machine_type(load_profile("dgx-a100")) == "DGX-A100-simulated"
    assert machine_type(load_profile("a100-mig-1g")) == "DGX-A100-simulated"  # via extends
    assert machine_type(load_profile("dgx-h100")) == "DGX-H100-simulated"
    assert machine_type(load_profile("hetero")) == "hetero-simulated"  # no machine: the name
    assert machine_type(None) == "unknown"


def test_demo_in_cdi_mode_writes_a_fake_driver_root_and_a_complete_spec() -> None:
    out = run_demo("--profile", "t4", "--device-list-strategy", "cdi-cri", "--allocate", "1",
                   "--exit-after", "0")
    assert "cdi k8s.device-plugin.nvidia.com/gpu=GPU-" in out
    assert "env NVIDIA_VISIBLE_DEVICES" not in out
    (line,) = [line for line in out.splitlines() if line.startswith("[demo] CDI spec ")]
    assert "/driver" not in line.split(":")[0]  # the spec lives in the work dir's cdi/
    assert "4 devices" in line and " 6 hooks" in line
    mounts = int(line.split(" mounts")[0].rsplit(" ", 1)[1])
    assert mounts >= 30  # the fake root's libraries, binaries, firmware, configs

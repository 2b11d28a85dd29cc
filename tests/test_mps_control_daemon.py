"""``mps-control-daemon``: the console script on the shared runtime (flags, exit codes,
SIGTERM, ``mount-shm``), against the fake NVML and the fake ``nvidia-cuda-mps-control``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpus.fake.mpscontrol import FAIL_ENV, install_as, read_state
from gpus.mps import MpsRoot
from gpus.runtime import EXIT_FAILURE, EXIT_OK, EXIT_USAGE
from mpsdaemon import main as cli
from mpsdaemon import shm

REPO = Path(__file__).resolve().parent.parent
GPU = "nvidia.com/gpu"
WAIT_S = 20.0
MPS_CONFIG = """version: v1
flags:
  migStrategy: {strategy}
sharing:
  mps:
    resources:
    - name: nvidia.com/gpu
      replicas: 4
"""
# Settings the tests must not inherit from whoever runs them.
SCRUBBED = ("MPS_ROOT", "CONFIG_FILE", "NVML_BACKEND", "MIG_STRATEGY", "DP_LOG_LEVEL", FAIL_ENV)


def write_config(tmp_path: Path, strategy: str = "none") -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(MPS_CONFIG.format(strategy=strategy))
    return path


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in SCRUBBED:
        monkeypatch.delenv(name, raising=False)


def wait_for_file(path: Path, process: subprocess.Popen[str]) -> bool:
    """Wait (bounded) for another process to create ``path``; False if it exits first."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if path.exists():
            return True
        if process.poll() is not None:
            return False
        time.sleep(0.02)
    return False


def test_sigterm_quits_the_daemons_and_removes_the_markers(tmp_path: Path) -> None:
    root = MpsRoot(str(tmp_path / "mps"))
    bindir = install_as(tmp_path / "bin").parent
    env = {k: v for k, v in os.environ.items() if k not in SCRUBBED}
    env.update(PATH=f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}", PYTHONPATH=str(REPO))
    command = [sys.executable, "-m", "mpsdaemon.main", "--config-file",
               str(write_config(tmp_path)), "--mps-root", root.path, "--nvml", "fake:dgx-a100"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        assert wait_for_file(root.ready_file, process), process.communicate(timeout=WAIT_S)[0]
        assert root.started_file(GPU).is_file()
        state = read_state(root.pipe_dir(GPU))
        assert state["running"] and state["active_thread_percentage"] == 25
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=WAIT_S)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == EXIT_OK, output
    assert read_state(root.pipe_dir(GPU))["commands"][-1] == "quit"
    assert not root.ready_file.exists() and not root.started_file(GPU).exists()
    assert "stopping the MPS control daemons" in output


@pytest.mark.usefixtures("clean_env")
def test_mps_without_mps_root_is_a_usage_error(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["--config-file", str(write_config(tmp_path)), "--nvml", "fake:dgx-a100"])
    assert code == EXIT_USAGE
    assert "sharing.mps: MPS sharing needs --mps-root" in capsys.readouterr().err


@pytest.mark.usefixtures("clean_env")
def test_mps_with_mixed_strategy_is_a_usage_error(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["--config-file", str(write_config(tmp_path, "mixed")),
                     "--mps-root", str(tmp_path / "mps"), "--nvml", "fake:dgx-a100"])
    assert code == EXIT_USAGE
    assert "MPS sharing is not supported with --mig-strategy mixed" in capsys.readouterr().err


@pytest.mark.usefixtures("clean_env")
def test_mount_shm_mounts_under_the_root_and_exits(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mounted: list[Path] = []

    class Mounter:
        def is_mounted(self, path: Path) -> bool:
            return False

        def unmount(self, path: Path) -> None:
            raise AssertionError("nothing was mounted")

        def mount(self, source: str, target: Path, fstype: str, options: list[str]) -> None:
            mounted.append(target)

    monkeypatch.setattr(shm, "SystemMounter", Mounter)
    root = tmp_path / "mps"
    assert cli.main(["mount-shm", "--mps-root", str(root)]) == EXIT_OK
    assert mounted == [root / "shm"]


@pytest.mark.usefixtures("clean_env")
def test_mount_shm_failure_exits_1_with_one_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    class Refusing:
        def is_mounted(self, path: Path) -> bool:
            return False

        def unmount(self, path: Path) -> None:
            pass

        def mount(self, source: str, target: Path, fstype: str, options: list[str]) -> None:
            raise shm.MountError("mount: permission denied")

    monkeypatch.setattr(shm, "SystemMounter", Refusing)
    assert cli.main(["mount-shm", "--mps-root", str(tmp_path / "mps")]) == EXIT_FAILURE
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("mps-control-daemon: ") and "permission denied" in err[-1]
    assert "cannot mount the MPS shm" in err[-1]


def test_the_flags_are_the_config_table_rows() -> None:
    options = {o for a in cli.build_parser()._actions for o in a.option_strings}
    assert options == {"-h", "--help", "--config-file", "--mps-root", "--nvml", "--log-level",
                       "--version"}  # --version: every console script has it (issue 12)

"""The fake nvidia-cuda-mps-control, driven as the daemon drives the real one (gpus.mps)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gpus.fake.mpscontrol import FAIL_ENV, REAL_NAME, inject, install_as, read_state
from gpus.mps import MpsControl, MpsError, MpsRoot

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def bindir(tmp_path: Path) -> Path:
    """A PATH directory holding the fake under the real name."""
    return install_as(tmp_path / "bin").parent


def environ(bindir: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": str(REPO)}
    env.pop(FAIL_ENV, None)
    return {**env, **extra}


def control(tmp_path: Path, bindir: Path, **extra: str) -> MpsControl:
    return MpsRoot(str(tmp_path / "mps")).control("nvidia.com/gpu",
                                                  environ=environ(bindir, **extra))


def test_daemon_mode_creates_its_directories_and_answers_clients(tmp_path: Path,
                                                                 bindir: Path) -> None:
    assert (bindir / REAL_NAME).stat().st_mode & 0o111
    ctl = control(tmp_path, bindir)
    ctl.start_daemon()
    pipe, log = Path(ctl.pipe_dir), Path(ctl.log_dir)
    assert pipe == tmp_path / "mps" / "nvidia.com" / "gpu" / "pipe"
    assert pipe.is_dir() and (log / "control.log").is_file()
    ctl.send("set_default_device_pinned_mem_limit 0 10240M")
    ctl.send("set_default_active_thread_percentage 25")
    assert ctl.send("get_default_active_thread_percentage") == "25.0\n"
    ctl.assert_healthy()
    state = read_state(pipe)
    assert state["running"] and state["pinned_mem_limits"] == {"0": "10240M"}
    assert state["commands"] == ["set_default_device_pinned_mem_limit 0 10240M",
                                 "set_default_active_thread_percentage 25",
                                 "get_default_active_thread_percentage",
                                 "get_default_active_thread_percentage"]
    assert "Cmd: set_default_active_thread_percentage 25" in (log / "control.log").read_text()
    with pytest.raises(MpsError, match="already running"):
        ctl.start_daemon()
    ctl.quit()
    assert not read_state(pipe)["running"]
    with pytest.raises(MpsError, match="Cannot find MPS control daemon process"):
        ctl.assert_healthy()


def test_several_commands_on_one_stdin(tmp_path: Path, bindir: Path) -> None:
    env = environ(bindir, CUDA_MPS_PIPE_DIRECTORY=str(tmp_path / "p"),
                  CUDA_MPS_LOG_DIRECTORY=str(tmp_path / "l"))
    subprocess.run([REAL_NAME, "-d"], env=env, check=True)
    done = subprocess.run([REAL_NAME], env=env, input="set_default_active_thread_percentage "
                          "50\nget_default_active_thread_percentage", capture_output=True,
                          text=True, check=True)
    assert done.stdout == "50.0\n"


@pytest.mark.parametrize("command", ["bogus", "set_default_active_thread_percentage 0",
                                     "set_default_device_pinned_mem_limit x 1G",
                                     "set_default_device_pinned_mem_limit 0 lots"])
def test_bad_commands_fail_and_change_nothing(tmp_path: Path, bindir: Path,
                                              command: str) -> None:
    ctl = control(tmp_path, bindir)
    ctl.start_daemon()
    before = read_state(ctl.pipe_dir)
    with pytest.raises(MpsError, match="exited 1"):
        ctl.send(command)
    assert read_state(ctl.pipe_dir) == before


def test_failures_can_be_injected(tmp_path: Path, bindir: Path) -> None:
    with pytest.raises(MpsError, match="start failed"):
        control(tmp_path, bindir, **{FAIL_ENV: "start"}).start_daemon()
    ctl = control(tmp_path, bindir, **{FAIL_ENV: "set_default_active_thread_percentage"})
    ctl.start_daemon()
    with pytest.raises(MpsError, match="set_default_active_thread_percentage: failed"):
        ctl.send("set_default_active_thread_percentage 50")
    ctl.assert_healthy()
    inject(ctl.pipe_dir, fail=["get_default_active_thread_percentage"])
    with pytest.raises(MpsError):
        ctl.assert_healthy()
    inject(ctl.pipe_dir, fail=[], running=False)  # the daemon died
    with pytest.raises(MpsError, match="Cannot find"):
        ctl.assert_healthy()


def test_missing_binary_is_a_clear_error(tmp_path: Path) -> None:
    ctl = MpsRoot(str(tmp_path)).control("nvidia.com/gpu", environ={"PATH": str(tmp_path)})
    with pytest.raises(MpsError, match=f"{REAL_NAME} not found on PATH"):
        ctl.start_daemon()


def test_console_script_help() -> None:
    done = subprocess.run([sys.executable, "-m", "gpus.fake.mpscontrol", "--help"],
                          capture_output=True, text=True, check=True, cwd=REPO)
    assert "usage: fake-mps-control" in done.stdout

"""The ``nvidia-device-plugin`` command: exit statuses, bad input, signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from test_server_support import short_tmpdir

from deviceplugin.main import main, ready_file_path
from deviceplugin.mockkubelet import MockKubelet

TIMEOUT = 10.0
GPU = "nvidia.com/gpu"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def stderr_lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def test_invalid_flag_value_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--mig-strategy", "bogus", "--kubelet-socket", ""]) == 2
    (line,) = stderr_lines(capsys)
    assert "--mig-strategy" in line
    assert "none" in line and "single" in line and "mixed" in line


def test_unknown_backend_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--nvml", "bogus", "--kubelet-socket", ""]) == 2
    (line,) = stderr_lines(capsys)
    assert "--nvml 'bogus'" in line and "real" in line and "fake:" in line


def test_unknown_fake_profile_fails_init_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    # A usage error (exit 2) as in GFD, not an init failure: a restart would not fix it.
    assert main(["--nvml", "fake:no-such-machine", "--kubelet-socket", ""]) == 2
    lines = [line for line in stderr_lines(capsys) if line.startswith("nvidia-device-plugin:")]
    assert len(lines) == 1 and "no-such-machine" in lines[0]


def test_plugin_dir_missing_fails_init(capsys: pytest.CaptureFixture[str]) -> None:
    with short_tmpdir() as directory:
        missing = os.path.join(directory, "nope", "kubelet.sock")
        assert main(["--nvml", "fake:dgx-a100", "--kubelet-socket", missing]) == 1
    lines = [line for line in stderr_lines(capsys) if line.startswith("nvidia-device-plugin:")]
    assert len(lines) == 1 and "does not exist" in lines[0]


def test_socket_path_too_long_fails_init(capsys: pytest.CaptureFixture[str]) -> None:
    with short_tmpdir() as directory:
        deep = os.path.join(directory, "d" * 100)
        os.mkdir(deep)
        code = main(["--nvml", "fake:dgx-a100", "--kubelet-socket", f"{deep}/kubelet.sock"])
        assert code == 1
        assert os.listdir(deep) == []
    lines = [line for line in stderr_lines(capsys) if line.startswith("nvidia-device-plugin:")]
    assert len(lines) == 1 and "AF_UNIX" in lines[0]


def spawn(args: list[str]) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": REPO}
    return subprocess.Popen(
        [sys.executable, "-m", "deviceplugin.main", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@contextmanager
def spawned(args: list[str]) -> Iterator[subprocess.Popen[str]]:
    """The plugin as a child process; killed on the way out if the test left it running."""
    proc = spawn(args)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def read_until(proc: subprocess.Popen[str], text: str) -> None:
    """Read the child's stderr up to the first line containing ``text`` (or its end)."""
    assert proc.stderr is not None
    for line in proc.stderr:
        if text in line:
            break


def test_sigterm_exits_zero_and_removes_sockets() -> None:
    with short_tmpdir() as directory, MockKubelet(directory) as kubelet:
        with spawned(["--nvml", "fake:dgx-a100", "--kubelet-socket", kubelet.socket_path]) as proc:
            assert kubelet.wait_for_registration(GPU, 30), proc.stderr
            assert os.path.exists(os.path.join(directory, "nvidia-gpu.sock"))
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=TIMEOUT)
        assert proc.returncode == 0, err
        assert sorted(os.listdir(directory)) == ["kubelet.sock"]


def test_idles_after_init_error_when_told_to(tmp_path: Path) -> None:
    with short_tmpdir() as directory:
        missing = os.path.join(directory, "nope", "kubelet.sock")
        with spawned(["--nvml", "fake:dgx-a100", "--kubelet-socket", missing,
                      "--fail-on-init-error=false"]) as proc:
            # Wait for the error line, then make sure it is still running and stops cleanly.
            read_until(proc, "initialisation failed")
            assert proc.poll() is None
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=TIMEOUT)
        assert proc.returncode == 0


def test_idle_after_init_error_is_ready() -> None:
    with short_tmpdir() as directory:
        ready = os.path.join(directory, "ready")
        missing = os.path.join(directory, "nope", "kubelet.sock")
        with spawned(["--nvml", "fake:dgx-a100", "--kubelet-socket", missing,
                      "--fail-on-init-error=false", "--ready-file", ready]) as proc:
            read_until(proc, f"ready: created {ready}")
            assert os.path.isfile(ready)
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=TIMEOUT)
        assert proc.returncode == 0


def test_stale_ready_file_is_deleted_at_start(capsys: pytest.CaptureFixture[str]) -> None:
    with short_tmpdir() as directory:
        ready = os.path.join(directory, "ready")
        Path(ready).write_text("left by a previous container\n")
        status = main(["--nvml", "fake:no-such-profile", "--ready-file", ready])
        assert status == 2
        assert not os.path.exists(ready)


def test_ready_file_from_the_environment_and_flag() -> None:
    assert ready_file_path(None, {}) == "/run/nvidia-device-plugin/ready"
    assert ready_file_path(None, {"DP_READY_FILE": "/x/ready"}) == "/x/ready"
    assert ready_file_path("", {"DP_READY_FILE": "/x/ready"}) == ""  # the flag wins

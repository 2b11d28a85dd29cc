"""The ``nvidia-device-plugin`` command: exit statuses, bad input, signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from test_server_support import short_tmpdir

from deviceplugin.main import main
from deviceplugin.mockkubelet import MockKubelet

TIMEOUT = 10.0
GPU = "nvidia.com/gpu"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def stderr_lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def test_invalid_flag_value_is_one_line_and_exit_2(capsys) -> None:
    assert main(["--mig-strategy", "bogus", "--kubelet-socket", ""]) == 2
    (line,) = stderr_lines(capsys)
    assert "--mig-strategy" in line
    assert "none" in line and "single" in line and "mixed" in line


def test_unknown_backend_is_a_usage_error(capsys) -> None:
    assert main(["--nvml", "bogus", "--kubelet-socket", ""]) == 2
    (line,) = stderr_lines(capsys)
    assert "--nvml 'bogus'" in line and "real" in line and "fake:" in line


def test_unknown_fake_profile_fails_init_with_one_line(capsys) -> None:
    assert main(["--nvml", "fake:no-such-machine", "--kubelet-socket", ""]) == 1
    lines = [line for line in stderr_lines(capsys) if line.startswith("nvidia-device-plugin:")]
    assert len(lines) == 1 and "no-such-machine" in lines[0]


def test_plugin_dir_missing_fails_init(capsys) -> None:
    with short_tmpdir() as directory:
        missing = os.path.join(directory, "nope", "kubelet.sock")
        assert main(["--nvml", "fake:dgx-a100", "--kubelet-socket", missing]) == 1
    lines = [line for line in stderr_lines(capsys) if line.startswith("nvidia-device-plugin:")]
    assert len(lines) == 1 and "does not exist" in lines[0]


def test_socket_path_too_long_fails_init(capsys) -> None:
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


def test_sigterm_exits_zero_and_removes_sockets() -> None:
    with short_tmpdir() as directory, MockKubelet(directory) as kubelet:
        proc = spawn(["--nvml", "fake:dgx-a100", "--kubelet-socket", kubelet.socket_path])
        try:
            assert kubelet.wait_for_registration(GPU, 30), proc.stderr
            assert os.path.exists(os.path.join(directory, "nvidia-gpu.sock"))
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=TIMEOUT)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 0, err
        assert sorted(os.listdir(directory)) == ["kubelet.sock"]


def test_idles_after_init_error_when_told_to(tmp_path) -> None:
    with short_tmpdir() as directory:
        missing = os.path.join(directory, "nope", "kubelet.sock")
        proc = spawn(
            ["--nvml", "fake:dgx-a100", "--kubelet-socket", missing, "--fail-on-init-error=false"]
        )
        try:
            # Wait for the error line, then make sure it is still running and stops cleanly.
            assert proc.stderr is not None
            for line in proc.stderr:
                if "initialisation failed" in line:
                    break
            assert proc.poll() is None
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=TIMEOUT)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 0

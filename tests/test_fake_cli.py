"""``fake-nvml``: inject waits for a starting daemon's socket, takes --control anywhere, and
stops quietly when its reader goes away."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_server_support import short_tmpdir

from gpus.fake import FakeNvml, install
from gpus.fake import control as controlmod
from gpus.fake.cli import CONTROL_ENV, main

REPO = Path(__file__).resolve().parent.parent
TIMEOUT = 10.0


@pytest.fixture
def sock_path() -> Iterator[str]:
    with short_tmpdir() as directory:
        yield os.path.join(directory, "fake.sock")


@pytest.fixture
def served(sock_path: str) -> Iterator[FakeNvml]:
    fake = install("t4", control_socket=sock_path)
    try:
        yield fake
    finally:
        fake.uninstall()


def test_inject_waits_for_a_socket_that_appears_late(
    sock_path: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    waiting = threading.Event()
    pause = controlmod._pause

    def observed_pause(seconds: float) -> None:
        waiting.set()  # the client found no socket and is polling for it
        pause(seconds)

    monkeypatch.setattr(controlmod, "_pause", observed_pause)
    status: list[int] = []
    client = threading.Thread(
        target=lambda: status.append(main(["inject", "--control", sock_path, "xid", "0", "79"]))
    )
    client.start()
    try:
        assert waiting.wait(TIMEOUT)
        assert not status  # still waiting, not failed
        fake = install("t4", control_socket=sock_path)
        try:
            client.join(TIMEOUT)
        finally:
            fake.uninstall()
    finally:
        client.join(TIMEOUT)
    assert status == [0]
    assert json.loads(capsys.readouterr().out) == {"delivered": 0}


def test_inject_gives_up_after_the_wait(sock_path: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inject", "--control", sock_path, "--wait", "0.05", "status"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"fake-nvml: cannot reach the fake NVML control socket {sock_path}")
    assert "after waiting 0.05 s" in err and f"?control={sock_path}" in err
    assert "\n" not in err


def test_a_stale_socket_file_is_waited_on_then_reported(
    sock_path: str, capsys: pytest.CaptureFixture[str]
) -> None:
    fake = install("t4", control_socket=sock_path)
    fake.uninstall()
    with open(sock_path, "w"):
        pass  # a file nobody listens on: connect is refused
    assert main(["inject", "--control", sock_path, "--wait", "0", "status"]) == 1
    assert "cannot reach" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["inject", "--control", "{sock}", "lose", "1"],
        ["inject", "lose", "1", "--control", "{sock}"],
        ["inject", "lose", "--control", "{sock}", "1"],
        ["inject", "lose", "1", "--control", "{sock}", "--wait", "1"],
    ],
)
def test_control_may_come_before_or_after_the_fault(
    served: FakeNvml, sock_path: str, argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([arg.format(sock=sock_path) for arg in argv]) == 0
    assert capsys.readouterr().out.strip() == "ok"
    assert served.status()["lost"] == [1]


def test_control_from_the_environment_is_kept(
    served: FakeNvml, sock_path: str, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv(CONTROL_ENV, sock_path)
    assert main(["inject", "lose", "2"]) == 0
    assert served.status()["lost"] == [2]


def test_a_closed_pipe_ends_quietly() -> None:
    """``fake-nvml list | head``: the reader is gone before the first write."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader closes first: every write gets EPIPE
    try:
        result = subprocess.run(
            [sys.executable, "-m", "gpus.fake.cli", "list"],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
    finally:
        os.close(write_end)
    assert result.stderr == ""
    assert result.returncode == 1


class _PipeClosedAtFlush(io.StringIO):
    """stdout whose reader left after the output was buffered: only the flush fails."""

    def flush(self) -> None:
        raise BrokenPipeError(32, "Broken pipe")


def test_a_pipe_closed_after_buffering_ends_quietly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdout", _PipeClosedAtFlush())
    assert main(["list"]) == 1  # the failure shows inside main, not at interpreter exit


def test_driver_root_writes_what_discovery_finds(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from gpus.driver.discover import DriverRoots, discover_driver

    root = tmp_path / "driver"
    assert main(["driver-root", "t4", str(root)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("fake NVIDIA driver 535.129.03 in ") and "libraries" in out
    found = discover_driver(DriverRoots(str(root), str(root)), allow_plain_device_files=True)
    assert found.version == "535.129.03"
    assert any(f.path.endswith("/nvidia-smi") for f in found.binaries)


def test_driver_root_for_an_unknown_profile_is_one_line(tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["driver-root", "no-such-machine", str(tmp_path)]) == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("fake-nvml: ") and "no-such-machine" in line

"""The ``mock-kubelet`` command: a directory it cannot listen in is one clear line, exit 2."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest
from test_server_support import short_tmpdir

from deviceplugin.mockkubelet import KUBELET_SOCKET, MockKubelet, MockKubeletError, main

PROG = "mock-kubelet:"


@pytest.fixture(autouse=True)
def restore_signals() -> Any:
    """main() installs SIGINT/SIGTERM handlers; put pytest's back afterwards."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def only_line(capsys: pytest.CaptureFixture[str]) -> str:
    """The single line main() printed on stderr (no traceback, nothing else)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith(PROG)]
    assert len(lines) == 1, err
    return lines[0]


def test_unwritable_directory_is_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The suite runs as root, for whom chmod changes nothing: make os.access say "read-only"
    # for that one directory, as it does on a read-only mount.
    with short_tmpdir() as directory:
        real_access = os.access

        def access(path: Any, mode: int, **kwargs: Any) -> bool:
            if os.fspath(path) == directory and mode & os.W_OK:
                return False
            return real_access(path, mode, **kwargs)

        monkeypatch.setattr("deviceplugin.mockkubelet.os.access", access)
        assert main(["--dir", directory, "--exit-after", "0"]) == 2
        assert os.listdir(directory) == []
    assert only_line(capsys) == (
        f"{PROG} --dir {directory!r} is not writable: {KUBELET_SOCKET} cannot be created there"
    )


def test_kubelet_socket_path_held_by_a_directory_is_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # A real failure, no mocks: the socket path cannot be replaced.
    with short_tmpdir() as directory:
        blocker = Path(directory, KUBELET_SOCKET)
        (blocker / "inside").mkdir(parents=True)
        assert main(["--dir", directory, "--exit-after", "0"]) == 2
        assert (blocker / "inside").is_dir()
    line = only_line(capsys)
    assert line == f"{PROG} cannot replace {blocker}: Is a directory"


def test_socket_path_too_long_to_bind_is_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with short_tmpdir() as directory:
        deep = os.path.join(directory, "d" * 100)
        os.mkdir(deep)
        assert main(["--dir", deep, "--exit-after", "0"]) == 2
        assert os.listdir(deep) == []
    assert only_line(capsys).startswith(
        f"{PROG} cannot listen on {os.path.join(deep, KUBELET_SOCKET)}: ")


def test_start_failure_leaves_the_mock_stopped_and_startable(sockdir: str) -> None:
    blocker = Path(sockdir, KUBELET_SOCKET)
    blocker.mkdir()
    kubelet = MockKubelet(sockdir)
    with pytest.raises(MockKubeletError, match="cannot replace"):
        kubelet.start()
    blocker.rmdir()
    with kubelet:  # starts now, and stops cleanly
        assert os.path.exists(kubelet.socket_path)
    assert not os.path.exists(kubelet.socket_path)

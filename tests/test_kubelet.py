"""Registration with the kubelet and the watch that keeps it registered."""

from __future__ import annotations

import logging
import os
import socket

import pytest

from deviceplugin.kubelet import (
    API_VERSION,
    RegistrationError,
    RegistrationLoop,
    StateLog,
    kubelet_socket_state,
    register,
)
from deviceplugin.mockkubelet import MockKubelet
from gpus.backoff import Backoff

TIMEOUT = 10.0


class FakeServer:
    """Stands in for a PluginServer in the loop (no gRPC)."""

    def __init__(self, name: str, endpoint: str = "nvidia-gpu.sock") -> None:
        self.name = name
        self.generation = 1
        self._endpoint = endpoint
        self.is_intact = True
        self.restarts = 0

    @property
    def endpoint(self) -> str:
        return self._endpoint

    def intact(self) -> bool:
        return self.is_intact

    def restart(self) -> None:
        self.restarts += 1
        self.generation += 1
        self.is_intact = True


class Recorder:
    """A register function that records calls and fails while ``failing`` is set."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str]] = []
        self.failing = False

    def __call__(self, kubelet_socket: str, endpoint: str, name: str) -> None:
        self.calls.append((kubelet_socket, endpoint, name))
        if self.failing:
            raise RegistrationError("kubelet said no")


def make_socket(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    return sock


def test_socket_state_kinds(sockdir: str) -> None:
    path = os.path.join(sockdir, "kubelet.sock")
    assert "does not exist" in (kubelet_socket_state(path).problem or "")
    open(path, "w").close()
    assert "is not a socket" in (kubelet_socket_state(path).problem or "")
    os.unlink(path)
    os.mkdir(path)
    assert "is a directory" in (kubelet_socket_state(path).problem or "")
    os.rmdir(path)
    with make_socket(path):
        first = kubelet_socket_state(path)
    assert first.ready and first.identity is not None
    os.unlink(path)
    with make_socket(path):
        assert kubelet_socket_state(path).identity != first.identity


def test_backoff_doubles_up_to_cap() -> None:
    backoff = Backoff(initial=0.1, cap=0.5)
    assert [backoff.next_delay() for _ in range(5)] == [0.1, 0.2, 0.4, 0.5, 0.5]
    backoff.reset()
    assert backoff.next_delay() == 0.1


def test_state_log_logs_changes_only(caplog: pytest.LogCaptureFixture) -> None:
    states = StateLog(logging.getLogger("test.state"))
    with caplog.at_level(logging.INFO, logger="test.state"):
        for _ in range(3):
            states.set("k", logging.INFO, "waiting")
        states.set("k", logging.INFO, "up")
    assert [r.getMessage() for r in caplog.records] == ["waiting", "up"]


def test_register_sends_the_request(sockdir: str) -> None:
    with MockKubelet(sockdir) as kubelet:
        register(kubelet.socket_path, "nvidia-gpu.sock", "nvidia.com/gpu")
        (request,) = kubelet.registrations()
    assert request.version == API_VERSION == "v1beta1"
    assert request.endpoint == "nvidia-gpu.sock"
    assert request.resource_name == "nvidia.com/gpu"
    assert request.options.get_preferred_allocation_available is True
    assert request.options.pre_start_required is False


@pytest.mark.parametrize("name", ["gpu", "kubernetes.io/gpu", "nvidia.com/"])
def test_register_refused_names(sockdir: str, name: str) -> None:
    with MockKubelet(sockdir) as kubelet:
        with pytest.raises(RegistrationError, match="INVALID_ARGUMENT.*vendor domain"):
            register(kubelet.socket_path, "nvidia-gpu.sock", name)
        assert kubelet.registrations() == []


def test_register_without_kubelet_is_a_clear_error(sockdir: str) -> None:
    with pytest.raises(RegistrationError, match="kubelet at .*kubelet.sock failed"):
        register(os.path.join(sockdir, "kubelet.sock"), "x.sock", "nvidia.com/gpu", timeout=0.5)


def test_loop_waits_for_the_kubelet_and_logs_once(
    sockdir: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = os.path.join(sockdir, "kubelet.sock")
    recorder, server = Recorder(), FakeServer("nvidia.com/gpu")
    loop = RegistrationLoop(path, lambda: [server], register_fn=recorder)
    with caplog.at_level(logging.INFO, logger="deviceplugin.kubelet"):
        for now in range(5):
            loop.tick(now=float(now))
    assert recorder.calls == []
    assert sum("does not exist" in r.getMessage() for r in caplog.records) == 1
    with make_socket(path):
        loop.tick(now=10.0)
        loop.tick(now=11.0)
    assert recorder.calls == [(path, "nvidia-gpu.sock", "nvidia.com/gpu")]
    assert loop.registered() == {"nvidia.com/gpu": True}


def test_loop_backs_off_on_failure(sockdir: str) -> None:
    path = os.path.join(sockdir, "kubelet.sock")
    recorder, server = Recorder(), FakeServer("nvidia.com/gpu")
    recorder.failing = True
    loop = RegistrationLoop(path, lambda: [server], register_fn=recorder)
    with make_socket(path):
        for step in range(20):
            loop.tick(now=step * 0.05)  # one second of 50 ms ticks
        # Tries at 0, 0.1, 0.3, 0.7 s (delays 0.1, 0.2, 0.4 ...), not on every tick.
        assert len(recorder.calls) == 4
        recorder.failing = False
        loop.tick(now=100.0)
    assert loop.registered() == {"nvidia.com/gpu": True}


def test_loop_reregisters_after_kubelet_restart_and_rebind(sockdir: str) -> None:
    path = os.path.join(sockdir, "kubelet.sock")
    recorder, server = Recorder(), FakeServer("nvidia.com/gpu")
    loop = RegistrationLoop(path, lambda: [server], register_fn=recorder)
    with make_socket(path):
        loop.tick(now=0.0)
        loop.tick(now=1.0)
    assert len(recorder.calls) == 1
    os.unlink(path)
    with make_socket(path):  # a new kubelet
        loop.tick(now=2.0)
        assert len(recorder.calls) == 2
        server.is_intact = False  # our socket wiped: rebind, then register again
        loop.tick(now=3.0)
    assert server.restarts == 1
    assert len(recorder.calls) == 3


def test_loop_reports_non_socket_and_keeps_going(
    sockdir: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = os.path.join(sockdir, "kubelet.sock")
    open(path, "w").close()
    recorder, server = Recorder(), FakeServer("nvidia.com/gpu")
    loop = RegistrationLoop(path, lambda: [server], register_fn=recorder)
    with caplog.at_level(logging.ERROR, logger="deviceplugin.kubelet"):
        loop.tick(now=0.0)
        loop.tick(now=1.0)
    assert loop.last_problem == f"kubelet socket {path} is not a socket"
    assert [r.levelno for r in caplog.records] == [logging.ERROR]
    assert recorder.calls == []
    os.unlink(path)
    with make_socket(path):
        loop.tick(now=2.0)
    assert loop.last_problem is None
    assert len(recorder.calls) == 1


def test_empty_kubelet_socket_never_registers() -> None:
    recorder, server = Recorder(), FakeServer("nvidia.com/gpu")
    loop = RegistrationLoop("", lambda: [server], register_fn=recorder)
    server.is_intact = False
    loop.tick(now=0.0)
    assert recorder.calls == []
    assert server.restarts == 1  # still rebinds vanished sockets


def test_loop_thread_starts_and_stops(sockdir: str) -> None:
    with MockKubelet(sockdir) as kubelet:
        server = FakeServer("nvidia.com/gpu")
        loop = RegistrationLoop(kubelet.socket_path, lambda: [server], poll_interval=0.01)
        loop.start()
        try:
            assert kubelet.wait_for_registration_request("nvidia.com/gpu", TIMEOUT)
        finally:
            loop.stop()

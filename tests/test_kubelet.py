"""Registration with the kubelet and the watch that keeps it registered."""

from __future__ import annotations

import logging
import os
import socket
import threading

import pytest

from deviceplugin.kubelet import (
    API_VERSION,
    RECOVERY_LOG_BURST,
    RateLimitedLog,
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


# --- re-registration: logged, and reported as not ready until it happened ----------------------


def registration_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.INFO and "registered nvidia.com/gpu" in r.getMessage()]


def test_every_reregistration_is_logged_with_its_cause_and_duration(
    sockdir: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = os.path.join(sockdir, "kubelet.sock")
    recorder, server = Recorder(), FakeServer("nvidia.com/gpu")
    loop = RegistrationLoop(path, lambda: [server], register_fn=recorder)
    with caplog.at_level(logging.INFO, logger="deviceplugin.kubelet"):
        with make_socket(path):
            loop.tick(now=0.0)
        os.unlink(path)
        with make_socket(path):  # a new kubelet, seen only once it is up
            loop.tick(now=1.0)
            server.is_intact = False  # our socket wiped under a running kubelet
            loop.tick(now=2.0)
        os.unlink(path)
        loop.tick(now=3.0)  # the kubelet is away for a while ...
        with make_socket(path):
            recorder.failing = True  # ... and refuses the first attempt when back
            loop.tick(now=4.0)
            recorder.failing = False
            loop.tick(now=5.0)
    lines = registration_lines(caplog)
    assert lines[0] == "registered nvidia.com/gpu (endpoint nvidia-gpu.sock) with the kubelet"
    causes = ["the kubelet restarted", "our socket was removed", "the kubelet socket went away"]
    assert len(lines) == 1 + len(causes)
    for line, cause in zip(lines[1:], causes, strict=True):
        assert line.startswith(
            "re-registered nvidia.com/gpu (endpoint nvidia-gpu.sock) with the kubelet ")
        assert " s after the registration was lost " in line
        assert line.endswith(f"({cause})")
    assert len(recorder.calls) == 5


def test_reregistration_lines_are_bounded(sockdir: str, caplog: pytest.LogCaptureFixture) -> None:
    path = os.path.join(sockdir, "kubelet.sock")
    recorder, server = Recorder(), FakeServer("nvidia.com/gpu")
    loop = RegistrationLoop(path, lambda: [server], register_fn=recorder)
    with caplog.at_level(logging.INFO, logger="deviceplugin.kubelet"), make_socket(path):
        loop.tick(now=0.0)
        for step in range(RECOVERY_LOG_BURST + 20):  # a socket deleted in a loop
            server.is_intact = False
            loop.tick(now=1.0 + step)
    assert len(recorder.calls) == RECOVERY_LOG_BURST + 21
    assert len(registration_lines(caplog)) == 1 + RECOVERY_LOG_BURST


def test_rate_limited_log_counts_what_it_left_out(caplog: pytest.LogCaptureFixture) -> None:
    limited = RateLimitedLog(logging.getLogger("test.ratelimit"), burst=2, window=10.0)
    with caplog.at_level(logging.INFO, logger="test.ratelimit"):
        logged = [limited.log("k", logging.INFO, f"event {t}", now=float(t)) for t in range(5)]
        assert limited.log("other", logging.INFO, "another key", now=4.0)
        assert limited.log("k", logging.INFO, "event 10", now=10.0)  # event 0 left the window
    assert logged == [True, True, False, False, False]
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.INFO] == [
        "event 0", "event 1", "another key",
        "event 10 (3 similar messages not logged before this one)",
    ]


class HeldRegister(Recorder):
    """A register function that, once ``hold`` is set, waits for ``release`` in each call."""

    def __init__(self) -> None:
        super().__init__()
        self.hold = False
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, kubelet_socket: str, endpoint: str, name: str) -> None:
        super().__call__(kubelet_socket, endpoint, name)
        if self.hold:
            self.entered.set()
            assert self.release.wait(TIMEOUT)


def test_the_first_tick_can_be_waited_for(sockdir: str) -> None:
    # The plugin starts its health monitor once the first Register is done (wait_first_tick).
    path = os.path.join(sockdir, "kubelet.sock")
    register, server = HeldRegister(), FakeServer("nvidia.com/gpu")
    register.hold = True
    loop = RegistrationLoop(path, lambda: [server], register_fn=register)
    kubelet = make_socket(path)
    try:
        for _ in range(2):  # and again after a stop: each start has its first tick
            server.generation += 1  # (re)bound: due for a Register
            register.entered.clear()
            register.release.clear()
            loop.start()
            assert register.entered.wait(TIMEOUT)
            assert not loop.wait_first_tick(0)  # its Register is still in flight
            register.release.set()
            assert loop.wait_first_tick(TIMEOUT)
            loop.stop()
    finally:
        register.release.set()
        loop.stop()
        kubelet.close()


@pytest.mark.parametrize("loss", ["kubelet restart", "socket removed"])
def test_lost_registration_is_reported_before_a_register_that_hangs(
    sockdir: str, loss: str
) -> None:
    # The tick registers synchronously; a kubelet slow to answer must not leave the readiness
    # of the previous registration in place meanwhile.
    path = os.path.join(sockdir, "kubelet.sock")
    register, server = HeldRegister(), FakeServer("nvidia.com/gpu")
    reports: list[bool] = []
    loop: RegistrationLoop = RegistrationLoop(
        path, lambda: [server], register_fn=register,
        on_tick=lambda: reports.append(loop.all_registered()),
    )
    kubelet = make_socket(path)
    loop.tick(now=0.0)
    assert loop.all_registered()
    assert reports == []  # nothing was lost: no report needed before the first Register
    if loss == "kubelet restart":
        kubelet.close()
        os.unlink(path)
        kubelet = make_socket(path)
    else:
        server.is_intact = False
    register.hold = True
    ticking = threading.Thread(target=loop.tick, kwargs={"now": 1.0})
    ticking.start()
    try:
        assert register.entered.wait(TIMEOUT)
        assert reports == [False]
        assert not loop.all_registered()
    finally:
        register.release.set()
        ticking.join(TIMEOUT)
        kubelet.close()
    assert loop.all_registered()


def test_log_level_follows_the_socket_state_not_its_wording(
    sockdir: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Missing (the kubelet is starting) is INFO, anything else ERROR, whatever the path says:
    # a directory whose name holds "does not exist" is still an error.
    odd = os.path.join(sockdir, "does not exist")
    os.mkdir(odd)
    missing, blocked = os.path.join(odd, "kubelet.sock"), os.path.join(sockdir, "blocked.sock")
    os.mkdir(blocked)
    assert kubelet_socket_state(missing).missing and not kubelet_socket_state(blocked).missing
    os.mkdir(missing)  # now a directory too, under a path that says "does not exist"
    for path in (missing, blocked):
        loop = RegistrationLoop(path, lambda: [FakeServer("nvidia.com/gpu")],
                                register_fn=Recorder())
        with caplog.at_level(logging.INFO, logger="deviceplugin.kubelet"):
            caplog.clear()
            loop.tick(now=0.0)
        assert [r.levelno for r in caplog.records] == [logging.ERROR], path
    os.rmdir(missing)
    loop = RegistrationLoop(missing, lambda: [FakeServer("nvidia.com/gpu")],
                            register_fn=Recorder())
    with caplog.at_level(logging.INFO, logger="deviceplugin.kubelet"):
        caplog.clear()
        loop.tick(now=0.0)
    assert [r.levelno for r in caplog.records] == [logging.INFO]

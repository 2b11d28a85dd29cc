"""deviceplugin.kubelet guards that mutation testing found unprotected (docs/testing.md).

The loop is driven through ``RegistrationLoop.tick(now=...)`` with fake servers and a recording
register function wherever a test can (no thread, no clock); the thread tests wait on events.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import socket
import threading
import time

import pytest
from test_kubelet import TIMEOUT, FakeServer, Recorder, make_socket

from deviceplugin.kubelet import (
    BACKOFF_CAP_S,
    RECOVERY_LOG_BURST,
    RateLimitedLog,
    RegistrationError,
    RegistrationLoop,
    StateLog,
    kubelet_socket_state,
    register,
)
from deviceplugin.mockkubelet import MockKubelet
from protos.deviceplugin.v1beta1 import api_pb2

LOGGER = "deviceplugin.kubelet"
GPU, MIG = "nvidia.com/gpu", "nvidia.com/mig-1g.5gb"
# How long a kubelet that never answers holds a Register call in the hang test (on the real
# code the call gives up after its own 0.2 s timeout and the handler is released at once).
HANG_S = 3.0


def messages(caplog: pytest.LogCaptureFixture, level: int | None = None) -> list[str]:
    """The loop's log lines (of one level, if given), oldest first."""
    return [r.getMessage() for r in caplog.records
            if r.name == LOGGER and (level is None or r.levelno == level)]


def recoveries(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The re-registration lines, oldest first."""
    return [m for m in messages(caplog, logging.INFO) if m.startswith("re-registered ")]


def restart_kubelet(path: str, kubelet: socket.socket) -> socket.socket:
    """Replace the kubelet socket with a new one (a new identity), as a kubelet restart does."""
    kubelet.close()
    os.unlink(path)
    return make_socket(path)


# --- register -----------------------------------------------------------------------------


def test_register_error_carries_the_kubelets_code_and_reason(sockdir: str) -> None:
    # The line an operator reads: the gRPC code and the kubelet's own reason, not a repr.
    with MockKubelet(sockdir) as kubelet, pytest.raises(RegistrationError) as caught:
        register(kubelet.socket_path, "gpu.sock", "gpu")
    assert str(caught.value) == (
        f"registering gpu with the kubelet at {kubelet.socket_path} failed: INVALID_ARGUMENT: "
        "invalid extended resource name 'gpu': it needs a vendor domain")


def test_register_gives_up_on_a_kubelet_that_does_not_answer(sockdir: str) -> None:
    # A hung kubelet must not hold the watch thread: Register is bounded by its timeout.
    release = threading.Event()

    def hang(request: api_pb2.RegisterRequest) -> str | None:
        release.wait(HANG_S)
        return None

    with MockKubelet(sockdir) as kubelet:
        kubelet.handle_register = hang  # type: ignore[method-assign]  # a kubelet that hangs
        try:
            with pytest.raises(RegistrationError, match=r" failed: DEADLINE_EXCEEDED: "):
                register(kubelet.socket_path, "nvidia-gpu.sock", GPU, timeout=0.2)
        finally:
            release.set()


# --- kubelet_socket_state -----------------------------------------------------------------


def test_a_kubelet_path_that_cannot_be_stat_is_a_problem(
        sockdir: str, caplog: pytest.LogCaptureFixture) -> None:
    # A stat error other than "missing" (here a file where the directory should be) is an
    # error to report, and nothing is registered.
    blocker = os.path.join(sockdir, "device-plugins")
    open(blocker, "w").close()
    path = os.path.join(blocker, "kubelet.sock")
    state = kubelet_socket_state(path)
    problem = f"cannot stat kubelet socket {path}: {os.strerror(errno.ENOTDIR)}"
    assert state.problem == problem
    assert not state.ready and not state.missing and state.identity is None
    recorder = Recorder()
    loop = RegistrationLoop(path, lambda: [FakeServer(GPU)], register_fn=recorder)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        loop.tick(now=0.0)
    assert recorder.calls == []
    assert messages(caplog, logging.ERROR) == [problem + "; waiting for the kubelet"]


# --- StateLog and RateLimitedLog ------------------------------------------------------------


def test_state_log_forgets_a_key_set_or_not(caplog: pytest.LogCaptureFixture) -> None:
    states = StateLog(logging.getLogger("test.state"))
    with caplog.at_level(logging.INFO, logger="test.state"):
        states.forget("never set")
        states.set("k", logging.INFO, "up")
        states.forget("k")
        states.set("k", logging.INFO, "up")  # the same state, logged again once forgotten
    assert [r.getMessage() for r in caplog.records] == ["up", "up"]


def test_rate_limited_lines_still_go_to_debug(caplog: pytest.LogCaptureFixture) -> None:
    # "The rest go to DEBUG": with --log-level=debug every event is still visible, verbatim.
    limited = RateLimitedLog(logging.getLogger("test.ratelimit"), burst=1, window=10.0)
    with caplog.at_level(logging.DEBUG, logger="test.ratelimit"):
        limited.log("k", logging.INFO, "first", now=0.0)
        limited.log("k", logging.INFO, "second", now=1.0)
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.INFO, "first"), (logging.DEBUG, "second")]


# --- the kubelet's state in the log ----------------------------------------------------------


def test_every_kubelet_transition_is_logged(
        sockdir: str, caplog: pytest.LogCaptureFixture) -> None:
    # Missing and up are one state: each change is logged, repeats are not.
    path = os.path.join(sockdir, "kubelet.sock")
    loop = RegistrationLoop(path, lambda: [FakeServer(GPU)], register_fn=Recorder())
    with caplog.at_level(logging.INFO, logger=LOGGER):
        loop.tick(now=0.0)
        with make_socket(path):
            loop.tick(now=1.0)
            loop.tick(now=2.0)
        os.unlink(path)
        loop.tick(now=3.0)
        loop.tick(now=4.0)
        with make_socket(path):
            loop.tick(now=5.0)
    missing = f"kubelet socket {path} does not exist (yet); waiting for the kubelet"
    up = f"kubelet socket {path} is up"
    assert [m for m in messages(caplog, logging.INFO) if m.startswith("kubelet socket ")] == [
        missing, up, missing, up]


# --- registrations in the log ---------------------------------------------------------------


def test_a_resource_that_never_registered_is_not_reported_as_recovered(
        sockdir: str, caplog: pytest.LogCaptureFixture) -> None:
    # Refused, then the kubelet went away and came back: the first success is a registration,
    # not a re-registration (there was nothing to lose).
    path = os.path.join(sockdir, "kubelet.sock")
    recorder, server = Recorder(), FakeServer(GPU)
    loop = RegistrationLoop(path, lambda: [server], register_fn=recorder)
    recorder.failing = True
    with caplog.at_level(logging.INFO, logger=LOGGER):
        with make_socket(path):
            loop.tick(now=0.0)
        os.unlink(path)
        loop.tick(now=1.0)
        server.is_intact = False  # and our socket was wiped meanwhile
        recorder.failing = False
        with make_socket(path):
            loop.tick(now=2.0)
    assert recoveries(caplog) == []
    assert f"registered {GPU} (endpoint nvidia-gpu.sock) with the kubelet" in messages(
        caplog, logging.INFO)


def test_every_refusal_is_logged_again_after_a_registration(
        sockdir: str, caplog: pytest.LogCaptureFixture) -> None:
    # The same refusal after a (re-)registration is news: the state went ok -> refused.
    path = os.path.join(sockdir, "kubelet.sock")
    recorder, server = Recorder(), FakeServer(GPU)
    loop = RegistrationLoop(path, lambda: [server], register_fn=recorder)
    kubelet = make_socket(path)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        for attempt in range(3):
            recorder.failing = True
            loop.tick(now=10.0 * attempt)
            recorder.failing = False
            loop.tick(now=10.0 * attempt + 5.0)  # past the backoff
            kubelet = restart_kubelet(path, kubelet)
    kubelet.close()
    assert [(r.levelno, r.getMessage()) for r in caplog.records
            if r.levelno >= logging.WARNING] == [
        (logging.WARNING, "kubelet said no; retrying with backoff")] * 3
    assert len(recoveries(caplog)) == 2
    assert len(recorder.calls) == 6


def test_a_rebind_by_the_servers_owner_registers_again_at_once(
        sockdir: str, caplog: pytest.LogCaptureFixture) -> None:
    # A new generation with the same kubelet and our socket in place (restarted by whoever owns
    # the server): registered again on the tick that sees it, and logged with that cause and
    # with how long the resource was unregistered.
    path = os.path.join(sockdir, "kubelet.sock")
    recorder, server = Recorder(), FakeServer(GPU)
    loop = RegistrationLoop(path, lambda: [server], register_fn=recorder)
    with caplog.at_level(logging.INFO, logger=LOGGER), make_socket(path):
        loop.tick(now=0.0)
        server.generation += 1
        before = time.monotonic()
        loop.tick(now=0.5)
        after = time.monotonic()
    assert len(recorder.calls) == 2
    [line] = recoveries(caplog)
    found = re.fullmatch(
        rf"re-registered {GPU} \(endpoint nvidia-gpu\.sock\) with the kubelet "
        r"(\d+\.\d\d) s after the registration was lost \(our socket was rebound\)", line)
    assert found is not None, line
    # Lost and found again within this tick; the figure is rounded to 0.01 s.
    assert 0.0 <= float(found[1]) <= after - before + 0.005


def test_the_recovery_log_budget_is_per_resource(
        sockdir: str, caplog: pytest.LogCaptureFixture) -> None:
    # One resource whose socket is deleted in a loop must not silence another's recovery.
    path = os.path.join(sockdir, "kubelet.sock")
    gpu, mig = FakeServer(GPU), FakeServer(MIG, "nvidia-mig-1g.5gb.sock")
    loop = RegistrationLoop(path, lambda: [gpu, mig], register_fn=Recorder())
    with caplog.at_level(logging.INFO, logger=LOGGER), make_socket(path):
        loop.tick(now=0.0)
        for step in range(RECOVERY_LOG_BURST):
            gpu.is_intact = False
            loop.tick(now=1.0 + step)
        mig.is_intact = False
        loop.tick(now=100.0)
    lines = recoveries(caplog)
    assert sum(line.startswith(f"re-registered {GPU} ") for line in lines) == RECOVERY_LOG_BURST
    assert sum(line.startswith(f"re-registered {MIG} ") for line in lines) == 1


def test_a_resource_served_again_starts_with_a_clean_log(
        sockdir: str, caplog: pytest.LogCaptureFixture) -> None:
    # A resource dropped (no longer advertised) and later served again is a new registration:
    # its first line is logged, and its recovery-log budget and left-out count start over.
    path = os.path.join(sockdir, "kubelet.sock")
    gpu, mig = FakeServer(GPU), FakeServer(MIG, "nvidia-mig-1g.5gb.sock")
    served: list[FakeServer] = [gpu, mig]
    loop = RegistrationLoop(path, lambda: served, register_fn=Recorder())
    with caplog.at_level(logging.INFO, logger=LOGGER), make_socket(path):
        loop.tick(now=0.0)
        for step in range(RECOVERY_LOG_BURST + 2):  # the gpu's budget used up, 2 left out
            gpu.is_intact = False
            loop.tick(now=1.0 + step)
        served = []
        loop.tick(now=50.0)
        assert loop.registered() == {}
        served = [gpu, mig]
        caplog.clear()
        loop.tick(now=51.0)
        gpu.is_intact = False
        loop.tick(now=52.0)
    first, second, third = messages(caplog, logging.INFO)
    assert (first, second) == (
        f"registered {GPU} (endpoint nvidia-gpu.sock) with the kubelet",
        f"registered {MIG} (endpoint nvidia-mig-1g.5gb.sock) with the kubelet",
    )
    # Logged (the budget starts over), and without a count of lines left out before the drop.
    assert re.fullmatch(
        rf"re-registered {GPU} \(endpoint nvidia-gpu\.sock\) with the kubelet \d+\.\d\d s "
        r"after the registration was lost \(our socket was removed\)", third), third


# --- backoff --------------------------------------------------------------------------------


def test_a_refusing_kubelet_is_retried_at_least_every_backoff_cap(sockdir: str) -> None:
    # The delays grow, but never past BACKOFF_CAP_S: a kubelet that comes round is noticed
    # within the cap. 40 s of 100 ms ticks on the loop's clock (no sleeping).
    path = os.path.join(sockdir, "kubelet.sock")
    recorder = Recorder()
    recorder.failing = True
    loop = RegistrationLoop(path, lambda: [FakeServer(GPU)], register_fn=recorder)
    tries: list[float] = []
    tick_s = 0.1
    with make_socket(path):
        for step in range(400):
            now = step * tick_s
            before = len(recorder.calls)
            loop.tick(now=now)
            if len(recorder.calls) > before:
                tries.append(now)
    gaps = [b - a for a, b in zip(tries, tries[1:], strict=False)]
    assert gaps[0] < 1.0  # it starts fast ...
    assert gaps[-1] >= BACKOFF_CAP_S  # ... grows to the cap ...
    assert max(gaps) <= BACKOFF_CAP_S + tick_s + 1e-6  # ... and stays there


# --- rebinding our sockets ------------------------------------------------------------------


class UnbindableServer(FakeServer):
    """A server whose socket vanished and cannot be bound again (every restart fails)."""

    def restart(self) -> None:
        self.restarts += 1
        raise OSError(f"{self.endpoint}: address already in use")


def test_a_failing_rebind_is_logged_once_per_resource_and_the_others_go_on(
        sockdir: str, caplog: pytest.LogCaptureFixture) -> None:
    path = os.path.join(sockdir, "kubelet.sock")
    intact = FakeServer("nvidia.com/mig-2g.10gb", "nvidia-mig-2g.10gb.sock")
    gpu = UnbindableServer(GPU)
    mig = UnbindableServer(MIG, "nvidia-mig-1g.5gb.sock")
    recorder = Recorder()
    loop = RegistrationLoop(path, lambda: [intact, gpu, mig], register_fn=recorder)
    with caplog.at_level(logging.INFO, logger=LOGGER), make_socket(path):
        loop.tick(now=0.0)
        assert loop.all_registered()
        gpu.is_intact = mig.is_intact = False
        assert not loop.all_registered()  # our socket is gone: not ready, even before a tick
        for now in (1.0, 2.0, 3.0):
            loop.tick(now=now)
    assert gpu.restarts == mig.restarts == 3  # retried every tick, behind an intact server
    assert messages(caplog, logging.ERROR) == [
        f"cannot rebind {GPU}: nvidia-gpu.sock: address already in use",
        f"cannot rebind {MIG}: nvidia-mig-1g.5gb.sock: address already in use",
    ]
    assert not loop.all_registered()


def test_serve_only_readiness_follows_our_sockets() -> None:
    # Without a kubelet socket nothing registers; ready means every socket is in place, and
    # there is no kubelet problem to report.
    recorder, server = Recorder(), FakeServer(GPU)
    loop = RegistrationLoop("", lambda: [server], register_fn=recorder)
    assert loop.last_problem is None
    loop.tick(now=0.0)
    assert loop.all_registered()
    assert loop.last_problem is None
    server.is_intact = False
    assert not loop.all_registered()
    loop.tick(now=1.0)
    assert server.restarts == 1
    assert loop.all_registered()
    assert recorder.calls == []


# --- the watch thread -----------------------------------------------------------------------


class SignallingRecorder(Recorder):
    """A Recorder that sets ``called`` on each call."""

    def __init__(self) -> None:
        super().__init__()
        self.called = threading.Event()

    def __call__(self, kubelet_socket: str, endpoint: str, name: str) -> None:
        super().__call__(kubelet_socket, endpoint, name)
        self.called.set()


def test_the_watch_survives_a_failing_tick_and_says_so(
        sockdir: str, caplog: pytest.LogCaptureFixture) -> None:
    # The watch runs in a daemon thread named kubelet-watch (what py-spy and thread dumps show;
    # daemon, so it never holds the process up at exit), logs a tick that raised with its
    # traceback, and keeps going.
    path = os.path.join(sockdir, "kubelet.sock")
    recorder, server = SignallingRecorder(), FakeServer(GPU)
    lists = 0

    def servers() -> list[FakeServer]:
        nonlocal lists
        lists += 1
        if lists == 1:
            raise RuntimeError("resource map not ready")
        return [server]

    watchers: list[threading.Thread] = []
    loop = RegistrationLoop(path, servers, poll_interval=0.01, register_fn=recorder,
                            on_tick=lambda: watchers.append(threading.current_thread()))
    with caplog.at_level(logging.INFO, logger=LOGGER), make_socket(path):
        loop.start()
        try:
            assert recorder.called.wait(TIMEOUT)
        finally:
            loop.stop()
    [failed] = [r for r in caplog.records if r.getMessage() == "kubelet watch tick failed"]
    assert failed.levelno == logging.ERROR
    assert failed.exc_info is not None and isinstance(failed.exc_info[1], RuntimeError)
    assert watchers and all(t.name == "kubelet-watch" and t.daemon for t in watchers)


def test_a_failing_readiness_callback_is_logged_and_registration_goes_on(
        sockdir: str, caplog: pytest.LogCaptureFixture) -> None:
    # The callback runs before the Register of a lost registration; its failure is logged with
    # its traceback and the registration still happens.
    path = os.path.join(sockdir, "kubelet.sock")
    recorder, server = Recorder(), FakeServer(GPU)

    def broken() -> None:
        raise OSError("readiness file: read-only file system")

    loop = RegistrationLoop(path, lambda: [server], register_fn=recorder, on_tick=broken)
    kubelet = make_socket(path)
    loop.tick(now=0.0)
    kubelet = restart_kubelet(path, kubelet)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        loop.tick(now=1.0)
    kubelet.close()
    assert len(recorder.calls) == 2
    [failed] = [r for r in caplog.records
                if r.getMessage() == "kubelet watch tick callback failed"]
    assert failed.levelno == logging.ERROR
    assert failed.exc_info is not None and isinstance(failed.exc_info[1], OSError)
    assert len(recoveries(caplog)) == 1


def test_a_stopped_watch_waits_for_its_thread_and_can_start_again() -> None:
    ticked = threading.Event()
    watchers: list[threading.Thread] = []

    def on_tick() -> None:
        watchers.append(threading.current_thread())
        ticked.set()

    loop = RegistrationLoop("", lambda: [], poll_interval=0.01, on_tick=on_tick)
    loop.start()
    try:
        assert ticked.wait(TIMEOUT)
    finally:
        loop.stop()
    first = watchers[-1]
    assert not first.is_alive()  # stop() returned only once the thread ended
    ticked.clear()
    loop.start()
    try:
        assert ticked.wait(TIMEOUT)
    finally:
        loop.stop()
    assert watchers[-1] is not first

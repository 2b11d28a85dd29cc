"""The runtime every daemon shares (gpus.runtime) and the error tree (gpus.errors)."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from deviceplugin.kubelet import RegistrationError
from gfd.nodepatch import KubeConfigError, NodeApiError
from gpus import errors
from gpus.backend import BackendError
from gpus.config import ConfigError
from gpus.nvml import NvmlError
from gpus.runtime import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USAGE,
    BackendSpecError,
    NvmlBackend,
    Signals,
    StateFile,
    exit_code,
    run_daemon,
    setup_logging,
)

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 10.0

# --- the error tree ---------------------------------------------------------------------------


@pytest.mark.parametrize(("error", "category"), [
    (ConfigError, errors.ConfigError),
    (BackendError, errors.ConfigError),
    (BackendSpecError, errors.ConfigError),
    (BackendSpecError, errors.InitError),
    (NvmlError, errors.NvmlError),
    (RegistrationError, errors.KubeletError),
    (NodeApiError, errors.ApiServerError),
    (KubeConfigError, errors.ApiServerError),
    (errors.DriverError, errors.NvkError),
    (errors.BackendSetupError, errors.NvkError),
])
def test_every_project_error_sits_in_the_tree(error: type, category: type) -> None:
    assert issubclass(error, category) and issubclass(error, errors.NvkError)


def test_old_bases_still_catch_them() -> None:
    # Callers written against the old bases keep working.
    assert issubclass(ConfigError, ValueError) and issubclass(BackendError, ValueError)
    assert issubclass(errors.InitError, RuntimeError)
    assert issubclass(RegistrationError, RuntimeError)


@pytest.mark.parametrize(("error", "code"), [
    (ConfigError("x"), EXIT_USAGE),
    (BackendError("fake:x", "unknown profile"), EXIT_USAGE),
    (BackendSpecError("x"), EXIT_USAGE),  # an init error that a restart would not fix
    (errors.InitError("x"), EXIT_FAILURE),
    (NvmlError("nvmlInit", 9), EXIT_FAILURE),
    (KubeConfigError("x"), EXIT_FAILURE),
    (errors.DriverError("x"), EXIT_FAILURE),
])
def test_exit_codes_follow_the_tree(error: errors.NvkError, code: int) -> None:
    assert exit_code(error) == code
    stderr = io.StringIO()

    def body() -> int:
        raise error

    assert run_daemon("prog", body, stderr=stderr) == code
    (line,) = stderr.getvalue().splitlines()
    assert line.startswith("prog: ") and line.endswith(str(error))


def test_run_daemon_lines_name_the_kind_of_failure() -> None:
    stderr = io.StringIO()

    def fail(error: Exception) -> int:
        raise error

    run_daemon("p", lambda: fail(ConfigError("bad")), stderr=stderr)
    run_daemon("p", lambda: fail(errors.InitError("no NVML")), stderr=stderr)
    run_daemon("p", lambda: fail(KubeConfigError("no kubeconfig")), stderr=stderr)
    assert stderr.getvalue().splitlines() == [
        "p: error: bad", "p: initialisation failed: no NVML",
        "p: cannot configure the Kubernetes client: no kubeconfig"]
    assert run_daemon("p", lambda: EXIT_OK, stderr=stderr) == EXIT_OK


def test_run_daemon_leaves_bugs_their_traceback() -> None:
    with pytest.raises(KeyError):
        run_daemon("p", lambda: dict[str, int]()["x"], stderr=io.StringIO())


# --- signals ----------------------------------------------------------------------------------


def test_signals_reload_then_stop() -> None:
    signals = Signals()
    signals.request_reload()
    assert signals.wait() == "reload"
    assert not signals.take_reload()  # wait() took it
    signals.request_reload()
    signals.request_stop()
    assert signals.wait() == "stop"  # a stop wins over a pending reload
    assert signals.wait() == "stop"  # and stays


def test_signals_wait_wakes_on_a_request_from_another_thread() -> None:
    signals = Signals()
    timer = threading.Timer(0.05, signals.request_stop)
    timer.start()
    assert signals.wait() == "stop"
    timer.join(TIMEOUT)


def test_signals_sleep_is_interrupted() -> None:
    signals = Signals()
    threading.Timer(0.05, signals.request_reload).start()
    signals.sleep(60)  # would hang the test, were it not interrupted
    assert signals.take_reload() and not signals.take_reload()


def test_installed_handlers_route_real_signals_and_are_restored() -> None:
    import signal

    before = signal.getsignal(signal.SIGHUP)
    signals = Signals().install()
    try:
        os.kill(os.getpid(), signal.SIGHUP)
        assert signals.wait() == "reload"
        os.kill(os.getpid(), signal.SIGTERM)
        assert signals.wait() == "stop"
    finally:
        signals.restore()
    assert signal.getsignal(signal.SIGHUP) is before


# --- logging ----------------------------------------------------------------------------------


@pytest.mark.parametrize("level", ["debug", "DEBUG", "Debug", " debug "])
def test_setup_logging_any_case_on_the_root(level: str) -> None:
    root = logging.getLogger()
    before = root.level
    undo = setup_logging(level)
    try:
        assert root.level == logging.DEBUG
        for name in ("gpus.nvml", "deviceplugin.health", "gfd.labels"):
            assert logging.getLogger(name).isEnabledFor(logging.DEBUG), name
    finally:
        undo()
    assert root.level == before


def test_setup_logging_refuses_an_unknown_level() -> None:
    with pytest.raises(ValueError, match="verbose"):
        setup_logging("verbose")


def run_module(module: str, *args: str, env: dict[str, str] | None = None,
               code: int = 0) -> str:
    result = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == code, result.stderr
    return result.stderr


def test_gfd_log_level_reaches_the_gpus_loggers(tmp_path: Path) -> None:
    # Before the shared set-up the level went to the "gfd" logger only: gpus.* stayed silent.
    args = ("--oneshot", "--nvml", "fake:t4", "--output-file", str(tmp_path / "features"),
            "--health-file", "", "--machine-type-file", str(tmp_path / "none"))
    for level in ("DEBUG", "info"):
        err = run_module("gfd", *args, "--log-level", level)
        assert " INFO gpus.backend: NVML backend: fake" in err, err
    err = run_module("gfd", *args, env={"GFD_LOG_LEVEL": "Warning"})
    assert " INFO " not in err, err


def test_plugin_log_level_the_same_way(tmp_path: Path) -> None:
    # The plugin installs its backend (logged by gpus.backend at INFO) and then fails on a
    # missing socket directory (exit 1): enough to see which levels reach stderr.
    args = ("--nvml", "fake:t4", "--kubelet-socket", str(tmp_path / "none" / "kubelet.sock"),
            "--ready-file", "", "--sysfs-root", str(tmp_path / "root"))
    err = run_module("deviceplugin.main", *args, env={"DP_LOG_LEVEL": "INFO"}, code=1)
    assert " INFO gpus.backend: NVML backend: fake" in err, err
    err = run_module("deviceplugin.main", *args, "--log-level", "WARNING",
                     env={"DP_LOG_LEVEL": "debug"}, code=1)  # the flag wins
    assert " INFO " not in err and " DEBUG " not in err, err


# --- state files ------------------------------------------------------------------------------


def test_state_file_warns_once_per_kind_and_says_when_it_recovers(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    target = tmp_path / "dir" / "state"
    state = StateFile(str(target), "state file", logging.getLogger("test.state"))
    with caplog.at_level(logging.INFO, logger="test.state"):
        assert not state.write("a") and not state.write("b")  # no directory
        (tmp_path / "dir").mkdir()
        assert state.write("c") and target.read_text() == "c"
        assert state.delete() and state.delete() and not target.exists()
    messages = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert messages == [
        ("WARNING", f"cannot write state file {target}: No such file or directory"),
        ("INFO", f"state file {target} written again")]


def test_disabled_state_file_does_nothing(tmp_path: Path) -> None:
    state = StateFile("", "state file", logging.getLogger("test.state"))
    assert not state.enabled and state.write("x") and state.delete()
    assert list(tmp_path.iterdir()) == []


# --- the NVML backend -------------------------------------------------------------------------


def test_backend_reads_the_daemons_environment_not_the_process_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # On a GPU node inside a cluster a fake is refused; which environment says "in a cluster"
    # must be the one the daemon resolved its configuration from.
    monkeypatch.setattr("gpus.backend.nvidia_gpus_in_sysfs", lambda root="/": ["0000:01:00.0"])
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    backend = NvmlBackend({})
    try:
        assert backend.select("fake:t4", sysfs_root=str(tmp_path)) is not None
    finally:
        backend.close()
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST")
    in_cluster = NvmlBackend({"KUBERNETES_SERVICE_HOST": "10.0.0.1"})
    with pytest.raises(BackendSpecError, match="refused"):
        in_cluster.select("fake:t4", sysfs_root=str(tmp_path))
    assert in_cluster.controller is None


def test_backend_swaps_and_uninstalls(tmp_path: Path) -> None:
    backend = NvmlBackend({})
    first = backend.select("fake:t4", sysfs_root=str(tmp_path))
    assert backend.select("fake:t4", sysfs_root=str(tmp_path)) is first  # same spec: kept
    second = backend.select("fake:dgx-a100", sysfs_root=str(tmp_path))
    assert second is not first and first is not None and not first.installed
    backend.close()
    assert second is not None and not second.installed and backend.controller is None

"""Start-up checks of ``nvidia-device-plugin``: socket directory, kubelet socket settings."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from test_server_support import short_tmpdir

from deviceplugin.main import (
    DevicePlugin,
    InitError,
    build_parser,
    main,
    replace_flags,
    replace_plugin_flags,
    socket_dir_problem,
    socket_dir_unusable,
)
from deviceplugin.mockkubelet import MockKubelet
from gpus import config as configmod
from gpus.config import Config, PluginFlags

TIMEOUT = 10.0
GPU = "nvidia.com/gpu"
PROG = "nvidia-device-plugin:"
REPO = str(Path(__file__).resolve().parents[1])
KUBELET_SOCKET_HINT = (
    ": it is the directory of the kubelet socket '{directory}/kubelet.sock'; set "
    "--kubelet-socket (env KUBELET_SOCKET) to the kubelet's device-plugins socket, or set it "
    'to "" and choose a directory with --socket-dir to serve without registering'
)


def error_lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    """Our own lines on stderr (logging goes there too, with its own format)."""
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith(PROG)]


# --- an unusable plugin socket directory --------------------------------------------------------


def test_unwritable_socket_dir_is_one_clear_line(
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

        monkeypatch.setattr("deviceplugin.server.os.access", access)
        code = main(["--nvml", "fake:dgx-a100", "--kubelet-socket",
                     os.path.join(directory, "kubelet.sock"), "--ready-file", ""])
        assert code == 1
        assert os.listdir(directory) == []
    (line,) = error_lines(capsys)
    assert line == (f"{PROG} initialisation failed: plugin socket directory {directory!r} is not "
                    f"writable{KUBELET_SOCKET_HINT.format(directory=directory)}")


def test_socket_dir_that_is_a_file_is_one_clear_line(capsys: pytest.CaptureFixture[str]) -> None:
    with short_tmpdir() as directory:
        blocker = os.path.join(directory, "plugins")
        Path(blocker).write_text("not a directory")
        code = main(["--nvml", "fake:dgx-a100", "--kubelet-socket",
                     os.path.join(blocker, "kubelet.sock"), "--ready-file", ""])
        assert code == 1
        assert Path(blocker).read_text() == "not a directory"
    (line,) = error_lines(capsys)
    assert line.endswith(f"plugin socket directory {blocker!r} is not a directory"
                         + KUBELET_SOCKET_HINT.format(directory=blocker))


def test_missing_kubelet_directory_is_one_line_naming_the_setting() -> None:
    # In a subprocess: the whole stderr, log lines included, must carry the reason once.
    with short_tmpdir() as directory:
        missing = os.path.join(directory, "nope")
        result = subprocess.run(
            [sys.executable, "-m", "deviceplugin.main", "--nvml", "fake:dgx-a100",
             "--kubelet-socket", os.path.join(missing, "kubelet.sock"), "--ready-file", ""],
            cwd=REPO, env={**os.environ, "PYTHONPATH": REPO}, capture_output=True, text=True,
            timeout=60, check=False,
        )
    assert result.returncode == 1
    assert result.stderr.count("does not exist") == 1
    (line,) = [line for line in result.stderr.splitlines() if line.startswith(PROG)]
    assert line == (f"{PROG} initialisation failed: plugin socket directory {missing!r} does not "
                    f"exist{KUBELET_SOCKET_HINT.format(directory=missing)}")
    assert "--kubelet-socket" in line and "KUBELET_SOCKET" in line


def test_missing_socket_dir_names_the_setting_that_chose_it() -> None:
    missing = "/nonexistent-nvk8s/plugins"
    registering = replace_plugin_flags(Config(), kubelet_socket=f"{missing}/kubelet.sock")
    assert socket_dir_unusable(registering, "") == (
        f"plugin socket directory {missing!r} does not exist"
        + KUBELET_SOCKET_HINT.format(directory=missing))
    serving = replace_plugin_flags(Config(), kubelet_socket="")
    assert "--socket-dir" in (socket_dir_unusable(serving, missing) or "")
    assert "PLUGIN_SOCKET_DIR" in (socket_dir_unusable(serving, missing) or "")
    with short_tmpdir() as directory:
        assert socket_dir_unusable(serving, directory) is None


def mixed_config(directory: str) -> Config:
    config = replace_flags(Config(), nvml="fake:a100-mig-partial", mig_strategy="mixed",
                           sysfs_root=os.path.join(directory, "root"))
    return replace_plugin_flags(config, kubelet_socket=os.path.join(directory, "kubelet.sock"),
                                cdi_spec_dir=os.path.join(directory, "cdi"))


def test_a_blocked_socket_keeps_the_other_resources_served() -> None:
    # One resource cannot listen (a file we must not remove holds its socket path): it is a
    # reported problem, and every other resource is still served and registered.
    with short_tmpdir() as directory, MockKubelet(directory) as kubelet:
        blocked = os.path.join(directory, "nvidia-mig-1g.5gb.sock")
        Path(blocked).write_text("keep me")
        status = os.path.join(directory, "status.json")
        plugin = DevicePlugin(mixed_config(directory), {}, poll_interval=0.02,
                              status_file=status)
        try:
            controller = plugin.select_backend()
            assert controller is not None
            controller.write_sysfs(Path(directory, "root"))
            plugin.start()
            assert kubelet.wait_for_registration(GPU, TIMEOUT)
            assert len(kubelet.devices(GPU)) == 4
            assert kubelet.allocate(GPU, 1).response.envs["NVIDIA_VISIBLE_DEVICES"]
            assert plugin.manager is not None
            assert plugin.manager.server("nvidia.com/mig-1g.5gb") is None
            (problem,) = plugin.readiness.status.problems
            assert problem == (f"cannot serve nvidia.com/mig-1g.5gb: {blocked} exists and is "
                               "not a socket; not removing it")
            assert not plugin.readiness.ready  # the probes must see it
        finally:
            plugin.close()
        assert Path(blocked).read_text() == "keep me"


def test_health_checks_start_once_the_first_register_is_done(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # NVIDIA's order (serve, register, then check health): building the monitor beside the
    # first Register delayed it (docs/benchmarks.md). The kubelet sees no monitor yet.
    monkeypatch.setattr("deviceplugin.plugin.FIRST_REGISTER_WAIT_S", TIMEOUT)
    plugins: list[DevicePlugin] = []
    seen: list[bool] = []

    class Kubelet(MockKubelet):
        def handle_register(self, request: Any) -> str | None:
            seen.append(plugins[0].health is None)
            return super().handle_register(request)

    with short_tmpdir() as directory, Kubelet(directory) as kubelet:
        plugin = DevicePlugin(mixed_config(directory), {}, poll_interval=0.02)
        plugins.append(plugin)
        try:
            controller = plugin.select_backend()
            assert controller is not None
            controller.write_sysfs(Path(directory, "root"))
            plugin.start()
            assert plugin.health is not None  # start() returns with the monitor running
            assert kubelet.wait_for_registration(GPU, TIMEOUT)
        finally:
            plugin.close()
    assert seen and all(seen)


# --- --socket-dir and the kubelet socket --------------------------------------------------------


def test_socket_dir_elsewhere_than_the_kubelet_socket_is_refused(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with short_tmpdir() as directory:
        kubelet_socket = os.path.join(directory, "kubelet", "kubelet.sock")
        other = os.path.join(directory, "plugins")
        code = main(["--nvml", "fake:dgx-a100", "--kubelet-socket", kubelet_socket,
                     "--socket-dir", other, "--ready-file", ""])
        assert code == 2
        assert os.listdir(directory) == []
    (line,) = error_lines(capsys)
    assert line.startswith(f"{PROG} error: --socket-dir {other!r} differs from the kubelet "
                           "socket's directory")


def test_socket_dir_from_the_environment_is_checked_too(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PLUGIN_SOCKET_DIR", "/tmp/elsewhere")
    assert main(["--nvml", "fake:dgx-a100", "--kubelet-socket", "/tmp/k/kubelet.sock"]) == 2
    (line,) = error_lines(capsys)
    assert "--socket-dir '/tmp/elsewhere'" in line


def test_socket_dir_rules() -> None:
    def config(kubelet_socket: str) -> Config:
        return replace_plugin_flags(Config(), kubelet_socket=kubelet_socket)

    assert socket_dir_problem(config("/k/kubelet.sock"), "") is None
    assert socket_dir_problem(config("/k/kubelet.sock"), "/k/") is None  # the same directory
    assert socket_dir_problem(config(""), "/anywhere") is None  # no registration
    assert socket_dir_problem(config("/k/kubelet.sock"), "/other") is not None


def test_plugin_refuses_a_mismatched_socket_dir_in_process(tmp_path: Path) -> None:
    config = replace_plugin_flags(replace_flags(Config(), nvml="fake:dgx-a100"),
                                  kubelet_socket=str(tmp_path / "k" / "kubelet.sock"))
    plugin = DevicePlugin(config, {}, socket_dir=str(tmp_path))
    try:
        with pytest.raises(InitError, match="differs from the kubelet socket's directory"):
            plugin.start()
        assert plugin.manager is None and plugin.controller is None
    finally:
        plugin.close()


# --- KUBELET_SOCKET="" --------------------------------------------------------------------------


def resolve(environ: dict[str, str]) -> Config:
    return configmod.resolve(build_parser().parse_args([]), environ)


def test_empty_kubelet_socket_variable_skips_registration() -> None:
    assert resolve({"KUBELET_SOCKET": ""}).flags.plugin.kubelet_socket == ""
    assert resolve({"KUBELET_SOCKET": "  "}).flags.plugin.kubelet_socket == ""
    assert resolve({}).flags.plugin.kubelet_socket == PluginFlags().kubelet_socket
    assert resolve({"KUBELET_SOCKET": "/k.sock"}).flags.plugin.kubelet_socket == "/k.sock"
    # Other variables keep "empty means unset".
    assert resolve({"MIG_STRATEGY": ""}).flags.mig_strategy == "none"
    assert resolve({"CDI_SPEC_DIR": ""}).flags.plugin.cdi_spec_dir == PluginFlags().cdi_spec_dir
    # The flag still wins over the variable.
    args = build_parser().parse_args(["--kubelet-socket", "/f.sock"])
    assert configmod.resolve(args, {"KUBELET_SOCKET": ""}).flags.plugin.kubelet_socket == "/f.sock"


def test_empty_kubelet_socket_variable_serves_without_registering(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with short_tmpdir() as directory:
        monkeypatch.setenv("KUBELET_SOCKET", "")
        config = replace_flags(resolve(dict(os.environ)), nvml="fake:dgx-a100",
                               sysfs_root=os.path.join(directory, "root"))
        config = replace_plugin_flags(config, cdi_spec_dir=os.path.join(directory, "cdi"))
        plugin = DevicePlugin(config, {}, socket_dir=directory, poll_interval=0.02)
        try:
            controller = plugin.select_backend()
            assert controller is not None
            controller.write_sysfs(Path(directory, "root"))
            plugin.start()
            assert os.path.exists(os.path.join(directory, "nvidia-gpu.sock"))
            assert plugin.readiness.wait(True, TIMEOUT)  # nothing to register: ready
        finally:
            plugin.close()

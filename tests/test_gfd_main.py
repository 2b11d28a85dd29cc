"""The gpu-feature-discovery shell: oneshot, dry-run, init failures, loop mode, Node patching."""

from __future__ import annotations

import argparse
import io
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import builders
import pytest
from apiserver import FakeApiServer

from gfd.main import (
    DEFAULT_HEALTH_FILE,
    Daemon,
    Options,
    build_parser,
    main,
    read_machine_type,
    resolve_options,
)
from gfd.nodepatch import OWNERSHIP_ANNOTATION, KubeNodeApi
from gfd.output import parse_features
from gpus.backoff import Backoff
from gpus.config import Config, Flags, GfdFlags, resolve
from gpus.model import Snapshot
from gpus.nvml import NvmlError

N = "nvidia.com/"
ROOT = Path(__file__).resolve().parent.parent
NODE = "gpu-node-1"


@pytest.fixture(autouse=True)
def _never_the_default_health_file() -> Iterator[None]:
    """Tests run as root here: none may write the real /run/gfd/last-pass-ok."""
    existed = os.path.exists(DEFAULT_HEALTH_FILE)
    yield
    assert existed or not os.path.exists(DEFAULT_HEALTH_FILE)


@pytest.fixture
def machine_file(tmp_path: Path) -> str:
    path = tmp_path / "product_name"
    path.write_text("DGX A100 920-23687-2530-000\n")
    return str(path)


@pytest.fixture
def server() -> Iterator[FakeApiServer]:
    with FakeApiServer() as srv:
        srv.add_node(NODE, labels={"team": "ml", "nvidia.com/device-plugin.config": "x"})
        yield srv


def base_args(tmp_path: Path, machine_file: str, sysfs: str, profile: str = "dgx-a100"
              ) -> list[str]:
    return ["--nvml", f"fake:{profile}", "--sysfs-root", sysfs,
            "--machine-type-file", machine_file, "--health-file", str(tmp_path / "health"),
            "-o", str(tmp_path / "features.d" / "gfd")]


# --------------------------------------------------------------------------- oneshot, file


def test_oneshot_file_mode_end_to_end(tmp_path: Path, machine_file: str,
                                      sysfs_root: Callable[..., str]) -> None:
    args = base_args(tmp_path, machine_file, sysfs_root("dgx-a100"))
    assert main(["--oneshot", *args]) == 0
    path = tmp_path / "features.d" / "gfd"
    text = path.read_text()
    assert text.splitlines() == sorted(text.splitlines())
    labels = parse_features(text)
    assert labels[N + "gpu.product"] == "NVIDIA-A100-SXM4-40GB"
    assert labels[N + "gpu.count"] == "8"
    assert labels[N + "gpu.machine"] == "DGX-A100-920-23687-2530-000"
    assert labels[N + "gpu.mode"] == "compute"
    assert int(labels[N + "gfd.timestamp"]) > 0
    assert path.exists()  # oneshot keeps the file


def test_a_bad_features_path_is_named_in_one_error_line(
        tmp_path: Path, machine_file: str, sysfs_root: Callable[..., str],
        caplog: pytest.LogCaptureFixture) -> None:
    """Regression (issue 10): the error named the temporary file instead of the path given."""
    (tmp_path / "a-file").write_text("x")
    path = tmp_path / "a-file" / "gfd"  # its parent is a regular file
    args = base_args(tmp_path, machine_file, sysfs_root("t4"), profile="t4")
    with caplog.at_level("ERROR", logger="gfd"):
        assert main(["--oneshot", *args, "-o", str(path)]) == 1
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert errors == [f"cannot write the features file {path}: Not a directory"]
    assert (tmp_path / "a-file").read_text() == "x"
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]


def test_oneshot_env_vars_and_no_timestamp(tmp_path: Path, machine_file: str,
                                           sysfs_root: Callable[..., str]) -> None:
    out = tmp_path / "gfd"
    env = {"GFD_ONESHOT": "true", "GFD_NO_TIMESTAMP": "true", "GFD_OUTPUT_FILE": str(out),
           "GFD_MIG_STRATEGY": "single", "NVML_BACKEND": "fake:a100-mig-1g",
           "GFD_MACHINE_TYPE_FILE": machine_file, "SYSFS_ROOT": sysfs_root("a100-mig-1g"),
           "GFD_HEALTH_FILE": str(tmp_path / "health")}
    assert main([], environ=env) == 0
    labels = parse_features(out.read_text())
    assert N + "gfd.timestamp" not in labels
    assert labels[N + "gpu.product"] == "NVIDIA-A100-SXM4-40GB-MIG-1g.5gb"
    assert labels[N + "gpu.count"] == "56"


def test_stdout_output(tmp_path: Path, machine_file: str, sysfs_root: Callable[..., str],
                       capsys: pytest.CaptureFixture[str]) -> None:
    args = base_args(tmp_path, machine_file, sysfs_root("t4"), "t4")[:-2]
    assert main(["--oneshot", "--no-timestamp", *args, "--output-file", "-"]) == 0
    labels = parse_features(capsys.readouterr().out)
    assert labels[N + "gpu.family"] == "turing"


def test_dry_run_prints_a_table_and_writes_nothing(
        tmp_path: Path, machine_file: str, sysfs_root: Callable[..., str],
        capsys: pytest.CaptureFixture[str]) -> None:
    args = base_args(tmp_path, machine_file, sysfs_root("dgx-a100"))
    assert main(["--dry-run", *args]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["LABEL", "VALUE"]
    assert "NVIDIA-A100-SXM4-40GB" in out
    assert not (tmp_path / "features.d").exists()


@pytest.mark.parametrize("argv", [["--mig-strategy", "bogus"], ["--sleep-interval", "soon"],
                                  ["--output-mode", "node-api"], ["--nvml", "bogus"]])
def test_bad_configuration_exits_2_and_writes_nothing(
        tmp_path: Path, machine_file: str, sysfs_root: Callable[..., str], argv: list[str],
        capsys: pytest.CaptureFixture[str]) -> None:
    args = base_args(tmp_path, machine_file, sysfs_root("dgx-a100"))
    assert main(["--oneshot", *args, *argv], environ={}) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gpu-feature-discovery: ")
    assert not (tmp_path / "features.d").exists()


def test_read_machine_type(tmp_path: Path) -> None:
    assert read_machine_type(str(tmp_path / "missing")) == "unknown"
    assert read_machine_type("") == "unknown"
    (tmp_path / "m").write_text("  \n")
    assert read_machine_type(str(tmp_path / "m")) == "unknown"


# --------------------------------------------------------------------------- init failures


def failing_reader(config: Config) -> Snapshot:
    raise NvmlError("nvmlInit", 9, "Driver Not Loaded")


def daemon(tmp_path: Path, reader: Callable[[Config], Snapshot], *, fail: bool = True,
           oneshot: bool = True, mode: str = "file", health: Path | None = None,
           **kwargs: object) -> Daemon:
    config = Config(flags=Flags(fail_on_init_error=fail, gfd=GfdFlags(
        oneshot=oneshot, output_file=str(tmp_path / "gfd"), sleep_interval=3600,
        machine_type_file="")))
    options = Options(output_mode=mode, node_name=NODE,
                      health_file=str(health) if health is not None else "")
    return Daemon(config, options, reader=reader, **kwargs)  # type: ignore[arg-type]


def test_init_failure_exits_1_with_one_line(tmp_path: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("ERROR", logger="gfd"):
        assert daemon(tmp_path, failing_reader).run() == 1
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "Driver Not Loaded" in errors[0]
    assert "\n" not in errors[0]
    assert not (tmp_path / "gfd").exists()


def test_init_failure_tolerated_writes_only_the_timestamp(tmp_path: Path) -> None:
    assert daemon(tmp_path, failing_reader, fail=False).run() == 0
    assert list(parse_features((tmp_path / "gfd").read_text())) == [N + "gfd.timestamp"]


def test_real_backend_without_driver_fails_cleanly(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    try:
        import pynvml

        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
        pytest.skip("a real NVIDIA driver is present")
    except pynvml.NVMLError:
        pass
    out = tmp_path / "gfd"
    no_health = {"GFD_HEALTH_FILE": ""}
    assert main(["--oneshot", "--nvml", "real", "-o", str(out)], environ=no_health) == 1
    assert not out.exists()
    assert main(["--oneshot", "--nvml", "real", "-o", str(out), "--fail-on-init-error=false"],
                environ=no_health) == 0
    assert list(parse_features(out.read_text())) == [N + "gfd.timestamp"]


def test_later_nvml_failure_keeps_the_last_labels(tmp_path: Path) -> None:
    calls: list[int] = []

    def flaky(config: Config) -> Snapshot:
        calls.append(1)
        if len(calls) > 1:
            raise NvmlError("nvmlDeviceGetCount", 15, "GPU is lost")
        return builders.snapshot()

    d = daemon(tmp_path, flaky, oneshot=False)
    assert d.compute_labels() is not None
    assert d.compute_labels() is None


# --------------------------------------------------------------------------- node-api mode


def test_oneshot_node_api_end_to_end(tmp_path: Path, machine_file: str,
                                     sysfs_root: Callable[..., str],
                                     server: FakeApiServer) -> None:
    kubeconfig = server.kubeconfig(str(tmp_path / "kubeconfig"))
    args = base_args(tmp_path, machine_file, sysfs_root("dgx-a100"))
    assert main(["--oneshot", "--no-timestamp", *args, "--output-mode", "both",
                 "--kubeconfig", kubeconfig], environ={"NODE_NAME": NODE}) == 0
    labels = server.labels(NODE)
    file_labels = parse_features((tmp_path / "features.d" / "gfd").read_text())
    assert {k: v for k, v in labels.items() if k in file_labels} == file_labels
    assert labels["team"] == "ml" and labels["nvidia.com/device-plugin.config"] == "x"
    owned = server.annotations(NODE)[OWNERSHIP_ANNOTATION].split(",")
    assert sorted(N + k for k in owned) == sorted(file_labels)

    # A second run with another MIG strategy removes what it no longer produces.
    args = base_args(tmp_path, machine_file, sysfs_root("a100-mig-1g"), "a100-mig-1g")
    assert main(["--oneshot", "--no-timestamp", *args, "--output-mode", "node-api",
                 "--kubeconfig", kubeconfig, "--node-name", NODE, "--mig-strategy", "mixed"],
                environ={}) == 0
    labels = server.labels(NODE)
    assert labels[N + "mig-1g.5gb.count"] == "56"
    assert labels[N + "mig.strategy"] == "mixed"
    assert labels["team"] == "ml"


def test_oneshot_node_api_gives_up_with_exit_1(tmp_path: Path, server: FakeApiServer) -> None:
    server.fail_next(100, 503)
    api = KubeNodeApi.from_environment(server.kubeconfig(str(tmp_path / "kc")))
    d = daemon(tmp_path, lambda c: builders.snapshot(),
               mode="both", node_api=api, backoff=Backoff(initial=0.001, cap=0.002))
    assert d.run() == 1
    assert (tmp_path / "gfd").exists()  # the file is written whatever the API server does


def run_until_labelled(d: Daemon, server: FakeApiServer) -> list[int]:
    """Run the daemon's loop in a thread until the node has labels, stop it; its exit codes."""
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(d.run()))
    thread.start()
    try:
        assert server.wait_for(lambda s: N + "gpu.count" in s.labels(NODE), timeout=10)
    finally:
        d.wakeup.request_stop()
        thread.join(timeout=10)
    return result


def test_loop_retries_until_the_api_server_recovers(tmp_path: Path, fake_snapshot: Callable[
        ..., Snapshot], server: FakeApiServer) -> None:
    snapshot = fake_snapshot("dgx-a100")
    server.fail_next(2, 500)
    server.close_next(1)
    api = KubeNodeApi.from_environment(server.kubeconfig(str(tmp_path / "kc")))
    d = daemon(tmp_path, lambda c: snapshot, oneshot=False, mode="both", node_api=api,
               backoff=Backoff(initial=0.01, cap=0.05))
    assert run_until_labelled(d, server) == [0]
    assert d.passes == 1  # convergence came from retries, not from new passes
    assert server.labels(NODE)[N + "gpu.count"] == "8"
    assert not (tmp_path / "gfd").exists()  # removed on a clean stop in loop mode


@pytest.mark.parametrize("content", [
    None,  # missing
    "::: [not yaml\n",
    "- a\n- list\n",
    "apiVersion: v1\nkind: Config\n",  # no cluster, no context
    "\x00\x01\x02 binary",
    "apiVersion: v1\nclusters: 7\ncontexts: x\ncurrent-context: [1]\n",
    "users:\n- name: x\n  user: {token: s3cret-token\n",
    "users: [{name: u, user: {token: s3cret}}]\ncontexts: [{name: x, context: 5}]\n"
    "current-context: x\n",
], ids=["missing", "bad-yaml", "a-list", "empty-config", "binary", "wrong-types",
        "cut-token", "bad-context"])
def test_unusable_kubeconfig_exits_1_with_one_line(
        tmp_path: Path, machine_file: str, sysfs_root: Callable[..., str], content: str | None,
        capsys: pytest.CaptureFixture[str]) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    if content is not None:
        kubeconfig.write_text(content)
    args = base_args(tmp_path, machine_file, sysfs_root("t4"), "t4")
    assert main(["--oneshot", *args, "--output-mode", "both", "--node-name", NODE,
                 "--kubeconfig", str(kubeconfig)], environ={}) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("gpu-feature-discovery: cannot configure the Kubernetes client: ")
    assert str(kubeconfig) in err[0] and "s3cret" not in err[0]  # credentials never quoted
    assert not (tmp_path / "features.d").exists()  # nothing written


def test_malformed_api_answers_are_retried_by_the_loop(
        tmp_path: Path, fake_snapshot: Callable[..., Snapshot], server: FakeApiServer) -> None:
    snapshot = fake_snapshot("t4")
    health = tmp_path / "health"
    server.answer_next(1, b"<html>bad gateway</html>")
    server.answer_next(1, b'{"metadata": []}')
    server.answer_next(1, b'{"metadata": {"labels": ["x"]}}')
    api = KubeNodeApi.from_environment(server.kubeconfig(str(tmp_path / "kc")))
    d = daemon(tmp_path, lambda c: snapshot, oneshot=False, mode="node-api", node_api=api,
               backoff=Backoff(initial=0.01, cap=0.05), health=health)
    assert run_until_labelled(d, server) == [0]
    assert d.passes == 1  # the retries converged within the first pass's sleep
    assert len(server.requests("GET")) >= 4
    assert int(health.read_text()) > 1


def test_oneshot_gives_up_on_malformed_answers_with_exit_1(
        tmp_path: Path, server: FakeApiServer) -> None:
    server.answer_next(100, b'{"metadata": "not an object"}')
    api = KubeNodeApi.from_environment(server.kubeconfig(str(tmp_path / "kc")))
    d = daemon(tmp_path, lambda c: builders.snapshot(),
               mode="node-api", node_api=api, backoff=Backoff(initial=0.001, cap=0.002))
    assert d.run() == 1
    assert server.requests("PATCH") == []


class StepClock:
    """Wall-clock seconds that advance by ``step`` on every read."""

    def __init__(self, start: float, step: float) -> None:
        self.now, self.step = start - step, step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def test_a_new_timestamp_alone_does_not_patch_the_node(
        tmp_path: Path, fake_snapshot: Callable[..., Snapshot], server: FakeApiServer) -> None:
    snapshots = [fake_snapshot("t4")]
    api = KubeNodeApi.from_environment(server.kubeconfig(str(tmp_path / "kc")))
    config = Config(flags=Flags(gfd=GfdFlags(oneshot=False, sleep_interval=60,
                                             machine_type_file="")))
    d = Daemon(config, Options(output_mode="node-api", node_name=NODE), node_api=api,
               reader=lambda c: snapshots[-1], clock=StepClock(1000, 60))
    assert d.run_pass() and d.run_pass()  # t=1000, t=1060: nothing but the time changed
    assert len(server.requests("PATCH")) == 1
    assert len(server.requests("GET")) == 2  # each pass still reads the Node
    assert server.labels(NODE)[N + "gfd.timestamp"] == "1000"
    # Any other change refreshes the timestamp with it.
    snapshots.append(fake_snapshot("dgx-a100"))
    assert d.run_pass()
    labels = server.labels(NODE)
    assert (labels[N + "gpu.count"], labels[N + "gfd.timestamp"]) == ("8", "1120")
    assert len(server.requests("PATCH")) == 2


def test_file_mode_keeps_a_timestamp_per_pass(tmp_path: Path, fake_snapshot: Callable[
        ..., Snapshot]) -> None:
    # NFD's features file is local and cheap to rewrite: it keeps NVIDIA's semantics.
    snapshot = fake_snapshot("t4")
    d = daemon(tmp_path, lambda c: snapshot, oneshot=False, clock=StepClock(1000, 60))
    assert d.run_pass() and d.run_pass()
    assert parse_features((tmp_path / "gfd").read_text())[N + "gfd.timestamp"] == "1060"


def test_oneshot_file_mode_never_imports_kubernetes(
        tmp_path: Path, machine_file: str, sysfs_root: Callable[..., str]) -> None:
    args = ["--oneshot", *base_args(tmp_path, machine_file, sysfs_root("t4"), "t4")]
    code = ("import sys\nfrom gfd.main import main\n"
            f"rc = main({args!r}, environ={{}})\n"
            "print(rc, sorted(m for m in sys.modules if m.split('.')[0] == 'kubernetes'))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=60,
                         env=dict(os.environ, PYTHONPATH=str(ROOT))).stdout
    assert out.strip() == "0 []"
    assert (tmp_path / "features.d" / "gfd").exists()


def test_node_api_options_from_env() -> None:
    parser = build_parser()
    args = parser.parse_args([])
    options = resolve_options(args, {"GFD_OUTPUT_MODE": "node-api", "NODE_NAME": "n1",
                                     "GFD_KUBECONFIG": "/k"})
    assert (options.output_mode, options.node_name, options.kubeconfig) == ("node-api", "n1",
                                                                          "/k")


# --------------------------------------------------------------------------- signals, loop


LOG_DEADLINE = 30.0  # seconds a spawned GFD may take to log an expected line


class Spawned:
    """A process (GFD) whose stderr a reader thread queues line by line.

    Waiting for a log line has a deadline, so a hung or silent GFD fails the test instead of
    hanging CI on a blocking read.
    """

    def __init__(self, command: list[str]) -> None:
        env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.put(line)
        self.lines.put(None)  # end of output: the process exited

    def wait_for_line(self, needle: str, timeout: float = LOG_DEADLINE) -> str:
        """The next log line containing ``needle``; AssertionError after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                line = self.lines.get(timeout=max(0.0, remaining))
            except queue.Empty:
                raise AssertionError(f"{needle!r} not logged within {timeout}s; "
                                     f"log so far: {self.seen[-10:]}") from None
            if line is None:
                raise AssertionError(f"{needle!r} never logged; exit code "
                                     f"{self.proc.wait(timeout=5)}; log: {self.seen[-10:]}")
            self.seen.append(line)
            if needle in line:
                return line

    def close(self) -> None:
        """Kill the process if it still runs, and reap it and the reader."""
        self.proc.kill()
        self.proc.wait(timeout=5)
        self._reader.join(timeout=5)


def spawn(args: list[str]) -> Spawned:
    """``python -m gfd`` with ``args``."""
    return Spawned([sys.executable, "-m", "gfd", *args])


def test_wait_for_line_has_a_deadline() -> None:
    # Stands in for a GFD that hangs before logging anything.
    spawned = Spawned([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with pytest.raises(AssertionError, match="not logged within"):
            spawned.wait_for_line("wrote", timeout=0.2)
    finally:
        spawned.close()


def test_sigterm_in_loop_mode_exits_0_and_removes_the_file(
        tmp_path: Path, machine_file: str, sysfs_root: Callable[..., str]) -> None:
    out = tmp_path / "features.d" / "gfd"
    gfd = spawn(base_args(tmp_path, machine_file, sysfs_root("dgx-a100")))
    try:
        gfd.wait_for_line("wrote")
        assert out.exists()
        gfd.proc.send_signal(signal.SIGTERM)
        assert gfd.proc.wait(timeout=10) == 0
    finally:
        gfd.close()
    assert not out.exists()


def test_sighup_reloads_the_config_file(tmp_path: Path, machine_file: str,
                                        sysfs_root: Callable[..., str]) -> None:
    out = tmp_path / "features.d" / "gfd"
    config = tmp_path / "config.yaml"
    config.write_text("version: v1\nflags:\n  migStrategy: none\n")
    gfd = spawn([*base_args(tmp_path, machine_file, sysfs_root("dgx-a100")),
                 "--config-file", str(config), "--no-timestamp"])
    try:
        gfd.wait_for_line("wrote")
        assert parse_features(out.read_text())[N + "gpu.replicas"] == "1"
        config.write_text(SHARED_CONFIG)
        gfd.proc.send_signal(signal.SIGHUP)
        gfd.wait_for_line("wrote")
        labels = parse_features(out.read_text())
        assert labels[N + "gpu.replicas"] == "3"
        assert labels[N + "gpu.product"] == "NVIDIA-A100-SXM4-40GB-SHARED"
        gfd.proc.send_signal(signal.SIGINT)
        assert gfd.proc.wait(timeout=10) == 0
    finally:
        gfd.close()


SHARED_CONFIG = ("version: v1\nsharing:\n  timeSlicing:\n    resources:\n"
                 "    - name: nvidia.com/gpu\n      replicas: 3\n")


def test_sighup_with_a_bad_then_vanished_config_keeps_the_labels(
        tmp_path: Path, machine_file: str, sysfs_root: Callable[..., str]) -> None:
    out = tmp_path / "features.d" / "gfd"
    health = tmp_path / "health"
    config = tmp_path / "config.yaml"
    config.write_text("version: v1\nflags:\n  migStrategy: none\n")
    gfd = spawn([*base_args(tmp_path, machine_file, sysfs_root("dgx-a100")),
                 "--config-file", str(config), "--no-timestamp"])
    try:
        gfd.wait_for_line("wrote")
        written = out.read_text()
        config.write_text("version: v1\nflags:\n  migStrategy: bogus\n")
        gfd.proc.send_signal(signal.SIGHUP)
        assert "migStrategy" in gfd.wait_for_line("config reload failed")
        config.unlink()
        gfd.proc.send_signal(signal.SIGHUP)
        assert str(config) in gfd.wait_for_line("config reload failed")
        assert out.read_text() == written  # the old configuration's labels stay
        assert gfd.proc.poll() is None
        # Still looping, and still reloading: a good file is picked up.
        health.unlink()
        config.write_text(SHARED_CONFIG)
        gfd.proc.send_signal(signal.SIGHUP)
        gfd.wait_for_line("wrote")
        assert parse_features(out.read_text())[N + "gpu.replicas"] == "3"
        gfd.proc.send_signal(signal.SIGTERM)
        assert gfd.proc.wait(timeout=10) == 0
    finally:
        gfd.close()
    assert not out.exists()
    assert health.exists()  # the pass after the good reload succeeded


def test_parser_has_nvidia_flags() -> None:
    parser = build_parser()
    args = parser.parse_args(["--oneshot", "--sleep-interval", "30s", "-o", "/x",
                              "--mig-strategy", "mixed"])
    config = resolve(args, {})
    assert config.flags.gfd.oneshot and config.flags.gfd.sleep_interval == 30
    assert config.flags.gfd.output_file == "/x" and config.flags.mig_strategy == "mixed"
    assert isinstance(args, argparse.Namespace)


def test_stdout_stream_injection(tmp_path: Path) -> None:
    stream = io.StringIO()
    config = Config(flags=Flags(gfd=GfdFlags(oneshot=True, output_file="-", no_timestamp=True,
                                             machine_type_file="")))
    d = Daemon(config, Options(), reader=lambda c: builders.snapshot(driver="1.2", cuda=0),
               stdout=stream)
    assert d.run() == 0
    assert stream.getvalue() == ""  # no GPUs: no labels at all


# --------------------------------------------------------------------------- health file

STALE = "1\n"  # what an earlier container left behind; any refresh replaces it


def no_nvml_after_first(snapshot: Snapshot) -> Callable[[Config], Snapshot]:
    """A reader that works once, then fails (the GPU fell off the bus)."""
    calls: list[int] = []

    def read(config: Config) -> Snapshot:
        calls.append(1)
        if len(calls) > 1:
            raise NvmlError("nvmlDeviceGetCount", 15, "GPU is lost")
        return snapshot

    return read


def test_health_file_holds_the_time_of_the_last_good_pass(
        tmp_path: Path, machine_file: str, sysfs_root: Callable[..., str]) -> None:
    health = tmp_path / "health"
    health.write_text(STALE)
    before = int(time.time())
    assert main(["--oneshot", *base_args(tmp_path, machine_file, sysfs_root("dgx-a100"))]) == 0
    text = health.read_text()
    assert text.endswith("\n") and before <= int(text) <= int(time.time())
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # atomic: no temps


def test_stale_health_file_is_deleted_at_start_even_if_init_fails(tmp_path: Path) -> None:
    health = tmp_path / "health"
    health.write_text(STALE)
    assert daemon(tmp_path, failing_reader, health=health).run() == 1
    assert not health.exists()


def test_tolerated_init_failure_is_a_successful_pass(tmp_path: Path) -> None:
    # --fail-on-init-error=false asks GFD to stay up with only the timestamp: restarting it
    # would not help, so the probes must not fail.
    health = tmp_path / "health"
    assert daemon(tmp_path, failing_reader, fail=False, health=health).run() == 0
    assert int(health.read_text()) > 1


def test_failed_file_output_does_not_refresh_it(tmp_path: Path, fake_snapshot: Callable[
        ..., Snapshot]) -> None:
    snapshot = fake_snapshot("t4")
    (tmp_path / "gfd").mkdir()  # the features file cannot replace a directory
    health = tmp_path / "health"
    health.write_text(STALE)
    assert daemon(tmp_path, lambda c: snapshot, health=health).run() == 1
    assert not health.exists()
    assert os.listdir(tmp_path / "gfd") == []  # nothing written in its place


def test_failed_node_patch_does_not_refresh_it_until_a_retry_succeeds(
        tmp_path: Path, fake_snapshot: Callable[..., Snapshot], server: FakeApiServer) -> None:
    snapshot = fake_snapshot("dgx-a100")
    health = tmp_path / "health"
    api = KubeNodeApi.from_environment(server.kubeconfig(str(tmp_path / "kc")))
    d = daemon(tmp_path, lambda c: snapshot, oneshot=False, mode="both", node_api=api,
               health=health)
    assert d.run_pass()
    assert int(health.read_text()) > 1
    health.write_text(STALE)
    server.fail_next(1, 500)
    assert not d.run_pass()
    assert health.read_text() == STALE
    assert (tmp_path / "gfd").exists()  # the file output did its part
    assert d.retry_patch()  # the retry completes the pass after all
    assert int(health.read_text()) > 1


def test_nvml_failure_after_a_pending_patch_does_not_refresh_it(
        tmp_path: Path, fake_snapshot: Callable[..., Snapshot], server: FakeApiServer) -> None:
    snapshot = fake_snapshot("t4")
    health = tmp_path / "health"
    api = KubeNodeApi.from_environment(server.kubeconfig(str(tmp_path / "kc")))
    d = daemon(tmp_path, no_nvml_after_first(snapshot), oneshot=False, mode="node-api",
               node_api=api, health=health)
    server.fail_next(1, 500)
    assert not d.run_pass()  # labels computed, patch failed: a retry is pending
    assert not health.exists()
    assert not d.run_pass()  # NVML lost: this pass has no labels
    assert d.retry_patch()  # the older labels land, but the latest pass still failed
    assert not health.exists()


def test_oneshot_patch_failure_leaves_no_health_file(tmp_path: Path,
                                                     server: FakeApiServer) -> None:
    server.fail_next(100, 503)
    health = tmp_path / "health"
    health.write_text(STALE)
    api = KubeNodeApi.from_environment(server.kubeconfig(str(tmp_path / "kc")))
    d = daemon(tmp_path, lambda c: builders.snapshot(),
               mode="node-api", node_api=api, backoff=Backoff(initial=0.001, cap=0.002),
               health=health)
    assert d.run() == 1
    assert not health.exists()


def test_dry_run_leaves_the_health_file_alone(tmp_path: Path, machine_file: str,
                                              sysfs_root: Callable[..., str]) -> None:
    health = tmp_path / "health"
    health.write_text(STALE)
    assert main(["--dry-run", *base_args(tmp_path, machine_file, sysfs_root("t4"), "t4")]) == 0
    assert health.read_text() == STALE


def test_empty_health_file_setting_disables_it(tmp_path: Path, machine_file: str,
                                               sysfs_root: Callable[..., str]) -> None:
    args = base_args(tmp_path, machine_file, sysfs_root("t4"), "t4")
    assert main(["--oneshot", *args, "--health-file", ""], environ={}) == 0
    assert sorted(os.listdir(tmp_path)) == ["features.d", "product_name"]


@pytest.mark.parametrize(("argv", "environ", "expected"), [
    ([], {}, DEFAULT_HEALTH_FILE),
    ([], {"GFD_HEALTH_FILE": "/e"}, "/e"),
    ([], {"GFD_HEALTH_FILE": ""}, ""),  # set but empty: disabled
    (["--health-file", "/f"], {"GFD_HEALTH_FILE": "/e"}, "/f"),
    (["--health-file", ""], {"GFD_HEALTH_FILE": "/e"}, ""),
])
def test_health_file_option(argv: list[str], environ: dict[str, str], expected: str) -> None:
    options = resolve_options(build_parser().parse_args(argv), environ)
    assert options.health_file == expected


def test_hung_api_server_cannot_block_the_loop(
        tmp_path: Path, fake_snapshot: Callable[..., Snapshot], server: FakeApiServer) -> None:
    snapshot = fake_snapshot("t4")
    health = tmp_path / "health"
    server.delay_next(2, 60)  # the first two requests hang far beyond the read timeout
    api = KubeNodeApi.from_environment(server.kubeconfig(str(tmp_path / "kc")),
                                       request_timeout=(2.0, 0.1))
    d = daemon(tmp_path, lambda c: snapshot, oneshot=False, mode="node-api", node_api=api,
               backoff=Backoff(initial=0.01, cap=0.05), health=health)
    assert run_until_labelled(d, server) == [0]
    assert d.passes == 1  # the retries converged within the first pass's sleep
    assert int(health.read_text()) > 1


def test_fake_backend_labels_come_from_the_profile_not_the_host_sysfs(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # gpu.mode comes from the PCI class in sysfs: a simulated DGX A100 must say "compute"
    # whatever this host's /sys holds at the profile's bus ids.
    from gfd.main import main

    code = main(["--nvml", "fake:dgx-a100", "--dry-run", "--health-file", ""], environ={})
    assert code == 0
    out = capsys.readouterr().out
    assert any(line.split() == ["nvidia.com/gpu.mode", "compute"] for line in out.splitlines())

"""``gpu-metrics-exporter``'s main in-process over the fake NVML: dcgm-exporter's flags and
variables, the refused ones, SIGHUP reloads of the collectors file, SIGTERM."""

from __future__ import annotations

import logging
import os
import queue
import signal
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import FakeFactory

from exporter.fields import DEFAULT_COLLECTORS
from exporter.main import (
    REFUSED,
    Hooks,
    build_parser,
    check_refused_env,
    exporter_options,
    main,
    parse_address,
)
from exporter.service import Exporter, ExporterOptions, build_exporter
from gpus.config import ConfigError, resolve
from gpus.runtime import EXIT_OK, EXIT_USAGE

TIMEOUT = 10.0
PROFILE = "fake:t4"
BASE = ["--nvml", PROFILE, "-a", "127.0.0.1:0"]


def options_for(argv: list[str], environ: dict[str, str] | None = None) -> ExporterOptions:
    args = build_parser().parse_args(argv)
    return exporter_options(resolve(args, environ or {}))


def scrape(exporter: Exporter) -> str:
    assert exporter.server is not None
    url = f"http://127.0.0.1:{exporter.server.port}/metrics"
    with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
        return str(response.read().decode())


class Running:
    """main() on this (the main) thread; ``body`` on a helper thread, then SIGTERM."""

    def __init__(self) -> None:
        self.started: queue.Queue[Exporter] = queue.Queue()
        self.reloads: queue.Queue[bool] = queue.Queue()
        self.errors: list[BaseException] = []
        self.hooks = Hooks(on_start=self.started.put, on_reload=self.reloads.put)

    def reload(self) -> bool:
        os.kill(os.getpid(), signal.SIGHUP)
        return self.reloads.get(timeout=TIMEOUT)

    def run(self, argv: list[str], body: Callable[[Exporter], None],
            environ: dict[str, str] | None = None) -> int:
        def helper() -> None:
            try:
                body(self.started.get(timeout=TIMEOUT))
            except BaseException as err:  # re-raised on the test's thread
                self.errors.append(err)
            finally:
                os.kill(os.getpid(), signal.SIGTERM)

        thread = threading.Thread(target=helper, daemon=True)
        thread.start()
        code = main(argv, environ or {}, self.hooks)
        thread.join(TIMEOUT)
        if self.errors:
            raise self.errors[0]
        return code


@contextmanager
def restored_signals() -> Iterator[None]:
    # If main failed before installing its handlers, the helper's SIGTERM must not kill pytest.
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM,
                                                                      signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def test_serves_dcgm_series_and_sigterm_stops_with_0() -> None:
    seen: list[str] = []
    with restored_signals():
        code = Running().run(BASE, lambda exporter: seen.append(scrape(exporter)),
                             {"NODE_NAME": "node-7"})
    assert code == EXIT_OK
    assert 'DCGM_FI_DEV_GPU_UTIL{gpu="0",UUID="GPU-' in seen[0]
    assert 'Hostname="node-7"' in seen[0]


def test_every_flag_reaches_the_exporter(tmp_path: Path) -> None:
    csv = tmp_path / "c.csv"
    csv.write_text("DCGM_FI_DEV_GPU_TEMP, gauge, temp\n")
    options = options_for([
        "-f", str(csv), "-a", "127.0.0.1:9500", "-c", "250", "-k",
        "--kubernetes-gpu-id-type", "device-name", "--pod-resources-kubelet-socket", "/x.sock",
        "--nvidia-resource-names", "a.com/gpu,b.com/gpu", "-n", "-rbmn", "-o", "-x", "1000"])
    assert [c.name for c in options.collectors] == ["DCGM_FI_DEV_GPU_TEMP"]
    assert options.address == ("127.0.0.1", 9500)
    assert options.collect_interval_ms == 250 and options.kubernetes
    assert options.kubernetes_gpu_id_type == "device-name"
    assert options.pod_resources_socket == "/x.sock"
    assert options.nvidia_resource_names == ("a.com/gpu", "b.com/gpu")
    assert options.no_hostname and options.replace_blanks_in_model_name
    assert options.use_old_namespace and options.xid_count_window_ms == 1000


def test_every_variable_reaches_the_exporter(tmp_path: Path) -> None:
    csv = tmp_path / "c.csv"
    csv.write_text("DCGM_FI_DEV_POWER_USAGE, gauge, power\n")
    options = options_for([], {
        "DCGM_EXPORTER_COLLECTORS": str(csv), "DCGM_EXPORTER_LISTEN": "[::1]:9401",
        "DCGM_EXPORTER_INTERVAL": "500", "DCGM_EXPORTER_KUBERNETES": "true",
        "DCGM_EXPORTER_KUBERNETES_GPU_ID_TYPE": "device-name",
        "DCGM_POD_RESOURCES_KUBELET_SOCKET": "/y.sock", "NVIDIA_RESOURCE_NAMES": "c.com/gpu",
        "DCGM_EXPORTER_NO_HOSTNAME": "true", "DCGM_EXPORTER_REPLACE_BLANKS_IN_MODEL_NAME": "true",
        "DCGM_EXPORTER_USE_OLD_NAMESPACE": "true", "DCGM_EXPORTER_XID_COUNT_WINDOW_SIZE": "2000",
        "NODE_NAME": "n1"})
    assert [c.name for c in options.collectors] == ["DCGM_FI_DEV_POWER_USAGE"]
    assert options.address == ("::1", 9401) and options.collect_interval_ms == 500
    assert options.kubernetes and options.kubernetes_gpu_id_type == "device-name"
    assert options.pod_resources_socket == "/y.sock"
    assert options.nvidia_resource_names == ("c.com/gpu",)
    assert options.no_hostname and options.replace_blanks_in_model_name
    assert options.use_old_namespace and options.xid_count_window_ms == 2000
    assert options.hostname == "n1"


def test_defaults_are_dcgm_exporters() -> None:
    options = options_for([])
    assert options.collectors == DEFAULT_COLLECTORS
    assert options.address == ("", 9400) and options.collect_interval_ms == 30000
    assert not options.kubernetes and options.kubernetes_gpu_id_type == "uid"
    assert options.pod_resources_socket == "/var/lib/kubelet/pod-resources/kubelet.sock"
    assert options.xid_count_window_ms == 300000 and options.hostname is None


@pytest.mark.parametrize("text,expected", [(":9400", ("", 9400)),
                                           ("0.0.0.0:1", ("0.0.0.0", 1)),
                                           ("[::]:9400", ("::", 9400))])
def test_addresses(text: str, expected: tuple[str, int]) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize("text", ["9400", "host:", ":x", ":70000", ":-1"])
def test_bad_addresses_name_the_flag(text: str) -> None:
    with pytest.raises(ConfigError, match="-a/--address"):
        parse_address(text)


@pytest.mark.parametrize("flag", [flag for refused in REFUSED for flag in refused.flags])
def test_refused_flags_are_one_line_and_exit_2(flag: str, capsys: pytest.CaptureFixture[str]
                                               ) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([flag, "x"], {})
    assert exit_info.value.code == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and flag in err and "not supported by this exporter" in err


def test_remote_hostengine_says_it_needs_dcgm(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["-r", "localhost:5555"], {})
    assert capsys.readouterr().err == ("gpu-metrics-exporter: -r/--remote-hostengine-info: "
                                       "needs DCGM; not supported by this exporter\n")


@pytest.mark.parametrize("name", [name for refused in REFUSED for name in refused.env])
def test_refused_variables_exit_2_unless_they_ask_for_nothing(
        name: str, capsys: pytest.CaptureFixture[str]) -> None:
    check_refused_env({name: "", "OTHER": "x"})
    refused = next(r for r in REFUSED if name in r.env)
    for harmless in refused.harmless:
        check_refused_env({name: harmless.upper()})
    assert main([], {name: "something"}) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and name in err


def test_a_bad_collectors_file_at_start_is_exit_2_naming_file_line_and_fields(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    csv = tmp_path / "bad.csv"
    csv.write_text("# fields\nDCGM_FI_DEV_GPU_TEMP, gauge, t\nDCGM_FI_NOPE, gauge, x\n")
    assert main([*BASE, "-f", str(csv)], {}) == EXIT_USAGE
    err = capsys.readouterr().err
    assert f"{csv}:3:" in err and "DCGM_FI_NOPE" in err and "DCGM_FI_DEV_GPU_UTIL" in err
    assert err.count("\n") == 1
    csv.write_text("DCGM_FI_DEV_GPU_TEMP, gauge\n")  # two columns
    assert main([*BASE, "-f", str(csv)], {}) == EXIT_USAGE
    assert f"{csv}:1:" in capsys.readouterr().err
    assert main([*BASE, "-f", str(tmp_path / "missing.csv")], {}) == EXIT_USAGE


def series_names(body: str) -> set[str]:
    return {line.split("{", 1)[0] for line in body.splitlines()
            if line.startswith("DCGM_") and "{" in line}


def test_sighup_reloads_the_collectors_and_a_bad_file_keeps_the_old_set(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="exporter.main")
    csv = tmp_path / "c.csv"
    csv.write_text("DCGM_FI_DEV_GPU_TEMP, gauge, temp\n")
    run = Running()
    names: list[set[str]] = []

    def body(exporter: Exporter) -> None:
        assert exporter.sampler is not None
        names.append(series_names(scrape(exporter)))
        csv.write_text("DCGM_FI_DEV_GPU_TEMP, gauge, temp\nDCGM_FI_DEV_POWER_USAGE, gauge, W\n")
        assert run.reload() is True
        reloaded_at = time.monotonic()
        # POWER_USAGE is read from the next NVML sample on: one that *began* after the reload
        # had been applied (a sample in progress meanwhile finishes with the old fields).
        assert exporter.sampler.wait_for(lambda r: r.sample.taken_at >= reloaded_at, TIMEOUT)
        names.append(series_names(scrape(exporter)))
        csv.write_text("DCGM_FI_DEV_POWER_USAGE, gauge, W\nDCGM_FI_DEV_NOPE, gauge, x\n")
        assert run.reload() is False
        names.append(series_names(scrape(exporter)))

    with restored_signals():
        assert run.run([*BASE, "-c", "50", "-f", str(csv)], body) == EXIT_OK
    assert names[0] == {"DCGM_FI_DEV_GPU_TEMP"}
    assert names[1] == names[2] == {"DCGM_FI_DEV_GPU_TEMP", "DCGM_FI_DEV_POWER_USAGE"}
    failed = [r.getMessage() for r in caplog.records if "reload failed" in r.getMessage()]
    assert len(failed) == 1 and f"{csv}:2:" in failed[0] and "DCGM_FI_DEV_NOPE" in failed[0]
    assert "previous 2 collectors" in failed[0]


def test_version_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"], {})
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("gpu-metrics-exporter ")


def test_a_new_set_is_served_from_the_cached_reading_at_once(fake_nvml: FakeFactory) -> None:
    fake = fake_nvml("t4")
    exporter = build_exporter(ExporterOptions(address=("127.0.0.1", 0),
                                              collect_interval_ms=600000,
                                              sysfs_root=fake.use_scratch_sysfs()))
    exporter.start()
    try:
        assert exporter.collector is not None
        assert len(exporter.collector.families()) > 1
        temp = tuple(c for c in DEFAULT_COLLECTORS if c.name == "DCGM_FI_DEV_GPU_TEMP")
        exporter.set_collectors(temp)  # no new NVML sample: the families are rebuilt anyway
        assert [f.name for f in exporter.collector.families()] == ["DCGM_FI_DEV_GPU_TEMP"]
        assert series_names(scrape(exporter)) == {"DCGM_FI_DEV_GPU_TEMP"}
        with pytest.raises(ValueError, match="-f/--collectors"):
            exporter.set_collectors(())
        assert series_names(scrape(exporter)) == {"DCGM_FI_DEV_GPU_TEMP"}
    finally:
        exporter.stop()

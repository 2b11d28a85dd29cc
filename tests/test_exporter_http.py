"""The exporter end to end over the fake NVML: /metrics, /health, OpenMetrics, promtool."""

from __future__ import annotations

import shutil
import subprocess
import threading
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
from conftest import FakeFactory

from exporter.attribution import DeviceKey
from exporter.fields import Collector
from exporter.http import WebConfigError, load_web_config
from exporter.series import Family, Inputs, SeriesOptions, build_families
from exporter.service import Exporter, ExporterOptions, build_exporter
from gpus.fake import FakeNvml

TIMEOUT = 10.0
# The running fake and the exporter serving it (the `running` fixture's value).
Running = tuple[FakeNvml, Exporter]


@pytest.fixture
def running(fake_nvml: FakeFactory) -> Iterator[Running]:
    fake = fake_nvml("h100-mig-mixed")
    exporter = build_exporter(ExporterOptions(
        address=("127.0.0.1", 0), hostname="gpu-node-1", collect_interval_ms=60000,
        sysfs_root=fake.use_scratch_sysfs()))
    exporter.start()
    yield fake, exporter
    exporter.stop()


def get(exporter: Exporter, path: str, accept: str | None = None) -> tuple[int, str, str]:
    assert exporter.server is not None
    request = urllib.request.Request(f"http://127.0.0.1:{exporter.server.port}{path}")
    if accept:
        request.add_header("Accept", accept)
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.headers["Content-Type"], err.read().decode()


def test_metrics_text_keeps_dcgm_names_and_formats(running: Running) -> None:
    _, exporter = running
    status, content_type, body = get(exporter, "/metrics")
    assert status == 200 and content_type.startswith("text/plain; version=0.0.4")
    assert "# TYPE DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION counter\n" in body
    power = next(line for line in body.splitlines()
                 if line.startswith("DCGM_FI_DEV_POWER_USAGE{"))
    assert power.startswith('DCGM_FI_DEV_POWER_USAGE{gpu="0",UUID="GPU-')
    assert len(power.rsplit(" ", 1)[1].split(".")[1]) == 6  # Go's %f
    temp = next(line for line in body.splitlines() if line.startswith("DCGM_FI_DEV_GPU_TEMP{"))
    assert "." not in temp.rsplit(" ", 1)[1]
    assert 'GPU_I_PROFILE="3g.40gb",GPU_I_ID="1",Hostname="gpu-node-1"' in body


def test_openmetrics_on_request(running: Running) -> None:
    _, exporter = running
    status, content_type, body = get(exporter, "/metrics", "application/openmetrics-text")
    assert status == 200 and content_type.startswith("application/openmetrics-text")
    assert body.endswith("# EOF\n")
    assert "# TYPE DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION unknown" in body


def test_health_follows_sample_freshness(running: Running) -> None:
    _, exporter = running
    assert get(exporter, "/health")[0] == 200
    assert exporter.sampler is not None
    exporter.sampler.interval_s = -1.0  # every sample is now "too old"
    assert get(exporter, "/health")[0] == 503
    assert get(exporter, "/nope")[0] == 404


def test_concurrent_scrapes_share_one_reading(running: Running) -> None:
    _, exporter = running
    assert exporter.sampler is not None
    reading = exporter.sampler.latest()
    bodies: list[str] = []
    threads = [threading.Thread(target=lambda: bodies.append(get(exporter, "/metrics")[2]))
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert exporter.sampler.latest() is reading  # no scrape read NVML
    gpu_lines = [[ln for ln in b.splitlines() if ln.startswith("DCGM_")] for b in bodies]
    assert len(bodies) == 8 and all(lines == gpu_lines[0] for lines in gpu_lines)


def test_lost_gpu_disappears_and_comes_back(running: Running) -> None:
    fake, exporter = running
    assert exporter.sampler is not None
    uuid = fake.uuids()[1]
    fake.lose_gpu(1, xid=None)
    exporter.sampler.sample_now()
    body = get(exporter, "/metrics")[2]
    assert f'DCGM_FI_DEV_GPU_TEMP{{gpu="1",UUID="{uuid}"' not in body
    assert f'gpu_exporter_gpu_lost{{UUID="{uuid}"}} 1.0' in body
    fake.restore_gpu(1)
    exporter.sampler.sample_now()
    assert f'DCGM_FI_DEV_GPU_TEMP{{gpu="1",UUID="{uuid}"' in get(exporter, "/metrics")[2]


def test_one_failing_call_omits_one_series_and_is_counted(running: Running) -> None:
    fake, exporter = running
    assert exporter.sampler is not None
    fake.fail("nvmlDeviceGetTemperature", "NVML_ERROR_UNKNOWN", count=1)
    exporter.sampler.sample_now()
    body = get(exporter, "/metrics")[2]
    temps = [ln for ln in body.splitlines() if ln.startswith("DCGM_FI_DEV_GPU_TEMP{")]
    assert len(temps) == len(fake.uuids()) - 1
    assert ('gpu_exporter_nvml_errors_total{call="nvmlDeviceGetTemperature",'
            'error="NVML_ERROR_UNKNOWN"} 1.0') in body


def test_xid_reaches_the_series(running: Running) -> None:
    fake, exporter = running
    fake.inject_xid(0, 79, wait=TIMEOUT)
    collector = exporter.collector
    assert collector is not None and collector.xids is not None
    assert collector.xids.wait_for_xid(DeviceKey(fake.uuids()[0]), TIMEOUT) == 79
    assert 'err_code="79",err_msg="GPU has fallen off the bus"} 79' in get(
        exporter, "/metrics")[2]


# What promtool's linter says about dcgm-exporter's own interface (camelCase label names such
# as modelName, counters named without _total): kept on purpose, so only these may appear.
DCGM_LINTS = ("label names should be written in 'snake_case' not 'camelCase'",
              'counter metrics should have "_total" suffix',
              "metric name should not include type 'counter'")
NO_PROMTOOL = pytest.mark.skipif(shutil.which("promtool") is None,
                                 reason="promtool not installed (Debian: apt-get install "
                                        "prometheus); CI installs it")


def promtool_problems(text: str) -> list[str]:
    """promtool check metrics: parse errors and lints other than DCGM_LINTS."""
    result = subprocess.run(["promtool", "check", "metrics"], input=text, text=True,
                            capture_output=True, timeout=60)
    output = (result.stdout + result.stderr).splitlines()
    problems = [line for line in output if line and not any(lint in line for lint in DCGM_LINTS)]
    if result.returncode not in (0, 3):  # 3: lint findings only
        problems.append(f"exit status {result.returncode}")
    return problems


@NO_PROMTOOL
def test_promtool_accepts_our_output(running: Running) -> None:
    _, exporter = running
    assert promtool_problems(get(exporter, "/metrics")[2]) == []


@NO_PROMTOOL
def test_promtool_check_catches_a_broken_exposition() -> None:
    assert promtool_problems('DCGM_FI_DEV_GPU_TEMP{gpu="0} 1\n')
    assert promtool_problems("# TYPE x gauge\n# TYPE x counter\nx 1\n")


def test_web_config_basic_auth_is_refused_with_a_reason(tmp_path: Path) -> None:
    path = tmp_path / "web.yml"
    path.write_text("basic_auth_users:\n  alice: $2y$10$abc\n")
    with pytest.raises(WebConfigError, match="basic_auth_users is not supported"):
        load_web_config(str(path))
    path.write_text("tls_server_config:\n  cert_file: c.pem\n")
    with pytest.raises(WebConfigError, match="both cert_file and key_file"):
        load_web_config(str(path))
    path.write_text("nonsense: 1\n")
    with pytest.raises(WebConfigError, match="unknown keys"):
        load_web_config(str(path))


def test_a_slow_client_does_not_stall_others(running: Running) -> None:
    import socket

    _, exporter = running
    assert exporter.server is not None
    with socket.create_connection(("127.0.0.1", exporter.server.port), timeout=TIMEOUT) as slow:
        slow.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # never finishes its request
        assert get(exporter, "/health")[0] == 200
        assert get(exporter, "/metrics")[0] == 200


def test_bad_options_are_refused_naming_the_flag() -> None:
    with pytest.raises(ValueError, match="-c/--collect-interval"):
        build_exporter(ExporterOptions(collect_interval_ms=0))
    with pytest.raises(ValueError, match="-x/--xid-count-window-size"):
        build_exporter(ExporterOptions(xid_count_window_ms=-1))
    with pytest.raises(ValueError, match="--kubernetes-gpu-id-type"):
        build_exporter(ExporterOptions(kubernetes_gpu_id_type="index"))


def test_a_failed_start_leaves_nothing_running(fake_nvml: FakeFactory) -> None:
    import socket

    fake = fake_nvml("t4")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        exporter = build_exporter(ExporterOptions(address=("127.0.0.1", taken.getsockname()[1]),
                                                  sysfs_root=fake.use_scratch_sysfs()))
        with pytest.raises(OSError):
            exporter.start()
    assert fake.status()["initialized"] == 0
    assert exporter.sampler is None and exporter.listener is None


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
def test_tls_from_a_web_config_file(fake_nvml: FakeFactory, tmp_path: Path) -> None:
    import ssl

    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-keyout", str(tmp_path / "key.pem"),
                    "-out", str(tmp_path / "cert.pem")], check=True, capture_output=True,
                   timeout=60)
    (tmp_path / "web.yml").write_text(
        "tls_server_config:\n  cert_file: cert.pem\n  key_file: key.pem\n")
    config = load_web_config(str(tmp_path / "web.yml"))
    fake = fake_nvml("t4")
    exporter = build_exporter(ExporterOptions(address=("127.0.0.1", 0), web_config=config,
                                              sysfs_root=fake.use_scratch_sysfs()))
    exporter.start()
    try:
        assert exporter.server is not None
        context = ssl.create_default_context(cafile=str(tmp_path / "cert.pem"))
        context.check_hostname = False
        url = f"https://127.0.0.1:{exporter.server.port}/metrics"
        with urllib.request.urlopen(url, context=context, timeout=TIMEOUT) as response:
            assert b"DCGM_FI_DEV_GPU_TEMP{" in response.read()
        with pytest.raises(OSError):  # plain HTTP is not served
            urllib.request.urlopen(url.replace("https", "http"), timeout=TIMEOUT).read()
        # a client that never starts its handshake does not stall the others
        import socket

        with socket.create_connection(("127.0.0.1", exporter.server.port), timeout=TIMEOUT), \
                urllib.request.urlopen(url, context=context, timeout=TIMEOUT) as response:
            assert response.status == 200
    finally:
        exporter.stop()


def test_kubernetes_mode_without_a_kubelet_serves_and_counts(
        fake_nvml: FakeFactory, sockdir: str) -> None:
    import os

    fake = fake_nvml("t4")
    exporter = build_exporter(ExporterOptions(
        address=("127.0.0.1", 0), kubernetes=True, sysfs_root=fake.use_scratch_sysfs(),
        pod_resources_socket=os.path.join(sockdir, "missing.sock")))
    exporter.start()
    try:
        assert exporter.refresher is not None
        assert exporter.refresher.wait_for(lambda c: c.health.kind == "no-socket", TIMEOUT)
        body = get(exporter, "/metrics")[2]
    finally:
        exporter.stop()
    assert body.count("DCGM_FI_DEV_GPU_TEMP{") == 4 and 'pod="' not in body
    assert 'gpu_exporter_podresources_failures_total{kind="no-socket"}' in body
    assert "gpu_exporter_pod_mapping_stale 0.0" in body


def test_families_are_built_on_the_sampling_thread_not_by_scrapes(
        running: Running, monkeypatch: pytest.MonkeyPatch) -> None:
    import exporter.collector as collector_module

    _, exporter = running
    assert exporter.sampler is not None
    built: list[str] = []
    real = build_families  # what exporter.collector calls

    def counting(inputs: Inputs, collectors: Iterable[Collector],
                 options: SeriesOptions) -> list[Family]:
        built.append(threading.current_thread().name)
        return real(inputs, collectors, options)

    monkeypatch.setattr(collector_module, "build_families", counting)
    exporter.sampler.sample_now()
    assert built == [threading.current_thread().name]  # the sampling thread (here: this one)
    for _ in range(3):
        assert get(exporter, "/metrics")[0] == 200
    assert len(built) == 1

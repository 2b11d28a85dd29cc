"""A real Prometheus (Debian's ``prometheus`` package) scrapes the exporter over HTTP, and the
series it stored carry the pod labels the mock kubelet's PodResources API gave.

Skipped when ``prometheus`` is not installed (``make prometheus`` installs it); with ``CI`` set
a missing binary fails instead (.ci/run installs it).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from test_plugin_mig_e2e import mig_config
from test_podresources import pod_resources_env
from test_server_support import short_tmpdir

from exporter.service import ExporterOptions, build_exporter

TIMEOUT = 30.0  # Prometheus starts, scrapes every second; generous for a busy machine
PROMETHEUS = shutil.which("prometheus")


def require_prometheus() -> str:
    if PROMETHEUS is None:
        message = "prometheus is not installed (make prometheus, or apt-get install prometheus)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return PROMETHEUS


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def api(port: int, path: str, **params: str) -> Any:
    query = f"?{urllib.parse.urlencode(params)}" if params else ""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/{path}{query}",
                                timeout=5.0) as response:
        body = json.loads(response.read())
    assert body["status"] == "success", body
    return body["data"]


def wait_until(check: Callable[[], Any], what: str, proc: subprocess.Popen[bytes]) -> Any:
    """Poll ``check`` (Prometheus' HTTP API) until it returns something truthy."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        assert proc.poll() is None, f"prometheus exited with {proc.returncode}"
        try:
            result = check()
        except (urllib.error.URLError, ConnectionError):
            result = None  # not listening yet
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)  # the poll period; Prometheus has no call that blocks until a scrape


def scrape_config(target: str) -> str:
    return json.dumps({  # JSON is YAML
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
        "scrape_configs": [{"job_name": "gpu", "honor_labels": True,
                            "static_configs": [{"targets": [target]}]}],
    })


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Callable[[str], tuple[int, subprocess.Popen[bytes]]]]:
    binary = require_prometheus()
    procs: list[subprocess.Popen[bytes]] = []

    def start(target: str) -> tuple[int, subprocess.Popen[bytes]]:
        config = tmp_path / "prometheus.yml"
        config.write_text(scrape_config(target))
        port = free_port()
        proc = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        procs.append(proc)
        return port, proc

    yield start
    for proc in procs:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


def test_prometheus_scrapes_gpu_series_with_pod_labels(
        prometheus: Callable[[str], tuple[int, subprocess.Popen[bytes]]]) -> None:
    require_prometheus()
    with short_tmpdir() as directory:
        config = mig_config(directory, "dgx-a100", "none")
        with pod_resources_env(config, directory) as (env, path):
            (held,) = env.kubelet.allocate("nvidia.com/gpu", 1, pod="trainer",
                                           namespace="ml").allocated
            exporter = build_exporter(ExporterOptions(
                address=("127.0.0.1", 0), collect_interval_ms=1000, kubernetes=True,
                pod_resources_socket=path, hostname="node-1",
                sysfs_root=config.flags.sysfs_root))
            exporter.start()
            try:
                assert exporter.server is not None and exporter.refresher is not None
                assert exporter.refresher.wait_for(lambda c: bool(c.attribution.pods), TIMEOUT)
                port, proc = prometheus(f"127.0.0.1:{exporter.server.port}")

                def scraped() -> Any:
                    targets = api(port, "targets")["activeTargets"]
                    return targets and targets[0]["health"] == "up" and targets

                (target,) = wait_until(scraped, "a successful scrape", proc)
                assert target["lastError"] == ""
                util = wait_until(lambda: api(port, "query", query="DCGM_FI_DEV_GPU_UTIL")
                                  ["result"], "DCGM_FI_DEV_GPU_UTIL", proc)
                power = api(port, "query", query="DCGM_FI_DEV_POWER_USAGE")["result"]
                energy = api(port, "query",
                             query="DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION")["result"]
                pods = api(port, "query", query='DCGM_FI_DEV_GPU_TEMP{pod="trainer"}')["result"]
            finally:
                exporter.stop()
    assert len(util) == len(power) == len(energy) == 8
    assert {series["metric"]["gpu"] for series in util} == {str(n) for n in range(8)}
    assert all(series["metric"]["Hostname"] == "node-1" for series in util)
    (mine,) = pods
    assert mine["metric"]["UUID"] == held and mine["metric"]["namespace"] == "ml"
    assert mine["metric"]["container"] == "main"
    assert float(mine["value"][1]) > 0
    others = [s for s in util if s["metric"]["UUID"] != held]
    assert others and all("pod" not in s["metric"] for s in others)

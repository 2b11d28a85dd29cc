"""``make run``: the demo prints the advertised GPUs, an allocation, the GFD labels and where
the metrics exporter serves."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POD_LABELS = {"pod": "demo-pod", "namespace": "default", "container": "main"}


def run_demo(*args: str) -> str:
    """Run the demo with ``args``; assert it exited 0 and return what it printed."""
    result = subprocess.run(
        [sys.executable, "-m", "demo", *args],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": REPO},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_demo_runs_and_exits() -> None:
    out = run_demo("--exit-after", "2")
    assert "[ListAndWatch] nvidia.com/gpu: 8 devices, 8 healthy" in out
    assert "[GetPreferredAllocation] nvidia.com/gpu: GPU-" in out
    assert "[Allocate] nvidia.com/gpu: GPU-" in out
    assert "env NVIDIA_VISIBLE_DEVICES=GPU-" in out
    assert "nvidia.com/gpu.count=8" in out
    assert "nvidia.com/gpu.product=NVIDIA-A100-SXM4-40GB" in out
    assert "[demo] allocated to pod default/demo-pod, container main" in out
    assert re.search(r"^\[exporter\] .*curl http://127\.0\.0\.1:\d+/metrics$", out, re.M), out
    sample = [line for line in out.splitlines() if line.startswith("    DCGM_FI_DEV_GPU_UTIL{")]
    assert len(sample) == 2 and all('pod="demo-pod"' in line for line in sample), out
    assert "[demo] stopping" in out


def test_demo_mig_with_device_specs() -> None:
    out = run_demo("--profile", "a100-mig-1g", "--mig-strategy", "mixed", "--pass-device-specs",
                   "--allocate", "1", "--exit-after", "0")
    assert "[ListAndWatch] nvidia.com/mig-1g.5gb: 56 devices, 56 healthy" in out
    assert "[Allocate] nvidia.com/mig-1g.5gb: MIG-" in out
    assert "/driver/dev/nvidia0 -> /dev/nvidia0 (rw)" in out
    assert out.count("-> /dev/nvidia-caps/nvidia-cap") == 2


def test_demo_labels_the_profiles_machine() -> None:
    out = run_demo("--profile", "t4", "--allocate", "1", "--exit-after", "0")
    assert "nvidia.com/gpu.machine=g4dn.12xlarge-simulated" in out
    assert "DGX-A100" not in out


def test_machine_type_comes_from_the_profile() -> None:
    from demo.node import machine_type
    from gpus.fake import load_profile

    assert machine_type(load_profile("dgx-a100")) == "DGX-A100-simulated"
    assert machine_type(load_profile("a100-mig-1g")) == "DGX-A100-simulated"  # via extends
    assert machine_type(load_profile("dgx-h100")) == "DGX-H100-simulated"
    assert machine_type(load_profile("hetero")) == "hetero-simulated"  # no machine: the name
    assert machine_type(None) == "unknown"


def test_demo_in_cdi_mode_writes_a_fake_driver_root_and_a_complete_spec() -> None:
    out = run_demo("--profile", "t4", "--device-list-strategy", "cdi-cri", "--allocate", "1",
                   "--exit-after", "0")
    assert "cdi k8s.device-plugin.nvidia.com/gpu=GPU-" in out
    assert "env NVIDIA_VISIBLE_DEVICES" not in out
    (line,) = [line for line in out.splitlines() if line.startswith("[demo] CDI spec ")]
    assert "/driver" not in line.split(":")[0]  # the spec lives in the work dir's cdi/
    assert "4 devices" in line and " 6 hooks" in line
    mounts = int(line.split(" mounts")[0].rsplit(" ", 1)[1])
    assert mounts >= 30  # the fake root's libraries, binaries, firmware, configs


def test_demo_exporter_serves_the_allocated_gpus_with_the_pods_labels() -> None:
    # The demo runs until the test has scraped it (SIGTERM); --exit-after only bounds a hang.
    demo = subprocess.Popen(
        [sys.executable, "-m", "demo", "--exit-after", "60"], cwd=REPO,
        env={**os.environ, "PYTHONPATH": REPO}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    try:
        assert demo.stdout is not None
        lines = []
        for line in demo.stdout:  # up to the line printed once everything serves
            lines.append(line)
            if line.startswith("[demo] serving"):
                break
        out = "".join(lines)
        allocated = re.search(r"^\[Allocate\] nvidia\.com/gpu: (.+)$", out, re.M)
        url = re.search(r" curl (http://\S+/metrics)$", out, re.M)
        assert allocated is not None and url is not None, out
        with urllib.request.urlopen(url.group(1), timeout=30) as response:
            text = response.read().decode("utf-8")
    finally:
        demo.send_signal(signal.SIGTERM)
        rest, err = demo.communicate(timeout=60)
    # The exporter stops before the plugin uninstalls the fake NVML both read: in the other
    # order its NVML shutdown fails (a traceback, exit 1) and its XID wait warns.
    assert demo.returncode == 0, err
    assert "NVML_ERROR_UNINITIALIZED" not in err, err
    assert "[demo] stopping" in rest
    util = {s.labels["UUID"]: s.labels for f in text_string_to_metric_families(text)
            if f.name == "DCGM_FI_DEV_GPU_UTIL" for s in f.samples}
    held = allocated.group(1).split(", ")
    assert len(util) == 8 and len(held) == 2
    for uuid, labels in util.items():
        pod = {k: labels[k] for k in POD_LABELS if k in labels}
        assert pod == (POD_LABELS if uuid in held else {}), (uuid, labels)


def test_an_empty_metrics_address_leaves_the_exporter_out() -> None:
    out = run_demo("--metrics-address", "", "--allocate", "1", "--exit-after", "0")
    assert "[Allocate] nvidia.com/gpu: GPU-" in out
    assert "[exporter]" not in out and "curl" not in out and "DCGM_" not in out


def test_a_busy_metrics_address_fails_with_one_line() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "demo", "--metrics-address", f"127.0.0.1:{port}",
             "--exit-after", "0"],
            cwd=REPO, env={**os.environ, "PYTHONPATH": REPO}, capture_output=True, text=True,
            timeout=60)
    assert result.returncode == 1, result.stderr
    assert f"[demo] the metrics exporter cannot listen on 127.0.0.1:{port}: " in result.stdout
    assert "Traceback" not in result.stderr


def test_a_malformed_metrics_address_is_a_usage_error() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "demo", "--metrics-address", "9400x", "--exit-after", "0"],
        cwd=REPO, env={**os.environ, "PYTHONPATH": REPO}, capture_output=True, text=True,
        timeout=60)
    assert result.returncode == 2
    assert "--metrics-address" in result.stderr and "[host]:port" in result.stderr


def test_metrics_url_and_sample() -> None:
    from demo.node import metrics_sample, metrics_url

    assert metrics_url(("", 9400)) == "http://127.0.0.1:9400/metrics"
    assert metrics_url(("0.0.0.0", 1)) == "http://127.0.0.1:1/metrics"
    assert metrics_url(("::", 2)) == "http://[::1]:2/metrics"
    assert metrics_url(("fe80::1", 3)) == "http://[fe80::1]:3/metrics"
    assert metrics_url(("localhost", 4)) == "http://localhost:4/metrics"
    page = "\n".join([
        "# TYPE DCGM_FI_DEV_GPU_UTIL gauge",
        'DCGM_FI_DEV_GPU_UTIL{gpu="0"} 5',
        'DCGM_FI_DEV_GPU_UTIL{gpu="1",pod="p"} 6',
        'DCGM_FI_DEV_FB_USED{gpu="1",pod="p"} 7',
    ])
    assert metrics_sample(page) == ['DCGM_FI_DEV_GPU_UTIL{gpu="1",pod="p"} 6']
    mig = 'DCGM_FI_DEV_FB_USED{gpu="0",GPU_I_ID="7",pod="p"} 1'
    assert metrics_sample(f'DCGM_FI_DEV_FB_USED{{gpu="1"}} 2\n{mig}') == [mig]
    assert metrics_sample(page.replace(',pod="p"', ""), limit=1) == [
        'DCGM_FI_DEV_GPU_UTIL{gpu="0"} 5']
    assert metrics_sample('DCGM_FI_DEV_FB_USED{gpu="0"} 2') == ['DCGM_FI_DEV_FB_USED{gpu="0"} 2']

"""GFD: SIGHUP keeps the settings that came from environment variables (issue 10).

GFD resolves flags, environment and config file at start and again on SIGHUP. The reload is
checked in a real GFD process: settings come from its environment (the config file sets other
values for some, so the environment must still win), then the file changes and SIGHUP
relabels; the new labels must show the file's change and every env-derived setting.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from test_gfd_main import Spawned

from gfd.output import parse_features

N = "nvidia.com/"
# Every variable GFD's configuration reads; cleared so the runner's environment cannot leak in.
GFD_ENV = (
    "GFD_MIG_STRATEGY", "MIG_STRATEGY", "GFD_FAIL_ON_INIT_ERROR", "FAIL_ON_INIT_ERROR",
    "NVIDIA_DRIVER_ROOT", "NVIDIA_DEV_ROOT", "NVML_BACKEND", "SYSFS_ROOT", "GFD_ONESHOT",
    "GFD_NO_TIMESTAMP", "GFD_SLEEP_INTERVAL", "GFD_OUTPUT_FILE", "GFD_MACHINE_TYPE_FILE",
    "GFD_CONFIG_FILE", "CONFIG_FILE",
)
FILE = "version: v1\nflags:\n  migStrategy: mixed\n  gfd:\n    noTimestamp: false\n"
SHARING = ("sharing:\n  timeSlicing:\n    resources:\n"
           "    - name: nvidia.com/gpu\n      replicas: 3\n")


@pytest.mark.parametrize("mig_variable", ["GFD_MIG_STRATEGY", "MIG_STRATEGY"])
def test_sighup_keeps_gfd_settings_from_the_environment(
        tmp_path: Path, sysfs_root: Callable[..., str], monkeypatch: pytest.MonkeyPatch,
        mig_variable: str) -> None:
    for name in GFD_ENV:
        monkeypatch.delenv(name, raising=False)
    machine_file = tmp_path / "product_name"
    machine_file.write_text("Env Machine 1\n")
    config = tmp_path / "config.yaml"
    config.write_text(FILE)
    out = tmp_path / "features.d" / "gfd"
    # The settings under test, from the environment only (the spawned process inherits it).
    monkeypatch.setenv(mig_variable, "single")  # the file says mixed
    monkeypatch.setenv("GFD_NO_TIMESTAMP", "true")  # the file says false
    monkeypatch.setenv("GFD_MACHINE_TYPE_FILE", str(machine_file))
    gfd = Spawned([sys.executable, "-m", "gfd", "--nvml", "fake:dgx-a100",
                   "--sysfs-root", sysfs_root("dgx-a100"), "--health-file",
                   str(tmp_path / "health"), "-o", str(out), "--config-file", str(config)])
    try:
        gfd.wait_for_line("wrote")
        expected = {N + "mig.strategy": "single", N + "gpu.machine": "Env-Machine-1"}
        labels = parse_features(out.read_text())
        assert {k: labels.get(k) for k in expected} == expected
        assert N + "gfd.timestamp" not in labels
        assert labels[N + "gpu.replicas"] == "1"
        # A file change the reload must pick up, so that the pass after it writes new labels.
        config.write_text(FILE + SHARING)
        gfd.proc.send_signal(signal.SIGHUP)
        gfd.wait_for_line("SIGHUP: reloading")
        gfd.wait_for_line("wrote")
        labels = parse_features(out.read_text())
        assert labels[N + "gpu.replicas"] == "3"
        assert {k: labels.get(k) for k in expected} == expected
        assert N + "gfd.timestamp" not in labels
        gfd.proc.send_signal(signal.SIGTERM)
        assert gfd.proc.wait(timeout=10) == 0
    finally:
        gfd.close()

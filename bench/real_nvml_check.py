"""Check the real-NVML path on a GPU node: reader, device plugin, GFD; read-only.

Run on a machine with an NVIDIA driver: ``python bench/real_nvml_check.py [--out DIR]``.
It never changes GPU settings or MIG mode. It compares our Snapshot with ``nvidia-smi``, runs
the device plugin (``--nvml real``) against the mock kubelet in a temp dir, allocates one
device through GetPreferredAllocation + Allocate, runs GFD once into a features file, and
prints what it saw plus timings. Exit status 0 only if every check passed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from deviceplugin.mockkubelet import MockKubelet  # noqa: E402
from gpus.backend import select_backend  # noqa: E402
from gpus.config import Config, MigStrategy  # noqa: E402
from gpus.nvml import Nvml  # noqa: E402
from gpus.resources import build_resource_map  # noqa: E402


class Checks:
    """Collects named pass/fail results and prints them as they come."""

    def __init__(self) -> None:
        self.failed: list[str] = []

    def check(self, name: str, ok: bool, detail: str = "") -> None:
        """Record and print one check."""
        print(f"[{'ok' if ok else 'FAIL'}] {name}{': ' + detail if detail else ''}", flush=True)
        if not ok:
            self.failed.append(name)


def child_env() -> dict[str, str]:
    """The environment for the daemons: this checkout first, then whatever PYTHONPATH held."""
    paths = [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(paths))


def nvidia_smi() -> list[dict[str, str]]:
    """What nvidia-smi reports per GPU (empty when it is not installed)."""
    if shutil.which("nvidia-smi") is None:
        return []
    fields = "index,uuid,name,memory.total,pci.bus_id,compute_cap,driver_version"
    out = subprocess.run(
        ["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader,nounits"],
        capture_output=True, text=True, check=True,
    ).stdout
    keys = fields.split(",")
    return [dict(zip(keys, (v.strip() for v in line.split(",")), strict=True))
            for line in out.strip().splitlines()]


def check_reader(checks: Checks, backend: str) -> None:
    """Read the Snapshot through NVML and compare it with nvidia-smi."""
    select_backend(backend)
    start = time.perf_counter()
    with Nvml() as nvml:
        snapshot = nvml.read_snapshot()
    elapsed = (time.perf_counter() - start) * 1000
    print(f"snapshot read in {elapsed:.1f} ms: driver {snapshot.system.driver_version}, "
          f"CUDA {snapshot.system.cuda_driver_version}")
    for gpu in snapshot.gpus:
        print(f"  GPU {gpu.index} {gpu.uuid} {gpu.name} {gpu.memory_bytes >> 20} MiB "
              f"cc {gpu.compute_capability} {gpu.architecture} bus {gpu.pci_bus_id} "
              f"class {gpu.pci_class} numa {gpu.numa_node} mig {gpu.mig_capable}/"
              f"{gpu.mig_enabled} ({len(gpu.mig_devices)} MIG devices)")
    checks.check("at least one GPU", len(snapshot.gpus) > 0)
    smi = {row["uuid"]: row for row in nvidia_smi()}
    for gpu in snapshot.gpus:
        row = smi.get(gpu.uuid)
        if row is None:
            checks.check(f"GPU {gpu.index} known to nvidia-smi", not smi, "nvidia-smi absent")
            continue
        checks.check(f"GPU {gpu.index} name", row["name"] == gpu.name, row["name"])
        checks.check(f"GPU {gpu.index} memory MiB",
                     int(row["memory.total"]) == gpu.memory_bytes >> 20, row["memory.total"])
        checks.check(f"GPU {gpu.index} bus id",
                     row["pci.bus_id"].lower() == gpu.pci_bus_id.lower(), row["pci.bus_id"])
        checks.check(f"GPU {gpu.index} compute capability",
                     row["compute_cap"] == "{}.{}".format(*gpu.compute_capability),
                     row["compute_cap"])
        checks.check("driver version", row["driver_version"] == snapshot.system.driver_version)
    for strategy in MigStrategy:
        config = Config()
        config = type(config)(flags=type(config.flags)(mig_strategy=strategy))
        rmap = build_resource_map(snapshot, config)
        summary = {name: len(res.devices) for name, res in rmap.resources.items()}
        print(f"  resources under mig-strategy={strategy}: {summary} problems={rmap.problems}")


def check_plugin(checks: Checks, workdir: str, backend: str) -> None:
    """Run the device plugin on real NVML against the mock kubelet; allocate one device."""
    kubelet = MockKubelet(workdir)
    kubelet.start()
    env = child_env()
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "deviceplugin.main", "--nvml", backend,
         "--kubelet-socket", kubelet.socket_path, "--ready-file", "",
         "--cdi-spec-dir", os.path.join(workdir, "cdi")],
        env=env, cwd=str(ROOT),
    )
    try:
        registered = kubelet.wait_for_registration("nvidia.com/gpu", timeout=20)
        elapsed = (time.perf_counter() - start) * 1000
        checks.check("plugin registered nvidia.com/gpu", registered, f"{elapsed:.0f} ms")
        if not registered:
            return
        ok = kubelet.wait_for_devices("nvidia.com/gpu", lambda ds: len(ds) > 0, timeout=10)
        devices = kubelet.devices("nvidia.com/gpu")
        for dev in devices:
            print(f"  ListAndWatch: {dev.id} {dev.health} numa={dev.numa_nodes}")
        checks.check("devices listed and healthy",
                     bool(ok) and all(d.health == "Healthy" for d in devices))
        outcome = kubelet.allocate("nvidia.com/gpu", 1)
        envs = dict(outcome.response.envs)
        print(f"  preferred {outcome.preferred}, allocated {outcome.allocated}, envs {envs}")
        checks.check("Allocate hands out the real UUID",
                     envs.get("NVIDIA_VISIBLE_DEVICES") == outcome.allocated[0])
    finally:
        proc.terminate()
        code = proc.wait(timeout=15)
        checks.check("plugin exits 0 on SIGTERM", code == 0, f"exit {code}")
        kubelet.stop()


def check_gfd(checks: Checks, out_dir: Path, backend: str) -> None:
    """Run GFD once on real NVML into a features file and show the labels."""
    features = out_dir / "gfd-features"
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "gfd", "--nvml", backend, "--oneshot", "--no-timestamp",
         "--output-file", str(features), "--health-file", ""],
        env=child_env(), cwd=str(ROOT),
        capture_output=True, text=True, timeout=60, check=False,
    )
    elapsed = (time.perf_counter() - start) * 1000
    checks.check("GFD oneshot exits 0", result.returncode == 0,
                 f"{elapsed:.0f} ms {result.stderr.strip()[-300:]}")
    if features.exists():
        text = features.read_text()
        print(text)
        checks.check("GFD wrote gpu.product", "nvidia.com/gpu.product=" in text)


def main() -> int:
    """Run every check; exit non-zero if any failed."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nvml", default="real", help="real, or fake:<profile> to try it here")
    parser.add_argument("--out", default=os.environ.get("OUT", tempfile.gettempdir()))
    args = parser.parse_args()
    checks = Checks()
    check_reader(checks, args.nvml)
    workdir = tempfile.mkdtemp(prefix="nvk", dir="/tmp")
    try:
        check_plugin(checks, workdir, args.nvml)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    check_gfd(checks, Path(args.out), args.nvml)
    print(f"{len(checks.failed)} failed: {checks.failed}" if checks.failed else "all checks passed")
    return 1 if checks.failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""The collector over the real mock kubelet and the fake NVML: pods on their devices' series."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import grpc
from test_plugin_mig_e2e import TIMEOUT, Env, mig_config
from test_plugin_sharing_e2e import shared
from test_podresources import pod_resources_env
from test_server_support import short_tmpdir

from deviceplugin.mockkubelet import PodResourcesFault
from exporter.attribution import AttributionRefresher, PodResourcesClient, resolver_from_snapshot
from exporter.collector import ExporterCollector, Sampler
from exporter.fields import DEFAULT_COLLECTORS
from exporter.http import generate_text
from exporter.pods import PidMapper
from exporter.series import SeriesOptions
from gpus.config import Config, ReplicatedResource
from gpus.fake import FakeNvml, FakeProcess
from gpus.telemetry import TelemetryReader

GPU_RES = "nvidia.com/gpu"
SHARED = "nvidia.com/gpu.shared"
_LINE = re.compile(r"^(\w+)\{(.*)\} (\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
# One sample line of the text format: (name, labels, value).
Sample = tuple[str, dict[str, str], float]


def parse(text: str) -> list[Sample]:
    """(name, labels, value) of every sample line with labels."""
    found = []
    for line in text.splitlines():
        match = _LINE.match(line)
        if match:
            found.append((match.group(1), dict(_LABEL.findall(match.group(2))),
                          float(match.group(3))))
    return found


class Scraper:
    """A collector on the env's fake and kubelet, with fake /proc and container logs."""

    def __init__(self, env: Env, path: str, root: Path) -> None:
        self.env = env
        self.proc, self.logs = root / "proc", root / "containers"
        self.proc.mkdir()
        self.logs.mkdir()
        snap = env.plugin.snapshot
        assert snap is not None
        self.reader = TelemetryReader()
        self.sampler = Sampler(snap, self.reader, 60.0, PidMapper(str(self.proc), str(self.logs)))
        self.client = PodResourcesClient(path, timeout_s=TIMEOUT)
        self.refresher = AttributionRefresher(self.client.list, resolver_from_snapshot(snap))
        self.collector = ExporterCollector(self.sampler, DEFAULT_COLLECTORS,
                                           SeriesOptions("node-1"), self.refresher)

    def run_process(self, device: str, pid: int, pod: str, used_mib: int, sm: int,
                    namespace: str = "default", container: str = "main") -> None:
        cid = f"{pid:064x}"
        uid = f"{pid:08x}-0000-0000-0000-000000000000"
        (self.proc / str(pid)).mkdir()
        (self.proc / str(pid) / "cgroup").write_text(
            f"0::/kubepods.slice/kubepods-pod{uid.replace('-', '_')}.slice/"
            f"cri-containerd-{cid}.scope\n")
        (self.logs / f"{pod}_{namespace}_{container}-{cid}.log").touch()
        controller = self.controller()
        current = controller._state.telemetry.processes.get(device, [])
        controller.set_processes(device, [*current, FakeProcess(pid, used_mib, sm)])

    def controller(self) -> FakeNvml:
        """The fake NVML beneath the env's plugin."""
        controller = self.env.plugin.controller
        assert controller is not None
        return controller

    def scrape(self) -> list[Sample]:
        self.refresher.refresh_now()
        self.sampler.sample_now()
        return parse(generate_text(self.collector, self.collector.formats).decode())

    def close(self) -> None:
        self.client.close()
        self.reader.close()


@contextmanager
def scraper(config_for: Callable[[str], Config], tmp_path: Path) -> Iterator[Scraper]:
    with short_tmpdir() as directory, pod_resources_env(config_for(directory),
                                                         directory) as (env, path):
        s = Scraper(env, path, tmp_path)
        try:
            yield s
        finally:
            s.close()


def series(samples: Sequence[Sample], name: str,
           **labels: str) -> list[tuple[dict[str, str], float]]:
    return [(lab, v) for n, lab, v in samples
            if n == name and all(lab.get(k) == want for k, want in labels.items())]


def test_whole_gpu_pod_on_its_gpus_series(tmp_path: Path) -> None:
    with scraper(lambda d: mig_config(d, "dgx-a100", "none"), tmp_path) as s:
        (held,) = s.env.kubelet.allocate(GPU_RES, 1, pod="train", namespace="ml").allocated
        samples = s.scrape()
    mine = series(samples, "DCGM_FI_DEV_GPU_TEMP", UUID=held)
    assert len(mine) == 1
    labels = mine[0][0]
    assert (labels["namespace"], labels["pod"], labels["container"]) == ("ml", "train", "main")
    assert "shared" not in labels
    others = [lab for lab, _ in series(samples, "DCGM_FI_DEV_GPU_TEMP") if lab["UUID"] != held]
    assert len(others) == 7 and all("pod" not in lab for lab in others)


def test_mig_pod_on_its_instance_series(tmp_path: Path) -> None:
    with scraper(lambda d: mig_config(d, "a100-mig-mixed", "mixed"), tmp_path) as s:
        resource = next(r for r in s.env.kubelet.resources() if r.startswith("nvidia.com/mig-"))
        (mig_id,) = s.env.kubelet.allocate(resource, 1, pod="m", namespace="ns").allocated
        snap = s.env.plugin.snapshot
        assert snap is not None
        mig = next(m for g in snap.gpus for m in g.mig_devices
                   if m.uuid == mig_id)
        samples = s.scrape()
    used = series(samples, "DCGM_FI_DEV_FB_USED", pod="m")
    assert len(used) == 1
    labels = used[0][0]
    assert labels["UUID"] == mig.parent_uuid and labels["GPU_I_ID"] == str(mig.gpu_instance_id)
    assert labels["GPU_I_PROFILE"] == mig.profile


def _shared_config(directory: str) -> Config:
    return shared(mig_config(directory, "dgx-a100", "none"), ReplicatedResource(GPU_RES, 4),
                  rename_by_default=True)


def test_time_sliced_pods_each_get_their_own_series(tmp_path: Path) -> None:
    with scraper(_shared_config, tmp_path) as s:
        held = {n: s.env.kubelet.allocate(SHARED, 1, pod=f"pod-{n}").allocated[0]
                for n in range(10)}  # ten pods on eight GPUs: some GPUs are shared
        by_gpu: dict[str, list[int]] = {}
        for n, device_id in held.items():
            by_gpu.setdefault(device_id.split("::")[0], []).append(n)
        gpu, sharers = next((g, ns) for g, ns in by_gpu.items() if len(ns) > 1)
        for k, n in enumerate(sharers):
            s.run_process(gpu, 1000 + n, f"pod-{n}", used_mib=100 * (k + 1), sm=10 * (k + 1))
        samples = s.scrape()
    for n, device_id in held.items():
        temps = series(samples, "DCGM_FI_DEV_GPU_TEMP", pod=f"pod-{n}")
        assert [lab["UUID"] for lab, _ in temps] == [device_id.split("::")[0]], n
    used = {lab["pod"]: (v, lab.get("shared"))
            for lab, v in series(samples, "DCGM_FI_DEV_FB_USED", UUID=gpu)}
    assert used == {f"pod-{n}": (100.0 * (k + 1), None) for k, n in enumerate(sharers)}
    util = {lab["pod"]: v for lab, v in series(samples, "DCGM_FI_DEV_GPU_UTIL", UUID=gpu)}
    assert util == {f"pod-{n}": 10.0 * (k + 1) for k, n in enumerate(sharers)}
    temps = series(samples, "DCGM_FI_DEV_GPU_TEMP", UUID=gpu)
    assert len(temps) == len(sharers) and all(lab["shared"] == "true" for lab, _ in temps)


def test_a_failing_kubelet_keeps_series_flowing_and_is_counted(tmp_path: Path) -> None:
    with scraper(lambda d: mig_config(d, "dgx-a100", "none"), tmp_path) as s:
        s.env.kubelet.allocate(GPU_RES, 1, pod="train")
        assert any("pod" in lab for _, lab, _ in s.scrape())
        s.env.kubelet.set_pod_resources_fault(PodResourcesFault(error=grpc.StatusCode.INTERNAL))
        samples = s.scrape()
        text = generate_text(s.collector, s.collector.formats).decode()
    assert any(lab.get("pod") == "train" for _, lab, _ in samples)  # the last good mapping
    assert 'gpu_exporter_podresources_failures_total{kind="error:INTERNAL"} 1.0' in text
    assert "gpu_exporter_pod_mapping_stale 1.0" in text
    assert "gpu_exporter_pod_mapping_age_seconds " in text


def test_scrapes_never_read_nvml(tmp_path: Path) -> None:
    with scraper(lambda d: mig_config(d, "dgx-a100", "none"), tmp_path) as s:
        s.scrape()
        reading = s.sampler.latest()
        controller = s.controller()
        controller.fail("nvmlDeviceGetTemperature", "NVML_ERROR_UNKNOWN")  # NVML now "broken"
        texts: list[str] = []
        threads = [threading.Thread(target=lambda: texts.append(
            generate_text(s.collector, s.collector.formats).decode())) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT)
        controller.clear_faults()
    assert s.sampler.latest() is reading and len(texts) == 6
    assert all(len(series(parse(t), "DCGM_FI_DEV_GPU_TEMP")) == 8 for t in texts)


def test_a_new_mapping_shows_without_a_new_sample(tmp_path: Path) -> None:
    with scraper(lambda d: mig_config(d, "dgx-a100", "none"), tmp_path) as s:
        assert not any("pod" in lab for _, lab, _ in s.scrape())
        s.env.kubelet.allocate(GPU_RES, 1, pod="late")
        s.refresher.refresh_now()  # same NVML reading, new pod mapping
        text = generate_text(s.collector, s.collector.formats).decode()
    assert any(lab.get("pod") == "late" for _, lab, _ in parse(text))

"""GFD labels on every machine profile, read through the fake NVML beneath pynvml."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest

from gfd.labels import is_valid_label_value, label_problems, node_labels
from gpus.config import Config, Flags, MigStrategy, ReplicatedResource, Sharing, TimeSlicing
from gpus.model import Snapshot

N = "nvidia.com/"
Reader = Callable[..., Snapshot]
_KEY_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")


def cfg(strategy: str = "none", *shared: ReplicatedResource) -> Config:
    return Config(flags=Flags(mig_strategy=MigStrategy(strategy)),
                  sharing=Sharing(time_slicing=TimeSlicing(resources=shared)))


def assert_valid(labels: dict[str, str]) -> None:
    """Every key and value is acceptable to the Kubernetes API server."""
    for key, value in labels.items():
        prefix, _, name = key.partition("/")
        assert prefix == "nvidia.com", key
        assert len(name) <= 63 and _KEY_NAME.fullmatch(name), key
        assert is_valid_label_value(value), (key, value)


def common(labels: dict[str, str]) -> None:
    assert labels[N + "cuda.driver-version.full"] == "535.129.03"
    assert labels[N + "cuda.driver.rev"] == "03"
    assert labels[N + "cuda.runtime-version.full"] == "12.2"
    assert labels[N + "mps.capable"] == "false"
    assert labels[N + "gfd.timestamp"] == "1700000000"
    assert labels[N + "gpu.machine"] == "DGX-A100"


def label(snapshot: Snapshot, config: Config) -> dict[str, str]:
    labels = node_labels(snapshot, config, machine="DGX A100", timestamp=1700000000)
    assert_valid(labels)
    return labels


def test_dgx_a100(fake_snapshot: Reader) -> None:
    labels = label(fake_snapshot("dgx-a100"), cfg())
    common(labels)
    assert {k: labels[N + k] for k in (
        "gpu.product", "gpu.count", "gpu.replicas", "gpu.sharing-strategy", "gpu.memory",
        "gpu.family", "gpu.compute.major", "gpu.compute.minor", "gpu.mode", "mig.capable")} == {
        "gpu.product": "NVIDIA-A100-SXM4-40GB", "gpu.count": "8", "gpu.replicas": "1",
        "gpu.sharing-strategy": "none", "gpu.memory": "40960", "gpu.family": "ampere",
        "gpu.compute.major": "8", "gpu.compute.minor": "0", "gpu.mode": "compute",
        "mig.capable": "true"}
    assert N + "mig.strategy" not in labels
    assert not any(k.startswith(N + "mig-") for k in labels)


def test_dgx_a100_time_slicing(fake_snapshot: Reader) -> None:
    labels = label(fake_snapshot("dgx-a100"),
                   cfg("none", ReplicatedResource(name="nvidia.com/gpu", replicas=4)))
    assert labels[N + "gpu.product"] == "NVIDIA-A100-SXM4-40GB-SHARED"
    assert labels[N + "gpu.replicas"] == "4"
    assert labels[N + "gpu.sharing-strategy"] == "time-slicing"
    assert labels[N + "gpu.count"] == "8"


def test_dgx_a100_mig_single_is_invalid(fake_snapshot: Reader) -> None:
    snapshot = fake_snapshot("dgx-a100-mig")
    labels = label(snapshot, cfg("single"))
    assert labels[N + "gpu.product"] == "NVIDIA-A100-SXM4-40GB-MIG-INVALID"
    assert (labels[N + "gpu.count"], labels[N + "gpu.replicas"], labels[N + "gpu.memory"]) == \
        ("0", "0", "0")
    assert labels[N + "gpu.sharing-strategy"] == ""  # as NVIDIA: empty, not "none"
    assert labels[N + "mig.strategy"] == "single"
    assert N + "gpu.multiprocessors" not in labels
    assert label_problems(snapshot, cfg("single"))


def test_dgx_a100_mig_mixed(fake_snapshot: Reader) -> None:
    snapshot = fake_snapshot("dgx-a100-mig")
    labels = label(snapshot, cfg("mixed"))
    assert labels[N + "mig.strategy"] == "mixed"
    profiles: dict[str, int] = {}
    for gpu in snapshot.gpus:
        for mig in gpu.mig_devices:
            profiles[mig.profile] = profiles.get(mig.profile, 0) + 1
    for profile, count in profiles.items():
        key = N + "mig-" + profile.replace("+", ".")
        assert labels[key + ".count"] == str(count)
        assert labels[key + ".product"].startswith("NVIDIA-A100-SXM4-40GB-MIG-")
        assert labels[key + ".replicas"] == "1"
    assert labels[N + "mig-1g.5gb.memory"] == "4864"
    assert labels[N + "gpu.count"] == "8"
    assert not label_problems(snapshot, cfg("mixed"))


def test_a100_mig_1g_single(fake_snapshot: Reader) -> None:
    labels = label(fake_snapshot("a100-mig-1g"), cfg("single"))
    assert labels[N + "gpu.product"] == "NVIDIA-A100-SXM4-40GB-MIG-1g.5gb"
    assert labels[N + "gpu.count"] == "56"
    assert labels[N + "gpu.memory"] == "4864"
    assert labels[N + "gpu.replicas"] == "1"
    assert labels[N + "gpu.slices.gi"] == "1"
    assert labels[N + "gpu.multiprocessors"] == "14"
    for engine in ("copy", "decoder", "encoder", "jpeg", "ofa"):
        assert N + f"gpu.engines.{engine}" in labels


def test_dgx_h100(fake_snapshot: Reader) -> None:
    labels = label(fake_snapshot("dgx-h100"), cfg())
    assert labels[N + "gpu.product"] == "NVIDIA-H100-80GB-HBM3"
    assert labels[N + "gpu.family"] == "hopper"
    assert labels[N + "gpu.count"] == "8"


def test_t4(fake_snapshot: Reader) -> None:
    labels = label(fake_snapshot("t4"), cfg())
    assert labels[N + "gpu.family"] == "turing"
    assert labels[N + "mig.capable"] == "false"
    assert (labels[N + "gpu.compute.major"], labels[N + "gpu.compute.minor"]) == ("7", "5")


def test_hetero_is_deterministic(fake_snapshot: Reader) -> None:
    snapshot = fake_snapshot("hetero")
    labels = label(snapshot, cfg())
    # 2 A100 + 2 T4: a tie, so the model of the lowest GPU index (GPU 0, an A100) describes it.
    first = min(snapshot.gpus, key=lambda g: g.index)
    assert labels[N + "gpu.product"] == first.name.replace(" ", "-")
    assert labels[N + "gpu.count"] == "2"
    assert labels[N + "gpu.memory"] == str(first.memory_bytes >> 20)
    for _ in range(3):
        assert label(snapshot, cfg()) == labels


@pytest.mark.parametrize("profile", ["dgx1-v100", "hgx-16", "a100-mig-mixed", "a100-mig-7g",
                                     "a100-mig-me", "a100-mig-empty", "a100-mig-partial",
                                     "h100-mig"])
@pytest.mark.parametrize("strategy", ["none", "single", "mixed"])
def test_every_profile_and_strategy_gives_valid_labels(fake_snapshot: Reader, profile: str,
                                                       strategy: str) -> None:
    labels = label(fake_snapshot(profile), cfg(strategy))
    assert N + "gpu.product" in labels

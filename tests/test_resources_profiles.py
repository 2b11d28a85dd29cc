"""The resource map over the shipped machine profiles, read through the fake NVML.

Skipped while the fake NVML or a profile is not available, so this file never blocks others.
"""

from __future__ import annotations

import functools
from typing import Any

import pytest

from gpus.config import (
    MIG_STRATEGIES,
    Config,
    Flags,
    MigStrategy,
    ReplicatedResource,
    Sharing,
    TimeSlicing,
)
from gpus.model import Snapshot
from gpus.resources import GPU_RESOURCE, build_resource_map, mig_single_problems

try:
    from gpus import fake as _fake
    from gpus import nvml as _nvml

    PROFILES: list[str] = list(_fake.list_profiles())
except ImportError:  # the fake NVML is being written in parallel: skip until it exists
    _fake = _nvml = None  # type: ignore[assignment]
    PROFILES = []


@functools.cache
def snapshot_of(profile: str) -> Snapshot:
    """Read a profile through pynvml with the fake installed beneath it (cached: pure data)."""
    if _fake is None or profile not in PROFILES:
        pytest.skip(f"fake NVML profile {profile!r} not available")
    controller: Any = _fake.install(profile)
    try:
        nvml = _nvml.Nvml()
        nvml.init()
        try:
            return nvml.read_snapshot()
        finally:
            nvml.shutdown()
    finally:
        controller.uninstall()


def resources(profile: str, strategy: str, *shared: ReplicatedResource,
              rename: bool = False) -> dict[str, int]:
    cfg = Config(flags=Flags(mig_strategy=MigStrategy(strategy)),
                 sharing=Sharing(TimeSlicing(rename_by_default=rename, resources=shared)))
    result = build_resource_map(snapshot_of(profile), cfg)
    return {name: len(r.devices) for name, r in result.resources.items()}


def problems(profile: str, strategy: str) -> tuple[str, ...]:
    return build_resource_map(snapshot_of(profile),
                              Config(flags=Flags(mig_strategy=MigStrategy(strategy)))).problems


@pytest.mark.parametrize("strategy", MIG_STRATEGIES)
def test_dgx_a100_is_eight_whole_gpus_under_every_strategy(strategy: str) -> None:
    assert resources("dgx-a100", strategy) == {GPU_RESOURCE: 8}
    assert problems("dgx-a100", strategy) == ()


def test_dgx_a100_time_sliced() -> None:
    shared = ReplicatedResource(GPU_RESOURCE, 4)
    assert resources("dgx-a100", "none", shared) == {GPU_RESOURCE: 32}
    assert resources("dgx-a100", "none", shared, rename=True) == {"nvidia.com/gpu.shared": 32}


def test_a100_mig_1g_single_and_mixed() -> None:
    gpus = len(snapshot_of("a100-mig-1g").gpus)
    assert resources("a100-mig-1g", "single") == {GPU_RESOURCE: 7 * gpus}
    assert resources("a100-mig-1g", "mixed") == {"nvidia.com/mig-1g.5gb": 7 * gpus}
    assert mig_single_problems(snapshot_of("a100-mig-1g")) == ()


def test_a100_mig_mixed_layout() -> None:
    gpus = len(snapshot_of("a100-mig-mixed").gpus)
    assert resources("a100-mig-mixed", "mixed") == {
        "nvidia.com/mig-1g.5gb": gpus, "nvidia.com/mig-2g.10gb": gpus,
        "nvidia.com/mig-3g.20gb": gpus}
    assert resources("a100-mig-mixed", "single") == {}
    assert "needs one MIG profile" in problems("a100-mig-mixed", "single")[0]


def test_a100_mig_7g() -> None:
    gpus = len(snapshot_of("a100-mig-7g").gpus)
    assert resources("a100-mig-7g", "single") == {GPU_RESOURCE: gpus}
    assert resources("a100-mig-7g", "mixed") == {"nvidia.com/mig-7g.40gb": gpus}


def test_a100_mig_me() -> None:
    names = resources("a100-mig-me", "mixed")
    assert any(name.startswith("nvidia.com/mig-") and name.endswith(".me") for name in names)
    assert all("+" not in name for name in names)


def test_a100_mig_empty() -> None:
    gpus = len(snapshot_of("a100-mig-empty").gpus)
    assert resources("a100-mig-empty", "mixed") == {}
    assert len(problems("a100-mig-empty", "mixed")) == gpus
    assert resources("a100-mig-empty", "single") == {}
    assert resources("a100-mig-empty", "none") == {GPU_RESOURCE: gpus}


def test_a100_mig_partial() -> None:
    snapshot = snapshot_of("a100-mig-partial")
    disabled = sum(not gpu.mig_enabled for gpu in snapshot.gpus)
    assert 0 < disabled < len(snapshot.gpus)
    assert resources("a100-mig-partial", "mixed")[GPU_RESOURCE] == disabled
    assert mig_single_problems(snapshot)
    assert any("MIG disabled while" in p for p in problems("a100-mig-partial", "single"))


def test_dgx_a100_mig() -> None:
    snapshot = snapshot_of("dgx-a100-mig")
    mixed = resources("dgx-a100-mig", "mixed")
    assert mixed.get("nvidia.com/mig-1g.5gb", 0) >= 7
    empty = [gpu for gpu in snapshot.gpus if gpu.mig_enabled and not gpu.mig_devices]
    assert empty
    text = "\n".join(problems("dgx-a100-mig", "mixed"))
    assert all(gpu.uuid in text for gpu in empty)
    assert mig_single_problems(snapshot)


def test_h100_mig_single() -> None:
    gpus = len(snapshot_of("h100-mig").gpus)
    assert resources("h100-mig", "single") == {GPU_RESOURCE: 7 * gpus}
    assert resources("h100-mig", "mixed") == {"nvidia.com/mig-1g.10gb": 7 * gpus}


@pytest.mark.parametrize("profile", PROFILES or ["<none>"])
@pytest.mark.parametrize("strategy", MIG_STRATEGIES)
def test_invariants_over_every_profile(profile: str, strategy: str) -> None:
    snapshot = snapshot_of(profile)
    cfg = Config(flags=Flags(mig_strategy=MigStrategy(strategy)),
                 sharing=Sharing(TimeSlicing(rename_by_default=True, resources=(
                     ReplicatedResource(GPU_RESOURCE, 2, devices=1),))))
    result = build_resource_map(snapshot, cfg, unhealthy={snapshot.gpus[0].uuid})
    known = {gpu.uuid for gpu in snapshot.gpus} | {
        mig.uuid for gpu in snapshot.gpus for mig in gpu.mig_devices}
    seen: set[str] = set()
    for resource in result.resources.values():
        assert resource.devices
        keys = [(d.gpu.index, d.mig.index if d.mig else -1, d.replica or 0)
                for d in resource.devices]
        assert keys == sorted(keys)
        for device in resource.devices:
            assert device.uuid in known and device.id not in seen
            seen.add(device.id)
            assert device.healthy == (device.gpu.uuid != snapshot.gpus[0].uuid)
    if strategy == "none":
        total = sum(len(r.devices) for r in result.resources.values())
        assert total == len(snapshot.gpus) + 1  # one GPU shared twice

"""The resource map over hand-built snapshots: MIG strategies, time-slicing, health."""

from __future__ import annotations

import dataclasses

import builders
import pytest

from gpus.config import (
    Config,
    Flags,
    MigStrategy,
    Mps,
    ReplicatedResource,
    Sharing,
    SharingStrategy,
    TimeSlicing,
    parse_config,
)
from gpus.model import GPU, Link, Snapshot, TopologyLevel
from gpus.resources import (
    GPU_RESOURCE,
    HEALTHY,
    UNHEALTHY,
    Resource,
    ResourceMap,
    build_resource_map,
    mig_resource_name,
    mig_single_problems,
    mps_max_clients,
    resource_short_name,
)

GIB = 1 << 30
# profile -> (memory GiB, GI slices, CI slices, multiprocessors)
PROFILES = {
    "1g.5gb": (5, 1, 1, 14),
    "1g.5gb+me": (5, 1, 1, 14),
    "1g.10gb": (10, 1, 1, 14),
    "1g.10gb+me": (10, 1, 1, 14),
    "2g.10gb": (10, 2, 2, 28),
    "3g.20gb": (20, 3, 3, 42),
    "7g.40gb": (40, 7, 7, 98),
}


def gpu_uuid(index: int) -> str:
    return f"GPU-{index:08x}-1111-2222-3333-444444444444"


def mig_uuid(gpu_index: int, mig_index: int) -> str:
    return f"MIG-{gpu_index:08x}-{mig_index:04x}-2222-3333-444444444444"


def make_gpu(index: int, profiles: tuple[str, ...] = (), mig_enabled: bool | None = None,
             numa: int | None = None) -> GPU:
    """An A100-40GB; MIG enabled when it has profiles (or when asked to be, with none)."""
    uuid = gpu_uuid(index)
    migs = (
        builders.mig_device(index, i, uuid=mig_uuid(index, i), parent_uuid=uuid, profile=profile,
                            memory_bytes=PROFILES[profile][0] * GIB,
                            gpu_instance_slices=PROFILES[profile][1],
                            compute_instance_slices=PROFILES[profile][2],
                            multiprocessors=PROFILES[profile][3])
        for i, profile in enumerate(profiles))
    return builders.gpu(index, uuid=uuid, bus=index + 7, pci_class=0x0302,
                        numa_node=(index // 4) if numa is None else numa, mig_capable=True,
                        mig_enabled=mig_enabled, migs=migs)


def make_snapshot(*gpus: GPU) -> Snapshot:
    n = len(gpus)
    links = tuple(tuple(Link(TopologyLevel.INTERNAL if i == j else TopologyLevel.SYSTEM, 12)
                        for j in range(n)) for i in range(n))
    return builders.snapshot(*gpus, links=links)


def dgx_a100() -> Snapshot:
    return make_snapshot(*(make_gpu(i) for i in range(8)))


def all_layout(profiles: tuple[str, ...], count: int = 8) -> Snapshot:
    return make_snapshot(*(make_gpu(i, profiles) for i in range(count)))


SEVEN_1G = ("1g.5gb",) * 7
MIXED_LAYOUT = ("3g.20gb", "2g.10gb", "1g.5gb")


def config(mig: str = "none", *resources: ReplicatedResource, rename_by_default: bool = False,
           fail: bool = False) -> Config:
    # Unconverted: test_unknown_strategy_is_a_programming_error passes a name no MigStrategy has.
    return Config(flags=Flags(mig_strategy=mig),  # type: ignore[arg-type]  # bad input under test
                  sharing=Sharing(TimeSlicing(rename_by_default, fail, tuple(resources))))


def ids(resource_map: ResourceMap, name: str) -> list[str]:
    return [device.id for device in resource_map.resources[name].devices]


# --- helpers -------------------------------------------------------------------------------


def test_short_names() -> None:
    assert resource_short_name("nvidia.com/mig-1g.5gb") == "mig-1g.5gb"
    assert resource_short_name("nvidia.com/gpu") == "gpu"
    assert resource_short_name("gpu") == "gpu"
    assert mig_resource_name("1g.10gb+me") == "nvidia.com/mig-1g.10gb.me"
    assert mig_resource_name("1c.2g.10gb") == "nvidia.com/mig-1c.2g.10gb"


# --- strategy none -------------------------------------------------------------------------


def test_none_dgx_a100_every_gpu_whole_in_index_order() -> None:
    snapshot = make_snapshot(*(make_gpu(i) for i in reversed(range(8))))
    result = build_resource_map(snapshot, config())
    assert list(result.resources) == [GPU_RESOURCE]
    resource = result.resources[GPU_RESOURCE]
    assert [d.id for d in resource.devices] == [gpu_uuid(i) for i in range(8)]
    assert all(d.healthy and d.health == HEALTHY and d.replica is None for d in resource.devices)
    assert [d.numa_node for d in resource.devices] == [0] * 4 + [1] * 4
    assert [d.index for d in resource.devices] == [str(i) for i in range(8)]
    assert not resource.shared and resource.replicas == 1 and not resource.renamed
    assert result.problems == ()


def test_none_ignores_mig_even_when_enabled() -> None:
    snapshot = make_snapshot(make_gpu(0, SEVEN_1G), make_gpu(1, mig_enabled=True), make_gpu(2))
    result = build_resource_map(snapshot, config("none"))
    assert ids(result, GPU_RESOURCE) == [gpu_uuid(0), gpu_uuid(1), gpu_uuid(2)]
    assert result.problems == ()


def test_empty_snapshot_has_no_resources() -> None:
    result = build_resource_map(make_snapshot(), config("mixed"))
    assert result.resources == {} and result.problems == ()


def test_unknown_strategy_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="unknown MIG strategy"):
        build_resource_map(dgx_a100(), config("bogus"))


# --- strategy single -----------------------------------------------------------------------


def test_single_seven_1g_on_every_gpu() -> None:
    result = build_resource_map(all_layout(SEVEN_1G), config("single"))
    assert list(result.resources) == [GPU_RESOURCE]
    devices = result.resources[GPU_RESOURCE].devices
    assert len(devices) == 56
    assert devices[0].id == mig_uuid(0, 0) and devices[-1].id == mig_uuid(7, 6)
    assert devices[8].index == "1:1"
    assert all(d.mig is not None and d.gpu.index == d.mig.parent_index for d in devices)
    assert result.problems == ()
    assert mig_single_problems(all_layout(SEVEN_1G)) == ()


def test_single_7g_whole_gpu_instances() -> None:
    result = build_resource_map(all_layout(("7g.40gb",)), config("single"))
    assert ids(result, GPU_RESOURCE) == [mig_uuid(i, 0) for i in range(8)]
    assert result.problems == ()


def test_single_without_mig_serves_whole_gpus() -> None:
    result = build_resource_map(dgx_a100(), config("single"))
    assert ids(result, GPU_RESOURCE) == [gpu_uuid(i) for i in range(8)]
    assert result.problems == () and mig_single_problems(dgx_a100()) == ()


def test_single_problem_counts_repeated_profiles() -> None:
    snapshot = make_snapshot(make_gpu(0, SEVEN_1G), make_gpu(1, ("7g.40gb",)))
    [problem] = mig_single_problems(snapshot)
    assert f"GPU 0 ({gpu_uuid(0)}): 1g.5gb x7; GPU 1 ({gpu_uuid(1)}): 7g.40gb" in problem


def test_single_several_profiles_serves_nothing_and_names_them() -> None:
    snapshot = all_layout(MIXED_LAYOUT, count=2)
    result = build_resource_map(snapshot, config("single"))
    assert result.resources == {}
    [problem] = result.problems
    assert "needs one MIG profile" in problem
    assert "1g.5gb, 2g.10gb, 3g.20gb" in problem
    assert f"GPU 0 ({gpu_uuid(0)}): 3g.20gb, 2g.10gb, 1g.5gb" in problem
    assert problem.endswith("); nothing is advertised (use mig-strategy mixed, or repartition)")
    assert "nothing is advertised" in problem
    assert mig_single_problems(snapshot) == result.problems


def test_single_enabled_without_instances_is_reported_and_others_served() -> None:
    snapshot = make_snapshot(make_gpu(0, SEVEN_1G), make_gpu(1, mig_enabled=True),
                             make_gpu(2, SEVEN_1G))
    result = build_resource_map(snapshot, config("single"))
    assert len(ids(result, GPU_RESOURCE)) == 14
    assert {d.gpu.index for d in result.resources[GPU_RESOURCE].devices} == {0, 2}
    [problem] = result.problems
    assert f"GPU 1 ({gpu_uuid(1)}) has MIG enabled but no MIG devices" in problem


def test_single_all_enabled_none_with_instances() -> None:
    snapshot = make_snapshot(make_gpu(0, mig_enabled=True), make_gpu(1, mig_enabled=True))
    result = build_resource_map(snapshot, config("single"))
    assert result.resources == {}
    assert len(result.problems) == 2
    assert len(mig_single_problems(snapshot)) == 2


def test_single_mixed_enabled_disabled_serves_the_mig_profile() -> None:
    snapshot = make_snapshot(make_gpu(0, SEVEN_1G), make_gpu(1), make_gpu(2, SEVEN_1G))
    result = build_resource_map(snapshot, config("single"))
    assert {d.gpu.index for d in result.resources[GPU_RESOURCE].devices} == {0, 2}
    assert all(d.mig is not None for d in result.resources[GPU_RESOURCE].devices)
    [problem] = result.problems
    assert f"GPU 1 ({gpu_uuid(1)}) has MIG disabled" in problem
    assert "not advertised" in problem and "1g.5gb" in problem


def test_single_mixed_enabled_disabled_with_no_usable_profile_serves_whole_gpus() -> None:
    snapshot = make_snapshot(make_gpu(0, MIXED_LAYOUT), make_gpu(1), make_gpu(2, mig_enabled=True))
    result = build_resource_map(snapshot, config("single"))
    assert ids(result, GPU_RESOURCE) == [gpu_uuid(1)]
    text = "\n".join(result.problems)
    assert "no MIG devices" in text and "needs one MIG profile" in text
    assert "MIG-disabled GPUs are advertised whole" in text
    assert "no MIG device is advertised, only the MIG-disabled GPUs, whole" in text
    assert len(result.problems) == 3


# --- strategy mixed ------------------------------------------------------------------------


def test_mixed_one_resource_per_profile() -> None:
    result = build_resource_map(all_layout(MIXED_LAYOUT), config("mixed"))
    assert list(result.resources) == ["nvidia.com/mig-1g.5gb", "nvidia.com/mig-2g.10gb",
                                      "nvidia.com/mig-3g.20gb"]
    assert ids(result, "nvidia.com/mig-3g.20gb") == [mig_uuid(i, 0) for i in range(8)]
    assert ids(result, "nvidia.com/mig-1g.5gb") == [mig_uuid(i, 2) for i in range(8)]
    assert result.problems == ()


def test_mixed_me_profile_name() -> None:
    snapshot = make_snapshot(make_gpu(0, ("1g.10gb+me", "1g.10gb")))
    result = build_resource_map(snapshot, config("mixed"))
    assert list(result.resources) == ["nvidia.com/mig-1g.10gb", "nvidia.com/mig-1g.10gb.me"]
    assert ids(result, "nvidia.com/mig-1g.10gb.me") == [mig_uuid(0, 0)]


def test_mixed_enabled_and_disabled_and_empty() -> None:
    snapshot = make_snapshot(make_gpu(0, SEVEN_1G), make_gpu(1), make_gpu(2, mig_enabled=True),
                             make_gpu(3, ("7g.40gb",)))
    result = build_resource_map(snapshot, config("mixed"))
    assert ids(result, GPU_RESOURCE) == [gpu_uuid(1)]
    assert len(ids(result, "nvidia.com/mig-1g.5gb")) == 7
    assert ids(result, "nvidia.com/mig-7g.40gb") == [mig_uuid(3, 0)]
    [problem] = result.problems
    assert "mig-strategy mixed" in problem and f"GPU 2 ({gpu_uuid(2)})" in problem


# --- time-slicing --------------------------------------------------------------------------


def test_time_slicing_replicas_keep_the_name() -> None:
    result = build_resource_map(dgx_a100(), config("none", ReplicatedResource(GPU_RESOURCE, 4)))
    resource = result.resources[GPU_RESOURCE]
    assert resource.shared and resource.replicas == 4 and not resource.renamed
    assert len(resource.devices) == 32
    assert [d.id for d in resource.devices[:5]] == [
        f"{gpu_uuid(0)}::0", f"{gpu_uuid(0)}::1", f"{gpu_uuid(0)}::2", f"{gpu_uuid(0)}::3",
        f"{gpu_uuid(1)}::0"]
    assert [d.replica for d in resource.devices[:5]] == [0, 1, 2, 3, 0]
    assert all(d.uuid == d.gpu.uuid for d in resource.devices)
    assert not resource.fail_requests_greater_than_one
    assert result.problems == ()


def test_rename_by_default_and_fail_requests() -> None:
    cfg = config("none", ReplicatedResource(GPU_RESOURCE, 2), rename_by_default=True, fail=True)
    result = build_resource_map(dgx_a100(), cfg)
    assert list(result.resources) == ["nvidia.com/gpu.shared"]
    resource = result.resources["nvidia.com/gpu.shared"]
    assert resource.renamed and resource.unshared_name == GPU_RESOURCE
    assert resource.fail_requests_greater_than_one and len(resource.devices) == 16


def test_explicit_rename_wins_over_rename_by_default() -> None:
    cfg = config("none", ReplicatedResource(GPU_RESOURCE, 2, rename="nvidia.com/gpu-ts"),
                 rename_by_default=True)
    result = build_resource_map(dgx_a100(), cfg)
    assert list(result.resources) == ["nvidia.com/gpu-ts"]


def test_devices_count_keeps_the_rest_unshared() -> None:
    cfg = config("none", ReplicatedResource(GPU_RESOURCE, 3, devices=2), rename_by_default=True)
    result = build_resource_map(dgx_a100(), cfg)
    assert ids(result, GPU_RESOURCE) == [gpu_uuid(i) for i in range(2, 8)]
    assert ids(result, "nvidia.com/gpu.shared") == [
        f"{gpu_uuid(g)}::{r}" for g in range(2) for r in range(3)]
    assert result.problems == ()


def test_devices_by_index_and_uuid() -> None:
    entry = ReplicatedResource(GPU_RESOURCE, 2, rename="nvidia.com/shared-gpu",
                               devices=("5", gpu_uuid(1)))
    result = build_resource_map(dgx_a100(), config("none", entry))
    assert {d.gpu.index for d in result.resources["nvidia.com/shared-gpu"].devices} == {1, 5}
    assert ids(result, GPU_RESOURCE) == [gpu_uuid(i) for i in (0, 2, 3, 4, 6, 7)]


def test_devices_selection_of_mig_devices() -> None:
    entry = ReplicatedResource("nvidia.com/mig-1g.5gb", 2, devices=("1", "0:2", mig_uuid(3, 6)))
    result = build_resource_map(all_layout(SEVEN_1G, 4), config("mixed", entry,
                                                                rename_by_default=True))
    shared = {d.uuid for d in result.resources["nvidia.com/mig-1g.5gb.shared"].devices}
    assert shared == {mig_uuid(0, 2), mig_uuid(3, 6)} | {mig_uuid(1, i) for i in range(7)}
    assert len(ids(result, "nvidia.com/mig-1g.5gb")) == 28 - 9
    assert result.problems == ()


def test_devices_selection_old_mig_uuid_form() -> None:
    old = f"MIG-{gpu_uuid(0)}/3/0"  # gpu_instance_id = index + 1
    entry = ReplicatedResource("nvidia.com/mig-1g.5gb", 2, rename="nvidia.com/x", devices=(old,))
    result = build_resource_map(all_layout(SEVEN_1G, 1), config("mixed", entry))
    assert {d.uuid for d in result.resources["nvidia.com/x"].devices} == {mig_uuid(0, 2)}


def test_devices_selection_problems() -> None:
    entry = ReplicatedResource(GPU_RESOURCE, 2, devices=("9", gpu_uuid(0)))
    cfg = config("none", entry, rename_by_default=True)
    result = build_resource_map(dgx_a100(), cfg)
    assert ids(result, "nvidia.com/gpu.shared") == [f"{gpu_uuid(0)}::0", f"{gpu_uuid(0)}::1"]
    [problem] = result.problems
    assert "'9' matches no device" in problem and "resources[0]" in problem


def test_devices_count_larger_than_available() -> None:
    entry = ReplicatedResource(GPU_RESOURCE, 2, devices=10)
    result = build_resource_map(dgx_a100(), config("none", entry, rename_by_default=True))
    assert len(ids(result, "nvidia.com/gpu.shared")) == 16
    assert GPU_RESOURCE not in result.resources
    assert "asks for 10 but the node has 8" in result.problems[0]


def test_partial_selection_without_rename_shares_everything() -> None:
    entry = ReplicatedResource(GPU_RESOURCE, 2, devices=2)
    result = build_resource_map(dgx_a100(), config("none", entry))
    assert list(result.resources) == [GPU_RESOURCE]
    assert len(ids(result, GPU_RESOURCE)) == 16
    assert "devices selection ignored" in result.problems[0]
    assert "rename" in result.problems[0]


def test_unknown_resource_is_a_problem_not_an_error() -> None:
    entry = ReplicatedResource("nvidia.com/mig-3g.20gb", 2)
    result = build_resource_map(dgx_a100(), config("none", entry))
    assert ids(result, GPU_RESOURCE) == [gpu_uuid(i) for i in range(8)]
    [problem] = result.problems
    assert "nvidia.com/mig-3g.20gb" in problem and "no such resource" in problem
    assert "offers nvidia.com/gpu" in problem


def test_rename_onto_an_existing_resource_is_refused() -> None:
    entry = ReplicatedResource("nvidia.com/mig-1g.5gb", 2, rename="nvidia.com/mig-2g.10gb")
    result = build_resource_map(all_layout(MIXED_LAYOUT, 1), config("mixed", entry))
    assert list(result.resources) == ["nvidia.com/mig-1g.5gb", "nvidia.com/mig-2g.10gb",
                                      "nvidia.com/mig-3g.20gb"]
    assert all(not r.shared for r in result.resources.values())
    assert "already exists" in result.problems[0]


def test_single_strategy_time_slices_mig_devices() -> None:
    entry = ReplicatedResource(GPU_RESOURCE, 2)
    result = build_resource_map(all_layout(SEVEN_1G, 1), config("single", entry))
    devices = result.resources[GPU_RESOURCE].devices
    assert len(devices) == 14
    assert devices[1].id == f"{mig_uuid(0, 0)}::1" and devices[1].index == "0:0"


def test_several_entries_in_mixed() -> None:
    snapshot = make_snapshot(make_gpu(0, MIXED_LAYOUT), make_gpu(1))
    cfg = config("mixed", ReplicatedResource(GPU_RESOURCE, 2),
                 ReplicatedResource("nvidia.com/mig-1g.5gb", 3), rename_by_default=True)
    result = build_resource_map(snapshot, cfg)
    assert list(result.resources) == ["nvidia.com/gpu.shared", "nvidia.com/mig-1g.5gb.shared",
                                      "nvidia.com/mig-2g.10gb", "nvidia.com/mig-3g.20gb"]
    assert result.resources["nvidia.com/mig-1g.5gb.shared"].replicas == 3
    assert result.resources["nvidia.com/gpu.shared"].short_name == "gpu.shared"


# --- health --------------------------------------------------------------------------------


def test_unhealthy_gpu_marks_its_replicas() -> None:
    cfg = config("none", ReplicatedResource(GPU_RESOURCE, 2))
    result = build_resource_map(dgx_a100(), cfg, unhealthy={gpu_uuid(3)})
    sick = [d.id for d in result.resources[GPU_RESOURCE].devices if not d.healthy]
    assert sick == [f"{gpu_uuid(3)}::0", f"{gpu_uuid(3)}::1"]
    assert result.resources[GPU_RESOURCE].devices[6].health == UNHEALTHY


def test_unhealthy_gpu_marks_its_mig_devices_and_mig_uuid_only_itself() -> None:
    snapshot = all_layout(SEVEN_1G, 2)
    result = build_resource_map(snapshot, config("mixed"),
                                unhealthy=[gpu_uuid(0), mig_uuid(1, 4)])
    sick = [d.id for d in result.resources["nvidia.com/mig-1g.5gb"].devices if not d.healthy]
    assert sick == [mig_uuid(0, i) for i in range(7)] + [mig_uuid(1, 4)]


def test_unknown_unhealthy_uuid_is_harmless() -> None:
    result = build_resource_map(dgx_a100(), config(), unhealthy=("GPU-nope",))
    assert all(d.healthy for d in result.resources[GPU_RESOURCE].devices)


# --- properties ----------------------------------------------------------------------------


def test_deterministic_and_pure() -> None:
    snapshot = make_snapshot(make_gpu(0, MIXED_LAYOUT), make_gpu(1), make_gpu(2, SEVEN_1G))
    cfg = config("mixed", ReplicatedResource("nvidia.com/mig-1g.5gb", 2, devices=3),
                 rename_by_default=True)
    before = dataclasses.replace(snapshot)
    first = build_resource_map(snapshot, cfg, unhealthy={gpu_uuid(2)})
    second = build_resource_map(snapshot, cfg, unhealthy={gpu_uuid(2)})
    assert first == second
    assert snapshot == before


def test_ids_unique_within_each_resource() -> None:
    snapshot = make_snapshot(make_gpu(0, MIXED_LAYOUT), make_gpu(1), make_gpu(2, SEVEN_1G))
    cfg = config("mixed", ReplicatedResource("nvidia.com/mig-1g.5gb", 4),
                 ReplicatedResource(GPU_RESOURCE, 2), rename_by_default=True)
    result = build_resource_map(snapshot, cfg)
    all_ids: list[str] = []
    for resource in result.resources.values():
        assert isinstance(resource, Resource) and resource.devices
        all_ids.extend(d.id for d in resource.devices)
    assert len(all_ids) == len(set(all_ids))


def test_from_a_parsed_config_file() -> None:
    cfg = parse_config(
        "version: v1\n"
        "flags: {migStrategy: mixed}\n"
        "sharing:\n"
        "  timeSlicing:\n"
        "    resources:\n"
        "    - name: mig-1g.5gb\n"
        "      replicas: 2\n"
        "      rename: mig-1g.5gb-ts\n"
        "      devices: [0]\n", "t.yaml")
    result = build_resource_map(all_layout(SEVEN_1G, 2), cfg)
    assert len(ids(result, "nvidia.com/mig-1g.5gb-ts")) == 14
    assert len(ids(result, "nvidia.com/mig-1g.5gb")) == 7


# --- MPS -----------------------------------------------------------------------------------


def mps_config(mig: str = "none", *resources: ReplicatedResource,
               rename_by_default: bool = False, fail: bool = True,
               time_slicing: tuple[ReplicatedResource, ...] = ()) -> Config:
    return Config(flags=Flags(mig_strategy=MigStrategy(mig), mps_root="/run/nvidia/mps"),
                  sharing=Sharing(TimeSlicing(resources=time_slicing),
                                  Mps(rename_by_default, fail, tuple(resources))))


def with_compute_capability(snapshot: Snapshot, index: int, cc: tuple[int, int]) -> Snapshot:
    gpus = tuple(dataclasses.replace(g, compute_capability=cc) if g.index == index else g
                 for g in snapshot.gpus)
    return dataclasses.replace(snapshot, gpus=gpus)


def test_mps_replicas_are_marked_and_time_slicing_is_not() -> None:
    result = build_resource_map(dgx_a100(), mps_config("none", ReplicatedResource(GPU_RESOURCE,
                                                                                  4)))
    resource = result.resources[GPU_RESOURCE]
    assert resource.sharing == SharingStrategy.MPS and resource.mps and resource.shared
    assert [d.id for d in resource.devices[:5]] == [
        f"{gpu_uuid(0)}::0", f"{gpu_uuid(0)}::1", f"{gpu_uuid(0)}::2", f"{gpu_uuid(0)}::3",
        f"{gpu_uuid(1)}::0"]
    assert len(resource.devices) == 32 and resource.fail_requests_greater_than_one
    assert result.problems == ()
    sliced = build_resource_map(dgx_a100(), config("none", ReplicatedResource(GPU_RESOURCE, 4)))
    ts = sliced.resources[GPU_RESOURCE]
    assert ts.sharing == SharingStrategy.TIME_SLICING and not ts.mps
    plain = build_resource_map(dgx_a100(), config("none")).resources[GPU_RESOURCE]
    assert plain.sharing == SharingStrategy.NONE and not plain.mps and not plain.shared


def test_mps_wins_over_time_slicing() -> None:
    cfg = mps_config("none", ReplicatedResource(GPU_RESOURCE, 2),
                     time_slicing=(ReplicatedResource(GPU_RESOURCE, 8),))
    resource = build_resource_map(dgx_a100(), cfg).resources[GPU_RESOURCE]
    assert resource.mps and resource.replicas == 2 and len(resource.devices) == 16


def test_mps_rename_by_default_and_selection() -> None:
    cfg = mps_config("none", ReplicatedResource(GPU_RESOURCE, 3, devices=(gpu_uuid(2), "5")),
                     rename_by_default=True, fail=False)
    result = build_resource_map(dgx_a100(), cfg)
    shared = result.resources["nvidia.com/gpu.shared"]
    assert shared.mps and shared.renamed and shared.unshared_name == GPU_RESOURCE
    assert not shared.fail_requests_greater_than_one
    assert [d.id for d in shared.devices] == [f"{gpu_uuid(i)}::{n}" for i in (2, 5)
                                              for n in range(3)]
    whole = result.resources[GPU_RESOURCE]
    assert [d.id for d in whole.devices] == [gpu_uuid(i) for i in (0, 1, 3, 4, 6, 7)]
    assert whole.sharing == SharingStrategy.NONE


@pytest.mark.parametrize(("cc", "limit"), [((7, 0), 16), ((7, 2), 16), ((6, 1), 16),
                                           ((7, 5), 48), ((8, 0), 48), ((9, 0), 48)])
def test_mps_clients_per_gpu_depend_on_compute_capability(cc: tuple[int, int],
                                                          limit: int) -> None:
    gpu = dataclasses.replace(make_gpu(0), compute_capability=cc)
    assert mps_max_clients(gpu) == limit
    snapshot = make_snapshot(gpu)
    assert build_resource_map(snapshot, mps_config("none", ReplicatedResource(
        GPU_RESOURCE, limit))).problems == ()
    over = build_resource_map(snapshot, mps_config("none", ReplicatedResource(GPU_RESOURCE,
                                                                              limit + 1)))
    assert over.resources == {}
    assert len(over.problems) == 1 and f"takes at most {limit}" in over.problems[0]


def test_mps_replicas_above_the_limit_name_the_gpu_and_serve_nothing_of_it() -> None:
    snapshot = with_compute_capability(dgx_a100(), 3, (7, 0))  # a V100 among A100s
    result = build_resource_map(snapshot, mps_config("none", ReplicatedResource(GPU_RESOURCE,
                                                                                20)))
    assert result.problems == (
        f"sharing.mps.resources[0] (nvidia.com/gpu): 20 replicas exceed the MPS clients per "
        f"GPU: GPU 3 ({gpu_uuid(3)}) with compute capability 7.0 takes at most 16 (48 from "
        f"compute capability 7.5, else 16); nvidia.com/gpu is not advertised",)
    # Never as whole GPUs under the name pods expect MPS replicas from.
    assert result.resources == {}


def test_mps_on_mig_devices_is_refused_under_single() -> None:
    snapshot = all_layout(SEVEN_1G, 2)
    result = build_resource_map(snapshot, mps_config("single", ReplicatedResource(GPU_RESOURCE,
                                                                                  2)))
    assert result.resources == {}
    (problem,) = result.problems
    assert problem.startswith("sharing.mps.resources[0] (nvidia.com/gpu): MPS sharing is not "
                              f"supported for MIG devices ({mig_uuid(0, 0)}, ")
    assert problem.endswith("); nvidia.com/gpu is not advertised")


def test_mps_refusal_leaves_other_resources_alone() -> None:
    # An entry for a resource the node lacks is reported as for time-slicing.
    result = build_resource_map(dgx_a100(), mps_config("none", ReplicatedResource(
        "nvidia.com/gpu-x", 2)))
    assert list(result.resources) == [GPU_RESOURCE]
    assert "no such resource on this node" in result.problems[0]
    assert result.problems[0].startswith("sharing.mps.resources[0] (nvidia.com/gpu-x)")

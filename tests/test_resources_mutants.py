"""gpus.resources guards that mutation testing found unprotected (docs/testing.md).

The problem strings are what the daemons log and expose in their status; they are pinned whole
so that a reworded or garbled message (which GPUs, which strategy, what to do) is noticed.
"""

from __future__ import annotations

from test_resources import (
    config,
    gpu_uuid,
    ids,
    make_gpu,
    make_snapshot,
)

from gpus.config import ReplicatedResource
from gpus.resources import GPU_RESOURCE, build_resource_map


def gpu_name(index: int) -> str:
    return f"GPU {index} ({gpu_uuid(index)})"


def test_single_strategy_problems_name_the_strategy_and_every_gpu() -> None:
    empty = make_snapshot(make_gpu(0, mig_enabled=True), make_gpu(1, ("1g.5gb",)))
    assert build_resource_map(empty, config("single")).problems == (
        f"mig-strategy single: {gpu_name(0)} has MIG enabled but no MIG devices; it is not "
        "advertised (create MIG devices or disable MIG)",)
    two_disabled = make_snapshot(make_gpu(0, ("1g.5gb",)), make_gpu(1), make_gpu(2))
    assert build_resource_map(two_disabled, config("single")).problems == (
        f"mig-strategy single: {gpu_name(1)}, {gpu_name(2)} have MIG disabled while other GPUs "
        "have MIG enabled; not advertised (nvidia.com/gpu is the MIG profile 1g.5gb on this "
        "node)",)


def test_single_strategy_with_two_profiles_and_whole_gpus() -> None:
    snapshot = make_snapshot(make_gpu(0, ("1g.5gb",)), make_gpu(1, ("2g.10gb",)), make_gpu(2),
                             make_gpu(3))
    result = build_resource_map(snapshot, config("single"))
    assert ids(result, GPU_RESOURCE) == [gpu_uuid(2), gpu_uuid(3)]
    assert result.problems == (
        "mig-strategy single needs one MIG profile on the node, found 1g.5gb, 2g.10gb "
        f"({gpu_name(0)}: 1g.5gb; {gpu_name(1)}: 2g.10gb); no MIG device is advertised, only "
        "the MIG-disabled GPUs, whole (use mig-strategy mixed, or repartition)",
        f"mig-strategy single: {gpu_name(2)}, {gpu_name(3)} have MIG disabled while "
        f"{gpu_name(0)}, {gpu_name(1)} have MIG enabled; the MIG-disabled GPUs are advertised "
        "whole because no single MIG profile is usable",
    )


def test_an_absent_resource_names_what_the_node_offers() -> None:
    snapshot = make_snapshot(make_gpu(0, ("1g.5gb",)), make_gpu(1))
    absent = ReplicatedResource("nvidia.com/mig-2g.10gb", 2)
    assert build_resource_map(snapshot, config("mixed", absent)).problems == (
        "sharing.timeSlicing.resources[0] (nvidia.com/mig-2g.10gb): no such resource on this "
        "node (it offers nvidia.com/gpu, nvidia.com/mig-1g.5gb); ignored",)
    nothing = build_resource_map(make_snapshot(), config("none", ReplicatedResource(GPU_RESOURCE,
                                                                                     2)))
    assert nothing.problems == (
        "sharing.timeSlicing.resources[0] (nvidia.com/gpu): no such resource on this node (it "
        "offers nothing); ignored",)
    assert dict(nothing.resources) == {}


def test_a_selection_without_a_new_name_shares_everything_and_says_how_to_fix_it() -> None:
    snapshot = make_snapshot(make_gpu(0), make_gpu(1))
    result = build_resource_map(snapshot, config("none", ReplicatedResource(GPU_RESOURCE, 2,
                                                                           devices=1)))
    assert result.problems == (
        "sharing.timeSlicing.resources[0] (nvidia.com/gpu): devices selection ignored, all 2 "
        "devices are shared: the unselected devices would need to stay under nvidia.com/gpu, "
        "so the replicas need another name (set rename or renameByDefault)",)
    assert len(ids(result, GPU_RESOURCE)) == 4


def test_asking_for_exactly_every_device_is_no_problem() -> None:
    snapshot = make_snapshot(make_gpu(0), make_gpu(1))
    result = build_resource_map(snapshot, config("none", ReplicatedResource(GPU_RESOURCE, 2,
                                                                           devices=2),
                                                 rename_by_default=True))
    assert result.problems == ()
    assert len(ids(result, "nvidia.com/gpu.shared")) == 4


def test_malformed_device_refs_match_nothing_and_never_raise() -> None:
    # parse_config rejects these; a Config built in code reaches the map unvalidated.
    snapshot = make_snapshot(make_gpu(0, ("1g.5gb", "1g.5gb")), make_gpu(1))
    entry = ReplicatedResource("nvidia.com/mig-1g.5gb", 2, devices=("0:x", "0:1:2", "GPU-z:1"),
                               rename="nvidia.com/mig-shared")
    result = build_resource_map(snapshot, config("mixed", entry))
    assert result.problems == tuple(
        f"sharing.timeSlicing.resources[0] (nvidia.com/mig-1g.5gb): devices entry {ref!r} "
        "matches no device of this resource; ignored" for ref in entry.devices)  # type: ignore


def test_two_entries_renamed_alike_share_only_the_first() -> None:
    # parse_config rejects this too; unvalidated, the second entry must not replace the first.
    snapshot = make_snapshot(make_gpu(0, ("1g.5gb",)), make_gpu(1))
    first = ReplicatedResource(GPU_RESOURCE, 2, rename="nvidia.com/shared")
    second = ReplicatedResource("nvidia.com/mig-1g.5gb", 3, rename="nvidia.com/shared")
    result = build_resource_map(snapshot, config("mixed", first, second))
    assert ids(result, "nvidia.com/shared") == [f"{gpu_uuid(1)}::{n}" for n in range(2)]
    assert result.problems == (
        "sharing.timeSlicing.resources[1] (nvidia.com/mig-1g.5gb): cannot advertise replicas "
        "as nvidia.com/shared: that resource already exists on this node; "
        "nvidia.com/mig-1g.5gb is not shared",)


def test_every_resource_carries_its_own_name() -> None:
    snapshot = make_snapshot(make_gpu(0, ("1g.5gb",)), make_gpu(1), make_gpu(2))
    shared = ReplicatedResource(GPU_RESOURCE, 2, devices=("1",), rename="nvidia.com/gpu-ts")
    resources = build_resource_map(snapshot, config("mixed", shared)).resources
    assert list(resources) == ["nvidia.com/gpu", "nvidia.com/gpu-ts", "nvidia.com/mig-1g.5gb"]
    assert all(resource.name == name for name, resource in resources.items())

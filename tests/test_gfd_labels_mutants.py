"""gfd.labels guards that mutation testing found unprotected (docs/testing.md)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from test_gfd_labels import N, cfg, gpu, mig, snap

import gfd.labels
from gfd.labels import (
    arch_family,
    dominant,
    full_gpu_labels,
    is_valid_label_value,
    label_problems,
    mig_mixed_labels,
    mig_single_labels,
    node_labels,
    product_value,
    version_labels,
)
from gfd.values import label_value
from gpus.config import Config
from gpus.model import Snapshot
from gpus.resources import build_resource_map


def test_oldest_architectures() -> None:
    assert arch_family(1, 3) == "tesla"
    assert arch_family(2, 1) == "fermi"


def test_dominant_breaks_ties_by_lowest_index_whatever_the_order() -> None:
    assert dominant([("B", 3), ("A", 1)]) == "A"
    assert dominant([("B", 3), ("A", 5), ("A", 1), ("B", 0)]) == "B"
    assert dominant([("B", 3), ("A", 5), ("A", 1)]) == "A"
    assert dominant([]) is None


def test_the_whole_gpu_describes_a_model_some_of_whose_gpus_use_mig() -> None:
    # Same model, different memory (one reports less while in MIG mode): labels follow the
    # MIG-disabled GPU, the one the gpu.* resource actually serves.
    snapshot = snap(gpu(0, memory_mib=100, mig_enabled=True, migs=(mig(0, 0),)),
                    gpu(1, memory_mib=300))
    labels = full_gpu_labels(snapshot, cfg("mixed"))
    assert labels[N + "gpu.memory"] == "300"
    assert labels[N + "gpu.count"] == "2"


def test_no_cuda_labels_without_a_cuda_version() -> None:
    assert not any(key.startswith(N + "cuda.runtime") for key in version_labels(snap(cuda=0)))
    assert version_labels(snap(cuda=12020))[N + "cuda.runtime-version.full"] == "12.2"


@pytest.mark.parametrize(("labeler", "snapshot", "config", "expected"), [
    (full_gpu_labels, snap(gpu(0), gpu(1)), cfg("none", replicas=4),
     {"gpu.replicas": "4", "gpu.product": "MOCKMODEL-SHARED"}),
    (mig_single_labels, snap(gpu(0, mig_enabled=True, migs=(mig(0, 0), mig(0, 1)))),
     cfg("single", replicas=2),
     {"gpu.replicas": "2", "gpu.product": "MOCKMODEL-MIG-1g.5gb-SHARED"}),
    (mig_mixed_labels, snap(gpu(0, mig_enabled=True, migs=(mig(0, 0), mig(0, 1, "2g.10gb")))),
     cfg("mixed", replicas=3, resource="nvidia.com/mig-1g.5gb"),
     {"mig-1g.5gb.replicas": "3", "mig-1g.5gb.product": "MOCKMODEL-MIG-1g.5gb-SHARED",
      "mig-2g.10gb.replicas": "1", "mig-2g.10gb.product": "MOCKMODEL-MIG-2g.10gb"}),
], ids=["full", "single", "mixed"])
def test_labelers_called_alone_read_sharing_from_the_config(
        labeler: Callable[..., dict[str, str]], snapshot: Snapshot, config: Config,
        expected: dict[str, str]) -> None:
    labels = labeler(snapshot, config)
    assert {key: labels[N + key] for key in expected} == expected
    table = gfd.labels.sharing_table(snapshot, config)
    assert labeler(snapshot, config, table) == labels


@pytest.mark.parametrize("strategy", ["none", "single", "mixed"])
def test_one_resource_map_per_labelling_pass(
        strategy: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # The map is the costly part of a pass; every labeler shares the one sharing table.
    calls: list[object] = []

    def counting_map(*args: object, **kwargs: object) -> object:
        calls.append(args)
        return build_resource_map(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(gfd.labels, "build_resource_map", counting_map)
    second = gpu(1, mig_enabled=True, migs=(mig(1, 0),)) if strategy == "single" else gpu(1)
    snapshot = snap(gpu(0, mig_enabled=True, migs=(mig(0, 0),)), second)
    labels = node_labels(snapshot, cfg(strategy, replicas=2))
    assert len(calls) == 1
    assert labels[N + "gpu.replicas"] == "2"


def test_label_values_keep_a_long_suffix_whole_and_drop_the_text() -> None:
    suffix = "-" + "x" * 63
    assert label_value("model", suffix) == "x" * 62
    assert product_value() == product_value("", "") == ""


def test_label_values_longer_than_63_are_invalid() -> None:
    assert is_valid_label_value("a" * 63)
    assert not is_valid_label_value("a" * 64)


def test_label_problems() -> None:
    assert label_problems(snap(gpu(0), driver="bad"), cfg()) == (
        "driver version 'bad' does not match X.Y[.Z]; no cuda.driver labels",)
    assert label_problems(snap(driver="bad"), cfg()) == ()  # no GPUs, no driver labels
    assert label_problems(snap(gpu(0), driver=" 535.129.03 "), cfg()) == ()
    mixed_layout = snap(gpu(0, mig_enabled=True, migs=(mig(0, 0),)), gpu(1))
    assert label_problems(mixed_layout, cfg("single")) == (
        "mig-strategy single: GPU 1 (GPU-00000001-0000-0000-0000-000000000000) has MIG "
        "disabled while other GPUs have MIG enabled; not advertised (nvidia.com/gpu is the MIG "
        "profile 1g.5gb on this node) (labelled -MIG-INVALID)",)
    assert label_problems(mixed_layout, cfg("mixed")) == ()
    assert label_problems(snap(gpu(0), gpu(1)), cfg("single")) == ()

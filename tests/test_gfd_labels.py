"""GFD labels from hand-built snapshots: NVIDIA's expected sets, formats, our improvements."""

from __future__ import annotations

import dataclasses
from typing import Unpack

import builders
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gfd.labels import (
    arch_family,
    is_valid_label_value,
    label_problems,
    node_labels,
    product_value,
    resource_labels,
    version_labels,
)
from gfd.values import label_value, sanitise
from gpus.config import (
    Config,
    Flags,
    GfdFlags,
    MigStrategy,
    Mps,
    ReplicatedResource,
    Sharing,
    TimeSlicing,
)
from gpus.model import GPU, MigDevice, Snapshot
from gpus.resources import build_resource_map

MIB = 1 << 20
N = "nvidia.com/"


def gpu(index: int = 0, name: str = "MOCKMODEL", memory_mib: int = 300,
        cc: tuple[int, int] = (8, 0), mig_enabled: bool = False,
        migs: tuple[MigDevice, ...] = (), pci_class: int | None = 0x0302,
        mig_capable: bool = False) -> GPU:
    """A GPU with just the facts the labels read."""
    return builders.gpu(index, uuid=f"GPU-{index:08d}-0000-0000-0000-000000000000", name=name,
                        memory_bytes=memory_mib * MIB, compute_capability=cc,
                        pci_bus_id=f"00000000:{index:02x}:00.0", pci_class=pci_class,
                        mig_capable=mig_capable or mig_enabled, mig_enabled=mig_enabled,
                        migs=migs)


def mig(parent: int, index: int, profile: str = "1g.5gb", memory_mib: int = 4864,
        gi: int = 1, ci: int = 1, **engines: Unpack[builders.Engines]) -> MigDevice:
    """A MIG device of ``profile`` on GPU ``parent``."""
    return builders.mig_device(parent, index, profile=profile, memory_bytes=memory_mib * MIB,
                               gpu_instance_slices=gi, compute_instance_slices=ci, **engines)


def snap(*gpus: GPU, driver: str = "400.300", cuda: int = 8000) -> Snapshot:
    """A snapshot of ``gpus``."""
    return builders.snapshot(*gpus, driver=driver, cuda=cuda)


def cfg(strategy: str = "none", replicas: int = 0, resource: str = "nvidia.com/gpu",
        rename: str = "", rename_by_default: bool = False, no_timestamp: bool = False
        ) -> Config:
    """A config with a MIG strategy and optional time-slicing."""
    entries = (ReplicatedResource(name=resource, replicas=replicas, rename=rename),) \
        if replicas else ()
    return Config(
        flags=Flags(mig_strategy=MigStrategy(strategy), gfd=GfdFlags(no_timestamp=no_timestamp)),
        sharing=Sharing(time_slicing=TimeSlicing(rename_by_default=rename_by_default,
                                                 resources=entries)))


def full(**extra: str) -> dict[str, str]:
    """NVIDIA's expected resource labels for the mock GPU, plus overrides."""
    labels = {
        N + "gpu.compute.major": "8", N + "gpu.compute.minor": "0",
        N + "gpu.family": "ampere", N + "gpu.count": "1", N + "gpu.replicas": "1",
        N + "gpu.sharing-strategy": "none", N + "gpu.memory": "300",
        N + "gpu.product": "MOCKMODEL",
    }
    labels.update({N + k: v for k, v in extra.items()})
    return labels


# --------------------------------------------------------------------------- NVIDIA's sets


def test_reference_one_full_gpu() -> None:
    assert resource_labels(snap(gpu()), cfg()) == full()


def test_reference_time_slicing_two_replicas() -> None:
    labels = resource_labels(snap(gpu()), cfg(replicas=2))
    assert labels == full(**{"gpu.replicas": "2", "gpu.sharing-strategy": "time-slicing",
                             "gpu.product": "MOCKMODEL-SHARED"})


def test_sharing_applies_to_every_gpu_and_count_is_physical() -> None:
    labels = resource_labels(snap(gpu(0), gpu(1)), cfg(replicas=2))
    assert labels[N + "gpu.count"] == "2"
    assert labels[N + "gpu.replicas"] == "2"


@pytest.mark.parametrize("kwargs", [{"rename": "nvidia.com/gpu.shared"},
                                    {"rename_by_default": True}])
def test_renamed_shared_resource_has_no_shared_suffix(kwargs: dict[str, object]) -> None:
    labels = resource_labels(snap(gpu()), cfg(replicas=4, **kwargs))  # type: ignore[arg-type]
    assert labels[N + "gpu.product"] == "MOCKMODEL"
    assert labels[N + "gpu.replicas"] == "4"


def test_rename_to_its_own_name_is_not_renamed() -> None:
    # The plugin advertises the replicas under nvidia.com/gpu itself (Resource.renamed is
    # false), so the product says -SHARED, as for no rename at all.
    labels = resource_labels(snap(gpu()), cfg(replicas=2, rename="nvidia.com/gpu"))
    assert labels[N + "gpu.product"] == "MOCKMODEL-SHARED"
    assert labels[N + "gpu.replicas"] == "2"


def test_sharing_the_plugin_rejects_is_not_labelled() -> None:
    # Renaming the GPUs' replicas onto an existing MIG resource: the plugin refuses to share
    # (gpus.resources reports it), so the labels say unshared too.
    gpus = [gpu(0), gpu(1, mig_enabled=True, migs=(mig(1, 0),))]
    config = cfg("mixed", replicas=2, rename="nvidia.com/mig-1g.5gb")
    labels = resource_labels(snap(*gpus), config)
    assert labels[N + "gpu.replicas"] == "1"
    assert labels[N + "gpu.sharing-strategy"] == "none"
    assert labels[N + "gpu.product"] == "MOCKMODEL"
    assert labels[N + "mig-1g.5gb.replicas"] == "1"


@pytest.mark.parametrize("strategy", ["none", "single", "mixed"])
@pytest.mark.parametrize("resource", ["nvidia.com/gpu", "nvidia.com/mig-1g.5gb"])
@pytest.mark.parametrize("rename", ["", "nvidia.com/gpu", "nvidia.com/shared-thing",
                                    "nvidia.com/mig-1g.5gb", "by-default"])
def test_labels_agree_with_the_plugins_resource_map(strategy: str, resource: str,
                                                    rename: str) -> None:
    gpus = [gpu(0), gpu(1, mig_enabled=True, migs=(mig(1, 0), mig(1, 1))),
            gpu(2, mig_enabled=True, migs=(mig(2, 0),))]
    config = cfg(strategy, replicas=3, resource=resource,
                 rename="" if rename == "by-default" else rename,
                 rename_by_default=rename == "by-default")
    snapshot = snap(*gpus)
    labels = resource_labels(snapshot, config)
    advertised = build_resource_map(snapshot, config).resources.values()
    shared = {r.unshared_name: r for r in advertised if r.shared}
    for key, product in labels.items():
        if not key.endswith(".product") or product.endswith("-INVALID"):
            continue
        name = key[: -len(".product")]
        if name == N + "gpu" and strategy != "single" and not any(
                not g.mig_enabled for g in gpus):
            continue  # every GPU in MIG mode: sharing does not apply (replicas 0)
        found = shared.get(name)
        assert labels[name + ".replicas"] == str(found.replicas if found else 1), key
        assert product.endswith("-SHARED") == (found is not None and not found.renamed), key


def test_none_strategy_mig_enabled_gpu_has_zero_replicas_and_no_sharing() -> None:
    labels = resource_labels(snap(gpu(mig_enabled=True)), cfg(replicas=2))
    assert labels[N + "gpu.replicas"] == "0"
    assert labels[N + "gpu.product"] == "MOCKMODEL"
    assert labels[N + "gpu.count"] == "1"
    assert N + "mig.strategy" not in labels


def test_none_strategy_mig_and_full_gpu_sharing_applies() -> None:
    labels = resource_labels(snap(gpu(0, mig_enabled=True), gpu(1)), cfg(replicas=2))
    assert labels == full(**{"gpu.count": "2", "gpu.replicas": "2",
                             "gpu.sharing-strategy": "time-slicing",
                             "gpu.product": "MOCKMODEL-SHARED"})


def test_single_without_mig_gpus_is_full_labels_plus_strategy() -> None:
    labels = resource_labels(snap(gpu(0), gpu(1)), cfg("single"))
    assert labels == full(**{"gpu.count": "2", "mig.strategy": "single"})


def test_single_valid_layout_labels_mig_devices_as_gpu() -> None:
    attrs = {"multiprocessors": 12, "copy_engines": 13, "decoders": 14, "encoders": 15,
             "jpeg_decoders": 16, "ofa_engines": 17}
    gpus = [gpu(i, mig_enabled=True, migs=(mig(i, 0, "1g.100gb", 100, 1, 2, **attrs),))
            for i in range(2)]
    labels = resource_labels(snap(*gpus), cfg("single"))
    assert labels == {
        N + "gpu.compute.major": "8", N + "gpu.compute.minor": "0", N + "gpu.family": "ampere",
        N + "gpu.count": "2", N + "gpu.replicas": "1", N + "gpu.sharing-strategy": "none",
        N + "gpu.memory": "100", N + "gpu.product": "MOCKMODEL-MIG-1g.100gb",
        N + "mig.strategy": "single", N + "gpu.multiprocessors": "12",
        N + "gpu.slices.gi": "1", N + "gpu.slices.ci": "2", N + "gpu.engines.copy": "13",
        N + "gpu.engines.decoder": "14", N + "gpu.engines.encoder": "15",
        N + "gpu.engines.jpeg": "16", N + "gpu.engines.ofa": "17",
    }


def test_single_mig_devices_can_be_time_sliced() -> None:
    gpus = [gpu(0, mig_enabled=True, migs=(mig(0, 0), mig(0, 1)))]
    labels = resource_labels(snap(*gpus), cfg("single", replicas=3))
    assert labels[N + "gpu.product"] == "MOCKMODEL-MIG-1g.5gb-SHARED"
    assert labels[N + "gpu.replicas"] == "3"
    assert labels[N + "gpu.count"] == "2"


INVALID = {N + "gpu.count": "0", N + "gpu.replicas": "0", N + "gpu.memory": "0",
           N + "gpu.product": "MOCKMODEL-MIG-INVALID", N + "mig.strategy": "single",
           N + "gpu.sharing-strategy": ""}  # NVIDIA: empty beside -MIG-INVALID, not "none"


@pytest.mark.parametrize("gpus", [
    pytest.param([gpu(0, mig_enabled=True)], id="empty"),
    pytest.param([gpu(0, mig_enabled=True, migs=(mig(0, 0, "1g.5gb"), mig(0, 1, "2g.10gb")))],
                 id="two-profiles"),
    pytest.param([gpu(0, mig_enabled=True, migs=(mig(0, 0),)), gpu(1)], id="enabled+disabled"),
    pytest.param([gpu(0, mig_enabled=True, migs=(mig(0, 0),)), gpu(1),
                  gpu(2, mig_enabled=True)], id="enabled+disabled+empty"),
])
def test_single_invalid_layouts(gpus: list[GPU]) -> None:
    labels = resource_labels(snap(*gpus), cfg("single"))
    for key, value in INVALID.items():
        assert labels[key] == value
    assert N + "gpu.multiprocessors" not in labels


def test_mixed_labels_per_profile_and_skips_empty_mig_gpus() -> None:
    gpus = [
        gpu(0, "NVIDIA A100-SXM4-40GB", 40960, mig_enabled=True,
            migs=(mig(0, 0, "3g.20gb", 19968, 3, 3, multiprocessors=42),
                  mig(0, 1, "1g.5gb", 4864, multiprocessors=14))),
        gpu(1, "NVIDIA A100-SXM4-40GB", 40960, mig_enabled=True,
            migs=(mig(1, 0, "1g.5gb", 4864, multiprocessors=14),)),
        gpu(2, "NVIDIA A100-SXM4-40GB", 40960, mig_enabled=True),
        gpu(3, "NVIDIA A100-SXM4-40GB", 40960),
    ]
    labels = resource_labels(snap(*gpus), cfg("mixed", replicas=2,
                                                resource="nvidia.com/mig-1g.5gb"))
    assert labels[N + "mig.strategy"] == "mixed"
    assert labels[N + "gpu.count"] == "4"  # every GPU of the model, as NVIDIA counts
    assert labels[N + "gpu.product"] == "NVIDIA-A100-SXM4-40GB"
    assert labels[N + "mig-1g.5gb.count"] == "2"
    assert labels[N + "mig-1g.5gb.replicas"] == "2"
    assert labels[N + "mig-1g.5gb.sharing-strategy"] == "time-slicing"
    assert labels[N + "mig-1g.5gb.product"] == "NVIDIA-A100-SXM4-40GB-MIG-1g.5gb-SHARED"
    assert labels[N + "mig-1g.5gb.memory"] == "4864"
    assert labels[N + "mig-3g.20gb.count"] == "1"
    assert labels[N + "mig-3g.20gb.replicas"] == "1"
    assert labels[N + "mig-3g.20gb.product"] == "NVIDIA-A100-SXM4-40GB-MIG-3g.20gb"
    assert labels[N + "mig-3g.20gb.multiprocessors"] == "42"
    assert labels[N + "mig-3g.20gb.slices.gi"] == "3"
    assert {k for k in labels if k.startswith(N + "mig-3g.20gb.")} == {
        N + "mig-3g.20gb." + s for s in (
            "count", "replicas", "sharing-strategy", "product", "memory", "multiprocessors",
            "slices.gi", "slices.ci", "engines.copy", "engines.decoder", "engines.encoder",
            "engines.jpeg", "engines.ofa")}


def test_mixed_media_extension_profile_key_is_label_safe() -> None:
    gpus = [gpu(0, mig_enabled=True, migs=(mig(0, 0, "1g.10gb+me"),))]
    labels = resource_labels(snap(*gpus), cfg("mixed"))
    assert labels[N + "mig-1g.10gb.me.count"] == "1"
    assert all(is_valid_label_value(v) for v in labels.values())


def test_mixed_all_mig_enabled_gpu_labels_have_zero_replicas() -> None:
    gpus = [gpu(i, mig_enabled=True, migs=(mig(i, 0),)) for i in range(2)]
    labels = resource_labels(snap(*gpus), cfg("mixed", replicas=2))
    assert labels[N + "gpu.replicas"] == "0"
    assert labels[N + "gpu.product"] == "MOCKMODEL"


# --------------------------------------------------------------------------- other families


def test_node_labels_full_catalogue_for_one_gpu() -> None:
    labels = node_labels(snap(gpu(), driver="535.129.03", cuda=12020), cfg(),
                         machine="DGX A100 (920-23687)", timestamp=1700000000)
    assert labels == full() | {
        N + "gfd.timestamp": "1700000000",
        N + "gpu.machine": "DGX-A100-920-23687",
        N + "cuda.driver.major": "535", N + "cuda.driver.minor": "129",
        N + "cuda.driver.rev": "03",
        N + "cuda.driver-version.major": "535", N + "cuda.driver-version.minor": "129",
        N + "cuda.driver-version.revision": "03", N + "cuda.driver-version.full": "535.129.03",
        N + "cuda.runtime.major": "12", N + "cuda.runtime.minor": "2",
        N + "cuda.runtime-version.major": "12", N + "cuda.runtime-version.minor": "2",
        N + "cuda.runtime-version.full": "12.2",
        N + "mig.capable": "false", N + "mps.capable": "false", N + "gpu.mode": "compute",
    }


def test_two_part_driver_version_has_empty_revision() -> None:
    labels = version_labels(snap(gpu(), driver="400.300", cuda=8000))
    assert labels[N + "cuda.driver.rev"] == ""
    assert labels[N + "cuda.driver-version.revision"] == ""
    assert labels[N + "cuda.driver-version.full"] == "400.300"
    assert labels[N + "cuda.runtime-version.full"] == "8.0"


@pytest.mark.parametrize("bad", ["535", "1.2.3.4", "", "abc"])
def test_malformed_driver_version_drops_only_driver_labels(bad: str) -> None:
    labels = version_labels(snap(gpu(), driver=bad, cuda=12020))
    assert not any(k.startswith(N + "cuda.driver") for k in labels)
    assert labels[N + "cuda.runtime-version.full"] == "12.2"


def test_timestamp_omitted_with_no_timestamp_or_unknown_time() -> None:
    assert N + "gfd.timestamp" not in node_labels(snap(gpu()), cfg(no_timestamp=True),
                                                  timestamp=5)
    assert N + "gfd.timestamp" not in node_labels(snap(gpu()), cfg(), timestamp=None)


def test_no_gpus_gives_only_the_timestamp() -> None:
    assert node_labels(snap(), cfg(), timestamp=7) == {N + "gfd.timestamp": "7"}


def test_mig_capable_when_any_gpu_is() -> None:
    labels = node_labels(snap(gpu(0), gpu(1, mig_capable=True)), cfg())
    assert labels[N + "mig.capable"] == "true"


@pytest.mark.parametrize(("classes", "mode"), [
    ((0x0302, 0x0302), "compute"), ((0x0300,), "graphics"), ((0x0302, 0x0300), "unknown"),
    ((None,), "unknown"), ((0x0380,), "unknown"),
])
def test_gpu_mode_from_pci_class(classes: tuple[int | None, ...], mode: str) -> None:
    gpus = [gpu(i, pci_class=c) for i, c in enumerate(classes)]
    assert node_labels(snap(*gpus), cfg())[N + "gpu.mode"] == mode


@pytest.mark.parametrize(("cc", "family"), [
    ((3, 7), "kepler"), ((5, 2), "maxwell"), ((6, 1), "pascal"), ((7, 0), "volta"),
    ((7, 2), "volta"), ((7, 5), "turing"), ((8, 0), "ampere"), ((8, 6), "ampere"),
    ((8, 9), "ada-lovelace"), ((9, 0), "hopper"), ((10, 0), "blackwell"),
    ((12, 0), "blackwell"), ((4, 0), "undefined"),
])
def test_arch_family(cc: tuple[int, int], family: str) -> None:
    assert arch_family(*cc) == family


def test_compute_major_zero_omits_family_and_compute() -> None:
    labels = resource_labels(snap(gpu(cc=(0, 0))), cfg())
    assert N + "gpu.family" not in labels and N + "gpu.compute.major" not in labels


def test_mig_strategy_label_absent_under_none() -> None:
    assert N + "mig.strategy" not in node_labels(snap(gpu()), cfg("none"))


# --------------------------------------------------------------------------- improvements


def test_sanitise_matches_nvidia() -> None:
    assert sanitise("NVIDIA A100-SXM4-40GB") == "NVIDIA-A100-SXM4-40GB"
    assert sanitise("NVIDIA-TITAN-X-(Pascal)") == "NVIDIA-TITAN-X-Pascal"
    assert sanitise("  Tesla   V100  ") == "Tesla-V100"


def test_long_product_is_cut_from_the_model_keeping_the_suffix() -> None:
    name = "NVIDIA " + "Very Long Experimental Accelerator " * 3
    value = product_value(name, "MIG", "1g.5gb", shared=True)
    assert len(value) <= 63 and is_valid_label_value(value)
    assert value.endswith("-MIG-1g.5gb-SHARED")
    assert value.startswith("NVIDIA-Very-Long")


def test_label_value_strips_edges_and_keeps_63() -> None:
    assert label_value("-_.abc._-") == "abc"
    assert label_value("x" * 100) == "x" * 63
    assert label_value("a" * 62 + "-b") == "a" * 62  # a cut must not end on '-'


@given(st.text(max_size=200), st.text(alphabet="abc.-_19", max_size=20))
def test_label_value_is_always_valid(text: str, suffix: str) -> None:
    assert is_valid_label_value(label_value(text))
    assert is_valid_label_value(product_value("M" + text, "MIG", suffix, shared=True))


def test_every_value_valid_for_hostile_machine_and_names() -> None:
    gpus = [gpu(0, name="(((" + "Ω" * 80 + ")))"), gpu(1, name="(((" + "Ω" * 80 + ")))")]
    labels = node_labels(snap(*gpus, driver="535.x!.1"), cfg(replicas=2),
                         machine="  ~~" + "Z" * 90 + "~~ ", timestamp=1)
    assert all(is_valid_label_value(v) for v in labels.values()), labels
    assert labels[N + "gpu.product"] == "SHARED"
    assert labels[N + "gpu.machine"] == "Z" * 63


def test_empty_machine_is_unknown() -> None:
    assert node_labels(snap(gpu()), cfg(), machine="   ")[N + "gpu.machine"] == "unknown"


HETERO = [
    gpu(0, "NVIDIA T4", 15360, (7, 5)),
    gpu(1, "NVIDIA A100-PCIE-40GB", 40960),
    gpu(2, "NVIDIA A100-PCIE-40GB", 40960),
    gpu(3, "NVIDIA T4", 15360, (7, 5)),
    gpu(4, "NVIDIA A100-PCIE-40GB", 40960),
]


def test_hetero_labels_describe_the_model_with_most_gpus() -> None:
    labels = resource_labels(snap(*HETERO), cfg())
    assert labels[N + "gpu.product"] == "NVIDIA-A100-PCIE-40GB"
    assert labels[N + "gpu.count"] == "3"
    assert labels[N + "gpu.memory"] == "40960"
    assert labels[N + "gpu.family"] == "ampere"


def test_hetero_tie_goes_to_the_lowest_gpu_index_and_order_does_not_matter() -> None:
    tied = HETERO[:4]
    first = resource_labels(snap(*tied), cfg())
    assert first[N + "gpu.product"] == "NVIDIA-T4"  # GPU 0 is a T4
    assert first[N + "gpu.count"] == "2"
    assert resource_labels(snap(*reversed(tied)), cfg()) == first


def test_labels_are_deterministic_across_calls() -> None:
    a = node_labels(snap(*HETERO), cfg("mixed"), timestamp=1)
    b = node_labels(snap(*HETERO), cfg("mixed"), timestamp=1)
    assert a == b and list(a) == list(b)


def test_config_is_not_mutated() -> None:
    config = cfg("mixed", replicas=2)
    before = dataclasses.asdict(config)
    node_labels(snap(*HETERO), config)
    assert dataclasses.asdict(config) == before


# --------------------------------------------------------------------------- edge trimming


@pytest.mark.parametrize("separator", ["-", "_", "."])
def test_label_value_trims_each_separator_at_each_edge(separator: str) -> None:
    assert label_value(f"{separator}abc") == "abc"
    assert label_value(f"abc{separator}") == "abc"
    assert label_value(f"{separator * 3}a{separator}b{separator * 3}") == \
        f"a{separator}b"  # inner separators stay


@pytest.mark.parametrize("name,shared,expected", [
    # A product name that ends in a separator once sanitised: trimmed before the suffix, so
    # no run of separators is glued onto "-SHARED".
    ("NVIDIA H100 80GB HBM3 -", True, "NVIDIA-H100-80GB-HBM3-SHARED"),
    ("NVIDIA A100 (rev. a1.)", True, "NVIDIA-A100-rev.-a1-SHARED"),
    ("NVIDIA A100 (rev. a1.)", False, "NVIDIA-A100-rev.-a1"),
    # Leading separators (and characters dropped by sanitising) go too.
    ("(-- Tesla T4)", False, "Tesla-T4"),
    ("_.A10", True, "A10-SHARED"),
    # Nothing left of the model: the suffix alone, without its joining '-'.
    ("(((", True, "SHARED"),
])
def test_product_values_are_trimmed_of_edge_separators(name: str, shared: bool,
                                                       expected: str) -> None:
    assert product_value(name, shared=shared) == expected


def test_a_model_cut_at_a_separator_does_not_glue_separators_onto_the_suffix() -> None:
    model = "A" * 51 + " " + "B" * 20  # sanitised: 72 characters, '-' at position 51
    value = product_value(model, "MIG", "1g.5gb")  # the suffix leaves room for 52
    assert value == "A" * 51 + "-MIG-1g.5gb"
    model = "A" * 50 + " .." + "B" * 20  # the cut leaves "-.": both go
    assert product_value(model, "MIG", "1g.5gb") == "A" * 50 + "-MIG-1g.5gb"
    assert product_value("(((", "MIG", "1g.5gb") == "MIG-1g.5gb"


def test_a_value_over_63_cut_at_a_separator_ends_alphanumeric() -> None:
    assert label_value("Z" * 62 + " Q") == "Z" * 62
    assert label_value("Z" * 61 + " _ Q") == "Z" * 61


def test_node_labels_trim_edge_separators_end_to_end() -> None:
    labels = node_labels(snap(gpu(0, name="NVIDIA L40S -"), gpu(1, name="NVIDIA L40S -"),
                              driver="535.129.03"),
                         cfg(replicas=2), machine=" -ProLiant XL675d Gen10 Plus (.) ",
                         timestamp=1)
    assert labels[N + "gpu.product"] == "NVIDIA-L40S-SHARED"
    assert labels[N + "gpu.machine"] == "ProLiant-XL675d-Gen10-Plus"


# --------------------------------------------------------------------------- MPS


def mps_cfg(replicas: int = 2, strategy: str = "none", rename_by_default: bool = False,
            rename: str = "", time_slicing: int = 0) -> Config:
    """A config sharing nvidia.com/gpu with MPS (and maybe time-slicing, which MPS beats)."""
    entry = ReplicatedResource(name="nvidia.com/gpu", replicas=replicas, rename=rename)
    sliced = ((ReplicatedResource(name="nvidia.com/gpu", replicas=time_slicing),)
              if time_slicing else ())
    return Config(flags=Flags(mig_strategy=MigStrategy(strategy), mps_root="/run/nvidia/mps"),
                  sharing=Sharing(TimeSlicing(resources=sliced),
                                  Mps(rename_by_default=rename_by_default, resources=(entry,))))


def test_mps_two_replicas_as_nvidia_labels_them() -> None:
    labels = node_labels(snap(gpu()), mps_cfg(2), timestamp=1)
    expected = full(**{"gpu.replicas": "2", "gpu.sharing-strategy": "mps",
                       "gpu.product": "MOCKMODEL-SHARED", "mps.capable": "true"})
    assert {k: labels[k] for k in expected} == expected
    assert labels[N + "gpu.count"] == "1"  # physical GPUs


def test_mps_wins_over_time_slicing_in_the_labels() -> None:
    labels = resource_labels(snap(gpu()), mps_cfg(3, time_slicing=8))
    assert labels[N + "gpu.replicas"] == "3"
    assert labels[N + "gpu.sharing-strategy"] == "mps"


@pytest.mark.parametrize("kwargs", [{"rename_by_default": True},
                                    {"rename": "nvidia.com/gpu-mps"}])
def test_renamed_mps_resource_has_no_shared_suffix(kwargs: dict[str, object]) -> None:
    labels = resource_labels(snap(gpu()), mps_cfg(4, **kwargs))  # type: ignore[arg-type]
    assert labels[N + "gpu.product"] == "MOCKMODEL"
    assert labels[N + "gpu.replicas"] == "4"
    assert labels[N + "gpu.sharing-strategy"] == "mps"


def test_mps_capable_only_with_mps_and_without_mig() -> None:
    assert node_labels(snap(gpu()), cfg())[N + "mps.capable"] == "false"
    assert node_labels(snap(gpu()), cfg(replicas=2))[N + "mps.capable"] == "false"
    assert node_labels(snap(gpu()), mps_cfg(2))[N + "mps.capable"] == "true"
    assert label_problems(snap(gpu()), mps_cfg(2)) == ()
    # NVIDIA's GFD fails the pass here; we label false and say why.
    node = snap(gpu(0), gpu(1, mig_enabled=True, migs=(mig(1, 0),)))
    assert node_labels(node, mps_cfg(2))[N + "mps.capable"] == "false"
    assert label_problems(node, mps_cfg(2)) == (
        "MPS sharing is not supported for MIG devices: GPU 1 "
        "(GPU-00000001-0000-0000-0000-000000000000) has MIG enabled (labelled mps.capable=false)",)
    assert label_problems(node, cfg(replicas=2)) == ()


def test_mps_replicas_above_the_client_limit_are_not_labelled_shared() -> None:
    # The plugin does not serve the refused entry: GFD does not call it shared either.
    labels = resource_labels(snap(gpu(cc=(7, 0))), mps_cfg(17))
    assert labels[N + "gpu.replicas"] == "1"
    assert labels[N + "gpu.sharing-strategy"] == "none"
    assert labels[N + "gpu.product"] == "MOCKMODEL"

"""GPU feature discovery labels: a pure function of a Snapshot and a Config.

Each label family (timestamp, machine, versions, MIG capability, sharing, GPU mode, full-GPU
resources, MIG resources) has its own small labeler returning ``{key: value}``; ``node_labels``
merges them in a fixed order, later families overriding earlier ones exactly where NVIDIA's do
(MIG ``single`` replaces the ``gpu.*`` product/count/memory labels of the full-GPU labeler).

Two deliberate improvements over NVIDIA's GFD (see docs/gfd.md):

* Every value is a valid Kubernetes label value: at most 63 characters from ``[A-Za-z0-9._-]``,
  starting and ending with an alphanumeric (or empty). Long product names are cut from the end
  of the *model* part so that meaningful suffixes (``-SHARED``, ``-MIG-1g.5gb``) survive.
* Heterogeneous nodes get deterministic labels: the ``gpu.*`` labels describe the model with
  the most GPUs, ties broken by the lowest GPU index (NVIDIA picks a random model each run).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping

from gfd.imex import imex_labels, imex_problems
from gfd.values import MAX_VALUE_LEN, PREFIX, Labels, label_value, sanitise
from gfd.vgpu import vgpu_labels, vgpu_problems
from gpus.config import Config, SharingStrategy
from gpus.model import GPU, MIB, MigDevice, Snapshot
from gpus.records import record
from gpus.resources import (
    GPU_RESOURCE,
    build_resource_map,
    mig_resource_name,
    mig_single_problems,
)

TIMESTAMP_LABEL = PREFIX + "gfd.timestamp"  # the time of the pass that wrote the labels
UNKNOWN_MACHINE = "unknown"
SHARING_NONE = "none"
SHARING_TIME_SLICING = "time-slicing"
SHARING_MPS = "mps"
PCI_CLASS_VGA = 0x0300
PCI_CLASS_3D = 0x0302

def product_value(*parts: str, shared: bool = False) -> str:
    """``<model>[-<part>...][-SHARED]`` as NVIDIA joins it, made label-safe (model cut first)."""
    present = [p for p in parts if p]
    if not present:
        return ""
    model, *rest = present
    tail = [sanitise(p) for p in rest]
    if shared:
        tail.append("SHARED")
    suffix = "".join("-" + t for t in tail if t)
    return label_value(model, suffix)


def mib(nbytes: int) -> int:
    """Bytes to MiB, rounded down, as NVIDIA reports ``gpu.memory``."""
    return nbytes // MIB


def arch_family(major: int, minor: int) -> str:
    """The architecture family GFD derives from a compute capability."""
    if major == 7:
        return "volta" if minor < 5 else "turing"
    if major == 8:
        return "ada-lovelace" if minor >= 9 else "ampere"
    families = {1: "tesla", 2: "fermi", 3: "kepler", 5: "maxwell", 6: "pascal", 9: "hopper",
                10: "blackwell", 12: "blackwell"}
    return families.get(major, "undefined")


# --------------------------------------------------------------------------- sharing


@record
class Sharing:
    """How one resource name is shared, as the labels report it."""

    replicas: int  # 0: sharing does not apply (MIG-enabled parents), 1: unshared, N: shared
    strategy: str  # "none", "time-slicing" or "mps"
    shared: bool  # replicas > 1
    renamed: bool  # advertised under another name, so the product gets no -SHARED suffix


NO_SHARING = Sharing(replicas=0, strategy=SHARING_NONE, shared=False, renamed=False)
UNSHARED = Sharing(replicas=1, strategy=SHARING_NONE, shared=False, renamed=False)

# Unshared resource name ("nvidia.com/gpu", "nvidia.com/mig-1g.5gb") -> how it is shared.
SharingTable = Mapping[str, Sharing]


def sharing_table(snapshot: Snapshot, config: Config) -> dict[str, Sharing]:
    """How each resource is shared, read from the device plugin's own resource map.

    ``gpus.resources.build_resource_map`` decides which sharing entries (time-slicing, or MPS
    when it has resources) apply and under which name (``shared_name``); the labels take
    replicas, the strategy (``Resource.sharing``) and ``Resource.renamed`` from it, so GFD and
    the plugin always agree (``-SHARED`` only when shared and not renamed, and an entry the
    plugin rejects, e.g. a rename colliding with another resource or MPS replicas above the
    GPU's client limit, is not reported as shared). Resources absent from the table are
    unshared.
    """
    table: dict[str, Sharing] = {}
    for resource in build_resource_map(snapshot, config).resources.values():
        if resource.shared:
            strategy = SHARING_MPS if resource.mps else SHARING_TIME_SLICING
            table[resource.unshared_name or resource.name] = Sharing(
                replicas=resource.replicas, strategy=strategy, shared=True,
                renamed=resource.renamed)
    return table


def sharing_for(table: SharingTable, resource: str) -> Sharing:
    """The sharing facts for ``resource`` (``nvidia.com/gpu``, ``nvidia.com/mig-1g.5gb``)."""
    return table.get(resource, UNSHARED)


def _base_labels(resource: str, product: str, count: int, sharing: Sharing) -> Labels:
    """product/count/replicas/sharing-strategy for one resource name."""
    key = resource + "."
    return {
        key + "product": product,
        key + "count": str(count),
        key + "replicas": str(sharing.replicas),
        key + "sharing-strategy": sharing.strategy,
    }


# --------------------------------------------------------------------------- choosing a model


def dominant(items: Iterable[tuple[str, int]]) -> str | None:
    """The key with the most items, ties broken by the lowest GPU index.

    ``items`` are ``(key, gpu_index)`` pairs; this is the documented heterogeneous-node rule.
    """
    counts: dict[str, int] = {}
    first: dict[str, int] = {}
    for key, index in items:
        counts[key] = counts.get(key, 0) + 1
        first[key] = min(first.get(key, index), index)
    if not counts:
        return None
    return min(counts, key=lambda k: (-counts[k], first[k]))


# --------------------------------------------------------------------------- labelers


def timestamp_labels(config: Config, timestamp: int | None) -> Labels:
    """``gfd.timestamp``, unless disabled or unknown."""
    if config.flags.gfd.no_timestamp or timestamp is None:
        return {}
    return {TIMESTAMP_LABEL: str(int(timestamp))}


def machine_labels(machine: str) -> Labels:
    """``gpu.machine`` from the DMI product name (already read by the shell)."""
    value = label_value(machine) or UNKNOWN_MACHINE
    return {PREFIX + "gpu.machine": value}


def _driver_version_ok(version: str) -> bool:
    parts = version.split(".")
    return 2 <= len(parts) <= 3 and all(parts[:2])


def version_labels(snapshot: Snapshot) -> Labels:
    """Driver and CUDA versions, new and deprecated keys.

    A driver version not shaped ``X.Y[.Z]`` yields no driver labels (NVIDIA fails the whole
    pass instead); the CUDA labels are independent of it.
    """
    labels: Labels = {}
    version = snapshot.system.driver_version.strip()
    parts = version.split(".")
    if _driver_version_ok(version):
        major, minor = label_value(parts[0]), label_value(parts[1])
        rev = label_value(parts[2]) if len(parts) == 3 else ""
        labels.update({
            PREFIX + "cuda.driver.major": major,
            PREFIX + "cuda.driver.minor": minor,
            PREFIX + "cuda.driver.rev": rev,
            PREFIX + "cuda.driver-version.major": major,
            PREFIX + "cuda.driver-version.minor": minor,
            PREFIX + "cuda.driver-version.revision": rev,
            PREFIX + "cuda.driver-version.full": label_value(version),
        })
    cuda = snapshot.system.cuda_driver_version
    if cuda > 0:
        cuda_major, cuda_minor = str(cuda // 1000), str((cuda % 1000) // 10)
        labels.update({
            PREFIX + "cuda.runtime.major": cuda_major,
            PREFIX + "cuda.runtime.minor": cuda_minor,
            PREFIX + "cuda.runtime-version.major": cuda_major,
            PREFIX + "cuda.runtime-version.minor": cuda_minor,
            PREFIX + "cuda.runtime-version.full": f"{cuda_major}.{cuda_minor}",
        })
    return labels


def mig_capability_labels(snapshot: Snapshot) -> Labels:
    """``mig.capable``: true when any GPU supports MIG."""
    capable = any(gpu.mig_capable for gpu in snapshot.gpus)
    return {PREFIX + "mig.capable": str(capable).lower()}


def _mig_enabled(snapshot: Snapshot) -> list[GPU]:
    return [gpu for gpu in snapshot.gpus if gpu.mig_enabled]


def sharing_capability_labels(snapshot: Snapshot, config: Config) -> Labels:
    """``mps.capable``: true when MPS is the sharing strategy and no GPU has MIG enabled.

    NVIDIA's GFD fails the pass when MPS is configured on a node with MIG enabled; we label
    false (the MPS control daemon, selected by this label, stays away) and report the problem.
    """
    capable = config.sharing.strategy == SharingStrategy.MPS and not _mig_enabled(snapshot)
    return {PREFIX + "mps.capable": str(capable).lower()}


def gpu_mode_labels(snapshot: Snapshot) -> Labels:
    """``gpu.mode`` from the PCI class: one class for all GPUs, else ``unknown``."""
    classes = {gpu.pci_class for gpu in snapshot.gpus}
    mode = "unknown"
    if len(classes) == 1:
        only = classes.pop()
        if only == PCI_CLASS_3D:
            mode = "compute"
        elif only == PCI_CLASS_VGA:
            mode = "graphics"
    return {PREFIX + "gpu.mode": mode}


def architecture_labels(resource: str, gpu: GPU) -> Labels:
    """family and compute capability, omitted when the major version is 0."""
    major, minor = gpu.compute_capability
    if major == 0:
        return {}
    return {
        resource + ".family": arch_family(major, minor),
        resource + ".compute.major": str(major),
        resource + ".compute.minor": str(minor),
    }


def full_gpu_labels(snapshot: Snapshot, config: Config,
                    sharing_by: SharingTable | None = None) -> Labels:
    """``gpu.*`` for whole GPUs, describing the dominant model.

    ``gpu.count`` counts every GPU of that model, MIG-enabled or not (as NVIDIA does). When at
    least one GPU of the model has MIG disabled, the sharing config applies; when all have MIG
    enabled, sharing does not apply and ``gpu.replicas`` is 0. ``sharing_by`` is
    :func:`sharing_table` (computed when not given).
    """
    name = dominant((gpu.name, gpu.index) for gpu in snapshot.gpus)
    if name is None:
        return {}
    same = sorted((g for g in snapshot.gpus if g.name == name), key=lambda g: g.index)
    whole = [g for g in same if not g.mig_enabled]
    representative = whole[0] if whole else same[0]
    if sharing_by is None:
        sharing_by = sharing_table(snapshot, config)
    sharing = sharing_for(sharing_by, GPU_RESOURCE) if whole else NO_SHARING
    product = product_value(name, shared=sharing.shared and not sharing.renamed)
    labels = _base_labels(GPU_RESOURCE, product, len(same), sharing)
    memory = mib(representative.memory_bytes)
    if memory:
        labels[GPU_RESOURCE + ".memory"] = str(memory)
    labels.update(architecture_labels(GPU_RESOURCE, representative))
    return labels


def mig_attribute_labels(resource: str, mig: MigDevice) -> Labels:
    """The MIG device's memory, multiprocessors, slices and engines."""
    key = resource + "."
    return {
        key + "memory": str(mib(mig.memory_bytes)),
        key + "multiprocessors": str(mig.multiprocessors),
        key + "slices.gi": str(mig.gpu_instance_slices),
        key + "slices.ci": str(mig.compute_instance_slices),
        key + "engines.copy": str(mig.copy_engines),
        key + "engines.decoder": str(mig.decoders),
        key + "engines.encoder": str(mig.encoders),
        key + "engines.jpeg": str(mig.jpeg_decoders),
        key + "engines.ofa": str(mig.ofa_engines),
    }


def _mig_profile_labels(
    resource: str, sharing: Sharing, devices: list[tuple[GPU, MigDevice]]
) -> Labels:
    """Labels for one MIG profile: the dominant parent model describes it."""
    model = dominant((gpu.name, gpu.index) for gpu, _ in devices)
    parent, mig = next((g, m) for g, m in devices if g.name == model)
    product = product_value(parent.name, "MIG", mig.profile,
                            shared=sharing.shared and not sharing.renamed)
    labels = _base_labels(resource, product, len(devices), sharing)
    labels.update(mig_attribute_labels(resource, mig))
    return labels


def _mig_devices(snapshot: Snapshot) -> list[tuple[GPU, MigDevice]]:
    """Every MIG device with its parent, in GPU then MIG index order."""
    ordered = sorted(snapshot.gpus, key=lambda g: g.index)
    return [(gpu, mig) for gpu in ordered if gpu.mig_enabled
            for mig in sorted(gpu.mig_devices, key=lambda m: m.index)]


def mig_single_labels(snapshot: Snapshot, config: Config,
                      sharing_by: SharingTable | None = None) -> Labels:
    """MIG ``single``: MIG devices become ``gpu.*``; a broken layout is ``<model>-MIG-INVALID``."""
    labels: Labels = {PREFIX + "mig.strategy": "single"}
    enabled = sorted((g for g in snapshot.gpus if g.mig_enabled), key=lambda g: g.index)
    if not enabled:
        return labels
    if mig_single_problems(snapshot):
        labels.update({
            GPU_RESOURCE + ".product": product_value(enabled[0].name, "MIG", "INVALID"),
            GPU_RESOURCE + ".count": "0",
            GPU_RESOURCE + ".replicas": "0",
            GPU_RESOURCE + ".memory": "0",
            # NVIDIA's unit tests expect the key with an empty value here, not "none".
            GPU_RESOURCE + ".sharing-strategy": "",
        })
        return labels
    if sharing_by is None:
        sharing_by = sharing_table(snapshot, config)
    labels.update(_mig_profile_labels(GPU_RESOURCE, sharing_for(sharing_by, GPU_RESOURCE),
                                      _mig_devices(snapshot)))
    return labels


def mig_mixed_labels(snapshot: Snapshot, config: Config,
                     sharing_by: SharingTable | None = None) -> Labels:
    """MIG ``mixed``: ``mig-<profile>.*`` per profile; MIG-enabled GPUs without devices ignored."""
    labels: Labels = {PREFIX + "mig.strategy": "mixed"}
    by_profile: dict[str, list[tuple[GPU, MigDevice]]] = {}
    for gpu, mig in _mig_devices(snapshot):
        by_profile.setdefault(mig.profile, []).append((gpu, mig))
    if sharing_by is None:
        sharing_by = sharing_table(snapshot, config)
    for profile, devices in by_profile.items():
        resource = mig_resource_name(profile)
        labels.update(_mig_profile_labels(resource, sharing_for(sharing_by, resource), devices))
    return labels


def mig_strategy_labels(snapshot: Snapshot, config: Config,
                        sharing_by: SharingTable | None = None) -> Labels:
    """The MIG strategy's labels; ``none`` adds nothing (not even ``mig.strategy``)."""
    strategy = config.flags.mig_strategy
    if strategy == "single":
        return mig_single_labels(snapshot, config, sharing_by)
    if strategy == "mixed":
        return mig_mixed_labels(snapshot, config, sharing_by)
    return {}


# --------------------------------------------------------------------------- merge


def merge(*parts: Mapping[str, str]) -> Labels:
    """Merge label sets; later ones win on the same key."""
    merged: Labels = {}
    for part in parts:
        merged.update(part)
    return merged


def resource_labels(snapshot: Snapshot, config: Config) -> Labels:
    """Full-GPU labels overlaid with the MIG strategy's (NVIDIA's "resource labeler")."""
    if not snapshot.gpus:
        return {}
    sharing_by = sharing_table(snapshot, config)  # one resource map per pass
    return merge(full_gpu_labels(snapshot, config, sharing_by),
                 mig_strategy_labels(snapshot, config, sharing_by))


def device_labels(snapshot: Snapshot, config: Config, machine: str) -> Labels:
    """Every label that describes GPUs; empty when the node has none (as NVIDIA does)."""
    if not snapshot.gpus:
        return {}
    labelers: list[Callable[[], Labels]] = [
        lambda: machine_labels(machine),
        lambda: version_labels(snapshot),
        lambda: mig_capability_labels(snapshot),
        lambda: sharing_capability_labels(snapshot, config),
        lambda: resource_labels(snapshot, config),
        lambda: gpu_mode_labels(snapshot),
        lambda: imex_labels(snapshot),
    ]
    return merge(*(labeler() for labeler in labelers))


def node_labels(
    snapshot: Snapshot,
    config: Config,
    *,
    machine: str = UNKNOWN_MACHINE,
    timestamp: int | None = None,
) -> dict[str, str]:
    """All GFD labels for the node (full keys with the ``nvidia.com/`` prefix).

    The vGPU labels describe the node, not its GPUs: NVIDIA writes them on every node.
    """
    return merge(timestamp_labels(config, timestamp), device_labels(snapshot, config, machine),
                 vgpu_labels(snapshot))


def label_problems(snapshot: Snapshot, config: Config) -> tuple[str, ...]:
    """Why some labels are missing or marked invalid (the shell logs these when they change)."""
    problems: list[str] = []
    if snapshot.gpus and not _driver_version_ok(snapshot.system.driver_version.strip()):
        problems.append(f"driver version {snapshot.system.driver_version!r} does not match "
                        "X.Y[.Z]; no cuda.driver labels")
    if config.flags.mig_strategy == "single" and any(g.mig_enabled for g in snapshot.gpus):
        problems.extend(f"{p} (labelled -MIG-INVALID)" for p in mig_single_problems(snapshot))
    enabled = _mig_enabled(snapshot)
    if config.sharing.strategy == SharingStrategy.MPS and enabled:
        gpus = ", ".join(f"GPU {gpu.index} ({gpu.uuid})" for gpu in enabled)
        problems.append(f"MPS sharing is not supported for MIG devices: {gpus} "
                        f"{'has' if len(enabled) == 1 else 'have'} MIG enabled "
                        "(labelled mps.capable=false)")
    problems.extend(imex_problems(snapshot))
    problems.extend(vgpu_problems(snapshot))
    return tuple(problems)


def is_valid_label_value(value: str) -> bool:
    """True when ``value`` is a valid Kubernetes label value."""
    return len(value) <= MAX_VALUE_LEN and re.fullmatch(
        r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?", value) is not None

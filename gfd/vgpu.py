"""The vGPU labeler: ``vgpu.present`` on every node, the host driver on vGPU guests.

As NVIDIA's (``internal/lm/vgpu.go``): ``nvidia.com/vgpu.present=true|false``, plus
``vgpu.host-driver-version`` / ``vgpu.host-driver-branch`` from the host driver record of a
vGPU guest's PCI config space (read by :mod:`gpus.vgpu` into ``Snapshot.vgpu``).

Where the config space could not be read whole (an unprivileged container sees 64 bytes),
NVIDIA's GFD fails the pass; ours writes no ``vgpu.*`` label (rather than a possibly wrong
``false``) and reports why (``vgpu_problems``).
"""

from __future__ import annotations

from gfd.values import PREFIX, Labels, label_value
from gpus.model import Snapshot

PRESENT_LABEL = PREFIX + "vgpu.present"
VERSION_LABEL = PREFIX + "vgpu.host-driver-version"
BRANCH_LABEL = PREFIX + "vgpu.host-driver-branch"


def vgpu_labels(snapshot: Snapshot) -> Labels:
    """The vGPU labels; none when the snapshot did not read sysfs or could not tell."""
    info = snapshot.vgpu
    if info is None or (info.error and not info.present):
        return {}
    labels = {PRESENT_LABEL: str(info.present).lower()}
    if info.present and info.host_driver_version:
        labels[VERSION_LABEL] = label_value(info.host_driver_version)
    if info.present and info.host_driver_branch:
        labels[BRANCH_LABEL] = label_value(info.host_driver_branch)
    return labels


def vgpu_problems(snapshot: Snapshot) -> tuple[str, ...]:
    """Why the vGPU labels are missing or incomplete."""
    info = snapshot.vgpu
    if info is None or not info.error:
        return ()
    missing = "no vgpu.host-driver labels" if info.present else "no vgpu.* labels"
    return (f"vGPU: {info.error}; {missing}",)

"""A GPU's MIG layout in a profile: instance lists parsed and placed with NVML's capacity rules."""

from __future__ import annotations

import re
from typing import Any

from gpus.fake.profile_fields import FieldReader
from gpus.fake.profile_limits import GI_ID_BOUNDS, MAX_MIG_SLICES
from gpus.fake.profile_model import ComputeInstance, GpuInstance, MigProfile, Model

_MIG_NAME = re.compile(r"^(?:(\d+)c\.)?(\d+g\..+)$")
# GPU instance ids NVML hands out on 7-slice GPUs, by (compute slices, memory eighths): the fake
# takes the first free one so ids look like a real A100/H100's.
_GI_ID_POOLS: dict[tuple[int, int], tuple[int, ...]] = {
    (7, 8): (0,),
    (4, 4): (1,),
    (3, 4): (1, 2),
    (2, 2): (3, 4, 5),
    (1, 2): (3, 4, 5, 6),
    (1, 1): (7, 8, 9, 10, 11, 12, 13),
}


class MigReader(FieldReader):
    """The ``mig`` entries of a profile's GPUs."""

    def mig_layout(
        self, model: Model, value: Any, field: str
    ) -> tuple[bool, tuple[GpuInstance, ...]]:
        """(MIG enabled, GPU instances) from ``disabled``/null or a list of instances."""
        if value is None or value == "disabled":
            return False, ()
        if not isinstance(value, list):
            raise self.fail(field, "expected 'disabled' or a list of MIG instances")
        if not model.mig_capable:
            raise self.fail(field, f"{model.name} is not MIG capable")
        layout = _MigLayout(model)
        for i, item in enumerate(value):
            self.mig_item(layout, item, f"{field}[{i}]")
        return True, tuple(layout.instances)

    def mig_item(self, layout: _MigLayout, item: Any, field: str) -> None:
        """One list entry: "[<c>c.]<name>" or {profile, count, compute, gi}."""
        if isinstance(item, str):
            match = _MIG_NAME.match(item)
            if not match:
                raise self.fail(
                    field, f"{item!r} is not a MIG profile name like 1g.5gb or 1c.3g.20gb"
                )
            profile = self.mig_profile(layout.model, match.group(2), field)
            compute = [int(match.group(1))] if match.group(1) else [profile.slices]
            self.add_instance(layout, profile, compute, None, field)
            return
        if not isinstance(item, dict):
            raise self.fail(field, "expected a profile name or a mapping")
        self.check_keys(item, ("profile", "count", "compute", "gi"), field)
        profile = self.mig_profile(
            layout.model, self.get(item, "profile", f"{field}.profile", str), f"{field}.profile"
        )
        count = self.get(item, "count", f"{field}.count", int, 1)
        compute = self.get(item, "compute", f"{field}.compute", list, [profile.slices])
        gi = self.get_int(item, "gi", f"{field}.gi", GI_ID_BOUNDS, None)
        if not 1 <= count <= MAX_MIG_SLICES or (gi is not None and count != 1):
            raise self.fail(
                f"{field}.count", f"must be 1..{MAX_MIG_SLICES} (and 1 when gi is given)"
            )
        for _ in range(count):
            self.add_instance(layout, profile, compute, gi, field)

    def mig_profile(self, model: Model, name: str, field: str) -> MigProfile:
        """The model's GPU instance profile called ``name``."""
        profile = model.mig_profile(name)
        if profile is None:
            known = ", ".join(p.name for p in model.mig_profiles)
            raise self.fail(field, f"{model.name} has no MIG profile {name!r} (has: {known})")
        return profile

    def add_instance(
        self,
        layout: _MigLayout,
        profile: MigProfile,
        compute: list[Any],
        gi: int | None,
        field: str,
    ) -> None:
        """Add a GPU instance, checking that it fits."""
        if not compute or not all(
            isinstance(c, int) and not isinstance(c, bool) and c >= 1 for c in compute
        ):
            raise self.fail(field, "compute: expected a non-empty list of compute slice counts")
        if sum(compute) > profile.slices:
            raise self.fail(
                field,
                f"compute instances use {sum(compute)} slices, {profile.name} has {profile.slices}",
            )
        reason = layout.add(profile, compute, gi)
        if reason:
            raise self.fail(field, reason)


class _MigLayout:
    """GPU instances being placed on one GPU, with NVML's capacity rules."""

    def __init__(self, model: Model) -> None:
        self.model = model
        self.instances: list[GpuInstance] = []

    def add(self, profile: MigProfile, compute: list[int], gi: int | None) -> str | None:
        """Place an instance; returns why it does not fit, or None."""
        same = sum(1 for g in self.instances if g.profile.id == profile.id)
        if same >= profile.instances:
            return f"{profile.name}: at most {profile.instances} instance(s) per GPU"
        slices = sum(g.profile.slices for g in self.instances) + profile.slices
        if slices > self.model.mig_slices:
            return (
                f"{profile.name} does not fit: {slices} of {self.model.mig_slices} compute slices"
            )
        eighths = sum(self.model.memory_eighths(g.profile) for g in self.instances)
        eighths += self.model.memory_eighths(profile)
        if eighths > 8:
            return f"{profile.name} does not fit: {eighths} of 8 memory slices"
        used = {g.id for g in self.instances}
        if gi is None:
            gi = self.free_id(profile, used)
        elif gi in used:
            return f"gi {gi} is already used on this GPU"
        start = sum(g.profile.slices for g in self.instances)
        cis = tuple(ComputeInstance(id=k, slices=c) for k, c in enumerate(compute))
        self.instances.append(
            GpuInstance(id=gi, profile=profile, placement_start=start, compute_instances=cis)
        )
        return None

    def free_id(self, profile: MigProfile, used: set[int]) -> int:
        """The first free id from the pool a real GPU would use, else the smallest free id."""
        pool: tuple[int, ...] = ()
        if self.model.mig_slices == 7:
            pool = _GI_ID_POOLS.get((profile.slices, self.model.memory_eighths(profile)), ())
        for candidate in pool:
            if candidate not in used:
                return candidate
        candidate = 1
        while candidate in used:
            candidate += 1
        return candidate

"""Validating a raw profile mapping (``extends`` resolved) into a :class:`Profile`."""

from __future__ import annotations

import re
import uuid as uuidlib
from collections.abc import Callable, Mapping
from typing import Any

import pynvml

from gpus.fake.profile_limits import (
    C_INT_BOUNDS,
    C_INT_MAX,
    C_UINT_BOUNDS,
    C_ULLONG_MAX,
    DRIVER_VERSION_BUFFER,
    ENGINE_FIELDS,
    MAX_GPUS,
    MIG_PROFILE_BOUNDS,
    MIG_SLICE_BOUNDS,
    MINOR_BOUNDS,
    NAME_BUFFER,
    NUMA_BOUNDS,
    NVLINK_BOUNDS,
    PCI_CLASS_BOUNDS,
    UUID_BUFFER,
)
from gpus.fake.profile_mig import MigReader
from gpus.fake.profile_model import (
    ARCHITECTURES,
    BRANDS,
    FABRIC_STATES,
    GI_PROFILES,
    VGPU_FIELD_BYTES,
    FabricSpec,
    GpuSpec,
    MigProfile,
    Model,
    Profile,
    VgpuSpec,
)
from gpus.fake.profile_topology import TopologyReader
from gpus.model import MIB

_UUID = re.compile(r"^GPU-[A-Za-z0-9._-]+$")


class ProfileBuilder(MigReader, TopologyReader):
    """Turns a raw profile mapping into a :class:`Profile`, naming the field of every error."""

    def __init__(
        self, source: str, raw: dict[str, Any], shipped_models: Callable[[], Mapping[str, Any]]
    ) -> None:
        super().__init__(source, raw)
        # Called only when the models are built: the profile's own top-level errors come first,
        # and a profile refused before that never reads the model table.
        self.shipped_models = shipped_models

    def build(self) -> Profile:
        """Validate and build the profile."""
        raw = self.raw
        self.check_keys(
            raw,
            (
                "name",
                "description",
                "driver_version",
                "cuda_driver_version",
                "nvml_version",
                "machine",
                "models",
                "defaults",
                "gpus",
                "mig",
                "topology",
                "vgpu",
            ),
            "",
        )
        name = self.get(raw, "name", "name", str)
        driver = self.get_str(raw, "driver_version", "driver_version", DRIVER_VERSION_BUFFER)
        # Bounded before the models: a huge gpus list must not cost anything.
        self.get(raw, "gpus", "gpus", list)
        if len(raw["gpus"]) > MAX_GPUS:
            raise self.fail(
                "gpus", f"{len(raw['gpus'])} GPUs, more than the {MAX_GPUS} a node can have"
            )
        models = self.models()
        gpus = self.gpus(name, models)
        return Profile(
            name=name,
            description=self.get(raw, "description", "description", str, ""),
            source=self.source,
            driver_version=driver,
            cuda_driver_version=self.get_int(
                raw, "cuda_driver_version", "cuda_driver_version", C_INT_BOUNDS
            ),
            nvml_version=self.get_str(
                raw, "nvml_version", "nvml_version", DRIVER_VERSION_BUFFER, f"12.{driver}"
            ),
            machine=self.get(raw, "machine", "machine", str, name),
            gpus=gpus,
            topology=self.topology(gpus),
            vgpu=self.vgpu(),
        )

    def vgpu(self) -> VgpuSpec | None:
        """The optional ``vgpu`` section: the host driver a vGPU guest sees."""
        raw = self.get(self.raw, "vgpu", "vgpu", dict, None)
        if raw is None:
            return None
        self.check_keys(raw, ("host_driver_version", "host_driver_branch"), "vgpu")
        values = []
        for key in ("host_driver_version", "host_driver_branch"):
            text = self.get(raw, key, f"vgpu.{key}", str)
            if not text.isascii() or not text.isprintable() or not text:
                raise self.fail(f"vgpu.{key}", "expected printable ASCII text")
            if len(text) > VGPU_FIELD_BYTES:
                raise self.fail(f"vgpu.{key}", f"longer than the {VGPU_FIELD_BYTES} bytes of "
                                "the PCI capability record")
            values.append(text)
        return VgpuSpec(host_driver_version=values[0], host_driver_branch=values[1])

    def fabric(self, data: Mapping[str, Any], field: str) -> FabricSpec | None:
        """A GPU's ``fabric`` (``defaults`` may give it to every GPU)."""
        raw = self.get(data, "fabric", field, dict, None)
        if raw is None:
            return None
        self.check_keys(raw, ("cluster_uuid", "clique_id", "state", "status"), field)
        text = self.get(raw, "cluster_uuid", f"{field}.cluster_uuid", str)
        try:
            cluster = str(uuidlib.UUID(text))
        except ValueError:
            raise self.fail(f"{field}.cluster_uuid", f"{text!r} is not a UUID") from None
        state = self.get(raw, "state", f"{field}.state", str, "completed")
        if state not in FABRIC_STATES:
            raise self.fail(f"{field}.state", f"unknown {state!r} (one of "
                            f"{', '.join(FABRIC_STATES)})")
        status = self.get(raw, "status", f"{field}.status", str, "success")
        code = 0 if status == "success" else getattr(pynvml, status, None)
        if not isinstance(code, int) or not (status == "success"
                                             or status.startswith("NVML_ERROR_")):
            raise self.fail(f"{field}.status", f"{status!r} is not success or an NVML_ERROR_ name")
        return FabricSpec(
            cluster_uuid=cluster,
            clique_id=self.get_int(raw, "clique_id", f"{field}.clique_id", C_UINT_BOUNDS),
            state=FABRIC_STATES[state],
            status=code,
        )

    # -- models ---------------------------------------------------------------------------------

    def models(self) -> dict[str, Model]:
        """The shipped models plus any the profile defines."""
        shipped = self.shipped_models()
        extra = self.get(self.raw, "models", "models", dict, {})
        raw_models = {**shipped, **extra}
        built: dict[str, Model] = {}
        for key in raw_models:
            built[str(key)] = self.model(str(key), raw_models)
        return built

    def model(self, key: str, raw_models: Mapping[str, Any]) -> Model:
        """Build one model (``mig_table`` borrows another model's MIG profiles)."""
        field = f"models.{key}"
        data = raw_models[key]
        if not isinstance(data, dict):
            raise self.fail(field, "must be a mapping")
        self.check_keys(
            data,
            (
                "name",
                "memory_bytes",
                "compute_capability",
                "architecture",
                "brand",
                "pci_device_id",
                "pci_subsystem_id",
                "pci_class",
                "nvlinks",
                "mig_slices",
                "mig",
                "mig_table",
            ),
            field,
        )
        cc = self.get(data, "compute_capability", f"{field}.compute_capability", list)
        if len(cc) != 2 or not all(
            isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= C_INT_MAX for v in cc
        ):
            raise self.fail(
                f"{field}.compute_capability", f"expected [major, minor], each 0..{C_INT_MAX}"
            )
        arch = self.get(data, "architecture", f"{field}.architecture", str)
        if arch not in (*ARCHITECTURES, "unknown"):
            raise self.fail(
                f"{field}.architecture", f"unknown {arch!r} (one of {', '.join(ARCHITECTURES)})"
            )
        brand = self.get(data, "brand", f"{field}.brand", str)
        if brand not in BRANDS:
            raise self.fail(f"{field}.brand", f"unknown {brand!r} (one of {', '.join(BRANDS)})")
        memory = self.get(data, "memory_bytes", f"{field}.memory_bytes", int)
        if memory <= 0 or memory % MIB or memory > C_ULLONG_MAX:
            raise self.fail(
                f"{field}.memory_bytes",
                f"must be a positive whole number of MiB up to {C_ULLONG_MAX} "
                "(NVML reports it as an unsigned long long)",
            )
        mig_raw = data.get("mig")
        mig_field = f"{field}.mig"
        table_ref = data.get("mig_table")
        if table_ref is not None:
            if table_ref not in raw_models or not isinstance(raw_models[table_ref], dict):
                raise self.fail(f"{field}.mig_table", f"unknown model {table_ref!r}")
            mig_raw = raw_models[table_ref].get("mig")
            mig_field = f"models.{table_ref}.mig"
        name = self.get_str(data, "name", f"{field}.name", NAME_BUFFER)
        mig_profiles = self.mig_table(mig_raw or [], mig_field)
        for mig in mig_profiles:
            # A MIG device's name is "<GPU name> MIG <c>c.<profile>".
            self.check_length(f"{name} MIG 8c.{mig.name}", f"{field}.name", NAME_BUFFER)
        return Model(
            key=key,
            name=name,
            memory_bytes=memory,
            compute_capability=(cc[0], cc[1]),
            architecture=arch,
            brand=brand,
            pci_device_id=self.get_int(
                data, "pci_device_id", f"{field}.pci_device_id", C_UINT_BOUNDS
            ),
            pci_subsystem_id=self.get_int(
                data, "pci_subsystem_id", f"{field}.pci_subsystem_id", C_UINT_BOUNDS, 0
            ),
            pci_class=self.get_int(
                data, "pci_class", f"{field}.pci_class", PCI_CLASS_BOUNDS, 0x030200
            ),
            nvlinks=self.get_int(data, "nvlinks", f"{field}.nvlinks", NVLINK_BOUNDS, 0),
            mig_slices=self.get_int(
                data, "mig_slices", f"{field}.mig_slices", MIG_SLICE_BOUNDS, 7 if mig_raw else 0
            ),
            mig_profiles=mig_profiles,
        )

    def mig_table(self, rows: Any, field: str) -> tuple[MigProfile, ...]:
        """A model's GPU instance profiles."""
        if not isinstance(rows, list):
            raise self.fail(field, "must be a list")
        out = []
        for i, row in enumerate(rows):
            f = f"{field}[{i}]"
            if not isinstance(row, dict):
                raise self.fail(f, "must be a mapping")
            self.check_keys(row, MigProfile.__dataclass_fields__, f)
            profile = self.get(row, "profile", f"{f}.profile", str)
            if profile not in GI_PROFILES:
                raise self.fail(
                    f"{f}.profile", f"unknown {profile!r} (one of {', '.join(GI_PROFILES)})"
                )
            ints = {
                k: self.get_int(row, k, f"{f}.{k}", bounds, 0 if k in ENGINE_FIELDS else ...)
                for k, bounds in MIG_PROFILE_BOUNDS.items()
            }
            # nvmlGpuInstanceProfileInfo_v2_t.name is "MIG <name>".
            name = self.get(row, "name", f"{f}.name", str)
            self.check_length(f"MIG {name}", f"{f}.name", NAME_BUFFER)
            out.append(MigProfile(profile=profile, name=name, **ints))
        return tuple(out)

    # -- GPUs -----------------------------------------------------------------------------------

    def gpus(self, profile_name: str, models: Mapping[str, Model]) -> tuple[GpuSpec, ...]:
        """Every GPU entry, with defaults and MIG layouts applied."""
        entries = self.get(self.raw, "gpus", "gpus", list)
        if not entries:
            raise self.fail("gpus", "at least one GPU is required")
        defaults = self.get(self.raw, "defaults", "defaults", dict, {})
        mig_overrides = self.get(self.raw, "mig", "mig", dict, {})
        for key in mig_overrides:
            if key != "all" and not (isinstance(key, int) and 0 <= key < len(entries)):
                raise self.fail(
                    f"mig.{key}", f"expected 'all' or a GPU index 0..{len(entries) - 1}"
                )
        out: list[GpuSpec] = []
        bus_ids: set[str] = set()
        for index, entry in enumerate(entries):
            field = f"gpus[{index}]"
            if not isinstance(entry, dict):
                raise self.fail(field, "must be a mapping")
            data = {**defaults, **entry}
            self.check_keys(
                data,
                ("model", "bus_id", "numa_node", "minor", "uuid", "mig", "pci_class", "fabric"),
                field,
            )
            model_key = self.get(data, "model", f"{field}.model", str)
            if model_key not in models:
                raise self.fail(
                    f"{field}.model",
                    f"unknown model {model_key!r} (known: {', '.join(sorted(models))})",
                )
            model = models[model_key]
            bus_id = self.bus_id(
                self.get(data, "bus_id", f"{field}.bus_id", str), f"{field}.bus_id"
            )
            if bus_id in bus_ids:
                raise self.fail(f"{field}.bus_id", f"duplicate bus id {bus_id}")
            bus_ids.add(bus_id)
            numa = self.get_int(data, "numa_node", f"{field}.numa_node", NUMA_BOUNDS, None)
            mig_field, mig_value = f"{field}.mig", data.get("mig")
            for key in ("all", index):
                if key in mig_overrides:
                    mig_field, mig_value = f"mig.{key}", mig_overrides[key]
            uuid = self.uuid(data, field, profile_name, index)
            minor = self.get_int(data, "minor", f"{field}.minor", MINOR_BOUNDS, index)
            for other in out:
                if other.uuid == uuid:
                    raise self.fail(f"{field}.uuid", f"duplicate UUID {uuid} (GPU {other.index})")
                if other.minor == minor:
                    raise self.fail(
                        f"{field}.minor", f"duplicate minor number {minor} (GPU {other.index})"
                    )
            enabled, instances = self.mig_layout(model, mig_value, mig_field)
            out.append(
                GpuSpec(
                    index=index,
                    uuid=uuid,
                    model=model,
                    bus_id=bus_id,
                    minor=minor,
                    numa_node=numa if numa is None or numa >= 0 else None,
                    pci_class=self.get_int(
                        data, "pci_class", f"{field}.pci_class", PCI_CLASS_BOUNDS, model.pci_class
                    ),
                    mig_enabled=enabled,
                    gpu_instances=instances,
                    fabric=self.fabric(data, f"{field}.fabric"),
                )
            )
        return tuple(out)

    def uuid(self, data: Mapping[str, Any], field: str, profile_name: str, index: int) -> str:
        """A GPU's UUID: given ("GPU-" and characters a UUID list can carry) or derived."""
        seed = f"fake-nvml/{profile_name}/{index}"
        uuid: str = self.get_str(
            data,
            "uuid",
            f"{field}.uuid",
            UUID_BUFFER,
            f"GPU-{uuidlib.uuid5(uuidlib.NAMESPACE_URL, seed)}",
        )
        # NVIDIA_VISIBLE_DEVICES and device IDs are comma-separated lists of these.
        if not _UUID.match(uuid):
            raise self.fail(f"{field}.uuid", f"{uuid!r} is not like GPU-<letters, digits, -._>")
        return uuid

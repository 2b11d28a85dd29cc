"""Pure functions: (Snapshot, Sample, Attribution, XIDs, options) -> metric families.

Names, types, HELP texts, label names and label order are dcgm-exporter's (its render template):
``gpu, UUID, pci_bus_id, device, modelName, [GPU_I_PROFILE, GPU_I_ID,] Hostname``, then the
``label`` rows of the collectors file sorted by name (``DCGM_FI_DRIVER_VERSION``), then the
attributes sorted by name (``container, namespace, pod``, ``err_code``/``err_msg`` on XIDs).

Pods (better than dcgm-exporter, see docs/metrics.md):

- a device held by one container: its series carry that container's labels;
- held by several (time-slicing, MPS, a renamed ``.shared`` resource): one series per holder.
  ``DCGM_FI_DEV_FB_USED`` and ``DCGM_FI_DEV_GPU_UTIL`` take each pod's own processes' memory and
  SM share when NVML lists the device's processes and every one of them is mapped to a holder;
  every other value (and those, when the processes cannot all be mapped) is the device's
  value on a series marked ``shared="true"``: a copy, said to be one;
- MIG devices (key: parent GPU + GPU instance) carry their holders' labels the same way.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from exporter.attribution import Attribution, DeviceKey, PodRef
from exporter.fields import Collector, PromType, ValueFormat
from exporter.pods import PodOwner
from exporter.xid import XidView, xid_message
from gpus.model import GPU, MigDevice, Snapshot
from gpus.records import record
from gpus.telemetry import DeviceSample, Sample

MAX_LABELS = 30  # Prometheus/Mimir's common per-series limit

# series name -> DeviceSample attribute
SOURCES: Mapping[str, str] = {
    "DCGM_FI_DEV_SM_CLOCK": "sm_clock_mhz",
    "DCGM_FI_DEV_MEM_CLOCK": "mem_clock_mhz",
    "DCGM_FI_DEV_MEMORY_TEMP": "memory_temp_c",
    "DCGM_FI_DEV_GPU_TEMP": "gpu_temp_c",
    "DCGM_FI_DEV_POWER_USAGE": "power_w",
    "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION": "energy_mj",
    "DCGM_FI_DEV_PCIE_REPLAY_COUNTER": "pcie_replays",
    "DCGM_FI_DEV_GPU_UTIL": "gpu_util",
    "DCGM_FI_DEV_MEM_COPY_UTIL": "mem_copy_util",
    "DCGM_FI_DEV_ENC_UTIL": "enc_util",
    "DCGM_FI_DEV_DEC_UTIL": "dec_util",
    "DCGM_FI_DEV_FB_FREE": "fb_free_mib",
    "DCGM_FI_DEV_FB_USED": "fb_used_mib",
    "DCGM_FI_DEV_FB_RESERVED": "fb_reserved_mib",
    "DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL": "nvlink_bandwidth_total",
    "DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS": "remapped_uncorrectable",
    "DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS": "remapped_correctable",
    "DCGM_FI_DEV_ROW_REMAP_FAILURE": "remap_failure",
    "DCGM_FI_PROF_GR_ENGINE_ACTIVE": "gr_engine_active",
    "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE": "tensor_active",
    "DCGM_FI_PROF_DRAM_ACTIVE": "dram_active",
    "DCGM_FI_PROF_PCIE_TX_BYTES": "pcie_tx_bytes",
    "DCGM_FI_PROF_PCIE_RX_BYTES": "pcie_rx_bytes",
    "DCGM_FI_DEV_ECC_SBE_VOL_TOTAL": "ecc_sbe_volatile",
    "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL": "ecc_dbe_volatile",
    "DCGM_FI_DEV_ECC_SBE_AGG_TOTAL": "ecc_sbe_aggregate",
    "DCGM_FI_DEV_ECC_DBE_AGG_TOTAL": "ecc_dbe_aggregate",
}
XID_LAST = "DCGM_FI_DEV_XID_ERRORS"
XID_COUNT = "DCGM_EXP_XID_ERRORS_COUNT"


def wanted_attributes(collectors: Iterable[Collector]) -> frozenset[str]:
    """The DeviceSample attributes the collectors need (for the telemetry reader)."""
    names = {SOURCES[c.name] for c in collectors if c.name in SOURCES}
    return frozenset(names | {"processes"})


@record
class SeriesOptions:
    """dcgm-exporter's flags that shape series."""

    hostname: str | None = None  # None: -n/--no-hostname
    replace_blanks_in_model_name: bool = False
    use_old_namespace: bool = False  # uuid, pod_name, pod_namespace, container_name


@record
class Series:
    """One sample: labels in exposition order, and the value."""

    labels: tuple[tuple[str, str], ...]
    value: float


@record
class Family:
    """One metric family."""

    name: str
    type: str  # "gauge" or "counter"
    help: str
    value_format: ValueFormat
    series: tuple[Series, ...]


@record
class Inputs:
    """Everything one scrape renders."""

    snapshot: Snapshot
    sample: Sample
    attribution: Attribution
    owners: Mapping[int, PodOwner]  # pid -> container (exporter.pods)
    xids: XidView | None = None


def _device_labels(gpu: GPU, mig: MigDevice | None, labels: Mapping[str, str],
                   options: SeriesOptions) -> list[tuple[str, str]]:
    model = gpu.name.replace(" ", "-") if options.replace_blanks_in_model_name else gpu.name
    result = [("gpu", str(gpu.index)), ("uuid" if options.use_old_namespace else "UUID", gpu.uuid),
              ("pci_bus_id", gpu.pci_bus_id), ("device", f"nvidia{gpu.index}"),
              ("modelName", model)]
    if mig is not None:
        result += [("GPU_I_PROFILE", mig.profile), ("GPU_I_ID", str(mig.gpu_instance_id))]
    if options.hostname is not None:
        result.append(("Hostname", options.hostname))
    result += sorted(labels.items())
    return result


def label_rows(collectors: Iterable[Collector], snapshot: Snapshot,
               gpu: GPU) -> dict[str, str]:
    """Values of the collectors' ``label`` rows that NVML gave (others are left out)."""
    known = {"DCGM_FI_DRIVER_VERSION": snapshot.system.driver_version,
             "DCGM_FI_NVML_VERSION": snapshot.system.nvml_version,
             "DCGM_FI_DEV_BRAND": gpu.brand}
    return {c.name: known[c.name] for c in collectors
            if c.prom_type is PromType.LABEL and known.get(c.name)}


def _pod_attrs(ref: PodRef | PodOwner, options: SeriesOptions) -> dict[str, str]:
    if options.use_old_namespace:
        return {"container_name": ref.container, "pod_name": ref.pod,
                "pod_namespace": ref.namespace}
    return {"container": ref.container, "namespace": ref.namespace, "pod": ref.pod}


def _per_pod(device: DeviceSample, holders: tuple[PodRef, ...],
             owners: Mapping[int, PodOwner], attr: str) -> dict[PodRef, float] | None:
    """Each holder's own share of a per-process value, or None when it cannot be split."""
    if device.processes is None or attr not in ("fb_used_mib", "gpu_util"):
        return None
    result = {ref: 0.0 for ref in holders}
    by_owner = {PodOwner(r.namespace, r.pod, r.container): r for r in holders}
    for proc in device.processes:
        ref = by_owner.get(owners.get(proc.pid))  # type: ignore[arg-type]
        value = proc.used_memory_mib if attr == "fb_used_mib" else proc.sm_util
        if ref is None or value is None:
            return None
        result[ref] += value
    return result


def _attributed(base: list[tuple[str, str]], value: float, device: DeviceSample | None,
                attr: str | None, holders: tuple[PodRef, ...], owners: Mapping[int, PodOwner],
                options: SeriesOptions, extra: Mapping[str, str]) -> list[Series]:
    if not holders:
        return [Series(tuple(base + sorted(extra.items())), value)]
    if len(holders) == 1:
        attrs = {**_pod_attrs(holders[0], options), **extra}
        return [Series(tuple(base + sorted(attrs.items())), value)]
    shares = None if device is None or attr is None else _per_pod(device, holders, owners, attr)
    series = []
    for ref in holders:
        attrs = {**_pod_attrs(ref, options), **extra}
        if shares is None:
            attrs["shared"] = "true"
        own = value if shares is None else shares[ref]
        series.append(Series(tuple(base + sorted(attrs.items())), own))
    return series


def _devices(inputs: Inputs) -> list[tuple[GPU, MigDevice | None, DeviceSample, DeviceKey]]:
    samples = {d.uuid: d for d in inputs.sample.devices}
    found: list[tuple[GPU, MigDevice | None, DeviceSample, DeviceKey]] = []
    for gpu in inputs.snapshot.gpus:
        whole = samples.get(gpu.uuid)
        if whole is None:
            continue  # lost: no series until it answers again
        found.append((gpu, None, whole, DeviceKey(gpu.uuid)))
        for mig in gpu.mig_devices:
            sample = samples.get(mig.uuid)
            if sample is not None:
                found.append((gpu, mig, sample, DeviceKey(gpu.uuid, mig.gpu_instance_id)))
    return found


def build_families(inputs: Inputs, collectors: Iterable[Collector],
                   options: SeriesOptions) -> list[Family]:
    """Every family the collectors ask for, in collectors order; empty families left out."""
    rows = tuple(collectors)
    # Labels and holders once per device, not once per device and family.
    devices = [(sample, key, _device_labels(gpu, mig, label_rows(rows, inputs.snapshot, gpu),
                                            options), inputs.attribution.pods_of(key))
               for gpu, mig, sample, key in _devices(inputs)]
    families = []
    for row in rows:
        if row.prom_type is PromType.LABEL:
            continue
        series: list[Series] = []
        for sample, key, base, holders in devices:
            series += _family_series(row.name, base, sample, key, holders, inputs, options)
        if series:
            families.append(Family(row.name, row.prom_type.value, row.help, row.field.value,
                                   tuple(series)))
    return families


def _family_series(name: str, base: list[tuple[str, str]], sample: DeviceSample,
                   key: DeviceKey, holders: tuple[PodRef, ...], inputs: Inputs,
                   options: SeriesOptions) -> list[Series]:
    if name == XID_LAST:
        last = None if inputs.xids is None else inputs.xids.last.get(key)
        if last is None:
            return []
        extra = {"err_code": str(last), "err_msg": xid_message(last)}
        return _attributed(base, float(last), None, None, holders, inputs.owners, options, extra)
    if name == XID_COUNT:
        if inputs.xids is None:
            return []
        window = {"window_size_in_ms": str(inputs.xids.window_ms)}
        counts = inputs.xids.counts.get(key, {})
        if not counts:
            return _attributed(base, 0.0, None, None, holders, inputs.owners, options, window)
        return [s for xid, n in sorted(counts.items())
                for s in _attributed(base, float(n), None, None, holders, inputs.owners,
                                     options, {**window, "xid": str(xid)})]
    attr = SOURCES.get(name)
    value = None if attr is None else sample.value(attr)
    if value is None:
        return []
    return _attributed(base, float(value), sample, attr, holders, inputs.owners, options, {})


def cardinality(families: Iterable[Family]) -> tuple[dict[str, int], int]:
    """(series per GPU UUID, most labels on any series): what the 30-label limit is about."""
    per_gpu: dict[str, int] = {}
    widest = 0
    for family in families:
        for series in family.series:
            labels = dict(series.labels)
            uuid = labels.get("UUID", labels.get("uuid", ""))
            per_gpu[uuid] = per_gpu.get(uuid, 0) + 1
            widest = max(widest, len(series.labels))
    return per_gpu, widest

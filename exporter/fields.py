"""dcgm-exporter's collectors CSV (``-f/--collectors``) and the table of fields we can serve.

The file format is dcgm-exporter's: one ``FIELD_NAME, prom_type, help`` row per line (exactly
three comma-separated columns, surrounding spaces trimmed, CSV quoting allowed), ``#`` starts a
comment line, blank lines are skipped. ``prom_type`` is ``gauge``, ``counter`` or ``label``; a
``label`` row produces no series, its value becomes a label on every other series of the device.

:data:`FIELDS` is plain data: per field, its DCGM id, type, unit and value format, and the NVML
(pynvml) call that provides it. :data:`DEFAULT_COLLECTORS` is dcgm-exporter's
``etc/default-counters.csv`` (its enabled rows, in order). Parsing is pure; a bad file raises one
:class:`CollectorsError` naming the file, the line and what would have been accepted.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Mapping
from dataclasses import field as dataclass_field
from enum import Enum
from pathlib import Path

from gpus.records import record


class PromType(str, Enum):
    """A collectors row's Prometheus type."""

    GAUGE = "gauge"
    COUNTER = "counter"
    LABEL = "label"


class ValueFormat(str, Enum):
    """How a value is written: dcgm-exporter prints INT64 as an integer, DOUBLE with Go's ``%f``
    (six decimals, ``312.457000``) and strings as they are."""

    INT = "int"
    FLOAT = "float"
    STRING = "string"


NUMERIC_TYPES = (PromType.GAUGE, PromType.COUNTER, PromType.LABEL)
STRING_TYPES = (PromType.LABEL,)  # a string value cannot be a sample


@record
class FieldSpec:
    """One field we know: what dcgm-exporter calls it and where NVML has it."""

    name: str  # the series name, e.g. "DCGM_FI_DEV_GPU_TEMP"
    field_id: int | None  # DCGM's field id; None for exporter-only DCGM_EXP_* fields
    prom_type: PromType  # the type in dcgm-exporter's counters file
    value: ValueFormat
    unit: str  # what one unit of the value is: "MHz", "C", "W", "mJ", "MiB", "ratio", ...
    nvml: str  # the pynvml call (or event) that provides the value
    help: str  # dcgm-exporter's help text
    default: bool = False  # enabled in dcgm-exporter's default counters file
    gpm: bool = False  # a profiling ratio: NVML GPM only (Hopper+), absent elsewhere

    @property
    def allowed_types(self) -> tuple[PromType, ...]:
        """The types a collectors row may give this field."""
        return STRING_TYPES if self.value is ValueFormat.STRING else NUMERIC_TYPES


def _f(name: str, field_id: int | None, prom_type: str, value: str, unit: str, nvml: str,
       help_text: str, *, default: bool = False, gpm: bool = False) -> FieldSpec:
    return FieldSpec(name, field_id, PromType(prom_type), ValueFormat(value), unit, nvml,
                     help_text, default, gpm)


_GPM = "nvmlGpmMetricsGet"
# In the order of dcgm-exporter's default counters file; the default rows first.
FIELDS: tuple[FieldSpec, ...] = (
    _f("DCGM_FI_DEV_SM_CLOCK", 100, "gauge", "int", "MHz",
       "nvmlDeviceGetClockInfo(h, NVML_CLOCK_SM)",
       "SM clock frequency (in MHz).", default=True),
    _f("DCGM_FI_DEV_MEM_CLOCK", 101, "gauge", "int", "MHz",
       "nvmlDeviceGetClockInfo(h, NVML_CLOCK_MEM)",
       "Memory clock frequency (in MHz).", default=True),
    _f("DCGM_FI_DEV_MEMORY_TEMP", 140, "gauge", "int", "C",
       "nvmlDeviceGetFieldValues(h, [NVML_FI_DEV_MEMORY_TEMP]) (values > 200 are errors)",
       "Memory temperature (in C).", default=True),
    _f("DCGM_FI_DEV_GPU_TEMP", 150, "gauge", "int", "C",
       "nvmlDeviceGetTemperature(h, NVML_TEMPERATURE_GPU)",
       "GPU temperature (in C).", default=True),
    _f("DCGM_FI_DEV_POWER_USAGE", 155, "gauge", "float", "W",
       "nvmlDeviceGetPowerUsage(h) (mW) / 1000",
       "Power draw (in W).", default=True),
    _f("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", 156, "counter", "int", "mJ",
       "nvmlDeviceGetTotalEnergyConsumption(h) (since the driver was loaded)",
       "Total energy consumption since boot (in mJ).", default=True),
    _f("DCGM_FI_DEV_PCIE_REPLAY_COUNTER", 202, "counter", "int", "count",
       "nvmlDeviceGetPcieReplayCounter(h)",
       "Total number of PCIe retries.", default=True),
    _f("DCGM_FI_DEV_GPU_UTIL", 203, "gauge", "int", "%",
       "nvmlDeviceGetUtilizationRates(h).gpu",
       "GPU utilization (in %).", default=True),
    _f("DCGM_FI_DEV_MEM_COPY_UTIL", 204, "gauge", "int", "%",
       "nvmlDeviceGetUtilizationRates(h).memory",
       "Memory utilization (in %).", default=True),
    _f("DCGM_FI_DEV_ENC_UTIL", 206, "gauge", "int", "%",
       "nvmlDeviceGetEncoderUtilization(h)[0]",
       "Encoder utilization (in %).", default=True),
    _f("DCGM_FI_DEV_DEC_UTIL", 207, "gauge", "int", "%",
       "nvmlDeviceGetDecoderUtilization(h)[0]",
       "Decoder utilization (in %).", default=True),
    _f("DCGM_FI_DEV_XID_ERRORS", 230, "gauge", "int", "xid",
       "NVML event set, nvmlEventTypeXidCriticalError: the last event's eventData",
       "Value of the last XID error encountered.", default=True),
    _f("DCGM_FI_DEV_FB_FREE", 251, "gauge", "int", "MiB",
       "nvmlDeviceGetMemoryInfo(h, version=nvmlMemory_v2).free // 1048576",
       "Framebuffer memory free (in MiB).", default=True),
    _f("DCGM_FI_DEV_FB_USED", 252, "gauge", "int", "MiB",
       "nvmlDeviceGetMemoryInfo(h, version=nvmlMemory_v2).used // 1048576",
       "Framebuffer memory used (in MiB).", default=True),
    _f("DCGM_FI_DEV_FB_RESERVED", 253, "gauge", "int", "MiB",
       "nvmlDeviceGetMemoryInfo(h, version=nvmlMemory_v2).reserved // 1048576",
       "Framebuffer memory reserved (in MiB).", default=True),
    _f("DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL", 449, "counter", "int", "count",
       "nvmlDeviceGetFieldValues(h, [NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX, _DATA_TX], "
       "scopeId=0xFFFFFFFF) summed",
       "Total number of NVLink bandwidth counters for all lanes.", default=True),
    _f("DCGM_FI_DEV_VGPU_LICENSE_STATUS", 526, "gauge", "int", "0/1",
       "nvmlDeviceGetGridLicensableFeatures(h): 1 if the vGPU feature is licensed",
       "vGPU License status", default=True),
    _f("DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS", 393, "counter", "int", "rows",
       "nvmlDeviceGetRemappedRows(h)[1]",
       "Number of remapped rows for uncorrectable errors", default=True),
    _f("DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS", 394, "counter", "int", "rows",
       "nvmlDeviceGetRemappedRows(h)[0]",
       "Number of remapped rows for correctable errors", default=True),
    _f("DCGM_FI_DEV_ROW_REMAP_FAILURE", 395, "gauge", "int", "0/1",
       "nvmlDeviceGetRemappedRows(h)[3]",
       "Whether remapping of rows has failed", default=True),
    _f("DCGM_FI_DRIVER_VERSION", 1, "label", "string", "",
       "nvmlSystemGetDriverVersion()",
       "Driver Version", default=True),
    _f("DCGM_FI_PROF_GR_ENGINE_ACTIVE", 1001, "gauge", "float", "ratio",
       f"{_GPM} NVML_GPM_METRIC_GRAPHICS_UTIL / 100",
       "Ratio of time the graphics engine is active.", default=True, gpm=True),
    _f("DCGM_FI_PROF_PIPE_TENSOR_ACTIVE", 1004, "gauge", "float", "ratio",
       f"{_GPM} NVML_GPM_METRIC_ANY_TENSOR_UTIL / 100",
       "Ratio of cycles the tensor (HMMA) pipe is active.", default=True, gpm=True),
    _f("DCGM_FI_PROF_DRAM_ACTIVE", 1005, "gauge", "float", "ratio",
       f"{_GPM} NVML_GPM_METRIC_DRAM_BW_UTIL / 100",
       "Ratio of cycles the device memory interface is active sending or receiving data.",
       default=True, gpm=True),
    _f("DCGM_FI_PROF_PCIE_TX_BYTES", 1009, "gauge", "float", "bytes/s",
       f"{_GPM} NVML_GPM_METRIC_PCIE_TX_PER_SEC",
       "The rate of data transmitted over the PCIe bus - including both protocol headers and "
       "data payloads - in bytes per second.", default=True, gpm=True),
    _f("DCGM_FI_PROF_PCIE_RX_BYTES", 1010, "gauge", "float", "bytes/s",
       f"{_GPM} NVML_GPM_METRIC_PCIE_RX_PER_SEC",
       "The rate of data received over the PCIe bus - including both protocol headers and "
       "data payloads - in bytes per second.", default=True, gpm=True),
    # The file's commented-out rows a user may enable.
    _f("DCGM_FI_DEV_POWER_VIOLATION", 240, "counter", "int", "ns",
       "nvmlDeviceGetViolationStatus(h, NVML_PERF_POLICY_POWER).violationTime",
       "Throttling duration due to power constraints (in ns)."),
    _f("DCGM_FI_DEV_THERMAL_VIOLATION", 241, "counter", "int", "ns",
       "nvmlDeviceGetViolationStatus(h, NVML_PERF_POLICY_THERMAL).violationTime",
       "Throttling duration due to thermal constraints (in ns)."),
    _f("DCGM_FI_DEV_ECC_SBE_VOL_TOTAL", 310, "counter", "int", "count",
       "nvmlDeviceGetTotalEccErrors(h, NVML_MEMORY_ERROR_TYPE_CORRECTED, NVML_VOLATILE_ECC)",
       "Total number of single-bit volatile ECC errors."),
    _f("DCGM_FI_DEV_ECC_DBE_VOL_TOTAL", 311, "counter", "int", "count",
       "nvmlDeviceGetTotalEccErrors(h, NVML_MEMORY_ERROR_TYPE_UNCORRECTED, NVML_VOLATILE_ECC)",
       "Total number of double-bit volatile ECC errors."),
    _f("DCGM_FI_DEV_ECC_SBE_AGG_TOTAL", 312, "counter", "int", "count",
       "nvmlDeviceGetTotalEccErrors(h, NVML_MEMORY_ERROR_TYPE_CORRECTED, NVML_AGGREGATE_ECC)",
       "Total number of single-bit persistent ECC errors."),
    _f("DCGM_FI_DEV_ECC_DBE_AGG_TOTAL", 313, "counter", "int", "count",
       "nvmlDeviceGetTotalEccErrors(h, NVML_MEMORY_ERROR_TYPE_UNCORRECTED, NVML_AGGREGATE_ECC)",
       "Total number of double-bit persistent ECC errors."),
    _f("DCGM_FI_DEV_RETIRED_SBE", 390, "counter", "int", "pages",
       "len(nvmlDeviceGetRetiredPages(h, "
       "NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS))",
       "Total number of retired pages due to single-bit errors."),
    _f("DCGM_FI_DEV_RETIRED_DBE", 391, "counter", "int", "pages",
       "nvmlDeviceGetFieldValues(h, [NVML_FI_DEV_RETIRED_DBE])",
       "Total number of retired pages due to double-bit errors."),
    _f("DCGM_FI_DEV_RETIRED_PENDING", 392, "counter", "int", "pages",
       "nvmlDeviceGetFieldValues(h, [NVML_FI_DEV_RETIRED_PENDING])",
       "Total number of pages pending retirement."),
    _f("DCGM_FI_DEV_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL", 409, "counter", "int", "count",
       "nvmlDeviceGetFieldValues(h, [NVML_FI_DEV_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL])",
       "Total number of NVLink flow-control CRC errors."),
    _f("DCGM_FI_DEV_NVLINK_CRC_DATA_ERROR_COUNT_TOTAL", 419, "counter", "int", "count",
       "nvmlDeviceGetFieldValues(h, [NVML_FI_DEV_NVLINK_CRC_DATA_ERROR_COUNT_TOTAL])",
       "Total number of NVLink data CRC errors."),
    _f("DCGM_FI_DEV_NVLINK_REPLAY_ERROR_COUNT_TOTAL", 429, "counter", "int", "count",
       "nvmlDeviceGetFieldValues(h, [NVML_FI_DEV_NVLINK_REPLAY_ERROR_COUNT_TOTAL])",
       "Total number of NVLink retries."),
    _f("DCGM_FI_DEV_NVLINK_RECOVERY_ERROR_COUNT_TOTAL", 439, "counter", "int", "count",
       "nvmlDeviceGetFieldValues(h, [NVML_FI_DEV_NVLINK_RECOVERY_ERROR_COUNT_TOTAL])",
       "Total number of NVLink recovery errors."),
    _f("DCGM_EXP_XID_ERRORS_COUNT", None, "gauge", "int", "count",
       "the XID event listener: events per XID within --xid-count-window-size",
       "XID errors observed during the configured time window."),
    _f("DCGM_FI_NVML_VERSION", 2, "label", "string", "",
       "nvmlSystemGetNVMLVersion()", "NVML Version"),
    _f("DCGM_FI_DEV_BRAND", 51, "label", "string", "",
       "nvmlDeviceGetBrand(h)", "Device Brand"),
    _f("DCGM_FI_DEV_SERIAL", 53, "label", "string", "",
       "nvmlDeviceGetSerial(h)", "Device Serial Number"),
    _f("DCGM_FI_DEV_VBIOS_VERSION", 85, "label", "string", "",
       "nvmlDeviceGetVbiosVersion(h)", "VBIOS version of the device"),
)

FIELDS_BY_NAME: Mapping[str, FieldSpec] = {spec.name: spec for spec in FIELDS}


@record
class Collector:
    """One row of a collectors file: a field, the type it is exported as, and its help."""

    field: FieldSpec
    prom_type: PromType
    help: str
    # 1-based line in its file; 0 for the built-in default set. Where a row came from is not
    # what it is, so two sets with the same rows are equal wherever they were read.
    line: int = dataclass_field(default=0, compare=False)

    @property
    def name(self) -> str:
        """The series name (= the field's name)."""
        return self.field.name


DEFAULT_COLLECTORS: tuple[Collector, ...] = tuple(
    Collector(spec, spec.prom_type, spec.help) for spec in FIELDS if spec.default
)


class CollectorsError(ValueError):
    """A collectors file that cannot be used; the message is ``<file>:<line>: <problem>``."""

    def __init__(self, source: str, line: int, problem: str) -> None:
        super().__init__(f"{source}:{line}: {problem}" if line else f"{source}: {problem}")
        self.source = source
        self.line = line
        self.problem = problem


def _known(names: Iterable[str]) -> str:
    return ", ".join(names)


def _row(source: str, number: int, line: str, record: list[str],
         seen: dict[str, int]) -> Collector:
    columns = [column.strip() for column in record]
    if len(columns) != 3:
        raise CollectorsError(
            source, number,
            f"expected 3 comma-separated columns 'FIELD, gauge|counter|label, help', got "
            f"{len(columns)}: {line.strip()!r}")
    name, type_text, help_text = columns
    spec = FIELDS_BY_NAME.get(name)
    if spec is None:
        known = _known(sorted(FIELDS_BY_NAME))
        raise CollectorsError(source, number, f"unknown field {name!r}; known fields: {known}")
    try:
        prom_type = PromType(type_text)
    except ValueError:
        prom_type = None
    if prom_type not in spec.allowed_types:
        allowed = _known(t.value for t in spec.allowed_types)
        raise CollectorsError(
            source, number, f"type {type_text!r} is not allowed for {name}; it takes: {allowed}")
    if name in seen:
        raise CollectorsError(source, number, f"{name} is already listed on line {seen[name]}")
    seen[name] = number
    assert prom_type is not None  # for mypy: allowed_types holds no None
    return Collector(spec, prom_type, help_text, number)


def parse_collectors(text: str, source: str = "<collectors>") -> tuple[Collector, ...]:
    """The rows of a collectors file, in file order; CollectorsError for the first bad line.

    ``source`` names the file in errors. A file with no rows is an error too: the exporter
    would serve nothing.
    """
    rows: list[Collector] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        try:
            record = next(csv.reader([line], skipinitialspace=True, strict=True))
        except csv.Error as err:
            raise CollectorsError(source, number, f"malformed CSV: {err}") from None
        rows.append(_row(source, number, line, record, seen))
    if not rows:
        raise CollectorsError(source, 0, "no fields listed (every line is blank or a comment)")
    return tuple(rows)


def load_collectors(path: str | Path) -> tuple[Collector, ...]:
    """Read and parse a collectors file; CollectorsError (naming the file) if unreadable."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise CollectorsError(source, 0, f"cannot read: {reason}") from None
    return parse_collectors(text, source)


def format_collectors(rows: Iterable[Collector]) -> str:
    """Rows as collectors-file text (what :func:`parse_collectors` reads back)."""
    lines = ["# DCGM FIELD, Prometheus metric type, help message"]
    for row in rows:
        help_text = row.help
        if any(c in help_text for c in ',"') or help_text != help_text.strip():
            help_text = '"' + help_text.replace('"', '""') + '"'
        lines.append(f"{row.name}, {row.prom_type.value}, {help_text}")
    return "\n".join(lines) + "\n"

"""The collectors CSV: dcgm-exporter's format, its default set, and one clear error per bad file."""

from __future__ import annotations

from pathlib import Path

import pytest

from exporter.fields import (
    DEFAULT_COLLECTORS,
    FIELDS,
    FIELDS_BY_NAME,
    CollectorsError,
    PromType,
    ValueFormat,
    format_collectors,
    load_collectors,
    parse_collectors,
)

# dcgm-exporter's etc/default-counters.csv (4.5.3-4.8.2): its enabled rows in file order, with
# their types (reference dcgm-nfd-mps.md, A1).
REFERENCE_DEFAULT = [
    ("DCGM_FI_DEV_SM_CLOCK", "gauge"),
    ("DCGM_FI_DEV_MEM_CLOCK", "gauge"),
    ("DCGM_FI_DEV_MEMORY_TEMP", "gauge"),
    ("DCGM_FI_DEV_GPU_TEMP", "gauge"),
    ("DCGM_FI_DEV_POWER_USAGE", "gauge"),
    ("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", "counter"),
    ("DCGM_FI_DEV_PCIE_REPLAY_COUNTER", "counter"),
    ("DCGM_FI_DEV_GPU_UTIL", "gauge"),
    ("DCGM_FI_DEV_MEM_COPY_UTIL", "gauge"),
    ("DCGM_FI_DEV_ENC_UTIL", "gauge"),
    ("DCGM_FI_DEV_DEC_UTIL", "gauge"),
    ("DCGM_FI_DEV_XID_ERRORS", "gauge"),
    ("DCGM_FI_DEV_FB_FREE", "gauge"),
    ("DCGM_FI_DEV_FB_USED", "gauge"),
    ("DCGM_FI_DEV_FB_RESERVED", "gauge"),
    ("DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL", "counter"),
    ("DCGM_FI_DEV_VGPU_LICENSE_STATUS", "gauge"),
    ("DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS", "counter"),
    ("DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS", "counter"),
    ("DCGM_FI_DEV_ROW_REMAP_FAILURE", "gauge"),
    ("DCGM_FI_DRIVER_VERSION", "label"),
    ("DCGM_FI_PROF_GR_ENGINE_ACTIVE", "gauge"),
    ("DCGM_FI_PROF_PIPE_TENSOR_ACTIVE", "gauge"),
    ("DCGM_FI_PROF_DRAM_ACTIVE", "gauge"),
    ("DCGM_FI_PROF_PCIE_TX_BYTES", "gauge"),
    ("DCGM_FI_PROF_PCIE_RX_BYTES", "gauge"),
]

# Field ids and value formats from the same table.
REFERENCE_IDS = {
    "DCGM_FI_DEV_SM_CLOCK": 100, "DCGM_FI_DEV_MEM_CLOCK": 101, "DCGM_FI_DEV_MEMORY_TEMP": 140,
    "DCGM_FI_DEV_GPU_TEMP": 150, "DCGM_FI_DEV_POWER_USAGE": 155,
    "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION": 156, "DCGM_FI_DEV_PCIE_REPLAY_COUNTER": 202,
    "DCGM_FI_DEV_GPU_UTIL": 203, "DCGM_FI_DEV_MEM_COPY_UTIL": 204, "DCGM_FI_DEV_ENC_UTIL": 206,
    "DCGM_FI_DEV_DEC_UTIL": 207, "DCGM_FI_DEV_XID_ERRORS": 230, "DCGM_FI_DEV_FB_FREE": 251,
    "DCGM_FI_DEV_FB_USED": 252, "DCGM_FI_DEV_FB_RESERVED": 253,
    "DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL": 449, "DCGM_FI_DEV_VGPU_LICENSE_STATUS": 526,
    "DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS": 393, "DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS": 394,
    "DCGM_FI_DEV_ROW_REMAP_FAILURE": 395, "DCGM_FI_DRIVER_VERSION": 1,
    "DCGM_FI_PROF_GR_ENGINE_ACTIVE": 1001, "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE": 1004,
    "DCGM_FI_PROF_DRAM_ACTIVE": 1005, "DCGM_FI_PROF_PCIE_TX_BYTES": 1009,
    "DCGM_FI_PROF_PCIE_RX_BYTES": 1010,
}


def test_default_set_is_dcgm_exporters_default_counters_file() -> None:
    assert [(c.name, c.prom_type.value) for c in DEFAULT_COLLECTORS] == REFERENCE_DEFAULT
    assert {c.name: c.field.field_id for c in DEFAULT_COLLECTORS} == REFERENCE_IDS


def test_default_rows_export_each_field_as_its_own_type_and_help() -> None:
    for row in DEFAULT_COLLECTORS:
        assert row.prom_type is row.field.prom_type
        assert row.help == row.field.help and row.help


def test_value_formats_follow_dcgm() -> None:
    # Power and the profiling ratios are doubles (Go %f), the driver version a string, the
    # rest integers (MiB truncated, mJ, MHz, C, %).
    floats = {s.name for s in FIELDS if s.default and s.value is ValueFormat.FLOAT}
    assert floats == {"DCGM_FI_DEV_POWER_USAGE", "DCGM_FI_PROF_GR_ENGINE_ACTIVE",
                      "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE", "DCGM_FI_PROF_DRAM_ACTIVE",
                      "DCGM_FI_PROF_PCIE_TX_BYTES", "DCGM_FI_PROF_PCIE_RX_BYTES"}
    strings = {s.name for s in FIELDS if s.value is ValueFormat.STRING}
    assert all(FIELDS_BY_NAME[n].prom_type is PromType.LABEL for n in strings)
    assert FIELDS_BY_NAME["DCGM_FI_DEV_POWER_USAGE"].unit == "W"
    assert FIELDS_BY_NAME["DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION"].unit == "mJ"
    assert {FIELDS_BY_NAME[n].unit for n in
            ("DCGM_FI_DEV_FB_FREE", "DCGM_FI_DEV_FB_USED", "DCGM_FI_DEV_FB_RESERVED")} == {"MiB"}
    assert {s.name for s in FIELDS if s.gpm} == {n for n, _ in REFERENCE_DEFAULT
                                                  if n.startswith("DCGM_FI_PROF_")}


def test_table_is_well_formed() -> None:
    assert len(FIELDS_BY_NAME) == len(FIELDS)  # no name twice
    ids = [s.field_id for s in FIELDS if s.field_id is not None]
    assert len(set(ids)) == len(ids)
    for spec in FIELDS:
        assert spec.name.startswith(("DCGM_FI_", "DCGM_EXP_"))
        assert (spec.field_id is None) == spec.name.startswith("DCGM_EXP_")
        assert spec.nvml and spec.help
        assert spec.prom_type in spec.allowed_types


def test_parses_dcgm_exporters_own_layout() -> None:
    # Padding before and after commas, a space before the comma, comment lines (also with the
    # trailing commas of a spreadsheet export), blank lines, a quoted help with a comma.
    text = (
        "# Format,,\n"
        "# DCGM FIELD, Prometheus metric type, help message\n"
        "\n"
        "DCGM_FI_DEV_SM_CLOCK,  gauge, SM clock frequency (in MHz).\n"
        "   # indented comment\n"
        "DCGM_FI_DEV_DEC_UTIL ,     gauge, Decoder utilization (in %).\n"
        'DCGM_FI_DEV_GPU_TEMP, gauge, "GPU temperature, in C."\n'
        "DCGM_FI_DRIVER_VERSION,        label, Driver Version\n"
        "DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL, gauge, help\n"
    )
    rows = parse_collectors(text, "c.csv")
    assert [(r.name, r.prom_type, r.line) for r in rows] == [
        ("DCGM_FI_DEV_SM_CLOCK", PromType.GAUGE, 4),
        ("DCGM_FI_DEV_DEC_UTIL", PromType.GAUGE, 6),
        ("DCGM_FI_DEV_GPU_TEMP", PromType.GAUGE, 7),
        ("DCGM_FI_DRIVER_VERSION", PromType.LABEL, 8),
        # A counter declared a gauge (newer dcgm-exporter files do this) is the user's choice.
        ("DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL", PromType.GAUGE, 9),
    ]
    assert rows[2].help == "GPU temperature, in C."
    assert rows[0].help == "SM clock frequency (in MHz)."


def test_format_round_trips_the_default_set() -> None:
    assert parse_collectors(format_collectors(DEFAULT_COLLECTORS)) == DEFAULT_COLLECTORS


def test_load_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "counters.csv"
    path.write_text(format_collectors(DEFAULT_COLLECTORS))
    assert load_collectors(path) == DEFAULT_COLLECTORS


def error_of(text: str, source: str = "/etc/dcgm-exporter/x.csv") -> str:
    with pytest.raises(CollectorsError) as caught:
        parse_collectors(text, source)
    return str(caught.value)


GOOD = "DCGM_FI_DEV_GPU_TEMP, gauge, GPU temperature (in C).\n"


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("DCGM_FI_DEV_GPU_TEMP, gauge",
         "expected 3 comma-separated columns 'FIELD, gauge|counter|label, help', got 2: "
         "'DCGM_FI_DEV_GPU_TEMP, gauge'"),
        ("DCGM_FI_DEV_GPU_TEMP, gauge, GPU temperature, in C",
         "expected 3 comma-separated columns 'FIELD, gauge|counter|label, help', got 4: "
         "'DCGM_FI_DEV_GPU_TEMP, gauge, GPU temperature, in C'"),
        ("DCGM_FI_DEV_GPU_TEMP",
         "expected 3 comma-separated columns 'FIELD, gauge|counter|label, help', got 1: "
         "'DCGM_FI_DEV_GPU_TEMP'"),
        ('DCGM_FI_DEV_GPU_TEMP, gauge, "unterminated',
         "malformed CSV: unexpected end of data"),
    ],
)
def test_malformed_line_names_file_and_line(line: str, problem: str) -> None:
    assert error_of(GOOD + "# comment\n" + line + "\n") == f"/etc/dcgm-exporter/x.csv:3: {problem}"


def test_unknown_field_names_file_line_and_every_known_field() -> None:
    message = error_of(GOOD + "DCGM_FI_DEV_GPU_TEMPERATURE, gauge, typo\n", "my.csv")
    prefix = "my.csv:2: unknown field 'DCGM_FI_DEV_GPU_TEMPERATURE'; known fields: "
    assert message.startswith(prefix)
    assert message[len(prefix):].split(", ") == sorted(FIELDS_BY_NAME)


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("DCGM_FI_DEV_GPU_TEMP, histogram, h",
         "type 'histogram' is not allowed for DCGM_FI_DEV_GPU_TEMP; it takes: gauge, counter, "
         "label"),
        ("DCGM_FI_DEV_GPU_TEMP, Gauge, h",
         "type 'Gauge' is not allowed for DCGM_FI_DEV_GPU_TEMP; it takes: gauge, counter, label"),
        ("DCGM_FI_DEV_GPU_TEMP, , h",
         "type '' is not allowed for DCGM_FI_DEV_GPU_TEMP; it takes: gauge, counter, label"),
        # A string value can only be a label: as a sample it would break the exposition.
        ("DCGM_FI_DRIVER_VERSION, gauge, Driver Version",
         "type 'gauge' is not allowed for DCGM_FI_DRIVER_VERSION; it takes: label"),
    ],
)
def test_wrong_type_names_file_line_and_the_allowed_types(line: str, problem: str) -> None:
    assert error_of(GOOD + line + "\n", "t.csv") == f"t.csv:2: {problem}"


def test_a_field_listed_twice_is_an_error() -> None:
    message = error_of(GOOD + "\n" + GOOD, "d.csv")
    assert message == "d.csv:3: DCGM_FI_DEV_GPU_TEMP is already listed on line 1"


@pytest.mark.parametrize("text", ["", "\n\n", "# only comments\n#\n", "   \n# x,,\n"])
def test_a_file_without_rows_is_an_error(text: str) -> None:
    assert error_of(text, "e.csv") == (
        "e.csv: no fields listed (every line is blank or a comment)")


def test_the_first_bad_line_is_reported(tmp_path: Path) -> None:
    text = GOOD + "BAD_ONE, gauge, h\nBAD_TWO, gauge, h\n"
    with pytest.raises(CollectorsError) as caught:
        parse_collectors(text, "f.csv")
    assert (caught.value.source, caught.value.line) == ("f.csv", 2)
    assert "BAD_ONE" in caught.value.problem


def test_unreadable_file_is_one_error_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "missing.csv"
    with pytest.raises(CollectorsError) as caught:
        load_collectors(missing)
    assert str(caught.value) == f"{missing}: cannot read: No such file or directory"
    binary = tmp_path / "binary.csv"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(CollectorsError, match=rf"^{binary}: cannot read: .*utf-8"):
        load_collectors(binary)

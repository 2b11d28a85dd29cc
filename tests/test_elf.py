"""gpus/driver/elf.py's SONAME reader on every way a file can be wrong.

A guard for the reader's split into small functions (issue 11): each check keeps its message
and its order, and a file without PT_DYNAMIC or DT_SONAME still reads as None. The files are the
stub writer's output with one field changed (layout: ELF header, PT_LOAD, PT_DYNAMIC, six dynamic
entries SONAME STRTAB STRSZ SYMTAB SYMENT NULL, one null symbol, the strings).
"""

from __future__ import annotations

import struct

import pytest

from gpus.driver.elf import (
    DT_NULL,
    DT_SONAME,
    DT_STRTAB,
    MAX_HEADER_BYTES,
    ElfError,
    parse_soname,
    stub_shared_object,
)

EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
PHDR = struct.Struct("<IIQQQQQQ")
DYN = struct.Struct("<qQ")
DYN_OFF = EHDR.size + 2 * PHDR.size
NAME = "libx.so.1"


def stub() -> bytearray:
    return bytearray(stub_shared_object(NAME))


def with_header(**fields: int) -> bytes:
    """The stub with ELF header fields replaced (by their index in the struct)."""
    data = stub()
    header = list(EHDR.unpack_from(data))
    for index, value in fields.items():
        header[int(index.lstrip("f"))] = value
    EHDR.pack_into(data, 0, *header)
    return bytes(data)


def with_phdr(number: int, **fields: int) -> bytes:
    """The stub with fields of program header ``number`` replaced (p_type, p_vaddr)."""
    data = stub()
    at = EHDR.size + number * PHDR.size
    phdr = list(PHDR.unpack_from(data, at))
    names = ("p_type", "p_flags", "p_offset", "p_vaddr", "p_paddr", "p_filesz", "p_memsz")
    for name, value in fields.items():
        phdr[names.index(name)] = value
    PHDR.pack_into(data, at, *phdr)
    return bytes(data)


def with_dynamic(*entries: tuple[int, int]) -> bytes:
    """The stub with its first dynamic entries replaced."""
    data = stub()
    for number, (tag, value) in enumerate(entries):
        DYN.pack_into(data, DYN_OFF + number * DYN.size, tag, value)
    return bytes(data)


def strtab_offset() -> int:
    data = stub()
    for number in range(6):
        tag, value = DYN.unpack_from(data, DYN_OFF + number * DYN.size)
        if tag == DT_STRTAB:
            return int(value)
    raise AssertionError("the stub has no DT_STRTAB")


def test_the_stub_reads_back() -> None:
    assert parse_soname(stub_shared_object(NAME)) == NAME


@pytest.mark.parametrize(("data", "message"), [
    (b"\x7fEL", "not an ELF file"),
    (with_header(f9=PHDR.size - 1), "unexpected program header size"),
    (with_header(f10=MAX_HEADER_BYTES // PHDR.size + 1), "unexpected program header size"),
    (with_header(f5=1 << 20), "program headers outside the file"),
    (with_dynamic((DT_SONAME, 1), (0x7FFF, 0)), "DT_SONAME without a string table"),
    (with_phdr(0, p_type=0), "DT_SONAME without a string table"),  # no PT_LOAD: no bias
    (with_phdr(0, p_vaddr=1 << 20), "DT_SONAME outside the file"),
    (stub_shared_object(NAME)[:-1], "DT_SONAME not terminated"),
], ids=["short", "phentsize", "phnum", "phoff", "no-strtab", "no-load", "outside", "no-nul"])
def test_each_malformation_is_its_own_error(data: bytes, message: str) -> None:
    with pytest.raises(ElfError, match=message):
        parse_soname(data)


def test_no_dynamic_segment_is_no_soname() -> None:
    assert parse_soname(with_phdr(1, p_type=0)) is None


def test_no_soname_entry_is_no_soname() -> None:
    assert parse_soname(with_dynamic((0x7FFF, 1))) is None


def test_entries_after_dt_null_are_not_read() -> None:
    data = with_dynamic((DT_STRTAB, strtab_offset()), (DT_NULL, 0), (DT_SONAME, 1))
    assert parse_soname(data) is None


def test_entries_before_dt_null_are_read_in_any_order() -> None:
    data = with_dynamic((DT_STRTAB, strtab_offset()), (DT_SONAME, 1))
    assert parse_soname(data) == NAME

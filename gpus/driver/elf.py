"""Just enough ELF64 (little-endian) to read a shared object's ``DT_SONAME``, and to write a stub.

ldconfig and the ``create-symlinks`` hook go by the SONAME recorded in a library's dynamic
section, not by its file name; so the reader follows what ldconfig does (program headers:
``PT_LOAD`` for the address -> offset mapping, ``PT_DYNAMIC`` for the entries, ``DT_STRTAB`` +
``DT_SONAME`` for the name) and the writer produces the smallest file that ldconfig accepts as a
64-bit shared library with that SONAME.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

ELF_MAGIC = b"\x7fELF"
ELFCLASS64 = 2
ELFDATA2LSB = 1
ET_DYN = 3
EM_X86_64 = 62
EM_AARCH64 = 183
PT_LOAD = 1
PT_DYNAMIC = 2
DT_NULL = 0
DT_STRTAB = 5
DT_SYMTAB = 6
DT_STRSZ = 10
DT_SYMENT = 11
DT_SONAME = 14
# Bounds against malformed files: no real library has a program header table or dynamic
# segment this large.
MAX_HEADER_BYTES = 1 << 20
MAX_SONAME = 4096

_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")  # 64 bytes
_PHDR = struct.Struct("<IIQQQQQQ")  # 56 bytes
_DYN = struct.Struct("<qQ")  # 16 bytes


class ElfError(ValueError):
    """The file is not a readable little-endian ELF64 shared object."""


def read_soname(path: str) -> str | None:
    """The ``DT_SONAME`` of the ELF64 shared object at ``path``; None when it has none.

    Only the headers, the dynamic segment and the name are read (a real library's dynamic
    segment sits megabytes into the file). Raises OSError when the file cannot be read and
    ElfError when it is not a well-formed ELF64 LE file.
    """
    with open(path, "rb") as handle:
        def read_at(offset: int, size: int) -> bytes:
            handle.seek(offset)
            return handle.read(size)

        return _soname(read_at)


def parse_soname(data: bytes) -> str | None:
    """``DT_SONAME`` of an ELF64 LE file held in memory (see :func:`read_soname`)."""
    return _soname(lambda offset, size: data[offset:offset + size])


def _soname(read_at: Callable[[int, int], bytes]) -> str | None:
    """What ldconfig reads: ELF header -> program headers -> dynamic segment -> the name."""
    load_bias, dynamic = _segments(*_program_headers(read_at))
    if dynamic is None:
        return None
    strtab, soname = _dynamic_entries(read_at(*dynamic))
    if soname is None:
        return None
    if strtab is None or load_bias is None:
        raise ElfError("DT_SONAME without a string table")
    return _name_at(read_at, strtab - load_bias + soname)


def _program_headers(read_at: Callable[[int, int], bytes]) -> tuple[bytes, int, int]:
    """The program header table (checked against the bounds), its entry size and count."""
    header_bytes = read_at(0, _EHDR.size)
    if len(header_bytes) < _EHDR.size or header_bytes[:4] != ELF_MAGIC:
        raise ElfError("not an ELF file")
    if header_bytes[4] != ELFCLASS64 or header_bytes[5] != ELFDATA2LSB:
        raise ElfError("not a 64-bit little-endian ELF file")
    header = _EHDR.unpack(header_bytes)
    phoff, phentsize, phnum = header[5], header[9], header[10]
    if phentsize != _PHDR.size or phnum * phentsize > MAX_HEADER_BYTES:
        raise ElfError("unexpected program header size")
    table = read_at(phoff, phnum * phentsize)
    if len(table) != phnum * phentsize:
        raise ElfError("program headers outside the file")
    return table, phentsize, phnum


def _segments(
    table: bytes, phentsize: int, phnum: int
) -> tuple[int | None, tuple[int, int] | None]:
    """(load bias of the first PT_LOAD, (offset, size) of PT_DYNAMIC); None where absent."""
    load_bias: int | None = None
    dynamic: tuple[int, int] | None = None
    for number in range(phnum):
        p_type, _, p_offset, p_vaddr, _, p_filesz, _, _ = _PHDR.unpack_from(
            table, number * phentsize)
        if p_type == PT_LOAD and load_bias is None:
            load_bias = p_vaddr - p_offset
        elif p_type == PT_DYNAMIC:
            dynamic = (p_offset, min(p_filesz, MAX_HEADER_BYTES))
    return load_bias, dynamic


def _dynamic_entries(entries: bytes) -> tuple[int | None, int | None]:
    """(DT_STRTAB, DT_SONAME) values up to DT_NULL; None where absent."""
    strtab = soname = None
    for at in range(0, len(entries) - _DYN.size + 1, _DYN.size):
        tag, value = _DYN.unpack_from(entries, at)
        if tag == DT_NULL:
            break
        if tag == DT_STRTAB:
            strtab = value
        elif tag == DT_SONAME:
            soname = value
    return strtab, soname


def _name_at(read_at: Callable[[int, int], bytes], start: int) -> str:
    """The NUL-terminated name at file offset ``start`` (at most MAX_SONAME bytes)."""
    if start < 0:
        raise ElfError("DT_SONAME outside the file")
    name = read_at(start, MAX_SONAME)
    end = name.find(b"\0")
    if end < 0:
        raise ElfError("DT_SONAME not terminated")
    return name[:end].decode("utf-8", "replace")


def stub_shared_object(soname: str, machine: int = EM_X86_64) -> bytes:
    """A minimal ELF64 LE shared object whose only content is ``DT_SONAME`` = ``soname``.

    One ``PT_LOAD`` maps the whole file at address 0 (so addresses equal offsets) and one
    ``PT_DYNAMIC`` holds STRTAB, STRSZ, SYMTAB (an empty symbol), SONAME and NULL; ldconfig
    (which reads exactly these) lists it like a real library. It is not loadable code.
    """
    phnum = 2
    phoff = _EHDR.size
    dyn_off = phoff + phnum * _PHDR.size
    dyn_count = 6
    sym_off = dyn_off + dyn_count * _DYN.size
    str_off = sym_off + 24  # one null Elf64_Sym
    strings = b"\0" + soname.encode() + b"\0"
    size = str_off + len(strings)
    dynamic = b"".join(_DYN.pack(tag, value) for tag, value in (
        (DT_SONAME, 1), (DT_STRTAB, str_off), (DT_STRSZ, len(strings)), (DT_SYMTAB, sym_off),
        (DT_SYMENT, 24), (DT_NULL, 0)))
    ident = ELF_MAGIC + bytes([ELFCLASS64, ELFDATA2LSB, 1, 0]) + bytes(8)
    header = _EHDR.pack(ident, ET_DYN, machine, 1, 0, phoff, 0, 0, _EHDR.size, _PHDR.size,
                        phnum, 64, 0, 0)
    load = _PHDR.pack(PT_LOAD, 4, 0, 0, 0, size, size, 0x1000)  # PF_R
    dyn = _PHDR.pack(PT_DYNAMIC, 4, dyn_off, dyn_off, dyn_off, len(dynamic), len(dynamic), 8)
    return header + load + dyn + dynamic + bytes(24) + strings

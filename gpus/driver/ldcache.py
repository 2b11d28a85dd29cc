"""``/etc/ld.so.cache``: a bounded reader for both on-disk formats, and a writer.

Layout (glibc ``elf/cache.c``; little-endian):

- optional old part: ``ld.so-1.7.0\\0`` (12 bytes), u32 count, count x 12-byte entries, then
  padding to an 8-byte boundary;
- new part (required): ``glibc-ld.so.cache1.1`` (20 bytes), u32 count, u32 string-table
  length, 20 bytes of flags, extension offset and padding -> a 48-byte header; count x 24-byte
  entries (i32 flags, u32 key, u32 value, u32 osversion, u64 hwcap); key (SONAME) and value
  (path) are NUL-terminated strings at offsets counted from the start of the new header.

The low byte of ``flags`` is the type (bit 0x01: ELF), the high byte the architecture; only
64-bit entries matter for a driver lookup. A file is untrusted input: sizes and counts are
checked against the data before anything is read, and entries pointing outside it are skipped.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

from gpus.records import record

OLD_MAGIC = b"ld.so-1.7.0\0"
NEW_MAGIC = b"glibc-ld.so.cache1.1"
FLAG_ELF = 0x0001
FLAG_LIBC6 = 0x0003
FLAG_TYPE_MASK = 0x00FF
FLAG_ARCH_MASK = 0xFF00
ARCH_X86_64 = 0x0300
ARCH_AARCH64 = 0x0A00
ARCH_PPC64LE = 0x0500
ARCHES_64 = frozenset({ARCH_X86_64, ARCH_AARCH64, ARCH_PPC64LE})
ARCHES_32 = frozenset({0x0000, 0x0800, 0x0900})  # i386, x32, arm hard-float
# A system with every distribution package installed has a cache of a few MiB.
MAX_CACHE_BYTES = 64 << 20
MAX_STRING = 4096  # PATH_MAX

_OLD_HEADER = struct.Struct("<12sI")
_OLD_ENTRY_SIZE = 12
_NEW_HEADER = struct.Struct("<20sII20x")  # 48 bytes
_NEW_ENTRY = struct.Struct("<iIIIQ")  # 24 bytes


class LdCacheError(ValueError):
    """The file is not an ld.so.cache this reader understands; the message says why."""


@record
class CacheEntry:
    """One library of the cache: its SONAME, its path and the raw flags."""

    soname: str
    path: str
    flags: int


@record
class LdCache:
    """The cache's ELF entries, split into the 64-bit and 32-bit lists (file order)."""

    libs64: tuple[CacheEntry, ...]
    libs32: tuple[CacheEntry, ...]

    def paths64(self) -> list[str]:
        """Distinct paths of the 64-bit libraries, first occurrence first."""
        return list(dict.fromkeys(entry.path for entry in self.libs64))


def read_ld_cache(path: str, *, max_bytes: int = MAX_CACHE_BYTES) -> LdCache:
    """Parse the cache at ``path``. OSError when unreadable; LdCacheError when malformed or
    larger than ``max_bytes`` (read no further than that)."""
    with open(path, "rb") as handle:
        data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise LdCacheError(f"{path}: larger than {max_bytes} bytes")
    try:
        return parse_ld_cache(data)
    except LdCacheError as err:
        raise LdCacheError(f"{path}: {err}") from err


def parse_ld_cache(data: bytes) -> LdCache:
    """Parse cache bytes (either format; see the module docstring)."""
    start = _new_header_offset(data)
    if len(data) < start + _NEW_HEADER.size:
        raise LdCacheError("truncated header")
    magic, count, strings_len = _NEW_HEADER.unpack_from(data, start)
    if magic != NEW_MAGIC:
        raise LdCacheError(f"unknown format (magic {magic[:20]!r})")
    entries_at = start + _NEW_HEADER.size
    if count > (len(data) - entries_at) // _NEW_ENTRY.size:
        raise LdCacheError(f"header claims {count} entries, the file holds fewer")
    if strings_len > len(data):
        raise LdCacheError(f"header claims {strings_len} bytes of strings, the file is shorter")
    libs64: list[CacheEntry] = []
    libs32: list[CacheEntry] = []
    for number in range(count):
        flags, key, value, _, _ = _NEW_ENTRY.unpack_from(data, entries_at + number * 24)
        if not flags & FLAG_ELF:
            continue
        arch = flags & FLAG_ARCH_MASK
        target = libs64 if arch in ARCHES_64 else libs32 if arch in ARCHES_32 else None
        if target is None:
            continue
        soname, path = _string(data, start + key), _string(data, start + value)
        if soname and path:
            target.append(CacheEntry(soname=soname, path=path, flags=flags))
    return LdCache(libs64=tuple(libs64), libs32=tuple(libs32))


def build_ld_cache(entries: Iterable[tuple[str, str]], *, flags: int = FLAG_LIBC6 | ARCH_X86_64,
                   old_format: bool = False) -> bytes:
    """Cache bytes listing ``(soname, path)`` pairs, as ``ldconfig`` writes them.

    glibc >= 2.32 writes only the new format (``old_format=False``); older ones prefix the
    old-format table, which this writer fills with the same entries for fidelity.
    """
    pairs = list(entries)
    strings = bytearray()
    offsets: list[tuple[int, int]] = []
    table = _NEW_HEADER.size + len(pairs) * _NEW_ENTRY.size
    for soname, path in pairs:
        key = table + len(strings)
        strings += soname.encode() + b"\0"
        value = table + len(strings)
        strings += path.encode() + b"\0"
        offsets.append((key, value))
    new = bytearray(_NEW_HEADER.pack(NEW_MAGIC, len(pairs), len(strings)))
    for key, value in offsets:
        new += _NEW_ENTRY.pack(flags, key, value, 0, 0)
    new += strings
    if not old_format:
        return bytes(new)
    old = bytearray(_OLD_HEADER.pack(OLD_MAGIC, len(pairs)))
    old_size = _OLD_HEADER.size + len(pairs) * _OLD_ENTRY_SIZE
    padding = -old_size % 8
    for key, value in offsets:
        # Old entries index the shared string table from its own start (glibc's layout).
        old += struct.pack("<iII", flags & FLAG_TYPE_MASK, key - table, value - table)
    return bytes(old) + bytes(padding) + bytes(new)


def _new_header_offset(data: bytes) -> int:
    """Where the new-format header starts: 0, or after the old table and its padding."""
    if not data.startswith(OLD_MAGIC):
        return 0
    if len(data) < _OLD_HEADER.size:
        raise LdCacheError("truncated old-format header")
    count: int = _OLD_HEADER.unpack_from(data)[1]
    if count > (len(data) - _OLD_HEADER.size) // _OLD_ENTRY_SIZE:
        raise LdCacheError(f"old-format header claims {count} entries, the file holds fewer")
    end = _OLD_HEADER.size + count * _OLD_ENTRY_SIZE
    return end + (-end % 8)


def _string(data: bytes, offset: int) -> str:
    """The NUL-terminated string at ``offset`` ('' when outside the data or unterminated)."""
    end = data.find(b"\0", offset, offset + MAX_STRING)
    return "" if end < 0 else data[offset:end].decode("utf-8", "replace")

"""ld.so.cache reader and writer: both formats, glibc's own ldconfig as the cross-check."""

from __future__ import annotations

import contextlib
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpus.driver.elf import ElfError, parse_soname, read_soname, stub_shared_object
from gpus.driver.ldcache import (
    ARCH_AARCH64,
    FLAG_LIBC6,
    LdCacheError,
    build_ld_cache,
    parse_ld_cache,
    read_ld_cache,
)

LIBS = [("libcuda.so.1", "/usr/lib/x86_64-linux-gnu/libcuda.so.1"),
        ("libnvidia-ml.so.1", "/usr/lib/x86_64-linux-gnu/libnvidia-ml.so.1")]
LDCONFIG = shutil.which("ldconfig") or ("/sbin/ldconfig" if Path("/sbin/ldconfig").exists()
                                        else None)


@pytest.mark.parametrize("old_format", [False, True])
def test_round_trip_both_formats(old_format: bool) -> None:
    cache = parse_ld_cache(build_ld_cache(LIBS, old_format=old_format))
    assert [(e.soname, e.path) for e in cache.libs64] == LIBS
    assert cache.libs32 == ()
    assert all(e.flags == 0x0303 for e in cache.libs64)


def test_old_format_prefix_is_skipped_to_an_8_byte_boundary() -> None:
    data = build_ld_cache(LIBS[:1], old_format=True)
    # 12-byte magic + u32 count + one 12-byte entry = 28 -> new header at 32.
    assert data[32:52] == b"glibc-ld.so.cache1.1"
    assert parse_ld_cache(data).libs64[0].soname == "libcuda.so.1"


def test_architectures_split_and_unknown_skipped() -> None:
    data = bytearray(build_ld_cache(LIBS + [("libc.so.6", "/lib/libc.so.6")]))
    entries = 48

    def set_flags(index: int, flags: int) -> None:
        struct.pack_into("<i", data, entries + 24 * index, flags)

    set_flags(0, FLAG_LIBC6 | ARCH_AARCH64)  # still 64-bit
    set_flags(1, FLAG_LIBC6)  # i386: 32-bit list
    set_flags(2, FLAG_LIBC6 | 0x7700)  # unknown arch: skipped
    cache = parse_ld_cache(bytes(data))
    assert [e.soname for e in cache.libs64] == ["libcuda.so.1"]
    assert [e.soname for e in cache.libs32] == ["libnvidia-ml.so.1"]


def test_non_elf_and_out_of_range_entries_are_skipped() -> None:
    data = bytearray(build_ld_cache(LIBS))
    struct.pack_into("<i", data, 48, 0x0300)  # type byte without the ELF bit
    struct.pack_into("<I", data, 48 + 24 + 8, 1 << 30)  # value offset outside the file
    assert parse_ld_cache(bytes(data)).libs64 == ()


@pytest.mark.parametrize("data,message", [
    (b"", "truncated header"),
    (b"glibc-ld.so.cache1.0" + bytes(28), "unknown format"),
    (b"glibc-ld.so.cache1.1" + struct.pack("<II", 1 << 28, 0) + bytes(20), "claims 268435456"),
    (b"glibc-ld.so.cache1.1" + struct.pack("<II", 0, 1 << 30) + bytes(20), "bytes of strings"),
    (b"ld.so-1.7.0\0" + struct.pack("<I", 1 << 30), "old-format header claims"),
])
def test_malformed_headers_are_clear_errors(data: bytes, message: str) -> None:
    with pytest.raises(LdCacheError, match=message):
        parse_ld_cache(data)


def test_file_size_limit(tmp_path: Path) -> None:
    path = tmp_path / "ld.so.cache"
    path.write_bytes(build_ld_cache(LIBS))
    assert len(read_ld_cache(str(path)).libs64) == 2
    with pytest.raises(LdCacheError, match=f"{path}: larger than 64 bytes"):
        read_ld_cache(str(path), max_bytes=64)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512), st.booleans())
def test_garbage_never_crashes(tail: bytes, old: bool) -> None:
    prefix = b"ld.so-1.7.0\0" if old else b"glibc-ld.so.cache1.1"
    with contextlib.suppress(LdCacheError):
        parse_ld_cache(prefix + tail)


@pytest.mark.skipif(LDCONFIG is None, reason="glibc's ldconfig not installed")
@pytest.mark.parametrize("old_format", [False, True])
def test_glibc_reads_our_cache(tmp_path: Path, old_format: bool) -> None:
    path = tmp_path / "ld.so.cache"
    path.write_bytes(build_ld_cache(LIBS, old_format=old_format))
    out = subprocess.run([str(LDCONFIG), "-p", "-C", str(path)], check=True,
                         capture_output=True, text=True).stdout
    assert "2 libs found" in out
    assert "libcuda.so.1 (libc6,x86-64) => /usr/lib/x86_64-linux-gnu/libcuda.so.1" in out


@pytest.mark.skipif(LDCONFIG is None, reason="glibc's ldconfig not installed")
def test_we_read_glibcs_cache_and_it_reads_our_stub_sonames(tmp_path: Path) -> None:
    libdir = tmp_path / "lib"
    libdir.mkdir()
    (libdir / "libcuda.so.550.54.15").write_bytes(stub_shared_object("libcuda.so.1"))
    conf = tmp_path / "ld.so.conf"
    conf.write_text(f"{libdir}\n")
    cache = tmp_path / "ld.so.cache"
    subprocess.run([str(LDCONFIG), "-X", "-C", str(cache), "-f", str(conf)], check=True,
                   capture_output=True)
    entries = {e.soname: e.path for e in read_ld_cache(str(cache)).libs64}
    assert entries["libcuda.so.1"] == f"{libdir}/libcuda.so.1"


def test_stub_soname_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "libx.so.1.2"
    path.write_bytes(stub_shared_object("libx.so.1"))
    assert read_soname(str(path)) == "libx.so.1"


def test_real_library_soname() -> None:
    candidates = sorted(Path("/lib/x86_64-linux-gnu").glob("libz.so.1.*")) or sorted(
        Path("/usr/lib/x86_64-linux-gnu").glob("libz.so.1.*"))
    if not candidates:
        pytest.skip("no libz on this machine")
    assert read_soname(str(candidates[0])) == "libz.so.1"


@pytest.mark.parametrize("data,message", [
    (b"MZ" + bytes(100), "not an ELF file"),
    (b"\x7fELF\x01\x01" + bytes(100), "not a 64-bit little-endian"),
])
def test_not_elf64(data: bytes, message: str) -> None:
    with pytest.raises(ElfError, match=message):
        parse_soname(data)


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=16, max_value=300), st.binary(min_size=1, max_size=8))
def test_corrupted_stub_never_crashes(at: int, junk: bytes) -> None:
    data = bytearray(stub_shared_object("libcuda.so.1"))
    data[at:at + len(junk)] = junk
    with contextlib.suppress(ElfError):
        parse_soname(bytes(data))

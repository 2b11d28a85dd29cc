"""The one atomic file replacement the features file, CDI spec and readiness files use."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gpus.atomicfile import replace_file


def test_replaces_with_readable_mode_and_leaves_no_temporaries(tmp_path: Path) -> None:
    target = tmp_path / "features"
    target.write_text("old\n")
    old_umask = os.umask(0o077)  # mkstemp's 0600 must not leak through
    try:
        replace_file(target, "new\n")
    finally:
        os.umask(old_umask)
    assert target.read_text() == "new\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert os.listdir(tmp_path) == ["features"]


def test_a_failed_replace_keeps_the_old_file_and_removes_the_temporary(tmp_path: Path) -> None:
    target = tmp_path / "spec.json"
    target.mkdir()  # os.replace of a file over a directory fails
    with pytest.raises(OSError):
        replace_file(target, "{}")
    assert target.is_dir()
    assert os.listdir(tmp_path) == ["spec.json"]


def test_missing_directory_is_an_oserror(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        replace_file(tmp_path / "absent" / "file", "x")


# --------------------------------------------------------------------------- the guards


@dataclass
class Event:
    """One observed system call: what, the inode it touched, and details."""

    what: str  # "mkstemp", "fsync-file", "fsync-dir" or "replace"
    inode: int
    size: int = 0  # fsync-file: bytes in the file when it was fsynced
    mode: int = 0  # replace: the temporary file's permission bits at the rename
    source: str = ""  # replace: the renamed path; mkstemp: the path created
    target_mode: int | None = None  # replace: the target's mode just before, None if absent


def watch_calls(monkeypatch: pytest.MonkeyPatch) -> list[Event]:
    """Record mkstemp, fsync and replace as replace_file calls them (they still run)."""
    events: list[Event] = []
    real_mkstemp, real_fsync, real_replace = tempfile.mkstemp, os.fsync, os.replace

    def mkstemp(*args: Any, **kwargs: Any) -> tuple[int, str]:
        fd, name = real_mkstemp(*args, **kwargs)
        events.append(Event("mkstemp", os.fstat(fd).st_ino, source=name))
        return fd, name

    def fsync(fd: int) -> None:
        info = os.fstat(fd)
        kind = "fsync-dir" if stat.S_ISDIR(info.st_mode) else "fsync-file"
        events.append(Event(kind, info.st_ino, size=info.st_size))
        real_fsync(fd)

    def replace(src: str, dst: str) -> None:
        info = os.stat(src)
        try:
            target_mode: int | None = stat.S_IMODE(os.stat(dst).st_mode)
        except FileNotFoundError:
            target_mode = None
        events.append(Event("replace", info.st_ino, mode=stat.S_IMODE(info.st_mode),
                            source=os.fspath(src), target_mode=target_mode))
        real_replace(src, dst)

    monkeypatch.setattr("gpus.atomicfile.tempfile.mkstemp", mkstemp)
    monkeypatch.setattr("gpus.atomicfile.os.fsync", fsync)
    monkeypatch.setattr("gpus.atomicfile.os.replace", replace)
    return events


def only(events: list[Event], what: str) -> Event:
    (event,) = [e for e in events if e.what == what]
    return event


@pytest.mark.parametrize("relative", [False, True], ids=["absolute", "relative"])
def test_the_temporary_file_is_created_in_the_targets_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, relative: bool) -> None:
    # A rename is atomic only within one filesystem: a temporary file in /tmp would make
    # os.replace fail (EXDEV) whenever the target lives elsewhere.
    directory = tmp_path / "features.d"
    directory.mkdir()
    events = watch_calls(monkeypatch)
    if relative:
        monkeypatch.chdir(directory)
        replace_file("gfd", "a=1\n")
    else:
        replace_file(directory / "gfd", "a=1\n")
    created, renamed = only(events, "mkstemp"), only(events, "replace")
    assert created.source == renamed.source
    assert os.path.samefile(os.path.dirname(os.path.abspath(renamed.source)), directory)
    assert (directory / "gfd").read_text() == "a=1\n"


def _other_filesystem() -> str | None:
    """A writable directory on another filesystem than the default temporary directory."""
    shm = "/dev/shm"
    try:
        if os.stat(shm).st_dev != os.stat(tempfile.gettempdir()).st_dev and \
                os.access(shm, os.W_OK):
            return shm
    except OSError:
        pass
    return None


@pytest.mark.skipif(_other_filesystem() is None, reason="no second writable filesystem")
def test_a_target_on_another_filesystem_than_tmp() -> None:
    other = _other_filesystem()
    assert other is not None
    directory = tempfile.mkdtemp(dir=other)
    try:
        target = os.path.join(directory, "gfd")
        replace_file(target, "a=1\n")
        replace_file(target, "a=2\n")
        assert Path(target).read_text() == "a=2\n"
        assert os.listdir(directory) == ["gfd"]
    finally:
        shutil.rmtree(directory)


def test_the_file_is_fsynced_whole_before_the_rename_and_the_directory_after(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "gfd"
    target.write_text("old\n")
    events = watch_calls(monkeypatch)
    text = "nvidia.com/gpu.product=Ü\n" * 1000
    replace_file(target, text)
    created = only(events, "mkstemp")
    assert [e.what for e in events] == ["mkstemp", "fsync-file", "replace", "fsync-dir"]
    synced = only(events, "fsync-file")
    assert synced.inode == created.inode == only(events, "replace").inode
    assert synced.size == len(text.encode())  # everything written before the fsync
    assert only(events, "fsync-dir").inode == tmp_path.stat().st_ino
    assert target.read_text(encoding="utf-8") == text


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o600, 0o444], ids=oct)
@pytest.mark.parametrize("umask", [0o077, 0o000, 0o022], ids=lambda u: f"umask{u:03o}")
def test_the_target_never_exists_with_another_mode(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: int, umask: int) -> None:
    target = tmp_path / "file"
    events = watch_calls(monkeypatch)
    old_umask = os.umask(umask)
    try:
        replace_file(target, "first\n", mode=mode)  # created
        replace_file(target, "second\n", mode=mode)  # replaced
    finally:
        os.umask(old_umask)
    renames = [e for e in events if e.what == "replace"]
    # At the moment of each rename the file that becomes the target already has its mode,
    # and what was there before (nothing, then the first file) had it too.
    assert [(e.mode, e.target_mode) for e in renames] == [(mode, None), (mode, mode)]
    assert stat.S_IMODE(target.stat().st_mode) == mode
    assert target.read_text() == "second\n"


def test_errors_name_the_target_not_the_temporary_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    cases = {
        str(a_file / "gfd"): NotADirectoryError,  # the parent is a regular file
        str(tmp_path / "absent" / "gfd"): FileNotFoundError,
    }
    (tmp_path / "a-dir").mkdir()
    cases[str(tmp_path / "a-dir")] = IsADirectoryError  # the rename fails
    for target, kind in cases.items():
        with pytest.raises(kind) as info:
            replace_file(target, "x")
        assert info.value.filename == target and info.value.filename2 is None
        assert ".tmp" not in str(info.value) and target in str(info.value)
    assert sorted(os.listdir(tmp_path)) == ["a-dir", "a-file"]

    def full_disk(*_: object) -> None:
        raise OSError(28, "No space left on device", "/somewhere/.gfd.x.tmp")

    monkeypatch.setattr("gpus.atomicfile.os.fsync", full_disk)
    with pytest.raises(OSError, match="No space left on device") as info:
        replace_file(tmp_path / "gfd", "x")
    assert info.value.filename == str(tmp_path / "gfd")
    assert sorted(os.listdir(tmp_path)) == ["a-dir", "a-file"]  # no temporary left

"""The features file, the dry-run table and the health file."""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path

import pytest

from gfd.output import FeaturesFile, HealthFile, format_features, parse_features, render_table


def test_format_is_sorted_key_value_lines() -> None:
    text = format_features({"nvidia.com/b": "2", "nvidia.com/a": "1"})
    assert text == "nvidia.com/a=1\nnvidia.com/b=2\n"
    assert parse_features(text) == {"nvidia.com/a": "1", "nvidia.com/b": "2"}
    assert format_features({}) == ""


def test_write_creates_directories_and_readable_file(tmp_path: Path) -> None:
    path = tmp_path / "features.d" / "gfd"
    features = FeaturesFile(str(path))
    assert features.write({"nvidia.com/gpu.count": "8"})
    assert path.read_text() == "nvidia.com/gpu.count=8\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert [p.name for p in path.parent.iterdir()] == ["gfd"]  # no temp file left behind


def test_unchanged_content_is_not_rewritten(tmp_path: Path) -> None:
    path = tmp_path / "gfd"
    features = FeaturesFile(str(path))
    features.write({"a": "1"})
    inode = path.stat().st_ino
    assert not features.write({"a": "1"})
    assert path.stat().st_ino == inode
    assert features.write({"a": "2"})
    assert path.stat().st_ino != inode  # replaced, not edited in place


def test_rewritten_when_someone_deleted_it(tmp_path: Path) -> None:
    path = tmp_path / "gfd"
    features = FeaturesFile(str(path))
    features.write({"a": "1"})
    path.unlink()
    assert features.write({"a": "1"})
    assert path.exists()


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "gfd"
    features = FeaturesFile(str(path))
    features.write({"a": "1"})

    def broken_replace(src: str, dst: str) -> None:
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk on fire"):
        features.write({"a": "2"})
    assert path.read_text() == "a=1\n"
    assert sorted(os.listdir(tmp_path)) == ["gfd"]


def _denied(*_: object, **__: object) -> tuple[int, str]:
    # What mkstemp raises in a directory we may not write (root bypasses permissions, so the
    # suite simulates it; the temporary name is what the real error names).
    raise PermissionError(13, "Permission denied", "/etc/features.d/.gfd.k2j4.tmp")


# (features path below tmp_path, the reason the error must give)
BAD_PATHS = {
    "parent is a regular file": ("a-file/gfd", "Not a directory"),
    "directory cannot be created": ("a-file/features.d/gfd",
                                    "cannot create directory {tmp}/a-file/features.d: "
                                    "Not a directory"),
    "path is a directory": ("a-dir", "Is a directory"),
    "directory not writable": ("gfd", "Permission denied"),
}


@pytest.mark.parametrize("where,reason", BAD_PATHS.values(), ids=BAD_PATHS.keys())
def test_a_bad_features_path_error_names_it_and_the_reason(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str, reason: str) -> None:
    """Regression (issue 10): the error named the temporary file, not the features file."""
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "a-dir").mkdir()
    if reason == "Permission denied":
        monkeypatch.setattr("gpus.atomicfile.tempfile.mkstemp", _denied)
    path = str(tmp_path / where)
    with pytest.raises(OSError) as info:
        FeaturesFile(path).write({"a": "1"})
    err = info.value
    assert err.filename == path and err.filename2 is None
    assert err.strerror == reason.format(tmp=tmp_path)
    assert ".tmp" not in str(err)
    assert sorted(os.listdir(tmp_path)) == ["a-dir", "a-file"]  # nothing left behind
    assert os.listdir(tmp_path / "a-dir") == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root bypasses directory permissions")
def test_an_unwritable_features_directory_is_named(tmp_path: Path) -> None:
    directory = tmp_path / "features.d"
    directory.mkdir(mode=0o555)
    path = str(directory / "gfd")
    with pytest.raises(PermissionError) as info:
        FeaturesFile(path).write({"a": "1"})
    assert info.value.filename == path and ".tmp" not in str(info.value)


def test_remove_is_idempotent(tmp_path: Path) -> None:
    path = tmp_path / "gfd"
    features = FeaturesFile(str(path))
    features.write({"a": "1"})
    features.remove()
    features.remove()
    assert not path.exists()


def test_stdout_mode_writes_every_time_and_never_removes() -> None:
    stream = io.StringIO()
    features = FeaturesFile("-", stream=stream)
    features.write({"a": "1"})
    features.write({"a": "1"})
    features.remove()
    assert stream.getvalue() == "a=1\na=1\n"


def test_table() -> None:
    table = render_table({"nvidia.com/gpu.count": "8", "nvidia.com/a": "x"})
    lines = table.splitlines()
    assert lines[0].split() == ["LABEL", "VALUE"]
    assert lines[1].split() == ["nvidia.com/a", "x"]
    assert lines[2].split() == ["nvidia.com/gpu.count", "8"]
    assert render_table({}) == "(no labels)\n"


# --------------------------------------------------------------------------- health file


def test_health_file_mark_and_reset(tmp_path: Path) -> None:
    path = tmp_path / "run" / "last-pass-ok"
    health = HealthFile(str(path), clock=lambda: 1700000000.9)
    health.reset()  # nothing to delete: fine
    health.mark()
    assert path.read_text() == "1700000000\n"  # whole seconds
    assert oct(path.stat().st_mode & 0o777) == "0o644"
    health.reset()
    assert not path.exists()


def test_disabled_health_file_does_nothing(tmp_path: Path) -> None:
    health = HealthFile("")
    assert not health.enabled
    health.mark()
    health.reset()
    assert list(tmp_path.iterdir()) == []


def test_unwritable_health_file_is_logged_once(tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "file").write_text("x")
    health = HealthFile(str(tmp_path / "file" / "health"))  # a file where a directory must be
    with caplog.at_level("INFO", logger="gfd.output"):
        health.mark()
        health.mark()
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "health" in warnings[0].getMessage()
    assert f"{tmp_path / 'file' / 'health'}: Not a directory" in warnings[0].getMessage()
    assert ".tmp" not in warnings[0].getMessage()
    assert (tmp_path / "file").read_text() == "x"

"""The one atomic file replacement the features file, CDI spec and readiness files use."""

from __future__ import annotations

import os
import stat
from pathlib import Path

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

"""gpus.atomicfile guards that mutation testing found unprotected (docs/testing.md)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from locale_support import ascii_default_encoding

from gpus.atomicfile import replace_file


def _spy_on_replace(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Record every os.replace(source, target) and let it happen."""
    calls: list[tuple[str, str]] = []
    real_replace: Callable[[str, str], None] = os.replace

    def spy(source: str, target: str) -> None:
        calls.append((os.fspath(source), os.fspath(target)))
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", spy)
    return calls


def test_the_temporary_is_a_hidden_sibling_of_the_target(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Beside the target, so the rename stays on one filesystem and is atomic; hidden and named
    # after it, so directory readers (NFD skips dot-files in features.d) never pick it up.
    calls = _spy_on_replace(monkeypatch)
    target = tmp_path / "features"
    replace_file(target, "a=b\n")
    [(source, renamed)] = calls
    assert renamed == str(target)
    assert Path(source).parent == tmp_path
    assert Path(source).name.startswith(".features.")
    assert Path(source).name.endswith(".tmp")
    assert target.read_text() == "a=b\n"


def test_a_bare_file_name_is_written_in_the_working_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    calls = _spy_on_replace(monkeypatch)
    replace_file("status.json", "{}")
    [(source, _)] = calls
    assert Path(source).resolve().parent == tmp_path.resolve()
    assert sorted(os.listdir(tmp_path)) == ["status.json"]
    assert (tmp_path / "status.json").read_text() == "{}"


def test_replace_writes_utf8_under_an_ascii_locale(tmp_path: Path) -> None:
    # A container without a locale may run Python with an ASCII default encoding; product
    # names and paths can still hold non-ASCII characters.
    target = tmp_path / "spec"
    with ascii_default_encoding():
        replace_file(target, "Tesla \u00e9")
    assert target.read_bytes() == "Tesla \u00e9".encode()


def test_the_callers_error_survives_a_failed_cleanup(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # If the temporary is already gone when cleaning up, the caller still sees why the replace
    # failed, not the cleanup's own error.
    def replace_that_loses_the_temporary(source: str, target: str) -> None:
        os.unlink(source)
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "replace", replace_that_loses_the_temporary)
    with pytest.raises(OSError, match="disk on fire"):
        replace_file(tmp_path / "features", "x")
    assert os.listdir(tmp_path) == []

"""Fuzzing machine profiles: mutations of the shipped ones, as text and as structure.

``load_profile`` must return a Profile or raise ProfileError; never any other exception.
"""

from __future__ import annotations

import copy
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from gpus.fake.profile import PROFILES_DIR, Profile, ProfileError, list_profiles, load_profile

from .strategies import TEXT, fuzz_settings, json_values, mutated_text

SHIPPED = {name: (PROFILES_DIR / f"{name}.yaml").read_text() for name in list_profiles()}
KEYS = st.one_of(st.sampled_from([
    "name", "driver_version", "cuda_driver_version", "models", "defaults", "gpus", "mig",
    "topology", "model", "bus_id", "numa_node", "profile", "count", "compute", "gi", "nvlink",
    "nvswitch", "default", "extends", "memory_bytes", "mig_table",
]), TEXT)


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    """One directory for the whole module (hypothesis re-runs the test body, not fixtures)."""
    path = Path(tempfile.mkdtemp(prefix="nvkfuzz"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def check(workdir: Path, text: str | bytes) -> None:
    path = workdir / "profile.yaml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        assert isinstance(load_profile(path), Profile)
    except ProfileError as err:
        assert str(err).startswith(str(path)), str(err)


def paths(data: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every key/index path into a parsed profile."""
    found = [prefix]
    if isinstance(data, dict):
        for key, value in data.items():
            found += paths(value, (*prefix, key))
    elif isinstance(data, list):
        for index, value in enumerate(data):
            found += paths(value, (*prefix, index))
    return found


@st.composite
def structural_mutation(draw: st.DrawFn) -> str:
    """A shipped profile with values replaced, keys deleted or added at random paths."""
    name = draw(st.sampled_from(sorted(SHIPPED)))
    data = yaml.safe_load(SHIPPED[name])
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        target = draw(st.sampled_from(paths(data)))
        if not target:
            continue
        parent = data
        for step in target[:-1]:
            parent = parent[step]
        last = target[-1]
        op = draw(st.sampled_from(["replace", "delete", "add", "small_int"]))
        if op == "delete":
            del parent[last]
        elif op == "add" and isinstance(parent, dict):
            parent[draw(KEYS)] = draw(json_values(KEYS))
        elif op == "small_int":
            parent[last] = draw(st.integers(min_value=-2, max_value=200))
        else:
            parent[last] = copy.deepcopy(draw(json_values(KEYS)))
    return yaml.safe_dump(data, allow_unicode=True)


@fuzz_settings(150)
@given(text=mutated_text(list(SHIPPED.values())))
def test_text_mutations(workdir: Path, text: str) -> None:
    check(workdir, text)


@fuzz_settings(150)
@given(text=structural_mutation())
def test_structural_mutations(workdir: Path, text: str) -> None:
    check(workdir, text)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_profiles_load(name: str) -> None:
    assert load_profile(name).name == name


# --- regressions found by fuzzing -------------------------------------------------------------


@pytest.mark.parametrize("content", [b"\xff\xfename: x\n", b"name: caf\xe9\n"])
def test_non_utf8_profile_is_a_profile_error(workdir: Path, content: bytes) -> None:
    """Was UnicodeDecodeError escaping load_profile."""
    path = workdir / "bad.yaml"
    path.write_bytes(content)
    with pytest.raises(ProfileError, match="cannot read"):
        load_profile(path)


def test_deeply_nested_profile_is_a_profile_error(workdir: Path) -> None:
    """The pure-Python YAML parser raised RecursionError here (libyaml refuses it)."""
    path = workdir / "deep.yaml"
    path.write_text("gpus: " + "[" * 3000 + "]" * 3000 + "\n")
    with pytest.raises(ProfileError, match="cannot read"):
        load_profile(path)

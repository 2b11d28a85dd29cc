"""``@record`` behaves as ``@dataclass(frozen=True)``: equality, hashing, repr, immutability and
the dataclasses functions, side by side with the standard decorator; and the packages use it."""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from gpus.records import record

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("gpus", "deviceplugin", "gfd", "exporter", "mpsdaemon")
NAN = float("nan")

Decorator = Callable[[type], type]


def standard(cls: type) -> type:
    return dataclass(frozen=True)(cls)


def both(build: Callable[[Decorator], type]) -> tuple[type, type]:
    """The same class body made by the standard decorator and by ``record``."""
    return build(standard), build(record)


def point(decorate: Decorator) -> type:
    @decorate
    class Point:
        a: int
        b: float = 0.0
        tags: tuple[str, ...] = field(default=(), compare=False)
        secret: str = field(default="s", repr=False)
        weight: int = field(default=0, hash=False)

    return Point


def same(std: object, rec: object) -> None:
    assert repr(std) == repr(rec)


CASES = [(1,), (1, 2.5), (1, NAN), (1, 2.5, ("x",), "t", 5), (-3, math.inf, (), "", -1)]


@pytest.mark.parametrize("args", CASES)
def test_equality_hash_and_repr_match_the_standard_decorator(args: tuple[Any, ...]) -> None:
    std_cls, rec_cls = both(point)
    std, rec = std_cls(*args), rec_cls(*args)
    same(std, rec)
    assert (std == std_cls(*args)) == (rec == rec_cls(*args))  # NaN: unequal unless identical
    assert (std == std) and (rec == rec)  # identity inside the tuples: NaN equals itself
    assert (std != std_cls(*args)) == (rec != rec_cls(*args))
    assert hash(std) == hash(rec)  # the same tuple of the same values


def test_field_options_are_honoured() -> None:
    std_cls, rec_cls = both(point)
    for cls in (std_cls, rec_cls):
        assert cls(1, 2.0, ("x",)) == cls(1, 2.0, ("y",))  # compare=False
        assert cls(1, 2.0, weight=1) != cls(1, 2.0, weight=2)  # still compared...
        assert hash(cls(1, 2.0, weight=1)) == hash(cls(1, 2.0, weight=2))  # ...not hashed
        assert "secret" not in repr(cls(1))  # repr=False


def test_other_classes_are_not_equal() -> None:
    std_cls, rec_cls = both(point)
    assert rec_cls(1).__eq__(std_cls(1)) is NotImplemented
    assert std_cls(1).__eq__(rec_cls(1)) is NotImplemented
    assert rec_cls(1) != (1, 0.0, (), "s", 0)

    @record
    class Base:
        x: int

    @record
    class Derived(Base):
        y: int = 0

    assert Derived(1, 2) == Derived(1, 2)
    assert Derived(1) != Base(1)
    assert repr(Derived(1, 2)).endswith("Derived(x=1, y=2)")


def test_frozen_and_the_dataclasses_functions() -> None:
    _, rec_cls = both(point)
    value: Any = rec_cls(1, 2.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        value.a = 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        del value.a
    assert [f.name for f in dataclasses.fields(value)] == ["a", "b", "tags", "secret", "weight"]
    assert dataclasses.replace(value, a=5) == rec_cls(5, 2.0)
    assert dataclasses.asdict(value)["b"] == 2.0
    assert copy.deepcopy(value) == value
    assert vars(rec_cls)["__match_args__"] == ("a", "b", "tags", "secret", "weight")
    assert {value, rec_cls(1, 2.0)} == {value}
    assert dataclasses.is_dataclass(value)


def test_a_record_met_again_in_its_own_repr_shows_as_dots() -> None:
    def node(decorate: Decorator) -> type:
        @decorate
        class Node:
            children: list[Any]

        return Node

    std_cls, rec_cls = both(node)
    std_children: list[Any] = []
    rec_children: list[Any] = []
    std, rec = std_cls(std_children), rec_cls(rec_children)
    std_children.append(std)
    rec_children.append(rec)
    same(std, rec)
    assert repr(rec).endswith("Node(children=[...])")


def test_methods_written_in_the_class_are_kept() -> None:
    def custom(decorate: Decorator) -> type:
        @decorate
        class Custom:
            a: int

            def __eq__(self, other: object) -> bool:
                return True

            def __repr__(self) -> str:
                return "custom"

        return Custom

    std_cls, rec_cls = both(custom)
    assert rec_cls(1) == rec_cls(2) and repr(rec_cls(1)) == "custom"
    assert hash(std_cls(1)) == hash(rec_cls(1))  # __eq__ alone: dataclass still adds a hash

    def hashed(decorate: Decorator) -> type:
        @decorate
        class Hashed:
            a: int

            def __hash__(self) -> int:
                return 7

        return Hashed

    std_cls, rec_cls = both(hashed)
    assert hash(std_cls(1)) == hash(rec_cls(1)) == 7

    def unhashable(decorate: Decorator) -> type:
        @decorate
        class Unhashable:
            a: int
            __hash__ = None  # type: ignore[assignment]

        return Unhashable

    for cls in both(unhashable):
        with pytest.raises(TypeError, match="unhashable"):
            hash(cls(1))


def test_a_record_without_fields() -> None:
    def empty(decorate: Decorator) -> type:
        @decorate
        class Empty:
            pass

        return Empty

    std_cls, rec_cls = both(empty)
    assert rec_cls() == rec_cls() and hash(std_cls()) == hash(rec_cls())
    same(std_cls(), rec_cls())


# --- shared_init=True: nothing compiled (the configuration table) -------------------------------


def shared(cls: type) -> type:
    return record(shared_init=True)(cls)


def table(decorate: Decorator) -> type:
    @decorate
    class Table:
        a: int
        b: str = "b"
        items: tuple[int, ...] = field(default_factory=tuple)
        made: list[int] = field(default_factory=list, init=False)
        fixed: int = field(default=7, init=False)
        seen: list[str] = field(default_factory=list, compare=False, repr=False)

        def __post_init__(self) -> None:
            object.__setattr__(self, "b", self.b.upper())
            self.seen.append("post")

    return Table


def outcome(build: Callable[[], Any]) -> str:
    """What a construction gives: the repr, or the error's type and message."""
    try:
        value = build()
    except Exception as err:  # the same error, whichever it is
        return f"{type(err).__name__}: {err}"
    return repr(value) + repr(vars(value))


CALLS: list[tuple[tuple[Any, ...], dict[str, Any]]] = [
    ((1,), {}), ((1, "x"), {}), ((1, "x", (2,)), {}), ((), {"a": 1, "items": (3,)}),
    ((), {}), ((1, "x", (2,), 4), {}), ((1,), {"a": 2}), ((1,), {"nope": 2}),
    ((1,), {"made": [1]}),
]


@pytest.mark.parametrize(("args", "kwargs"), CALLS)
def test_shared_init_builds_and_refuses_as_the_generated_one(
    args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    std_cls, rec_cls = table(standard), table(shared)
    assert outcome(lambda: std_cls(*args, **kwargs)) == outcome(lambda: rec_cls(*args, **kwargs))


def test_shared_init_names_every_missing_argument() -> None:
    def three(decorate: Decorator) -> type:
        @decorate
        class Three:
            x: int
            y: int
            z: int

        return Three

    std_cls, rec_cls = three(standard), three(shared)
    for count in range(3):
        args = tuple(range(count))
        assert outcome(functools.partial(std_cls, *args)) == outcome(
            functools.partial(rec_cls, *args))


def test_shared_init_keeps_the_class_frozen() -> None:
    std_cls, rec_cls = table(standard), table(shared)
    for cls in (std_cls, rec_cls):
        value: Any = cls(1)
        with pytest.raises(dataclasses.FrozenInstanceError, match="cannot assign to field 'a'"):
            value.a = 2
        with pytest.raises(dataclasses.FrozenInstanceError, match="cannot delete field 'a'"):
            del value.a
        with pytest.raises(dataclasses.FrozenInstanceError, match="assign to field 'other'"):
            value.other = 2
        assert dataclasses.replace(value, b="z") == cls(1, "z")
        assert copy.deepcopy(value) == value
        assert vars(cls)["__match_args__"] == ("a", "b", "items", "seen")

        class Loose(cls):  # type: ignore[valid-type,misc]  # not a dataclass: only fields frozen
            pass

        loose: Any = Loose(1)
        loose.other = 2
        assert loose.other == 2
        with pytest.raises(dataclasses.FrozenInstanceError):
            loose.a = 3


def test_shared_init_refuses_what_it_does_not_implement() -> None:
    with pytest.raises(TypeError, match="kw_only"):

        @record(shared_init=True)
        class KeywordOnly:
            a: int = field(default=0, kw_only=True)

    with pytest.raises(TypeError, match="Cannot overwrite attribute __setattr__"):

        @record(shared_init=True)
        class Settable:
            a: int = 0

            def __setattr__(self, name: str, value: Any) -> None:
                pass


def test_the_packages_declare_frozen_dataclasses_with_record() -> None:
    # A plain @dataclass(frozen=True) works, but compiles three more methods at every start
    # (gpus/records.py); one with a comment on its line (a hot key, say) is a choice, not a slip.
    pattern = re.compile(r"^[ \t]*@(dataclasses\.)?dataclass\(frozen=True\)[ \t]*$", re.MULTILINE)
    found = [
        f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, match.start()) + 1}"
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
        for text in [path.read_text(encoding="utf-8")]
        for match in pattern.finditer(text)
    ]
    assert found == [], "use gpus.records.record instead: " + ", ".join(found)

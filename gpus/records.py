"""``@record``: the project's frozen dataclass, cheaper to define.

``@record`` is ``@dataclass(frozen=True)`` with the same ``__eq__``, ``__hash__`` and
``__repr__``, shared by every record instead of compiled for each class. The standard decorator
compiles six methods from source text for every frozen class when its module is imported, and
the device plugin imports ~60 frozen dataclasses before its first Register: with them it ran
978 M instructions from process start to Register, with ``@record`` 904 M (callgrind, fake
dgx-a100; docs/benchmarks.md). ``dataclass`` still compiles ``__init__`` and the frozen
``__setattr__`` / ``__delattr__``; the other three behave as the generated ones:

- ``==`` compares the fields (those with ``compare``) in order, as tuples, for instances of
  the very same class; anything else is ``NotImplemented``.
- ``hash()`` hashes the tuple of the fields with ``hash`` (or, when unset, ``compare``). A
  ``__hash__`` or ``__eq__`` written in the class body is kept, as ``dataclass`` keeps it.
- ``repr()`` is ``Name(field=value, ...)`` over the fields with ``repr``, ``...`` for a record
  met again while it is being shown.

They cost a little more per call (a shared function reading the class's field getters, a few
hundred ns): a class hashed or compared in a hot loop may stay ``@dataclass(frozen=True)``, with
a comment on that line saying why (``tests/test_records.py`` accepts it then).

``dataclasses.fields``, ``replace`` and ``asdict`` work as on any dataclass; type checkers see
a frozen dataclass (``dataclass_transform``).
"""

from __future__ import annotations

import _thread
import dataclasses
import sys
from collections.abc import Callable, Sequence
from operator import attrgetter
from typing import Any, TypeVar

if sys.version_info >= (3, 11):
    from typing import dataclass_transform
else:  # Python 3.10: the marker only informs type checkers

    def dataclass_transform(**_: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        return lambda decorator: decorator


__all__ = ["record"]

T = TypeVar("T")
Key = Callable[[Any], tuple[Any, ...]]

# What each record class keeps for the shared methods, as class attributes: the getters of its
# compared (_record_eq_key) and hashed (_record_hash_key) fields, its shown field names
# (_record_shown).


@dataclass_transform(frozen_default=True, field_specifiers=(dataclasses.field,))
def record(cls: type[T]) -> type[T]:
    """A frozen dataclass of ``cls`` (see the module docstring)."""
    body = set(cls.__dict__)  # what the class itself wrote, before dataclass adds anything
    # As dataclass: a class that writes __eq__ alone gets __hash__ = None from Python, which
    # does not count as writing one; any other __hash__ it wrote is kept (None included).
    wrote_hash = "__hash__" in body and not (cls.__dict__["__hash__"] is None
                                             and "__eq__" in body)
    made = dataclasses.dataclass(frozen=True, eq=False, repr=False)(cls)
    fields = dataclasses.fields(made)  # type: ignore[arg-type]  # made is a dataclass now
    target: Any = made  # methods and their data are set on the class
    if "__eq__" not in body:
        target._record_eq_key = _key([f.name for f in fields if f.compare])
        target.__eq__ = _eq
    if not wrote_hash:
        target._record_hash_key = _key(
            [f.name for f in fields if (f.compare if f.hash is None else f.hash)])
        target.__hash__ = _hash
    if "__repr__" not in body:
        target._record_shown = tuple(f.name for f in fields if f.repr)
        target.__repr__ = _repr
    return made


def _key(names: Sequence[str]) -> Key:
    """The tuple of the named attributes: always a tuple, as the generated code compares
    (``(x,) == (x,)`` holds for a NaN ``x``, ``x == x`` does not)."""
    if not names:
        return _no_fields
    if len(names) == 1:
        one: Callable[[Any], Any] = attrgetter(names[0])
        return lambda obj: (one(obj),)
    several: Key = attrgetter(*names)  # a tuple, at C speed
    return several


def _no_fields(_: Any) -> tuple[Any, ...]:
    return ()


def _eq(self: Any, other: Any) -> Any:
    cls = self.__class__
    if other.__class__ is cls:
        return cls._record_eq_key(self) == cls._record_eq_key(other)
    return NotImplemented


def _hash(self: Any) -> int:
    return hash(self.__class__._record_hash_key(self))


_showing: set[tuple[int, int]] = set()  # (record id, thread) being shown: a cycle shows "..."


def _repr(self: Any) -> str:
    running = (id(self), _thread.get_ident())
    if running in _showing:
        return "..."
    _showing.add(running)
    try:
        names: tuple[str, ...] = self.__class__._record_shown
        shown = ", ".join(f"{name}={getattr(self, name)!r}" for name in names)
        return f"{self.__class__.__qualname__}({shown})"
    finally:
        _showing.discard(running)

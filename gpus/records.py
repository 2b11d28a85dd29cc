"""``@record``: the project's frozen dataclass, cheaper to define.

``@record`` is ``@dataclass(frozen=True)`` with the same ``__eq__``, ``__hash__`` and
``__repr__``, shared by every record instead of compiled for each class. The standard decorator
compiles six methods from source text for every frozen class when its module is imported, and
the device plugin imports ~60 frozen dataclasses before its first Register: with them it ran
978 M instructions from process start to Register, with ``@record`` 904 M, and 830 M once the
classes built only a few times per process shared their ``__init__`` too (callgrind, fake
dgx-a100; docs/benchmarks.md). The shared methods behave as the generated ones:

- ``==`` compares the fields (those with ``compare``) in order, as tuples, for instances of
  the very same class; anything else is ``NotImplemented``.
- ``hash()`` hashes the tuple of the fields with ``hash`` (or, when unset, ``compare``). A
  ``__hash__`` or ``__eq__`` written in the class body is kept, as ``dataclass`` keeps it.
- ``repr()`` is ``Name(field=value, ...)`` over the fields with ``repr``, ``...`` for a record
  met again while it is being shown.

They cost a little more per call (a shared function reading the class's field getters, a few
hundred ns): a class hashed or compared in a hot loop may stay ``@dataclass(frozen=True)``, with
a comment on that line saying why (``tests/test_records.py`` accepts it then).

``@record(shared_init=True)`` also shares ``__init__`` (the same parameters, defaults, default
factories, ``__post_init__`` call and error messages; no ``kw_only`` fields or ``InitVar``) and
the frozen ``__setattr__`` / ``__delattr__``, so nothing is compiled. Construction is several
times slower: it is for classes built a few times per process, such as the configuration
table's sections, a snapshot and its system info, the status or one apply's result.

``dataclasses.fields``, ``replace`` and ``asdict`` work as on any dataclass; type checkers see
a frozen dataclass (``dataclass_transform``).
"""

from __future__ import annotations

import _thread
import dataclasses
import sys
from collections.abc import Callable, Sequence
from operator import attrgetter
from typing import Any, TypeVar, overload

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


@overload
def record(cls: type[T], /) -> type[T]: ...


@overload
def record(*, shared_init: bool = False) -> Callable[[type[T]], type[T]]: ...


@dataclass_transform(frozen_default=True, field_specifiers=(dataclasses.field,))
def record(cls: type[T] | None = None, /, *, shared_init: bool = False) -> Any:
    """A frozen dataclass of ``cls`` (see the module docstring); ``@record(shared_init=True)``
    shares ``__init__``, ``__setattr__`` and ``__delattr__`` too."""
    if cls is None:
        return lambda later: _make(later, shared_init)
    return _make(cls, shared_init)


def _make(cls: type[T], shared_init: bool) -> type[T]:
    body = set(cls.__dict__)  # what the class itself wrote, before dataclass adds anything
    # As dataclass: a class that writes __eq__ alone gets __hash__ = None from Python, which
    # does not count as writing one; any other __hash__ it wrote is kept (None included).
    wrote_hash = "__hash__" in body and not (cls.__dict__["__hash__"] is None
                                             and "__eq__" in body)
    if shared_init:
        for name in ("__setattr__", "__delattr__"):
            if name in body:  # as dataclass refuses it for a frozen class
                raise TypeError(f"Cannot overwrite attribute {name} in class {cls.__name__}")
        made = dataclasses.dataclass(init=False, eq=False, repr=False)(cls)
    else:
        made = dataclasses.dataclass(frozen=True, eq=False, repr=False)(cls)
    fields = dataclasses.fields(made)  # type: ignore[arg-type]  # made is a dataclass now
    target: Any = made  # methods and their data are set on the class
    if shared_init:
        if "__init__" not in body:
            target._record_init = _init_spec(made, fields)
            target.__init__ = _init
        target._record_frozen = (made, tuple(f.name for f in fields))
        target.__setattr__ = _frozen_setattr
        target.__delattr__ = _frozen_delattr
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


# --- shared_init: the configuration table's classes, built a few times per process ---------------

_MISSING = dataclasses.MISSING

# (class name, fields in order as (name, in __init__, default, default factory), the positional
# parameters, how many of them have no default, whether __post_init__ exists)
InitSpec = tuple[str, tuple[tuple[str, bool, Any, Any], ...], tuple[str, ...], int, bool]


def _init_spec(cls: type, fields: tuple[dataclasses.Field[Any], ...]) -> InitSpec:
    """What :func:`_init` needs; refuses what it does not implement (kw_only, InitVar)."""
    # InitVar pseudo-fields are in __dataclass_fields__ but not in fields() (ClassVars too, which
    # __init__ ignores); dataclasses marks them with a private constant.
    initvar = getattr(dataclasses, "_FIELD_INITVAR", None)
    every = getattr(cls, "__dataclass_fields__", {}).values()
    if any(f.kw_only for f in fields) or any(f._field_type is initvar for f in every):
        raise TypeError(f"record(shared_init=True) {cls.__name__}: kw_only fields and InitVar "
                        "are not supported")
    positional = [f for f in fields if f.init]
    required = 0
    for f in positional:
        if f.default is _MISSING and f.default_factory is _MISSING:
            if required < positional.index(f):
                raise TypeError(f"non-default argument {f.name!r} follows default argument")
            required += 1
    order = tuple((f.name, f.init, f.default, f.default_factory) for f in fields)
    return (cls.__qualname__, order, tuple(f.name for f in positional), required,
            hasattr(cls, "__post_init__"))


def _init(self: Any, *args: Any, **kwargs: Any) -> None:
    """The generated ``__init__`` of a frozen dataclass, read from the class's spec: the same
    parameters, defaults, factories, errors and ``__post_init__`` call."""
    name, order, positional, required, post_init = self.__class__._record_init
    method = f"{name}.__init__()"
    if len(args) > len(positional):
        allowed = (f"from {required + 1} to {len(positional) + 1}" if required < len(positional)
                   else f"{len(positional) + 1}")
        raise TypeError(f"{method} takes {allowed} positional arguments but {len(args) + 1} "
                        "were given")
    given = dict(zip(positional, args, strict=False))  # args may be fewer
    for key, value in kwargs.items():
        if key not in positional:
            raise TypeError(f"{method} got an unexpected keyword argument {key!r}")
        if key in given:
            raise TypeError(f"{method} got multiple values for argument {key!r}")
        given[key] = value
    missing = [field for field, init, default, factory in order
               if init and field not in given and default is _MISSING and factory is _MISSING]
    if missing:
        names = [repr(field) for field in missing]
        listed = names[0] if len(names) == 1 else (
            f"{names[0]} and {names[1]}" if len(names) == 2
            else ", ".join(names[:-1]) + f", and {names[-1]}")
        plural = "argument" if len(names) == 1 else "arguments"
        raise TypeError(f"{method} missing {len(names)} required positional {plural}: {listed}")
    for field, init, default, factory in order:
        if init and field in given:
            value = given[field]
        elif factory is not _MISSING:
            value = factory()
        elif init:
            value = default
        else:
            continue  # the class attribute holds the default, as with the generated __init__
        object.__setattr__(self, field, value)
    if post_init:
        self.__post_init__()


def _frozen_setattr(self: Any, name: str, value: Any) -> None:
    cls, fields = self.__class__._record_frozen
    if type(self) is cls or name in fields:
        raise dataclasses.FrozenInstanceError(f"cannot assign to field {name!r}")
    super(cls, self).__setattr__(name, value)


def _frozen_delattr(self: Any, name: str) -> None:
    cls, fields = self.__class__._record_frozen
    if type(self) is cls or name in fields:
        raise dataclasses.FrozenInstanceError(f"cannot delete field {name!r}")
    super(cls, self).__delattr__(name)

"""Value kinds: how a setting's value is read from a flag or env string and from the file.

Each kind has one implementation with two entry points: ``from_text(raw, label)`` for a flag or
environment variable (errors are ConfigErrors naming the label: ``invalid --x 'y': reason``)
and ``from_file(value)`` for a parsed YAML/JSON value (errors are :class:`ValueProblem`, which
the file parser turns into ``file:line: field.path: reason``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Literal

from .enums import Choice, DeviceListStrategy, values
from .errors import ConfigError, type_name

ArgForm = Literal["value", "bool", "multi"]


class ValueProblem(Exception):
    """A file value that does not fit its kind: the reason, and the path below the key
    (``"[1]"``, ``".name"``) that it is about."""

    def __init__(self, reason: str, suffix: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.suffix = suffix


_TRUE = ("true", "1", "yes")
_FALSE = ("false", "0", "no")
_GO_DURATION_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "\u00b5s": 1e-6,  # micro sign
    "\u03bcs": 1e-6,  # Greek mu
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_GO_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|\u00b5s|\u03bcs|ms|s|m|h)")


def _invalid(label: str, raw: object, reason: str) -> ConfigError:
    return ConfigError(f"invalid {label} {raw!r}: {reason}")


def parse_bool(raw: str, label: str) -> bool:
    """true/false/1/0/yes/no, case-insensitive."""
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise _invalid(label, raw, "must be one of true, false, 1, 0, yes, no")


def parse_choice(raw: str, label: str, choices: Sequence[str]) -> str:
    """One of ``choices``, exactly."""
    value = raw.strip()
    if value not in choices:
        raise _invalid(label, raw, f"must be one of {', '.join(choices)}")
    return value


def parse_duration(raw: str, label: str, allow_zero: bool = True) -> float:
    """A Go duration ("60s", "1m30s", "500ms") or a number of seconds ("60", "2.5") -> seconds."""
    try:
        return duration_seconds(raw, allow_zero)
    except ValueError as error:
        raise _invalid(label, raw, str(error)) from None


def duration_seconds(raw: str, allow_zero: bool = True) -> float:
    """Like :func:`parse_duration` but raises ValueError carrying only the reason."""
    text = raw.strip()
    seconds: float
    try:
        seconds = float(text)
    except ValueError:
        seconds = _parse_go_duration(text)
    if seconds != seconds or seconds in (float("inf"), float("-inf")):  # NaN / inf
        raise ValueError("must be a finite duration")
    if seconds < 0 or (seconds == 0 and not allow_zero):
        raise ValueError("must be >= 0" if allow_zero else "must be > 0")
    return seconds


def _parse_go_duration(text: str) -> float:
    body = text[1:] if text[:1] in "+-" else text
    sign = -1.0 if text.startswith("-") else 1.0
    position, total = 0, 0.0
    while position < len(body):
        match = _GO_DURATION_PART.match(body, position)
        if match is None:
            break
        total += float(match.group(1)) * _GO_DURATION_UNITS[match.group(2)]
        position = match.end()
    if not body or position != len(body):
        raise ValueError('must be a duration like "60s", "1m30s", "500ms" or seconds')
    return sign * total


def _one_of(choices: Sequence[str]) -> str:
    return f"must be one of {', '.join(choices)}"


class Kind:
    """How one setting's values are read, checked and shown. Subclasses implement both forms.

    Plain classes rather than dataclasses: they are built at import, on every daemon start.
    """

    __slots__ = ()

    # How argparse takes the flag: a value, an optional value (booleans), or repeated values.
    arg_form: ClassVar[ArgForm] = "value"

    def from_text(self, raw: Any, label: str) -> Any:
        """The value of a flag or environment variable ``label``; ConfigError if invalid."""
        raise NotImplementedError

    def from_file(self, value: object) -> Any:
        """The value of a config-file key; ValueProblem if invalid."""
        raise NotImplementedError

    @property
    def choices(self) -> tuple[str, ...]:
        """The values allowed, when the kind is a choice (for help texts)."""
        return ()

    def show(self, value: Any) -> str:
        """``value`` as the help text writes it (its default)."""
        return str(value)

    def coerce(self, value: Any) -> Any:
        """A value set in code, in this kind's type where it is valid (else unchanged)."""
        return value


class BoolKind(Kind):
    """true/false/1/0/yes/no from text (any case); a YAML boolean in the file."""

    __slots__ = ()
    arg_form: ClassVar[ArgForm] = "bool"

    def from_text(self, raw: Any, label: str) -> bool:
        return parse_bool(str(raw), label)

    def from_file(self, value: object) -> bool:
        if not isinstance(value, bool):
            raise ValueProblem(f"must be a boolean (true or false), got {value!r}")
        return value

    def show(self, value: Any) -> str:
        return "true" if value else "false"


class TextKind(Kind):
    """Any string; with ``nonempty``, not blank."""

    __slots__ = ("nonempty",)

    def __init__(self, nonempty: bool = False) -> None:
        self.nonempty = nonempty

    def from_text(self, raw: Any, label: str) -> str:
        if self.nonempty and not str(raw).strip():
            raise _invalid(label, raw, "must not be empty")
        return str(raw)

    def from_file(self, value: object) -> str:
        if not isinstance(value, str):
            raise ValueProblem(f"must be a string, got {type_name(value)} {value!r}")
        if self.nonempty and not value.strip():
            raise ValueProblem(f"must not be empty, got {value!r}")
        return value


class ChoiceKind(Kind):
    """One member of a :class:`Choice` Enum, given by its value (in any case with
    ``any_case``, for flags and env vars: ``--log-level DEBUG``)."""

    __slots__ = ("choice", "any_case", "unsupported")

    def __init__(self, choice: type[Choice], any_case: bool = False,
                 unsupported: Mapping[str, str] | None = None) -> None:
        self.choice = choice
        self.any_case = any_case
        # NVIDIA's values we refuse on purpose -> the reason (one line, not "must be one of").
        self.unsupported = dict(unsupported or {})

    @property
    def choices(self) -> tuple[str, ...]:
        return values(self.choice)

    def from_text(self, raw: Any, label: str) -> Choice:
        text = str(raw).strip().lower() if self.any_case else str(raw)
        if text.strip() in self.unsupported:
            raise _invalid(label, raw, self.unsupported[text.strip()])
        try:
            return self.choice(parse_choice(text, label, self.choices))
        except ConfigError:
            raise _invalid(label, raw, _one_of(self.choices)) from None

    def from_file(self, value: object) -> Choice:
        if not isinstance(value, str):
            raise ValueProblem(f"must be a string, got {type_name(value)} {value!r}")
        if value in self.unsupported:
            raise ValueProblem(f"{self.unsupported[value]}, got {value!r}")
        if value not in self.choices:
            raise ValueProblem(f"{_one_of(self.choices)}, got {value!r}")
        return self.choice(value)

    def coerce(self, value: Any) -> Any:
        return self.choice(value) if value in self.choices else value


class DurationKind(Kind):
    """Seconds, from a Go duration ("60s", "1m30s") or a number of seconds; ``allow_zero``
    False requires > 0. (NVIDIA reads a bare number in the file as nanoseconds, which is never
    what anyone meant.)"""

    __slots__ = ("allow_zero",)

    def __init__(self, allow_zero: bool = True) -> None:
        self.allow_zero = allow_zero

    def from_text(self, raw: Any, label: str) -> float:
        return parse_duration(str(raw), label, self.allow_zero)

    def from_file(self, value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ValueProblem(f'must be a duration like "60s", got {type_name(value)}')
        try:
            return duration_seconds(str(value), allow_zero=self.allow_zero)
        except ValueError as error:
            raise ValueProblem(f"{error}, got {value!r}") from None

    def show(self, value: Any) -> str:
        return f"{value:g}s"


class _UnknownItem(Exception):
    def __init__(self, index: int) -> None:
        super().__init__(index)
        self.index = index


def _unique_members(items: Sequence[str], choice: type[Choice]) -> tuple[Choice, ...]:
    """``items`` as members of ``choice``, duplicates dropped; _UnknownItem at the first
    unknown one. The one device-list check, shared by flags, env vars and the file."""
    known = values(choice)
    result: list[Choice] = []
    for index, item in enumerate(items):
        if item not in known:
            raise _UnknownItem(index)
        member = choice(item)
        if member not in result:
            result.append(member)
    return tuple(result)


class ChoiceListKind(Kind):
    """Several members of a Choice Enum, in order, duplicates dropped: from text a comma list
    (the flag may repeat), in the file a string or a list of strings."""

    __slots__ = ("choice",)
    arg_form: ClassVar[ArgForm] = "multi"

    def __init__(self, choice: type[Choice]) -> None:
        self.choice = choice

    @property
    def choices(self) -> tuple[str, ...]:
        return values(self.choice)

    def from_text(self, raw: Any, label: str) -> tuple[Choice, ...]:
        chunks = [raw] if isinstance(raw, str) else [str(chunk) for chunk in raw]
        items = [part.strip() for chunk in chunks for part in chunk.split(",") if part.strip()]
        if not items:
            raise _invalid(label, ",".join(chunks), "must name at least one strategy")
        try:
            return _unique_members(items, self.choice)
        except _UnknownItem as unknown:
            raise _invalid(label, items[unknown.index], _one_of(self.choices)) from None

    def from_file(self, value: object) -> tuple[Choice, ...]:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise ValueProblem(f"must be a string or a list of strings, got {type_name(value)}")
        if not items:
            raise ValueProblem("must name at least one strategy")
        try:
            return _unique_members(items, self.choice)
        except _UnknownItem as unknown:
            where = "" if isinstance(value, str) else f"[{unknown.index}]"
            raise ValueProblem(f"{_one_of(self.choices)}, got {items[unknown.index]!r}",
                               where) from None

    def show(self, value: Any) -> str:
        return ",".join(str(item) for item in value)

    def coerce(self, value: Any) -> Any:
        if not isinstance(value, tuple):
            return value
        return tuple(self.choice(item) if item in self.choices else item for item in value)


def parse_device_list_strategy(raw: Sequence[str], label: str) -> tuple[str, ...]:
    """A comma list (or several values) of device-list strategies, duplicates dropped."""
    return ChoiceListKind(DeviceListStrategy).from_text(list(raw), label)


def split_keys(value: object, known: Sequence[str], ignored: Sequence[str] = (),
               on_ignored: Callable[[str], None] = lambda key: None) -> dict[str, Any]:
    """A mapping's known keys (None values dropped, as absent); an ignored key is reported to
    ``on_ignored`` and dropped; anything else, or a non-mapping, is a ValueProblem."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueProblem(f"must be a mapping, got {type_name(value)}")
    result: dict[str, Any] = {}
    for key, item in value.items():
        if key in known:
            if item is not None:
                result[key] = item
        elif key in ignored:
            on_ignored(str(key))
        else:
            raise ValueProblem(f"unknown key {key!r} (allowed: {', '.join(known)})", f".{key}")
    return result


class VersionKind(Kind):
    """The file format's ``version``: exactly ``expected``."""

    __slots__ = ("expected",)

    def __init__(self, expected: str) -> None:
        self.expected = expected

    def from_text(self, raw: Any, label: str) -> str:
        if str(raw).strip() != self.expected:
            raise _invalid(label, raw, f"must be {self.expected}")
        return self.expected

    def from_file(self, value: object) -> str:
        if value != self.expected:
            raise ValueProblem(f"unknown version {value!r}: must be {self.expected}")
        return self.expected


class NumberKind(Kind):
    """A number (``integer``: a whole one) of at least ``minimum``; from text or the file."""

    __slots__ = ("integer", "minimum")

    def __init__(self, integer: bool = False, minimum: float = 0) -> None:
        self.integer = integer
        self.minimum = minimum

    def _reason(self) -> str:
        what = "a whole number" if self.integer else "a number"
        return f"must be {what} >= {self.minimum:g}"

    def _check(self, value: float) -> float | None:
        if value != value or value in (float("inf"), float("-inf")) or value < self.minimum:
            return None
        if self.integer and value != int(value):
            return None
        return int(value) if self.integer else float(value)

    def from_text(self, raw: Any, label: str) -> float:
        try:
            number = float(str(raw).strip())
        except ValueError:
            raise _invalid(label, raw, self._reason()) from None
        checked = self._check(number)
        if checked is None:
            raise _invalid(label, raw, self._reason())
        return checked

    def from_file(self, value: object) -> float:
        checked = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            checked = self._check(value)
        if checked is None:
            raise ValueProblem(f"{self._reason()}, got {type_name(value)} {value!r}")
        return checked

    def show(self, value: Any) -> str:
        return f"{value:g}"


def _split_text(raw: Any) -> list[str]:
    """A comma list, or several (repeated flag) comma lists, as stripped non-empty items."""
    chunks = [raw] if isinstance(raw, str) else [str(chunk) for chunk in raw]
    return [part.strip() for chunk in chunks for part in chunk.split(",") if part.strip()]


class TextListKind(Kind):
    """Names, in order, duplicates dropped: from text a comma list (the flag may repeat), in
    the file a string or a list of strings (``--cdi-feature-flags``, ``--cdi-disable-hooks``).
    Which names mean something is the user's business (unknown ones are logged there)."""

    __slots__ = ()
    arg_form: ClassVar[ArgForm] = "multi"

    def from_text(self, raw: Any, label: str) -> tuple[str, ...]:
        return tuple(dict.fromkeys(_split_text(raw)))

    def from_file(self, value: object) -> tuple[str, ...]:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise ValueProblem(f"must be a string or a list of strings, got {type_name(value)}")
        return tuple(dict.fromkeys(i.strip() for i in items if i.strip()))

    def show(self, value: Any) -> str:
        return ",".join(value) or "none"


IMEX_ALL = "all"


class ImexChannelsKind(Kind):
    """IMEX channel IDs: ``all``, or channel numbers (``0``, ``0,1``); from text a comma list,
    in the file (``imex.channelIDs``) a list of numbers or the string ``all``. Kept as
    strings, numbers in canonical decimal form, duplicates dropped."""

    __slots__ = ()
    arg_form: ClassVar[ArgForm] = "multi"
    _REASON = "must be 'all' or a comma list of channel numbers >= 0"

    def _items(self, items: Sequence[object]) -> tuple[str, ...] | None:
        if [str(i).strip() for i in items] == [IMEX_ALL]:
            return (IMEX_ALL,)
        result: list[str] = []
        for item in items:
            if isinstance(item, bool):
                return None
            text = str(item).strip()
            # ASCII only: str.isdigit() is also true of "²" (which int() refuses: a ValueError,
            # not a ConfigError) and of other scripts' digits, which no channel is named with.
            if not (text.isascii() and text.isdigit()):
                return None
            result.append(str(int(text)))
        return tuple(dict.fromkeys(result))

    def from_text(self, raw: Any, label: str) -> tuple[str, ...]:
        items = _split_text(raw)
        checked = self._items(items)
        if checked is None:
            raise _invalid(label, ",".join(items), self._REASON)
        return checked

    def from_file(self, value: object) -> tuple[str, ...]:
        items = [value] if isinstance(value, (str, int)) else value
        checked = None
        if isinstance(items, list) and all(isinstance(i, (str, int)) for i in items):
            checked = self._items(items)
        if checked is None:
            raise ValueProblem(f"{self._REASON}, got {type_name(value)} {value!r}")
        return checked

    def show(self, value: Any) -> str:
        return ",".join(value) or "none"

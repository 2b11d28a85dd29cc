"""Calling NVML: :class:`NvmlError` (the NVML call and error name) and the wrapper that raises it.

Part of the one NVML reader (:mod:`gpus.nvml`, which re-exports :class:`NvmlError` and
:func:`error_name`); its sibling modules (:mod:`gpus.nvmlmig`, :mod:`gpus.nvmlevents`,
:mod:`gpus.telemetry`) call NVML through :func:`_call` too, so every ``pynvml.NVMLError``
becomes an :class:`NvmlError` naming the call wherever it happens.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import pynvml

from gpus import errors

T = TypeVar("T")

_ERROR_NAMES: dict[int, str] = {
    getattr(pynvml, name): name for name in dir(pynvml) if name.startswith("NVML_ERROR_")
}


def error_name(code: int) -> str:
    """NVML's name for a return code, e.g. "NVML_ERROR_GPU_IS_LOST"."""
    return _ERROR_NAMES.get(code, f"NVML_ERROR_{code}")


class NvmlError(errors.NvmlError):
    """An NVML call failed: ``call`` (e.g. "nvmlDeviceGetUUID"), ``code`` and ``name``.

    Raised by every :class:`gpus.nvml.Nvml` method; part of the error tree (:mod:`gpus.errors`)."""

    def __init__(self, call: str, code: int, description: str = "", hint: str = "") -> None:
        self.call = call
        self.code = code
        self.name = error_name(code)
        self.description = description
        message = f"{call}: {self.name}"
        if description:
            message += f" ({description})"
        if hint:
            message += f": {hint}"
        super().__init__(message)

    @classmethod
    def from_pynvml(cls, call: str, exc: pynvml.NVMLError, hint: str = "") -> NvmlError:
        """Convert pynvml's exception."""
        code = int(exc.value)
        try:
            description = str(exc)
        except Exception:  # pynvml's __str__ may itself call into NVML
            description = ""
        return cls(call, code, description, hint)


def _call(call: str, fn: Callable[..., T], *args: Any) -> T:
    """Run a pynvml wrapper, converting its errors."""
    try:
        return fn(*args)
    except pynvml.NVMLError as exc:
        raise NvmlError.from_pynvml(call, exc) from None


def _text(value: str | bytes) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value

"""The fake ``libnvidia-ml``: NVML C functions as ctypes CFUNCTYPE pointers over :class:`FakeState`.

An instance of :class:`FakeNvmlLib` is installed as ``pynvml.nvmlLib``, so pynvml's own wrappers
(ctypes structs, ``byref``, version-suffixed symbols, error mapping) run unchanged. Every pointer
argument is declared ``c_void_p`` and cast to the struct pynvml passes, so pynvml's exact ctypes
types never trip an ArgumentError. A symbol the fake lacks is simply not an attribute: pynvml turns
the AttributeError into NVML_ERROR_FUNCTION_NOT_FOUND, as with an old driver.

This module is the library itself (the symbol table and the shim every call goes through); the
Python bodies live beside their signatures, one module per family: ``lib_device`` (library,
system, device, topology, fabric), ``lib_mig``, ``lib_events`` and ``lib_telemetry`` (telemetry
and GPM), on the pointer helpers of ``lib_ctypes``.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Callable
from ctypes import CFUNCTYPE, c_int, c_void_p
from typing import Any

import pynvml

from gpus.fake.lib_device import SIGNATURES as DEVICE_SIGNATURES
from gpus.fake.lib_device import DeviceFunctions
from gpus.fake.lib_events import SIGNATURES as EVENT_SIGNATURES
from gpus.fake.lib_events import EventFunctions
from gpus.fake.lib_mig import SIGNATURES as MIG_SIGNATURES
from gpus.fake.lib_mig import MigFunctions
from gpus.fake.lib_telemetry import SIGNATURES as TELEMETRY_SIGNATURES
from gpus.fake.lib_telemetry import TelemetryFunctions
from gpus.fake.state import NOT_APPLICABLE, FakeState, NvmlReturn

log = logging.getLogger(__name__)

# symbol -> argument types (return type is nvmlReturn_t = c_int), every family's.
SIGNATURES: dict[str, tuple[Any, ...]] = {
    **DEVICE_SIGNATURES,
    **MIG_SIGNATURES,
    **EVENT_SIGNATURES,
    **TELEMETRY_SIGNATURES,
}


class NvmlFunctions(DeviceFunctions, MigFunctions, EventFunctions, TelemetryFunctions):
    """Python bodies of the NVML functions; each returns NVML_SUCCESS or raises NvmlReturn.

    Called with the state lock held.
    """

    def __init__(self, state: FakeState) -> None:
        self.s = state


class FakeNvmlLib:
    """The object installed as ``pynvml.nvmlLib``: one CFUNCTYPE attribute per NVML symbol."""

    def __init__(self, state: FakeState) -> None:
        self._state = state
        self._impl = NvmlFunctions(state)
        self._error_strings: dict[int, ctypes.Array[ctypes.c_char]] = {}
        # Keep every callback object alive for as long as the lib exists.
        self._callbacks: dict[str, Any] = {}
        for name, argtypes in SIGNATURES.items():
            self._callbacks[name] = CFUNCTYPE(c_int, *argtypes)(self._shim(name))
            setattr(self, name, self._callbacks[name])
        # pynvml sets restype = c_char_p on this one, so it returns a pointer, not an int.
        error_string = CFUNCTYPE(c_void_p, c_int)(self._error_string)
        self._callbacks["nvmlErrorString"] = error_string
        self.nvmlErrorString = error_string

    @property
    def functions(self) -> NvmlFunctions:
        """The Python implementations (tests may patch their methods)."""
        return self._impl

    def _shim(self, name: str) -> Callable[..., int]:
        """The Python body of one C function: faults, lock, and never a stray exception."""
        state = self._state

        def call(*args: Any) -> int:
            try:
                with state.lock:
                    code = state.precheck(name)
                    if code:
                        return code
                    result: int = getattr(self._impl, name)(*args)
                    return result
            except NvmlReturn as ret:
                return ret.code
            except Exception:
                log.exception("fake NVML: %s raised; returning NVML_ERROR_UNKNOWN", name)
                return int(pynvml.NVML_ERROR_UNKNOWN)

        call.__name__ = name
        return call

    def _error_string(self, code: int) -> int | None:
        try:
            buffer = self._error_strings.get(code)
            if buffer is None:
                text = pynvml.NVMLError._errcode_to_string.get(code, f"Unknown NVML error {code}")
                buffer = ctypes.create_string_buffer(text.encode())
                self._error_strings[code] = buffer
            return ctypes.addressof(buffer)
        except Exception:
            log.exception("fake NVML: nvmlErrorString(%r) raised", code)
            return None


__all__ = ["FakeNvmlLib", "NvmlFunctions", "SIGNATURES", "NOT_APPLICABLE"]

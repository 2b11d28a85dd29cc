"""The C side of the fake NVML's functions: writing answers through the pointers pynvml passes.

Every pointer argument of the fake's CFUNCTYPEs is declared ``c_void_p`` (:data:`PTR`) and cast
here to the C type or struct pynvml passed, so pynvml's exact ctypes types never trip an
ArgumentError. A NULL pointer or a value the C type cannot hold becomes an NVML error.
"""

from __future__ import annotations

import ctypes
import logging
from ctypes import POINTER, c_void_p
from typing import Any

import pynvml

from gpus.fake.state import NvmlReturn

log = logging.getLogger(__name__)

SUCCESS = pynvml.NVML_SUCCESS
PTR = c_void_p  # every pointer argument


def fits(ctype: Any, value: int) -> int:
    """``value`` if the C integer type holds it; ctypes would silently wrap it otherwise.

    The loader bounds every profile value; this catches a value it missed (or a Profile built
    in code) as NVML_ERROR_UNKNOWN instead of a wrong answer such as 2^70 bytes read as 0.
    """
    if ctype(value).value != value:
        log.error("fake NVML: %d does not fit the C type %s", value, ctype.__name__)
        raise NvmlReturn(pynvml.NVML_ERROR_UNKNOWN)
    return value


def put(pointer: int | None, ctype: Any, value: Any) -> None:
    """Write ``value`` through an output pointer of C type ``ctype``."""
    if not pointer:
        raise NvmlReturn(pynvml.NVML_ERROR_INVALID_ARGUMENT)
    if ctype is not c_void_p:
        value = fits(ctype, value)
    ctypes.cast(pointer, POINTER(ctype))[0] = value


def struct_at(pointer: int | None, struct_type: Any) -> Any:
    """The struct an output pointer points to."""
    if not pointer:
        raise NvmlReturn(pynvml.NVML_ERROR_INVALID_ARGUMENT)
    return ctypes.cast(pointer, POINTER(struct_type)).contents


def write_str(buffer: int | None, size: int, text: str) -> int:
    """Copy ``text`` NUL-terminated into a caller's buffer, as NVML does."""
    data = text.encode() + b"\0"
    if not buffer:
        raise NvmlReturn(pynvml.NVML_ERROR_INVALID_ARGUMENT)
    if len(data) > size:
        raise NvmlReturn(pynvml.NVML_ERROR_INSUFFICIENT_SIZE)
    ctypes.memmove(buffer, data, len(data))
    return SUCCESS


def handle_value(handle: int) -> Any:
    """A device/instance handle as the pointer type pynvml's structs hold."""
    return ctypes.cast(c_void_p(handle), pynvml.c_nvmlDevice_t)


def fill_pci(info: Any, bus_id: str, device_id: int, subsystem_id: int) -> None:
    """Fill an nvmlPciInfo_t from an NVML-form bus id."""
    domain, bus, rest = bus_id.split(":")
    device = rest.split(".")[0]
    info.busIdLegacy = f"{domain[-4:]}:{bus}:{rest}".encode()
    info.busId = bus_id.encode()
    info.domain, info.bus, info.device = int(domain, 16), int(bus, 16), int(device, 16)
    info.pciDeviceId, info.pciSubSystemId = device_id, subsystem_id


"""The fake NVML's event calls: event sets, registration and waiting (``FakeState.wait``)."""

from __future__ import annotations

from ctypes import c_uint, c_ulonglong, c_void_p
from typing import Any

import pynvml

from gpus.fake.lib_ctypes import PTR, SUCCESS, handle_value, put, struct_at
from gpus.fake.state import SUPPORTED_EVENTS, FakeEventSet, FakeState, NvmlReturn

# symbol -> argument types (return type is nvmlReturn_t = c_int).
SIGNATURES: dict[str, tuple[Any, ...]] = {
    "nvmlEventSetCreate": (PTR,),
    "nvmlEventSetFree": (PTR,),
    "nvmlDeviceRegisterEvents": (PTR, c_ulonglong, PTR),
    "nvmlDeviceGetSupportedEventTypes": (PTR, PTR),
    "nvmlEventSetWait": (PTR, PTR, c_uint),
    "nvmlEventSetWait_v2": (PTR, PTR, c_uint),
}


class EventFunctions:
    """Event NVML calls. Called with the state lock held."""

    s: FakeState

    def nvmlEventSetCreate(self, out: int) -> int:  # noqa: N802
        """A new event set."""
        event_set = FakeEventSet(handle=0, cond=self.s.new_condition())
        event_set.handle = self.s.new_handle(event_set)
        self.s.event_sets[event_set.handle] = event_set
        put(out, c_void_p, event_set.handle)
        return SUCCESS

    def nvmlEventSetFree(self, handle: int) -> int:  # noqa: N802
        """Free an event set, waking its waiters."""
        event_set = self.s.event_set(handle)
        event_set.freed = True
        event_set.cond.notify_all()
        del self.s.event_sets[event_set.handle]
        return SUCCESS

    def nvmlDeviceGetSupportedEventTypes(self, handle: int, out: int) -> int:  # noqa: N802
        """The event types the fake delivers."""
        self.s.gpu(handle)
        put(out, c_ulonglong, SUPPORTED_EVENTS)
        return SUCCESS

    def nvmlDeviceRegisterEvents(self, handle: int, types: int, set_handle: int) -> int:  # noqa: N802
        """Register a GPU for event types (MIG handles: NOT_SUPPORTED, as in NVML)."""
        gpu = self.s.gpu(handle)
        event_set = self.s.event_set(set_handle)
        if types & ~SUPPORTED_EVENTS:
            raise NvmlReturn(pynvml.NVML_ERROR_NOT_SUPPORTED)
        index = gpu.spec.index
        event_set.registrations[index] = event_set.registrations.get(index, 0) | types
        self.s.registered.notify_all()
        return SUCCESS

    def nvmlEventSetWait_v2(self, handle: int, out: int, timeout_ms: int) -> int:  # noqa: N802
        """Block until an event (NVML_ERROR_TIMEOUT after ``timeout_ms``)."""
        event_set = self.s.event_set(handle)
        data = struct_at(out, pynvml.c_nvmlEventData_t)
        event = self.s.wait(event_set, timeout_ms)
        data.device = handle_value(event.gpu_handle)
        data.eventType, data.eventData = event.event_type, event.data
        data.gpuInstanceId, data.computeInstanceId = (
            event.gpu_instance_id,
            event.compute_instance_id,
        )
        return SUCCESS

    def nvmlEventSetWait(self, handle: int, out: int, timeout_ms: int) -> int:  # noqa: N802
        """Same as v2 (the data struct already carries GI/CI ids)."""
        return self.nvmlEventSetWait_v2(handle, out, timeout_ms)

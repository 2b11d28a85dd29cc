"""NVML events: the watcher the device plugin's health monitor waits on.

Split from :mod:`gpus.nvml` (the reader), whose session and error conversion it uses.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from types import TracebackType
from typing import Any

import pynvml

from gpus.nvml import DEFAULT_EVENTS, NOT_APPLICABLE, Nvml, _handle_key
from gpus.nvmlcall import NvmlError, _call, _text
from gpus.records import record

log = logging.getLogger("gpus.nvml")


@record
class NvmlEvent:
    """One NVML event: XID (``xid`` = eventData) or ECC error, on a GPU or a MIG instance."""

    gpu_uuid: str
    event_type: int
    xid: int
    gpu_instance_id: int | None
    compute_instance_id: int | None



class EventWatcher:
    """One NVML event set with the given GPUs registered; ``wait()`` returns the next event.

    MIG UUIDs register their parent GPU (NVML delivers MIG events there, with GI/CI ids).
    A GPU whose registration fails is listed in ``registration_errors`` instead of raising.
    """

    def __init__(self, nvml: Nvml, uuids: Iterable[str], event_types: int = DEFAULT_EVENTS) -> None:
        self._nvml = nvml
        self.registration_errors: dict[str, NvmlError] = {}
        self._uuid_by_handle: dict[int, str] = {}
        self._set: Any = _call("nvmlEventSetCreate", pynvml.nvmlEventSetCreate)
        for uuid in uuids:
            try:
                self._register(uuid, event_types)
            except NvmlError as exc:
                log.warning("cannot watch events of %s: %s", uuid, exc)
                self.registration_errors[uuid] = exc

    def _register(self, uuid: str, event_types: int) -> None:
        handle = _call("nvmlDeviceGetHandleByUUID", pynvml.nvmlDeviceGetHandleByUUID, uuid)
        is_mig = _call("nvmlDeviceIsMigDeviceHandle", pynvml.nvmlDeviceIsMigDeviceHandle, handle)
        gpu_uuid = uuid
        if getattr(is_mig, "value", is_mig):
            handle = _call(
                "nvmlDeviceGetDeviceHandleFromMigDeviceHandle",
                pynvml.nvmlDeviceGetDeviceHandleFromMigDeviceHandle,
                handle,
            )
            gpu_uuid = _text(_call("nvmlDeviceGetUUID", pynvml.nvmlDeviceGetUUID, handle))
        if _handle_key(handle) in self._uuid_by_handle:
            return
        try:
            supported = _call(
                "nvmlDeviceGetSupportedEventTypes", pynvml.nvmlDeviceGetSupportedEventTypes, handle
            )
            event_types &= supported
        except NvmlError as exc:
            if exc.code != pynvml.NVML_ERROR_NOT_SUPPORTED:
                raise
        _call(
            "nvmlDeviceRegisterEvents",
            pynvml.nvmlDeviceRegisterEvents,
            handle,
            event_types,
            self._set,
        )
        self._uuid_by_handle[_handle_key(handle)] = gpu_uuid

    @property
    def watched(self) -> list[str]:
        """UUIDs of the GPUs registered."""
        return list(self._uuid_by_handle.values())

    def wait(self, timeout_ms: int) -> NvmlEvent | None:
        """The next event, or None after ``timeout_ms``; other errors raise NvmlError."""
        if self._set is None:
            raise NvmlError("nvmlEventSetWait", pynvml.NVML_ERROR_UNINITIALIZED, "watcher closed")
        try:
            data = pynvml.nvmlEventSetWait(self._set, timeout_ms)
        except pynvml.NVMLError as exc:
            if int(exc.value) == pynvml.NVML_ERROR_TIMEOUT:
                return None
            raise NvmlError.from_pynvml("nvmlEventSetWait", exc) from None
        uuid = self._uuid_by_handle.get(_handle_key(data.device))
        if uuid is None:
            uuid = _text(_call("nvmlDeviceGetUUID", pynvml.nvmlDeviceGetUUID, data.device))
        gi, ci = int(data.gpuInstanceId), int(data.computeInstanceId)
        return NvmlEvent(
            gpu_uuid=uuid,
            event_type=int(data.eventType),
            xid=int(data.eventData),
            gpu_instance_id=None if gi == NOT_APPLICABLE else gi,
            compute_instance_id=None if ci == NOT_APPLICABLE else ci,
        )

    def close(self) -> None:
        """Free the event set (idempotent; call once no thread is waiting)."""
        event_set, self._set = self._set, None
        if event_set is None:
            return
        try:
            _call("nvmlEventSetFree", pynvml.nvmlEventSetFree, event_set)
        except NvmlError as exc:
            log.warning("freeing the NVML event set failed: %s", exc)

    def __enter__(self) -> EventWatcher:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

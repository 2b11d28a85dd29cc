"""Keep the C heap steady around large requests (glibc's malloc only).

With its default, adaptive thresholds glibc gives a thread's heap back to the kernel once the
free space at its top passes twice the largest block it ever mmapped: after a kubelet request
of a few hundred KiB (8,192 time-sliced replica IDs are 374 KiB on the wire) the gRPC buffers
land in the handler thread's heap, and freeing them trims it. The next such request then takes
~180 page faults to get the same memory back, which measured 0.4 ms of a 2-4 ms call.

:func:`steady_heap` fixes both thresholds instead: blocks up to 1 MiB (a request at the
node's device limit is ~750 KiB) come from the heap, and a heap keeps up to 4 MiB free at its
top. Anything larger, such as a request at the 2 MiB receive limit, is still mmapped and
unmapped when freed, so a burst of oversized requests does not leave the daemon bigger. The
cost is at most 4 MiB kept per malloc arena, and only in threads that served such a request.
"""

from __future__ import annotations

import ctypes
import logging
import os

log = logging.getLogger(__name__)

# mallopt parameters, from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD_BYTES = 1024 * 1024
TRIM_THRESHOLD_BYTES = 4 * 1024 * 1024


def steady_heap() -> bool:
    """Fix glibc's mmap and trim thresholds (see the module docstring) for this process.

    Returns whether both were set: False, changing nothing, on a C library other than glibc
    (musl, macOS), where the adaptive behaviour this works around does not exist as such.
    Call it once, at daemon start; it affects every thread.
    """
    libc = glibc_version()
    if libc is None:
        log.debug("not glibc: malloc thresholds left alone")
        return False
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success; setting either threshold also ends the adaptive behaviour.
    done = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
    if not done:
        log.warning("%s refused the malloc thresholds; large requests may page-fault more", libc)
    return done


def glibc_version() -> str | None:
    """``"glibc 2.36"`` when this process runs on glibc, else None."""
    try:
        return os.confstr("CS_GNU_LIBC_VERSION")
    except (ValueError, OSError):  # no such name (macOS), or the C library does not know it
        return None

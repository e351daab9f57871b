"""Keep freed memory in the process for the next block instead of returning it to the kernel.

Every block a process moves is a fresh multi-MiB buffer, often several (gRPC's slices and message
bytes, redis-py's reply, the record). With glibc's defaults, buffers this large are mmap'd and
unmapped per use, or trimmed off the heap when freed, so each one is faulted in again page by page:
on the development VM a fresh 4 MiB buffer costs ~3 ms of page faults against ~0.2 ms for copying
into memory that is already mapped, and that decided the store's throughput more than anything in
its code. Raising glibc's mmap and trim thresholds lets freed blocks be reused; the price is that
a process keeps up to TRIM_THRESHOLD_BYTES of freed heap per malloc arena instead of returning it.

Process-wide, so only entry points call it: `kvpack kvstore serve`, `kvpack inference serve`
(it moves blocks through KVStoreClient) and the store benchmark.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger(__name__)

# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Largest allocation still served from the heap: glibc refuses more than 32 MiB (HEAP_MAX_SIZE / 2
# on 64-bit); larger records are mmap'd and faulted in on every use, as before.
MMAP_THRESHOLD_BYTES = 32 << 20
# Freed memory at the top of a heap beyond this is given back to the kernel.
TRIM_THRESHOLD_BYTES = 256 << 20


def keep_freed_memory() -> bool:
    """Apply the thresholds above; False (and nothing changed) where the C library is not glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    applied = (mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
               and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1)
    if not applied:
        log.warning("mallopt refused the allocator thresholds; large buffers stay mmap'd per use")
    return applied

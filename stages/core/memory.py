"""The C allocator keeps freed memory for the next allocation: how a stage runs, never what it computes.

A conv activation of one training image at 600 x 1000 px is tens of MB, above glibc's mmap threshold (at most
32 MiB), so by default each such tensor is a fresh ``mmap`` that the kernel faults in page by page and unmaps
when it is freed: every training iteration paid for its activations again, half a million page faults
(4.5 s of kernel time per 4 iterations of Lite0's trunk on two 600 x 1000 images). With ``mmap`` off and the heap
never trimmed, the next iteration reuses the same memory. The arithmetic is the same (torch aligns its
buffers itself), so no stage's code version includes this module; the peak memory stays reserved until the
process ends (about 25% more resident memory in that measurement).

Only where the C library is glibc; elsewhere nothing changes.
"""
from __future__ import annotations

import ctypes
import platform

# mallopt parameters of glibc's malloc.h
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
NEVER_TRIM = 2**31 - 1  # bytes of free memory at the heap's top before it is returned: never


def keep_freed_memory() -> bool:
    """Serve every allocation from the heap (``M_MMAP_MAX`` 0) and never trim it; whether glibc took it."""
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, NEVER_TRIM))
    except (OSError, AttributeError):
        return False

"""Keeping freed memory for reuse: the allocator settings of a process that receives large messages.

gRPC hands each received message over as a fresh ``bytes`` object, and its
transport threads allocate their read buffers the same way; with a put's
chunks in flight between the event loop and the threads writing them, glibc's
defaults return the freed megabytes to the system (``madvise``, heap trims)
and the next messages fault the same pages back in, zeroed. On this machine
a 256 MiB put in 1 MiB chunks took about 7,000 page faults on the event loop
and 37,000 on gRPC's transport threads; keeping freed memory cut them to
about 1,200 and 1,600, the loop's CPU per put from about 180 to 130 ms and
the transport threads' from 160 to 95 ms (bench/RESULTS.md). Raising the
mmap and trim thresholds keeps up to ``keep_bytes`` of freed memory in the
heap, where the next message reuses it.

Process-wide, so it is the data plugin's setting (``[plugin.data]
heap_keep_bytes``, 0 to leave the allocator alone); glibc only (elsewhere it
does nothing).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

__all__ = ["keep_freed_memory"]

log = logging.getLogger("planes.plugins.data")

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: glibc's largest mmap threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX): a
#: block at least this big is always mapped on its own.
MMAP_THRESHOLD_MAX = 32 << 20


def _libc():
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    if not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
        return None  # not glibc: its thresholds mean nothing here
    return libc


def keep_freed_memory(keep_bytes: int) -> bool:
    """Keep up to ``keep_bytes`` of freed memory for reuse; True if the allocator took the settings.

    Blocks up to 32 MiB (every chunk: ``max_chunk_bytes`` is at most 16 MiB
    by default) come from the heap, and the heap gives memory back to the
    system only once more than ``keep_bytes`` of it is free.
    """
    if keep_bytes <= 0:
        return False
    libc = _libc()
    if libc is None:
        return False
    mmap_threshold = min(keep_bytes, MMAP_THRESHOLD_MAX)
    took = libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(mmap_threshold)) == 1
    took = libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(min(keep_bytes, 2**31 - 1))) == 1 and took
    if not took:
        log.warning("the allocator refused heap_keep_bytes = %d; freed memory goes back to the system", keep_bytes)
    return took

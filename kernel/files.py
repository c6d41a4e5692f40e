"""File helpers for the embedded stores: syncing a directory, and direct I/O (writes around the page cache).

A store writes a large, durable run of bytes through a second descriptor
opened with ``O_DIRECT``, from page-aligned buffers at page-aligned offsets:
the disk takes the bytes by DMA, with no copy into the page cache and no
writeback CPU later. Filesystems that refuse it (tmpfs, some network and
overlay filesystems) answer ``EINVAL``, at the open or at the first write;
the stores then write through the page cache as usual.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

__all__ = ["DIRECT_ALIGN", "align_up", "fsync_dir", "open_direct"]

#: Offsets, lengths and buffer addresses of direct writes are multiples of this.
DIRECT_ALIGN = 4096


def align_up(size: int) -> int:
    """``size`` rounded up to a multiple of :data:`DIRECT_ALIGN`."""
    return -(-size // DIRECT_ALIGN) * DIRECT_ALIGN


def open_direct(path: Path) -> int | None:
    """A second, write-only descriptor of ``path`` for direct I/O, or None where the filesystem does not take it."""
    try:
        return os.open(path, os.O_WRONLY | os.O_DIRECT)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return None
        raise


def fsync_dir(directory: Path) -> None:
    """Make the names in ``directory`` durable: a file created, renamed, linked or removed there survives a crash."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

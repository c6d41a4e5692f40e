"""File helpers for the embedded stores: syncing a directory, direct I/O (writes around the page cache),
and the lock that gives one kernel a state directory.

A store writes a large, durable run of bytes through a second descriptor
opened with ``O_DIRECT``, from page-aligned buffers at page-aligned offsets:
the disk takes the bytes by DMA, with no copy into the page cache and no
writeback CPU later. Filesystems that refuse it (tmpfs, some network and
overlay filesystems) answer ``EINVAL``, at the open or at the first write;
the stores then write through the page cache as usual.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

__all__ = ["DIRECT_ALIGN", "DirectoryInUse", "DirectoryLock", "align_up", "fsync_dir", "open_direct"]

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


class DirectoryInUse(OSError):
    """Another process holds the directory's lock; ``holder`` is its pid as it wrote it (0 if unknown)."""

    def __init__(self, directory: Path, holder: int):
        super().__init__(errno.EBUSY, f"{directory} is in use by another process (pid {holder or 'unknown'})")
        self.directory, self.holder = directory, holder


class DirectoryLock:
    """An exclusive ``flock`` on ``directory/name``, held from :meth:`acquire` to :meth:`release`.

    The stores under a state directory assume one writer: two kernels on one
    directory would both append to the evidence chain, assign the same
    sequence numbers and overwrite each other's payload files. The lock is
    taken without waiting, so a second kernel fails at start-up instead;
    the kernel dies with it, so a crash never leaves a stale lock (the
    file stays, unlocked, and the next start takes it). The holder's pid
    is written into the file for the error message only.
    """

    def __init__(self, directory: Path, name: str = "kernel.lock"):
        self.directory = directory
        self.path = directory / name
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        if self._fd is not None:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _pid_in(fd)
            os.close(fd)
            raise DirectoryInUse(self.directory, holder) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing the last descriptor drops the lock


def _pid_in(fd: int) -> int:
    try:
        text = os.pread(fd, 32, 0).decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        return 0
    return int(text) if text.isdigit() else 0

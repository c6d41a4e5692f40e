"""Secret files: created once, owner-only (0600), never logged.

A secret is written to a temporary file next to its final name, flushed to
disk, then published with ``os.link``, which fails if the name exists. So a
reader sees no file or the whole file, never an empty or partial one, and of
two processes starting at once exactly one publishes its secret; the other
reads it. A crash leaves at most a stray temporary file, never a short secret.

Older releases created the file first and wrote it afterwards, so a crash in
between could leave it empty. An empty secret file is provably unused (nothing
can have been signed with or authenticated by zero bytes), so
:func:`write_secret` replaces it; a non-empty file is never replaced.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import SettingsError
from .files import fsync_dir

log = logging.getLogger("planes.kernel.secrets")


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` with mode 0700 if missing, and each missing parent too (``mkdir -p`` gives parents the umask's mode)."""
    missing = []
    for directory in (path, *path.parents):
        if directory.exists():
            break
        missing.append(directory)
    for directory in reversed(missing):
        directory.mkdir(mode=0o700, exist_ok=True)
    return path


def secret_missing(path: Path) -> bool:
    """True if ``path`` has no secret yet: absent, or an empty leftover of an interrupted start-up."""
    try:
        return path.lstat().st_size == 0
    except FileNotFoundError:
        return True


def write_secret(path: Path, data: bytes) -> bool:
    """Publish ``data`` as a new 0600 file at ``path``; False (file untouched) if it exists.

    An empty file at ``path`` counts as absent and is replaced (see the module
    docstring). ``data`` must not be empty.
    """
    if not data:
        raise ValueError("a secret cannot be empty")
    ensure_private_dir(path.parent)
    if _publish(path, data, 0o600, exclusive=True):
        return True
    if not secret_missing(path):
        return False
    # Only the replacement of an empty file needs a lock: two starters must
    # not each remove the file the other just published.
    with _locked(path.parent):
        try:
            info = path.lstat()
        except FileNotFoundError:
            return _publish(path, data, 0o600, exclusive=True)
        if info.st_size != 0 or not stat.S_ISREG(info.st_mode):
            return False
        log.warning("replacing empty secret file %s, left by an interrupted start-up", path)
        path.unlink()
        return _publish(path, data, 0o600, exclusive=True)


def write_public(path: Path, data: bytes) -> None:
    """Write a non-secret file (a public key) atomically, replacing what is there."""
    write_replacing(path, data, 0o644)


def write_new(path: Path, data: bytes, mode: int = 0o600) -> bool:
    """Publish ``data`` as a new file at ``path`` (``mode``, less what the umask takes), all or nothing; False if it exists.

    A reader sees no file or the whole one, and an existing file is never
    replaced (the temporary file is linked into place, not renamed).
    """
    return _publish(path, data, mode, exclusive=True)


def write_replacing(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` all or nothing (temporary file, fsync, rename, fsync of the directory)."""
    _publish(path, data, mode, exclusive=False)


def _publish(path: Path, data: bytes, mode: int, *, exclusive: bool) -> bool:
    """Write a temporary file in ``path``'s directory, fsync it, then link (or rename) it into place."""
    directory = path.parent
    temporary = directory / f".{path.name}.{os.getpid()}.{os.urandom(6).hex()}.tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        if not exclusive:
            os.replace(temporary, path)
        else:
            try:
                os.link(temporary, path)
            except FileExistsError:
                return False
            except OSError as exc:
                if exc.errno in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK):
                    raise SettingsError(
                        f"cannot create {path}: its filesystem does not support hard links, which are needed to "
                        "create it atomically without ever replacing a file; put it on another filesystem"
                    ) from None
                raise
    finally:
        temporary.unlink(missing_ok=True)
    fsync_dir(directory)
    return True


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def read_secret(path: Path) -> bytes:
    """Read a secret file, refusing one that others can read or write, or an empty one."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise SettingsError(f"secret file {path} does not exist") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SettingsError(
            f"secret file {path} is accessible by group or others "
            f"(mode {stat.S_IMODE(mode):04o}); run: chmod 600 {path}"
        )
    data = path.read_bytes()
    if not data:
        raise SettingsError(f"secret file {path} is empty")
    return data

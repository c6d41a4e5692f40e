"""Secret files: created once, owner-only (0600), never logged."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from .errors import SettingsError


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) with mode 0700 if missing."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def write_secret(path: Path, data: bytes) -> bool:
    """Write ``data`` to a new 0600 file; False (and no write) if it exists.

    The file is created with O_EXCL so two processes starting at once cannot
    both write it, and with its final mode so it is never world-readable.
    """
    ensure_private_dir(path.parent)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    return True


def read_secret(path: Path) -> bytes:
    """Read a secret file, refusing one that others can read or write."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise SettingsError(f"secret file {path} does not exist") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SettingsError(
            f"secret file {path} is accessible by group or others "
            f"(mode {stat.S_IMODE(mode):04o}); run: chmod 600 {path}"
        )
    return path.read_bytes()

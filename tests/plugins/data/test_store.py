"""The payload writer on a real filesystem: direct I/O for durable payloads, at every alignment edge."""

from __future__ import annotations

import errno
import os

import blake3
import pytest

from planes.plugins.data import store as store_module
from planes.plugins.data.crypto import SEGMENT, TAG, SegmentCipher
from planes.plugins.data.store import DIRECT_ALIGN, DIRECT_STAGE, ObjectWriter

SIZES = [0, 1, DIRECT_ALIGN - 1, DIRECT_ALIGN, DIRECT_ALIGN + 1, DIRECT_STAGE - 1, DIRECT_STAGE, DIRECT_STAGE + 1,
         3 * DIRECT_STAGE + 12345]


def _write(path, data: bytes, *, durable: bool, cipher=None, piece: int = 300_001, preallocate: bool = True):
    writer = ObjectWriter(path, "p-1", cipher, durable, blake3.blake3(), len(data) if preallocate else 0)
    used_direct = writer.direct
    for offset in range(0, len(data), piece):
        writer.write(data[offset:offset + piece])
    digest = writer.finish()
    assert digest == blake3.blake3(data).digest()
    return used_direct


@pytest.mark.parametrize("size", SIZES)
def test_durable_plain_payloads_go_direct_and_read_back_exactly(tmp_path, size):
    data = os.urandom(size)
    assert _write(tmp_path / "p", data, durable=True), "this filesystem takes O_DIRECT, so a durable put uses it"
    assert (tmp_path / "p").read_bytes() == data


@pytest.mark.parametrize("size", [0, SEGMENT - 1, SEGMENT, 2 * SEGMENT + 7])
def test_durable_encrypted_payloads_go_direct_and_open_exactly(tmp_path, size):
    data, key = os.urandom(size), os.urandom(32)
    assert _write(tmp_path / "p", data, durable=True, cipher=SegmentCipher(key, "p-1")), \
        "sealed segments are staged for O_DIRECT like plain bytes"
    stored = (tmp_path / "p").read_bytes()
    records = max(1, -(-size // SEGMENT))
    assert len(stored) == size + records * TAG
    opener = SegmentCipher(key, "p-1")
    opened = b"".join(opener.open(i, stored[i * (SEGMENT + TAG):(i + 1) * (SEGMENT + TAG)], i == records - 1, "p-1")
                      for i in range(records))
    assert opened == data


def test_payloads_that_are_not_durable_use_the_page_cache(tmp_path):
    data = os.urandom(DIRECT_STAGE + 5)
    assert not _write(tmp_path / "p", data, durable=False)
    assert (tmp_path / "p").read_bytes() == data


def test_a_filesystem_without_direct_io_gets_buffered_writes(tmp_path, monkeypatch):
    """Opening with O_DIRECT fails with EINVAL on such filesystems (no such filesystem here, so it is injected)."""
    monkeypatch.setattr(store_module.os, "open", _refusing_direct(os.open))
    data = os.urandom(2 * DIRECT_STAGE + 3)
    assert not _write(tmp_path / "p", data, durable=True, preallocate=False)
    assert (tmp_path / "p").read_bytes() == data


def test_direct_writes_refused_midway_fall_back_without_losing_bytes(tmp_path, monkeypatch):
    """Some filesystems take the O_DIRECT open but refuse the writes (EINVAL): the rest goes through the page cache."""
    real_pwrite, direct_fds = os.pwrite, set()
    real_open = os.open

    def tracking_open(path, flags, *args):
        fd = real_open(path, flags, *args)
        if flags & os.O_DIRECT:
            direct_fds.add(fd)
        return fd

    def pwrite(fd, data, offset):
        if fd in direct_fds and offset >= DIRECT_STAGE:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)
    monkeypatch.setattr(store_module.os, "open", tracking_open)
    monkeypatch.setattr(store_module.os, "pwrite", pwrite)
    data = os.urandom(3 * DIRECT_STAGE + 99)
    path = tmp_path / "p"
    writer = ObjectWriter(path, "p-1", None, True, blake3.blake3(), len(data))
    writer.write(data)
    assert not writer.direct, "the refused write switched the writer to the page cache"
    assert writer.finish() == blake3.blake3(data).digest()
    assert path.read_bytes() == data


def _refusing_direct(real_open):
    def open_(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)
    return open_

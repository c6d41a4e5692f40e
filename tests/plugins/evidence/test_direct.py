"""Large segments are written around the page cache (O_DIRECT), page-aligned; small ones through it."""

from __future__ import annotations

import errno
import os

import pytest

from planes.evidence.v1 import evidence_service_pb2 as pb
from planes.plugins.evidence import open_log, store as evidence_store
from planes.plugins.evidence.fsck import fsck
from tests.plugins.evidence.conftest import SERVICE, event


def batch(prefix: str, count: int) -> list[pb.Event]:
    return [event(f"{prefix}-{i}", prompt="p" * 64, digest=bytes(32)) for i in range(count)]


def segments(log) -> list[tuple[int, int, int]]:
    """(first sequence, file offset, bytes) of every stored segment."""
    rows = log.store._write.execute(
        "SELECT first_sequence, file_offset, count, leaves_length, values_length FROM segments ORDER BY 1")
    return [(first, offset, evidence_store.record_length(count, leaves, values))
            for first, offset, count, leaves, values in rows]


def reopened_and_checked(tmp_path, size: int):
    log = open_log(tmp_path)
    assert log.size == size
    report = fsck(log.store, log.key.public_key)
    assert report.ok, report.problems
    return log


def test_large_segments_start_on_a_page_and_small_ones_where_the_file_ends(tmp_path):
    log = open_log(tmp_path)
    if log.store._direct_fd is None:
        pytest.skip("this filesystem does not take O_DIRECT")
    log.append("acme", batch("small", 3), SERVICE)
    log.append("acme", batch("large", 1000), SERVICE)
    log.append("acme", batch("tail", 2), SERVICE)
    log.append("acme", batch("again", 1000), SERVICE)
    (_, small_at, small), (_, large_at, large), (_, tail_at, _), (_, again_at, _) = segments(log)
    assert large >= evidence_store.DIRECT_MIN and small < evidence_store.DIRECT_MIN
    assert (small_at, large_at) == (0, 4096), "the large segment starts on the next page after the small one"
    assert tail_at == large_at + large, "a small segment follows at the end of the bytes, inside the padding"
    assert again_at % 4096 == 0 and again_at > tail_at
    log.close()
    log = reopened_and_checked(tmp_path, 2005)
    assert [e.event_id for e in log.query("acme", correlation_id="corr-1", limit=5000)][-1] == "again-999"
    log.close()


def test_a_flipped_byte_of_a_direct_segment_is_located(tmp_path):
    log = open_log(tmp_path)
    log.append("acme", batch("large", 1000), SERVICE)
    (_, at, length), = segments(log)
    log.close()
    with open(log.store.segment_path, "r+b") as file:
        file.seek(at + length // 3)
        byte = file.read(1)[0]
        file.seek(at + length // 3)
        file.write(bytes([byte ^ 0x20]))
    reopened = open_log(tmp_path)
    problems = fsck(reopened.store, reopened.key.public_key).problems
    assert len(problems) == 1 and problems[0].startswith("event sequence "), problems
    reopened.close()


def test_a_filesystem_that_refuses_direct_writes_gets_them_through_the_page_cache(tmp_path, monkeypatch):
    """Taken at open, refused at the first write (EINVAL): that segment and every later one are written
    buffered, nothing lost."""
    log = open_log(tmp_path)
    if log.store._direct_fd is None:
        pytest.skip("this filesystem does not take O_DIRECT")
    direct_fd = log.store._direct_fd
    real_pwrite = os.pwrite
    refused = []

    def pwrite(fd, data, offset):
        if fd == direct_fd:
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(evidence_store.os, "pwrite", pwrite)
    log.append("acme", batch("large", 1000), SERVICE)
    log.append("acme", batch("more", 1000), SERVICE)
    assert len(refused) == 1 and log.store._direct_fd is None
    monkeypatch.undo()
    log.close()
    reopened_and_checked(tmp_path, 2000).close()


def test_a_filesystem_that_refuses_o_direct_at_open_is_written_buffered(tmp_path, monkeypatch):
    real_open = os.open

    def refusing_open(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(evidence_store.os, "open", refusing_open)
    log = open_log(tmp_path)
    assert log.store._direct_fd is None
    log.append("acme", batch("small", 3), SERVICE)
    log.append("acme", batch("large", 1000), SERVICE)
    assert [at for _, at, _ in segments(log)] == [0, segments(log)[0][2]], "back to back, as before"
    monkeypatch.undo()
    log.close()
    reopened_and_checked(tmp_path, 1003).close()


def test_a_failed_direct_write_refuses_the_batch_and_keeps_nothing_of_it(tmp_path, monkeypatch):
    log = open_log(tmp_path)
    if log.store._direct_fd is None:
        pytest.skip("this filesystem does not take O_DIRECT")
    log.append("acme", batch("first", 1000), SERVICE)
    direct_fd, real_pwrite = log.store._direct_fd, os.pwrite

    def full_disk(fd, data, offset):
        if fd == direct_fd:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(evidence_store.os, "pwrite", full_disk)
    with pytest.raises(OSError, match="No space left"):
        log.append("acme", batch("second", 1000), SERVICE)
    monkeypatch.undo()
    assert log.size == 1000 and log.store._direct_fd is not None, "only EINVAL turns direct writes off"
    log.append("acme", batch("second", 1000), SERVICE)
    log.close()
    reopened_and_checked(tmp_path, 2000).close()

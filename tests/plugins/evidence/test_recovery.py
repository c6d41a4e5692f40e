"""Opening the log never destroys evidence: a lost, short or stale file refuses start-up and changes nothing."""

from __future__ import annotations

import os
import shutil
import sqlite3
import tempfile
from pathlib import Path

import pytest

from planes.kernel.errors import FailedPrecondition, LimitExceeded
from planes.plugins.evidence import open_log, recovery
from planes.plugins.evidence.fsck import fsck
from tests.plugins.evidence.conftest import SERVICE, event, in_forked_child


@pytest.fixture
def stopped(tmp_path):
    """A state directory whose log holds two segments (9 events), closed."""
    log = open_log(tmp_path)
    log.append("acme", [event(f"e{i}", prompt=f"p{i}") for i in range(6)], SERVICE)
    log.append("acme", [event(f"f{i}", prompt=f"q{i}") for i in range(3)], SERVICE)
    log.checkpoint_now()
    log.close()
    return tmp_path


def _files(state):
    index = state / "evidence" / "log.sqlite3"
    return index, index.with_name("log.sqlite3.segments")


def _appended_past_the_index(state, *batches) -> bytes:
    """Append ``batches``, then put back the index from before them: segments the index does not know.
    Returns the segment file's bytes."""
    index, segments = _files(state)
    saved = state / "index-before"
    shutil.copy(index, saved)
    log = open_log(state)
    for batch in batches:
        log.append("acme", batch, SERVICE)
    log.close()
    written = segments.read_bytes()
    shutil.copy(saved, index)
    return written


def _committed_end(index) -> int:
    connection = sqlite3.connect(index)
    try:
        return connection.execute("SELECT max(file_offset + leaves_length + (count + 1) * 8 + count * 72 "
                                  "+ values_length) FROM segments").fetchone()[0]
    finally:
        connection.close()


@pytest.mark.parametrize("loss", ["emptied", "deleted"])
def test_a_lost_index_refuses_start_and_keeps_every_segment_byte(stopped, loss):
    index, segments = _files(stopped)
    before = segments.read_bytes()
    if loss == "emptied":
        index.write_bytes(b"")
    else:
        index.unlink()
    with pytest.raises(FailedPrecondition) as caught:
        open_log(stopped)
    message = caught.value.message
    assert "\n" not in message
    assert f"{segments} holds {len(before)} bytes" in message and str(index) in message
    assert ("is missing" if loss == "deleted" else "is empty (0 bytes") in message
    assert "restore log.sqlite3 from backup, or move log.sqlite3.segments away to begin a new log" in message
    assert segments.read_bytes() == before, "not one byte of evidence was cut"
    assert index.exists() == (loss == "emptied"), "no new index was made in its place"
    assert not list(segments.parent.glob("*.uncommitted-*"))


def test_moving_the_segment_file_away_begins_a_new_log(stopped):
    index, segments = _files(stopped)
    index.unlink()
    segments.rename(stopped / "old.segments")
    log = open_log(stopped)
    try:
        assert log.size == 0 and log.append("acme", [event("new")], SERVICE).sequences == [1]
    finally:
        log.close()


@pytest.mark.parametrize("cut", ["truncated", "deleted"])
def test_a_segment_file_shorter_than_the_committed_end_refuses_start(stopped, cut):
    index, segments = _files(stopped)
    end = _committed_end(index)
    if cut == "truncated":
        os.truncate(segments, end - 5)
    else:
        segments.unlink()
    with pytest.raises(FailedPrecondition) as caught:
        open_log(stopped)
    state = f"is {end - 5} bytes" if cut == "truncated" else "is missing"
    assert caught.value.message.startswith(f"evidence segment file {segments} {state}, shorter than the {end} bytes "
                                           f"its index {index} has committed")
    assert segments.exists() == (cut == "truncated") and (cut == "deleted" or segments.stat().st_size == end - 5)
    assert _committed_end(index) == end, "the index is as it was"


def test_an_uncommitted_tail_is_set_aside_before_the_file_is_cut(stopped):
    """A crash between a segment's write and its index commit: the bytes go to a side file, not away."""
    index, segments = _files(stopped)
    end = segments.stat().st_size
    torn = b"torn batch" * 100
    with segments.open("ab") as file:
        file.write(torn)
    log = open_log(stopped)
    try:
        side = segments.with_name(f"log.sqlite3.segments.uncommitted-{end}")
        assert side.read_bytes() == torn and side.stat().st_mode & 0o777 == 0o600
        assert segments.stat().st_size == end
        assert log.append("acme", [event("after")], SERVICE).sequences == [10]
        assert fsck(log.store, log.key.public_key).ok
    finally:
        log.close()


def test_a_torn_last_append_of_real_segment_bytes_is_set_aside(stopped):
    """The real thing: a whole segment written past the committed end (its commit never happened)."""
    index, segments = _files(stopped)
    written = _appended_past_the_index(stopped, [event(f"g{i}", prompt="r") for i in range(4)])
    end = _committed_end(index)  # as if the last commit never happened
    log = open_log(stopped)
    try:
        assert log.size == 9 and segments.read_bytes() == written[:end]
        assert segments.with_name(f"log.sqlite3.segments.uncommitted-{end}").read_bytes() == written[end:]
        assert log.append("acme", [event("g0", prompt="r")], SERVICE).sequences == [10]
    finally:
        log.close()


def test_an_index_older_than_the_segment_file_refuses_start(stopped):
    """Two whole segments past the committed end are not a crash: the index was restored from an older backup."""
    index, segments = _files(stopped)
    written = _appended_past_the_index(stopped, [event(f"g{i}", prompt="r") for i in range(4)],
                                       [event(f"h{i}") for i in range(2)])
    with pytest.raises(FailedPrecondition, match=f"{segments} holds events 10 to 14 and more past the "
                                                 f"{_committed_end(index)} bytes its index"):
        open_log(stopped)
    assert segments.read_bytes() == written
    assert not list(segments.parent.glob("*.uncommitted-*"))


def test_a_tail_longer_than_one_segment_can_be_refuses_start(stopped):
    index, segments = _files(stopped)
    end = segments.stat().st_size
    os.truncate(segments, end + recovery.MAX_UNCOMMITTED + 1)  # sparse: no disk taken
    with pytest.raises(FailedPrecondition, match=f"{recovery.MAX_UNCOMMITTED + 1} past the {end} its index"):
        open_log(stopped)
    assert segments.stat().st_size == end + recovery.MAX_UNCOMMITTED + 1


def test_zero_padding_past_the_committed_end_is_cut_without_a_side_file(stopped):
    index, segments = _files(stopped)
    end = segments.stat().st_size
    os.truncate(segments, end + 4000)  # what a page-aligned direct write leaves after its segment
    open_log(stopped).close()
    assert segments.stat().st_size == end and not list(segments.parent.glob("*.uncommitted-*"))


def test_a_segment_larger_than_the_bound_is_refused_before_anything_is_written(stopped, monkeypatch):
    index, segments = _files(stopped)
    log = open_log(stopped)
    try:
        monkeypatch.setattr(recovery, "MAX_SEGMENT_BYTES", 2000)
        before = segments.read_bytes()
        with pytest.raises(LimitExceeded) as caught:
            log.append("acme", [event(f"big{i}", prompt="x" * 100) for i in range(10)], SERVICE)
        assert caught.value.name == "segment_bytes" and caught.value.limit == 2000 and caught.value.actual > 2000
        assert segments.read_bytes() == before and log.size == 9
        assert log.append("acme", [event("small", prompt="x")], SERVICE).sequences == [10], "just under passes"
    finally:
        log.close()


def test_a_damaged_index_is_named_in_the_error(stopped):
    index, segments = _files(stopped)
    index.write_bytes(b"this is not a database" * 300)
    before = segments.read_bytes()
    with pytest.raises(FailedPrecondition, match=f"evidence index {index} is damaged .*restore it from backup"):
        open_log(stopped)
    assert segments.read_bytes() == before


def _open_log_error(state) -> str:
    try:
        open_log(state).close()
    except FailedPrecondition as exc:
        return exc.message
    return ""


def _open_log_error_as_nobody(state) -> str:
    os.setgid(65534)
    os.setuid(65534)
    return _open_log_error(state)


def test_a_read_only_evidence_directory_is_named_in_the_error(stopped, tmp_path_factory):
    """Root writes anywhere, so as root the kernel is started as another user over root's files."""
    visible = Path(tempfile.mkdtemp(prefix="planes-ro-"))
    try:
        state = visible / "state"
        shutil.copytree(stopped, state)
        index, segments = _files(state)
        for path in (visible, state, state / "keys", index.parent):
            path.chmod(0o555)
        for path in (index, segments, *(state / "keys").iterdir()):
            path.chmod(0o444)
        before = segments.read_bytes()
        if os.geteuid() == 0:
            message, exitcode = in_forked_child(_open_log_error_as_nobody, state)
            assert exitcode == 0
        else:
            message = _open_log_error(state)
        assert message.startswith(f"evidence index {index} cannot be written (attempt to write a readonly database)"
                                  f": this user needs write access to it and to its directory {index.parent}"), message
        assert segments.read_bytes() == before
    finally:
        for path in (visible, *visible.rglob("*")):
            path.chmod(0o700)
        shutil.rmtree(visible)

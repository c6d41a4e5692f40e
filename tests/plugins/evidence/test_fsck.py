"""fsck detects and locates a change to any stored byte (format 2: segments), and format 1 migrates."""

from __future__ import annotations

import sqlite3

import pytest

from planes.kernel import errors
from planes.plugins.evidence import open_log
from planes.plugins.evidence.fsck import fsck
from planes.plugins.evidence.store import u64_array
from tests.plugins.evidence.conftest import SERVICE, event


@pytest.fixture
def filled(log):
    log.append("acme", [event(f"e{i}", prompt=f"p{i}", blob=bytes([i]) * 8) for i in range(6)], SERVICE)
    log.append("acme", [event(f"f{i}", correlation="corr-2", prompt=f"q{i}") for i in range(3)], SERVICE)
    log.checkpoint_now()
    assert fsck(log.store, log.key.public_key).ok
    return log


def _sql(log, sql, *params):
    connection = sqlite3.connect(log.store.path)
    try:
        rows = connection.execute(sql, params).fetchall()
        connection.commit()
        return rows
    finally:
        connection.close()


def _flip(blob: bytes, at: int = -1) -> bytes:
    data = bytearray(blob)
    data[at] ^= 0x01
    return bytes(data)


def _problems(log) -> list[str]:
    return fsck(log.store, log.key.public_key).problems


PARTS = ("leaves", "offsets", "leaf_hashes", "chain_heads", "id_hashes", "values")


def _part(log, first: int, name: str) -> tuple[int, int]:
    """(file position, length) of one part of a segment in the segment file."""
    count, offset, leaves_length, values_length = _sql(
        log, "SELECT count, file_offset, leaves_length, values_length FROM segments WHERE first_sequence = ?", first)[0]
    sizes = dict(zip(PARTS, (leaves_length, (count + 1) * 8, count * 32, count * 32, count * 8, values_length)))
    return offset + sum(sizes[p] for p in PARTS[:PARTS.index(name)]), sizes[name]


def _flip_file(log, position: int) -> None:
    with open(log.store.segment_path, "r+b") as file:
        file.seek(position)
        byte = file.read(1)[0]
        file.seek(position)
        file.write(bytes([byte ^ 0x01]))


@pytest.mark.parametrize("part", PARTS)
def test_every_flipped_byte_of_the_segment_file_is_detected_and_located(filled, part):
    start, length = _part(filled, 1, part)
    offsets = u64_array(filled.store.event_at(1) and filled.store._segment_of(1).offsets).tolist()
    for at in range(length):
        _flip_file(filled, start + at)
        filled.store._local.segments.clear()
        problems = _problems(filled)
        _flip_file(filled, start + at)
        assert len(problems) == 1, (at, problems)
        if part == "leaves":
            sequence = next(i for i in range(6) if offsets[i] <= at < offsets[i + 1]) + 1
            assert problems[0].startswith(f"event sequence {sequence}"), (at, problems)
        elif part in ("leaf_hashes", "chain_heads"):
            assert problems[0].startswith(f"event sequence {at // 32 + 1} "), (at, problems)
        elif part == "id_hashes":
            assert problems[0].startswith(f"event sequence {at // 8 + 1} "), (at, problems)
            assert "event-id hash" in problems[0]
        elif part == "values":
            assert "raw value" in problems[0], (at, problems)
        else:
            assert problems[0].startswith(("segment at sequence 1:", "event sequence ")), (at, problems)
    assert _problems(filled) == []


def test_a_flipped_leaf_byte_is_reported_as_such(filled):
    start, length = _part(filled, 7, "leaves")
    _flip_file(filled, start + length - 1)
    assert _problems(filled) == ["event sequence 9 (id 'f2'): stored leaf or leaf hash was altered"]


def test_a_short_segment_file_is_located(filled):
    with open(filled.store.segment_path, "r+b") as file:
        file.truncate(_part(filled, 7, "id_hashes")[0] + 3)
    assert _problems(filled)[0].startswith("segment at sequence 7: event-id hashes hold 3 bytes for 3 events")


def test_an_unacknowledged_tail_is_cut_off_when_the_writer_opens(tmp_path, filled):
    """A crash after the file write and before the index commit leaves bytes nobody acknowledged."""
    size = filled.store.segment_path.stat().st_size
    with open(filled.store.segment_path, "ab") as file:
        file.write(b"torn batch" * 100)
    filled.store.close()
    reopened = open_log(tmp_path)
    try:
        assert reopened.store.segment_path.stat().st_size == size
        assert reopened.append("acme", [event("after")], SERVICE).sequences == [10]
        assert fsck(reopened.store, reopened.key.public_key).ok
    finally:
        reopened.store.close()
    filled.store = open_log(tmp_path).store  # for the fixture's teardown


@pytest.mark.parametrize(("column", "value", "expected"), [
    ("tenant", "globex", "event sequence 1 (id 'e0'): index column tenant ('globex') disagrees with the leaf"),
    ("min_time", 2**62, "event sequence 1 (id 'e0'): index columns min_time/max_time of segment at sequence 1"),
    ("max_time", 0, "event sequence 1 (id 'e0'): index columns min_time/max_time of segment at sequence 1"),
    ("count", 5, "segment at sequence 1: offsets run from 0 to"),
    ("leaves_length", 10, "segment at sequence 1: offsets run from"),
    ("file_offset", 1, "segment at sequence 1: offsets run from"),
])
def test_changed_segment_columns_are_located(filled, column, value, expected):
    _sql(filled, f"UPDATE segments SET {column} = ? WHERE first_sequence = 1", value)
    assert _problems(filled)[0].startswith(expected)


def test_a_changed_raw_value_names_its_event_and_field(filled):
    start, length = _part(filled, 1, "values")
    with open(filled.store.segment_path, "rb") as file:
        file.seek(start)
        blob = file.read(length)
    at = blob.index(b"p3")
    with open(filled.store.segment_path, "r+b") as file:
        file.seek(start + at)
        file.write(b"xx")
    assert _problems(filled) == ["event sequence 4: raw value of field 'prompt' was altered"]


@pytest.mark.parametrize("sql", [
    "UPDATE correlation_runs SET correlation_id = 'other' WHERE first_sequence = 7",
    "UPDATE correlation_runs SET last_sequence = 8 WHERE first_sequence = 7",
    "DELETE FROM correlation_runs WHERE first_sequence = 1",
    "INSERT INTO correlation_runs VALUES ('globex', 'corr-1', 2, 2, NULL)",
    "UPDATE correlation_runs SET runs = zeroblob(8) WHERE first_sequence = 7",
    "UPDATE correlation_runs SET runs = X'00000000000000000100000000000000'"
    "||X'02000000000000000100000000000000' WHERE first_sequence = 7",  # text, not a blob
    "UPDATE correlation_runs SET runs = CAST(X'00000000000000000100000000000000'"
    "||X'02000000000000000100000000000000' AS BLOB), last_sequence = 9 WHERE first_sequence = 7",  # skips 8
])
def test_changed_correlation_index_is_located(filled, sql):
    _sql(filled, sql)
    problems = _problems(filled)
    assert len(problems) == 1 and "correlation index rows disagree with the leaves" in problems[0]


def test_interleaved_correlations_take_a_row_each_and_are_found_exactly(log):
    """Concurrent requests interleave in a batch: one index row per correlation, not per event."""
    events = [event(f"i{n}", correlation=f"req-{n % 3}") for n in range(12)]
    log.append("acme", events[:6], SERVICE)
    log.append("acme", events[6:], SERVICE)
    rows = _sql(log, "SELECT correlation_id, first_sequence, last_sequence, runs IS NOT NULL FROM correlation_runs "
                     "ORDER BY first_sequence")
    assert rows == [("req-0", 1, 4, 1), ("req-1", 2, 5, 1), ("req-2", 3, 6, 1),
                    ("req-0", 7, 10, 1), ("req-1", 8, 11, 1), ("req-2", 9, 12, 1)]
    assert [e.event_id for e in log.query("acme", correlation_id="req-1")] == ["i1", "i4", "i7", "i10"]
    assert [e.event_id for e in log.query("acme", correlation_id="req-1", after_sequence=5)] == ["i7", "i10"]
    assert fsck(log.store, log.key.public_key).ok


def test_index_rows_of_one_run_each_as_earlier_logs_wrote_them_still_check_and_query(log):
    log.append("acme", [event(f"i{n}", correlation=f"req-{n % 2}") for n in range(4)], SERVICE)
    _sql(log, "DELETE FROM correlation_runs")
    for sequence in range(1, 5):  # what the index held before rows carried their runs
        _sql(log, "INSERT INTO correlation_runs (tenant, correlation_id, first_sequence, last_sequence) "
                  "VALUES ('acme', ?, ?, ?)", f"req-{(sequence - 1) % 2}", sequence, sequence)
    assert fsck(log.store, log.key.public_key).ok
    assert [e.event_id for e in log.query("acme", correlation_id="req-0")] == ["i0", "i2"]


def test_deleted_segment_is_a_gap(filled):
    filled.append("acme", [event("g1")], SERVICE)
    _sql(filled, "DELETE FROM segments WHERE first_sequence = 7")
    assert _problems(filled)[0].startswith("gap: sequence 7 is missing (next stored is 10)")


@pytest.mark.parametrize(("column", "problem"), [("signature", "signature does not verify"),
                                                 ("body", "signature does not verify")])
def test_changed_checkpoint_is_located(filled, column, problem):
    row = filled.store.checkpoint()
    value = row[2] if column == "signature" else row[1]
    _sql(filled, f"UPDATE checkpoints SET {column} = ? WHERE tree_size = ?", _flip(value, 5), row[0])
    assert _problems(filled) == [f"checkpoint at tree size {row[0]}: {problem}"]


def test_a_changed_key_id_column_is_located_and_never_handed_out(filled):
    row = filled.store.checkpoint()
    _sql(filled, "UPDATE checkpoints SET key_id = 'forged-key-id' WHERE tree_size = ?", row[0])
    assert _problems(filled) == [f"checkpoint at tree size {row[0]}: key id 'forged-key-id' (signed: "
                                 f"{filled.key.kid!r}) is not the log key's {filled.key.kid!r}"]
    assert filled.checkpoint().key_id == filled.key.kid, "clients get the key id the signature covers"


@pytest.mark.parametrize("at", [-1, 9, 12])
def test_a_changed_merkle_frontier_is_located_and_not_signed_into_the_next_checkpoint(tmp_path, filled, at):
    """The log appends to the stored frontier and signs its root: a flipped byte must not reach a checkpoint."""
    saved = filled.store.meta("frontier")
    _sql(filled, "UPDATE meta SET value = ? WHERE key = 'frontier'", _flip(saved, at))
    problems = _problems(filled)
    assert len(problems) == 1 and problems[0].startswith("the stored Merkle frontier")
    filled.close()
    reopened = open_log(tmp_path, {"checkpoint_every": 4, "checkpoint_seconds": 3600})
    try:  # the last checkpoint covers the frontier's size and disagrees: rebuilt from the leaves
        reopened.append("acme", [event("g1")], SERVICE)
        reopened.checkpoint_now()
        report = fsck(reopened.store, reopened.key.public_key)
        assert report.ok and report.checkpoints == 3, report.problems
    finally:
        reopened.close()


def test_redaction_and_retention_erase_the_bytes_and_keep_fsck_clean(log):
    log.append("acme", [event(f"e{i}", prompt=f"secret-prompt-{i}", blob=bytes([i]) * 8) for i in range(4)], SERVICE)
    log.append("acme", [event("f0", prompt="secret-prompt-f0")], SERVICE)
    log.redact("acme", "e2", "prompt", "privacy request", SERVICE)
    assert log.store.delete_all_values([1, 2, 5]) == 5
    assert fsck(log.store, log.key.public_key).ok
    data = log.store.segment_path.read_bytes()
    for gone in (b"secret-prompt-0", b"secret-prompt-1", b"secret-prompt-2", b"secret-prompt-f0"):
        assert gone not in data, "a removed value is erased from the segment file, not only hidden"
    assert b"secret-prompt-3" in data
    assert log.store.values([1, 2, 3, 4, 5]) == {3: {"blob": log.store.values([3])[3]["blob"]},
                                                 4: log.store.values([4])[4]}
    assert set(log.store.values([4])[4]) == {"prompt", "blob"}
    assert log.store.delete_all_values([1]) == 0, "removing twice removes nothing more"


def test_a_removal_cut_short_by_a_crash_is_finished_by_the_next_writer(tmp_path, log):
    log.append("acme", [event("e0", prompt="secret-prompt-0")], SERVICE)
    store = log.store
    store._erase = lambda ranges: None  # the process dies after recording the removal, before zeroing
    store.delete_values(1, ["prompt"])
    assert b"secret-prompt-0" in store.segment_path.read_bytes()
    assert fsck(store, log.key.public_key).problems == [
        "event sequence 1: field 'prompt' was removed but its raw value is still in the segment file"]
    assert store.values([1]) == {}, "a recorded removal hides the value at once"
    store.close()
    reopened = open_log(tmp_path)
    try:
        assert b"secret-prompt-0" not in reopened.store.segment_path.read_bytes()
        assert fsck(reopened.store, reopened.key.public_key).ok
    finally:
        reopened.store.close()
    log.store = open_log(tmp_path).store  # for the fixture's teardown


FORMAT_1_SCHEMA = """
CREATE TABLE events (sequence INTEGER PRIMARY KEY, event_id TEXT NOT NULL UNIQUE, tenant TEXT NOT NULL,
    correlation_id TEXT NOT NULL, event_type TEXT NOT NULL, time_ns INTEGER NOT NULL, leaf BLOB NOT NULL,
    leaf_hash BLOB NOT NULL, chain_head BLOB NOT NULL);
CREATE TABLE field_values (sequence INTEGER NOT NULL, name TEXT NOT NULL, salt BLOB NOT NULL, value BLOB NOT NULL,
    PRIMARY KEY (sequence, name)) WITHOUT ROWID;
CREATE TABLE checkpoints (tree_size INTEGER PRIMARY KEY, body BLOB NOT NULL, signature BLOB NOT NULL,
    key_id TEXT NOT NULL);
CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
"""


def test_a_format_1_log_is_migrated_and_still_verifies(tmp_path, filled):
    """A log written one row per event (format 1) opens as segments with its checkpoints and proofs intact."""
    store = filled.store
    old_dir = tmp_path / "old"
    (old_dir / "keys").mkdir(parents=True)
    for name in ("evidence-signing.pem", "evidence-signing.pub.pem"):
        (old_dir / "keys" / name).write_bytes((tmp_path / "keys" / name).read_bytes())
        (old_dir / "keys" / name).chmod(0o600)
    (old_dir / "evidence").mkdir()
    old = sqlite3.connect(old_dir / "evidence" / "log.sqlite3")
    old.executescript(FORMAT_1_SCHEMA)
    events = [store.event_at(sequence) for sequence in range(1, filled.size + 1)]
    old.executemany("INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [(e.sequence, e.event_id, e.tenant, e.correlation_id, e.event_type, e.time_ns, e.leaf,
                      e.leaf_hash, e.chain_head) for e in events])
    values = store.values(list(range(1, filled.size + 1)))
    old.executemany("INSERT INTO field_values VALUES (?, ?, ?, ?)",
                    [(v.sequence, v.name, v.salt, v.value) for found in values.values() for v in found.values()])
    old.executemany("INSERT INTO checkpoints VALUES (?, ?, ?, ?)", store.checkpoints())
    old.executemany("INSERT INTO meta VALUES (?, ?)", [("log_id", store.meta("log_id").encode()
                                                        if isinstance(store.meta("log_id"), str)
                                                        else store.meta("log_id"))])
    old.commit()
    old.close()

    migrated = open_log(old_dir)
    try:
        assert migrated.size == filled.size and migrated.head == filled.head
        report = fsck(migrated.store, migrated.key.public_key)
        assert report.ok and report.events == 9 and report.values == 15, report
        assert b"q1" in migrated.store.segment_path.read_bytes(), "raw values moved into the segment file"
        assert [e.event_id for e in migrated.query("acme", correlation_id="corr-2")] == ["f0", "f1", "f2"]
        assert migrated.query("acme", correlation_id="corr-1")[3].fields[0].string_value == "p3"
        proof = migrated.prove_inclusion("acme", "e4")
        assert proof.checkpoint == filled.prove_inclusion("acme", "e4").checkpoint
        replay = event("e4", prompt="p4", blob=bytes([4]) * 8)  # the same content: a replay, compared by value
        assert migrated.append("acme", [replay], SERVICE).duplicates == 1, "replays are still found"
        with pytest.raises(errors.AlreadyExists, match="'e4' was already appended"):
            migrated.append("acme", [event("e4")], SERVICE)
    finally:
        migrated.store.close()


def test_a_read_only_check_of_an_empty_log_and_of_a_format_1_log(tmp_path):
    from planes.kernel.errors import PlanesError
    from planes.plugins.evidence.store import SqliteEvidenceStore

    empty = SqliteEvidenceStore(tmp_path / "empty" / "log.sqlite3", writer=False)
    try:
        assert empty.head() == (0, None) and not empty.segment_path.exists(), "checking creates no segment file"
    finally:
        empty.close()
    (tmp_path / "old").mkdir()
    connection = sqlite3.connect(tmp_path / "old" / "log.sqlite3")
    connection.executescript(FORMAT_1_SCHEMA)
    connection.close()
    with pytest.raises(PlanesError, match="format 1"):
        SqliteEvidenceStore(tmp_path / "old" / "log.sqlite3", writer=False)


def _all_problems(log) -> list[str]:
    return fsck(log.store, log.key.public_key, stop_at_first=False).problems


def test_a_zeroed_values_length_is_located_by_event_and_field(filled):
    """With values_length 0 every field would read as redacted, with no removal recorded and no event."""
    _sql(filled, "UPDATE segments SET values_length = 0 WHERE first_sequence = 1")
    problems = _all_problems(filled)
    assert problems[0] == ("event sequence 1 (id 'e0'): field 'prompt' has no raw value and no recorded removal "
                           "(segment at sequence 1: its values_length or values were changed)")
    assert [p for p in problems if "'prompt' has no raw value" in p] == [
        p for p in problems if p.startswith("event sequence")] and len(problems) == 7
    assert problems[-1].startswith("segment at sequence 1: the segment file holds")
    assert "values_length or leaves_length is short" in problems[-1]


def test_a_zeroed_values_length_of_the_last_segment_is_located(filled):
    _sql(filled, "UPDATE segments SET values_length = 0 WHERE first_sequence = 7")
    assert _problems(filled) == ["event sequence 7 (id 'f0'): field 'prompt' has no raw value and no recorded "
                                 "removal (segment at sequence 7: its values_length or values were changed)"]


def test_lost_bytes_values_are_located_by_the_file_layout(log):
    """A bytes field with no value may be withheld at the source, so its loss shows where the bytes are left."""
    log.append("acme", [event(f"b{i}", blob=bytes([i + 1]) * 8) for i in range(3)], SERVICE)
    log.append("acme", [event("c0", prompt="x")], SERVICE)
    assert fsck(log.store, log.key.public_key).ok
    _sql(log, "UPDATE segments SET values_length = 0 WHERE first_sequence = 1")
    assert _all_problems(log) == ["segment at sequence 1: the segment file holds 144 bytes after it that no segment "
                                  "accounts for (its recorded values_length or leaves_length is short)"]


def test_fields_withheld_at_the_source_and_removed_values_are_not_problems(log):
    from planes.common.v1 import common_pb2

    withheld = event("w1", prompt="kept")
    withheld.fields.add(name="secret", commitment=common_pb2.Digest(value=bytes(range(32))))
    log.append("acme", [withheld, event("w2", prompt="gone", blob=b"b")], SERVICE)
    log.append("acme", [event("w3", prompt="after")], SERVICE)
    log.redact("acme", "w2", "prompt", "privacy request", SERVICE)
    log.checkpoint_now()
    report = fsck(log.store, log.key.public_key, stop_at_first=False)
    assert report.ok, report.problems


@pytest.mark.parametrize("delta", [-1, 1])
def test_a_values_length_off_by_one_is_located(filled, delta):
    _sql(filled, "UPDATE segments SET values_length = values_length + ? WHERE first_sequence = 1", delta)
    problems = _problems(filled)
    assert problems[0].startswith("segment at sequence 1: "), problems


def test_a_changed_log_id_is_located_in_every_checkpoint(filled):
    """Bundles carry the log id beside the checkpoint: a changed meta row made every later export fail."""
    _sql(filled, "UPDATE meta SET value = ? WHERE key = 'log_id'", b"0" * 32)
    signed = filled.store.checkpoints()
    problems = _all_problems(filled)
    assert len(problems) == len(signed) == 2
    for (size, _body, _signature, _kid), text in zip(signed, problems):
        assert text == (f"checkpoint at tree size {size}: signed for log id {filled.log_id!r}, the meta row log_id "
                        f"says {'0' * 32!r}")


def test_an_impossible_segment_row_is_one_located_line_for_fsck_and_start_up(tmp_path, filled):
    import subprocess
    import sys

    filled.close()
    connection = sqlite3.connect(tmp_path / "evidence" / "log.sqlite3")
    connection.execute("UPDATE segments SET first_sequence = 0 WHERE first_sequence = 1")
    connection.commit()
    connection.close()
    checked = subprocess.run([sys.executable, "-m", "planes.kernel.cli", "evidence", "fsck", "--state-dir",
                              str(tmp_path)], capture_output=True, text=True, cwd="/")
    assert checked.returncode == 1 and "Traceback" not in checked.stderr, checked.stderr
    lines = checked.stderr.strip().splitlines()
    assert len(lines) == 1 and str(tmp_path / "evidence" / "log.sqlite3") in lines[0]
    assert "the segments row with first_sequence 0 (count 6" in lines[0]
    with pytest.raises(errors.FailedPrecondition) as caught:
        open_log(tmp_path)
    assert "evidence index" in caught.value.message and "first_sequence 0 (count 6" in caught.value.message
    connection = sqlite3.connect(tmp_path / "evidence" / "log.sqlite3")
    connection.execute("UPDATE segments SET first_sequence = 1 WHERE first_sequence = 0")
    connection.commit()
    connection.close()
    filled.store = open_log(tmp_path).store  # for the fixture's teardown

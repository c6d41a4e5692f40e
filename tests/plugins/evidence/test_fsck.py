"""fsck detects and locates a change to any stored byte."""

from __future__ import annotations

import sqlite3

import pytest

from planes.plugins.evidence.fsck import fsck
from tests.plugins.evidence.conftest import SERVICE, event


@pytest.fixture
def filled(log):
    log.append("acme", [event(f"e{i}", prompt=f"p{i}", blob=bytes([i]) * 8) for i in range(6)], SERVICE)
    log.checkpoint_now()
    assert fsck(log.store, log.key.public_key).ok
    return log


def _tamper(log, sql, *params):
    connection = sqlite3.connect(log.store.path)
    connection.execute(sql, params)
    connection.commit()
    connection.close()


def _flip(blob: bytes, at: int = -1) -> bytes:
    data = bytearray(blob)
    data[at] ^= 0x01
    return bytes(data)


@pytest.mark.parametrize(("column", "expected"), [
    ("leaf", "event sequence 3 (id 'e2'): stored leaf or leaf hash was altered"),
    ("leaf_hash", "event sequence 3 (id 'e2'): stored leaf or leaf hash was altered"),
    ("chain_head", "event sequence 3 (id 'e2'): chain head does not match the recomputed chain"),
])
def test_changed_hash_columns_are_located(filled, column, expected):
    value = filled.store.event_at(3)
    _tamper(filled, f"UPDATE events SET {column} = ? WHERE sequence = 3", _flip(getattr(value, column)))
    report = fsck(filled.store, filled.key.public_key)
    assert report.problems == [expected]


@pytest.mark.parametrize(("column", "value"), [
    ("event_id", "e-forged"), ("tenant", "globex"), ("correlation_id", "other"), ("event_type", "x.y"),
    ("time_ns", 42),
])
def test_changed_index_columns_are_located(filled, column, value):
    _tamper(filled, f"UPDATE events SET {column} = ? WHERE sequence = 2", value)
    report = fsck(filled.store, filled.key.public_key)
    assert len(report.problems) == 1
    assert "event sequence 2" in report.problems[0] and column in report.problems[0]


@pytest.mark.parametrize("column", ["value", "salt"])
def test_changed_raw_values_are_located(filled, column):
    _tamper(filled, f"UPDATE field_values SET {column} = ? WHERE sequence = 4 AND name = 'prompt'", b"forged")
    assert fsck(filled.store, filled.key.public_key).problems == [
        "event sequence 4: raw value of field 'prompt' was altered"]


def test_deleted_event_is_a_gap(filled):
    _tamper(filled, "DELETE FROM events WHERE sequence = 5")
    assert fsck(filled.store, filled.key.public_key).problems[0].startswith("gap: sequence 5 is missing")


@pytest.mark.parametrize(("column", "problem"), [("signature", "signature does not verify"),
                                                 ("body", "signature does not verify")])
def test_changed_checkpoint_is_located(filled, column, problem):
    row = filled.store.checkpoint()
    value = row[2] if column == "signature" else row[1]
    _tamper(filled, f"UPDATE checkpoints SET {column} = ? WHERE tree_size = ?", _flip(value, 5), row[0])
    report = fsck(filled.store, filled.key.public_key)
    assert report.problems == [f"checkpoint at tree size {row[0]}: {problem}"]

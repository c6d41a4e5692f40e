"""Killing the process during appends loses no acknowledged event; a failed write keeps nothing."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

import pytest

from planes.evidence.v1 import evidence_service_pb2 as pb
from planes.kernel.identity import Identity
from planes.plugins.evidence import open_log
from planes.plugins.evidence.fsck import fsck
from tests.plugins.evidence.conftest import in_forked_child

WHO = Identity("writer", "acme", frozenset({"service"}))

WRITER = textwrap.dedent('''
    import sys
    from pathlib import Path
    from planes.common.v1 import common_pb2
    from planes.evidence.v1 import evidence_service_pb2 as pb
    from planes.kernel.identity import Identity
    from planes.plugins.evidence import open_log

    log = open_log(Path(sys.argv[1]), {"checkpoint_every": 50})
    who = Identity("writer", "acme", frozenset({"service"}))
    batch = 0
    while True:
        events = [pb.Event(event_id=f"b{batch}-{i}", event_type="tool.invoked",
                           correlation=common_pb2.Correlation(correlation_id=f"c{batch}"))
                  for i in range(20)]
        for item in events:
            item.fields.add(name="payload_digest", bytes_value=bytes(32))
        result = log.append("acme", events, who)
        print(f"ack {batch} {result.sequences[-1]}", flush=True)
        batch += 1
''')


def test_sigkill_during_appends_loses_no_acknowledged_event(tmp_path):
    process = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    acknowledged = []
    deadline = time.monotonic() + 60
    try:
        while len(acknowledged) < 15 and time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            _, batch, last = line.split()
            acknowledged.append((int(batch), int(last)))
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert len(acknowledged) >= 15
    reopened = open_log(tmp_path)
    last_batch, last_sequence = acknowledged[-1]
    assert reopened.size >= last_sequence, "every acknowledged event is there"
    ids = {e.event_id for e in reopened.query("acme", limit=100_000)}
    assert {f"b{b}-{i}" for b in range(last_batch + 1) for i in range(20)} <= ids
    report = fsck(reopened.store, reopened.key.public_key)
    assert report.ok, report.problems


def _events(prefix: str, count: int) -> list[pb.Event]:
    events = [pb.Event(event_id=f"{prefix}-{i}", event_type="tool.invoked") for i in range(count)]
    for item in events:
        item.fields.add(name="payload_digest", bytes_value=bytes(32))
    return events


def test_a_failed_segment_write_refuses_the_batch_and_keeps_nothing_of_it(tmp_path, monkeypatch):
    """The segment is written on a helper thread while the index rows go in; its failure rolls them back."""
    log = open_log(tmp_path)
    log.append("acme", _events("a", 300), WHO)
    size, head = log.size, log.head

    def full_disk(parts, at):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(log.store, "_write_segment", full_disk)
        with pytest.raises(OSError, match="No space left"):
            log.append("acme", _events("b", 300), WHO)
    assert (log.size, log.head, log.store.head()[0]) == (size, head, size)
    assert log.query("acme", limit=10_000)[-1].event_id == "a-299"
    log.append("acme", _events("b", 300), WHO)
    log.store.close()
    reopened = open_log(tmp_path)
    assert reopened.size == 600 and reopened.query("acme", limit=10_000)[-1].event_id == "b-299"
    report = fsck(reopened.store, reopened.key.public_key)
    assert report.ok, report.problems


def _append_in_child(log) -> int:
    return log.append("acme", _events("child", 300), WHO).sequences[-1]


def test_a_forked_child_can_append(tmp_path):
    """The helper thread that syncs segments does not survive fork; the child makes its own."""
    log = open_log(tmp_path)
    log.append("acme", _events("parent", 300), WHO)
    last, exitcode = in_forked_child(_append_in_child, log)
    assert exitcode == 0 and last == 600
    log.store.close()
    assert open_log(tmp_path).query("acme", limit=10_000)[-1].event_id == "child-299"

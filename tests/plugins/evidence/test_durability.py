"""Killing the process during appends loses no acknowledged event."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

from planes.plugins.evidence import open_log
from planes.plugins.evidence.fsck import fsck

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

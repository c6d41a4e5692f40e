from __future__ import annotations

import multiprocessing

import pytest

from planes.common.v1 import common_pb2
from planes.evidence.v1 import evidence_service_pb2 as pb
from planes.kernel.identity import Identity
from planes.plugins.evidence import open_log

SERVICE = Identity("billing-svc", "acme", frozenset({"service"}))


def event(event_id: str, *, event_type="tool.invoked", correlation="corr-1", tenant="", **fields) -> pb.Event:
    message = pb.Event(event_id=event_id, event_type=event_type,
                       correlation=common_pb2.Correlation(correlation_id=correlation, tenant=tenant))
    for name, value in fields.items():
        if isinstance(value, bytes):
            message.fields.add(name=name, bytes_value=value, classification=common_pb2.CLASSIFICATION_INTERNAL)
        else:
            message.fields.add(name=name, string_value=value, classification=common_pb2.CLASSIFICATION_CONFIDENTIAL)
    return message


@pytest.fixture
def log(tmp_path):
    opened = open_log(tmp_path, {"checkpoint_every": 4, "checkpoint_seconds": 3600})
    yield opened
    opened.close()


def _send_result(work, argument, pipe) -> None:
    pipe.send(work(argument))


def in_forked_child(work, argument, timeout: float = 60):
    """``work(argument)`` run in a forked child; what it returns, and the child's exit code.

    Helper threads (the segment syncer, the encoder worker) do not survive
    fork, so this is how the tests show a child makes its own.
    """
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_send_result, args=(work, argument, send))
    child.start()
    child.join(timeout=timeout)
    if child.exitcode is None:
        child.kill()
    return (receive.recv() if child.exitcode == 0 else None), child.exitcode

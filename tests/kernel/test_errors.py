"""The one error mapping: kernel exceptions <-> gRPC status, both directions."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from planes.kernel import errors

CASES = [
    errors.InvalidArgument("field x must be positive", metadata={"field": "x"}),
    errors.NotFound("payload p-1 not found"),
    errors.AlreadyExists("tenant acme exists"),
    errors.Conflict("resource version 3 is stale; current is 4"),
    errors.FailedPrecondition("snapshot expired"),
    errors.Unauthenticated("token expired"),
    errors.PermissionDenied("no"),
    errors.Unavailable("evidence store down", retry_after=1.5),
    errors.DeadlineExceeded("late"),
    errors.Cancelled("cancelled"),
    errors.Unimplemented("not here"),
    errors.Internal("internal error; correlation id c"),
    errors.LimitExceeded("tenant_bytes", 100, 250, retry_after=3.0),
    errors.VersionMismatch("control", "2.0", "1.3"),
    errors.EvidenceUnavailable("evidence-required event task.admitted cannot be recorded"),
]


@pytest.mark.parametrize("error", CASES, ids=lambda e: type(e).__name__)
def test_round_trip_restores_class_and_fields(error):
    code, message, trailers = errors.to_status(error)
    assert code == error.code
    back = errors.from_status(code, message, trailers)
    assert type(back) is type(error)
    assert back == error
    for attribute in ("limit", "actual", "name", "retry_after", "client_version", "server_version"):
        assert getattr(back, attribute, None) == getattr(error, attribute, None)


def test_status_details_are_standard_google_rpc():
    _, _, trailers = errors.to_status(errors.LimitExceeded("chunk_bytes", 10, 11))
    status = status_pb2.Status.FromString(dict(trailers)[errors.STATUS_DETAILS_KEY])
    assert status.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    assert (info.reason, info.domain) == ("LIMIT_EXCEEDED", "planes")
    assert (info.metadata["limit"], info.metadata["actual"]) == ("10", "11")


def test_foreign_status_without_details_maps_by_code():
    error = errors.from_status(grpc.StatusCode.ABORTED, "stale", ())
    assert isinstance(error, errors.Conflict) and error.message == "stale"
    assert isinstance(errors.from_status(grpc.StatusCode.UNKNOWN, "?", ()), errors.Internal)


def test_garbage_details_fall_back_to_the_code():
    error = errors.from_status(grpc.StatusCode.NOT_FOUND, "gone", ((errors.STATUS_DETAILS_KEY, b"\xff\x00garbage"),))
    assert isinstance(error, errors.NotFound)


class _RpcError(grpc.RpcError):
    """What a failed grpc call raises: code, details, trailing metadata (as grpc.aio.AioRpcError has)."""

    def __init__(self, code, details, trailers):
        self._code, self._details, self._trailers = code, details, trailers

    def code(self):
        return self._code

    def details(self):
        return self._details

    def trailing_metadata(self):
        return self._trailers


@pytest.mark.parametrize("error", [errors.DeadlineExceeded("payload p-1: idle 30 s", metadata={"payload_id": "p-1"}),
                                   errors.Cancelled("stopped", metadata={"task_id": "t-1"}),
                                   errors.Unavailable("store full", retry_after=30.0)],
                         ids=lambda e: type(e).__name__)
def test_a_server_made_status_keeps_its_metadata_whatever_its_code(error):
    code, message, trailers = errors.to_status(error)
    back = errors.from_rpc_error(_RpcError(code, message, trailers))
    assert type(back) is type(error) and back.message == error.message
    assert back.metadata == error.metadata and getattr(back, "retry_after", None) == getattr(error, "retry_after", None)


def test_a_transport_deadline_without_details_is_still_a_deadline():
    back = errors.from_rpc_error(_RpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded", ()))
    assert isinstance(back, errors.DeadlineExceeded) and back.message == "Deadline Exceeded"

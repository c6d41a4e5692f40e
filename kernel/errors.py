"""Kernel errors and their one mapping to and from gRPC status.

Every error a plane raises is a :class:`PlanesError`. On the wire it becomes a
gRPC status with a ``google.rpc.Status`` in the ``grpc-status-details-bin``
trailer, carrying an ``ErrorInfo`` (reason, domain, metadata) and, where they
apply, a ``planes.common.v1.LimitExceeded``, a ``planes.common.v1.VersionMismatch``
and a ``RetryInfo``. :func:`from_rpc_error` turns such a status back into the
same exception class with the same fields, so an in-process caller and a remote
caller catch the same thing.

Messages are for people and must never contain payload bytes or secrets: say
which limit, which reference, which field, never what the data was.
"""

from __future__ import annotations

from typing import Any, ClassVar

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2

DOMAIN = "planes"
STATUS_DETAILS_KEY = "grpc-status-details-bin"


class PlanesError(Exception):
    """Base of every error the kernel and the planes raise."""

    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.INTERNAL
    reason: ClassVar[str] = "INTERNAL"

    def __init__(self, message: str, *, metadata: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.metadata: dict[str, str] = dict(metadata or {})

    def __eq__(self, other: object) -> bool:
        return (
            type(other) is type(self)
            and other.message == self.message  # type: ignore[attr-defined]
            and other.metadata == self.metadata  # type: ignore[attr-defined]
        )

    __hash__ = Exception.__hash__

    def _extra_details(self) -> list[Any]:
        return []

    @classmethod
    def _from_details(cls, message: str, metadata: dict[str, str], details: dict[str, Any]):
        return cls(message, metadata=metadata)


class InvalidArgument(PlanesError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "INVALID_ARGUMENT"


class NotFound(PlanesError):
    code = grpc.StatusCode.NOT_FOUND
    reason = "NOT_FOUND"


class AlreadyExists(PlanesError):
    code = grpc.StatusCode.ALREADY_EXISTS
    reason = "ALREADY_EXISTS"


class Conflict(PlanesError):
    """A write against a stale version (optimistic concurrency)."""

    code = grpc.StatusCode.ABORTED
    reason = "CONFLICT"


class FailedPrecondition(PlanesError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "FAILED_PRECONDITION"


class Unauthenticated(PlanesError):
    code = grpc.StatusCode.UNAUTHENTICATED
    reason = "UNAUTHENTICATED"


class PermissionDenied(PlanesError):
    code = grpc.StatusCode.PERMISSION_DENIED
    reason = "PERMISSION_DENIED"


class Unavailable(PlanesError):
    code = grpc.StatusCode.UNAVAILABLE
    reason = "UNAVAILABLE"

    def __init__(
        self, message: str, *, retry_after: float | None = None, metadata: dict[str, str] | None = None
    ) -> None:
        super().__init__(message, metadata=metadata)
        self.retry_after = retry_after

    def _extra_details(self) -> list[Any]:
        return _retry_info(self.retry_after)

    @classmethod
    def _from_details(cls, message, metadata, details):
        return cls(message, retry_after=details.get("retry_after"), metadata=metadata)


class EvidenceUnavailable(Unavailable):
    """Evidence-required work refused because the evidence plane cannot record it.

    A kernel error rather than the evidence plugin's, so that every caller,
    local or remote, gets this class back whichever planes it has installed.
    """

    reason = "EVIDENCE_UNAVAILABLE"


class DeadlineExceeded(PlanesError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
    reason = "DEADLINE_EXCEEDED"


class Cancelled(PlanesError):
    code = grpc.StatusCode.CANCELLED
    reason = "CANCELLED"


class Unimplemented(PlanesError):
    code = grpc.StatusCode.UNIMPLEMENTED
    reason = "UNIMPLEMENTED"


class Internal(PlanesError):
    code = grpc.StatusCode.INTERNAL
    reason = "INTERNAL"


class LimitExceeded(PlanesError):
    """A limit was broken: carries the limit's name, its value and the actual value."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "LIMIT_EXCEEDED"

    def __init__(
        self,
        name: str,
        limit: int,
        actual: int,
        *,
        retry_after: float | None = None,
        message: str | None = None,
        metadata: dict[str, str] | None = None,
    ) -> None:
        super().__init__(
            message or f"{name} limit exceeded: {actual} > {limit}",
            metadata={**(metadata or {}), "limit_name": name, "limit": str(limit), "actual": str(actual)},
        )
        self.name = name
        self.limit = limit
        self.actual = actual
        self.retry_after = retry_after

    def _extra_details(self) -> list[Any]:
        from planes.common.v1 import common_pb2

        return [common_pb2.LimitExceeded(name=self.name, limit=self.limit, actual=self.actual)] + _retry_info(
            self.retry_after
        )

    @classmethod
    def _from_details(cls, message, metadata, details):
        limit = details.get("limit")
        if limit is None:
            return cls(metadata.get("limit_name", ""), int(metadata.get("limit", 0)),
                       int(metadata.get("actual", 0)), message=message)
        rest = {k: v for k, v in metadata.items() if k not in ("limit_name", "limit", "actual")}
        return cls(limit.name, limit.limit, limit.actual, retry_after=details.get("retry_after"),
                   message=message, metadata=rest)


class VersionMismatch(FailedPrecondition):
    """The caller speaks a contract version this server cannot serve."""

    reason = "VERSION_MISMATCH"

    def __init__(self, plane: str, client: str, server: str, *, message: str | None = None,
                 metadata: dict[str, str] | None = None) -> None:
        super().__init__(
            message or f"{plane} contract {client} requested, this server serves {server}",
            metadata={**(metadata or {}), "plane": plane, "client_version": client, "server_version": server},
        )
        self.plane = plane
        self.client_version = client
        self.server_version = server

    @classmethod
    def _from_details(cls, message, metadata, details):
        return cls(metadata.get("plane", ""), metadata.get("client_version", ""),
                   metadata.get("server_version", ""), message=message)


class PluginError(PlanesError):
    """A plugin cannot be loaded, validated or started. Raised at start-up."""

    reason = "PLUGIN_ERROR"

    def __init__(self, plugin: str, problem: str) -> None:
        super().__init__(f"plugin {plugin!r}: {problem}", metadata={"plugin": plugin})
        self.plugin = plugin
        self.problem = problem


class SettingsError(PlanesError):
    """The settings file or an environment override is invalid."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "SETTINGS_ERROR"


def _retry_info(retry_after: float | None) -> list[Any]:
    if retry_after is None:
        return []
    delay = duration_pb2.Duration()
    delay.FromTimedelta(__import__("datetime").timedelta(seconds=retry_after))
    return [error_details_pb2.RetryInfo(retry_delay=delay)]


_BY_REASON: dict[str, type[PlanesError]] = {}
_BY_CODE: dict[grpc.StatusCode, type[PlanesError]] = {}


def _register(*classes: type[PlanesError]) -> None:
    for cls in classes:
        _BY_REASON[cls.reason] = cls
        _BY_CODE.setdefault(cls.code, cls)


_register(
    InvalidArgument, NotFound, AlreadyExists, Conflict, FailedPrecondition, Unauthenticated,
    PermissionDenied, Unavailable, DeadlineExceeded, Cancelled, Unimplemented, Internal,
    LimitExceeded, VersionMismatch, PluginError, SettingsError, EvidenceUnavailable,
)
# A plain ABORTED from a foreign server is a conflict; RESOURCE_EXHAUSTED without
# our details is still a limit.
_BY_CODE[grpc.StatusCode.UNKNOWN] = Internal
_BY_CODE[grpc.StatusCode.DATA_LOSS] = Internal
_BY_CODE[grpc.StatusCode.OUT_OF_RANGE] = InvalidArgument


def to_status(error: PlanesError) -> tuple[grpc.StatusCode, str, tuple[tuple[str, bytes], ...]]:
    """The gRPC code, message and trailing metadata that carry ``error``."""
    info = error_details_pb2.ErrorInfo(reason=error.reason, domain=DOMAIN, metadata=error.metadata)
    status = status_pb2.Status(code=error.code.value[0], message=error.message)
    for detail in [info, *error._extra_details()]:
        packed = any_pb2.Any()
        packed.Pack(detail)
        status.details.append(packed)
    return error.code, error.message, ((STATUS_DETAILS_KEY, status.SerializeToString()),)


def from_status(code: grpc.StatusCode, message: str, trailing_metadata: Any) -> PlanesError:
    """Rebuild the typed error from a gRPC status and its trailing metadata."""
    from planes.common.v1 import common_pb2

    raw = None
    for key, value in trailing_metadata or ():
        if key == STATUS_DETAILS_KEY:
            raw = value
            break
    reason, metadata, details = None, {}, {}
    if raw is not None:
        status = status_pb2.Status()
        try:
            status.ParseFromString(raw)
        except Exception:  # a foreign server sent garbage; fall back to the code
            status = None
        for packed in status.details if status is not None else ():
            if packed.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                packed.Unpack(info)
                if info.domain == DOMAIN:
                    reason, metadata = info.reason, dict(info.metadata)
            elif packed.Is(common_pb2.LimitExceeded.DESCRIPTOR):
                limit = common_pb2.LimitExceeded()
                packed.Unpack(limit)
                details["limit"] = limit
            elif packed.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                retry = error_details_pb2.RetryInfo()
                packed.Unpack(retry)
                details["retry_after"] = retry.retry_delay.ToTimedelta().total_seconds()
    cls = _BY_REASON.get(reason or "") or _BY_CODE.get(code, Internal)
    if cls is LimitExceeded and "limit" not in details and "limit" not in metadata:
        return LimitExceeded("unknown", 0, 0, message=message)
    if cls is PluginError:
        return PluginError(metadata.get("plugin", ""), message)
    return cls._from_details(message, metadata, details)


def from_rpc_error(error: grpc.RpcError) -> PlanesError:
    """The typed error carried by a failed gRPC call."""
    code = error.code()
    if _has_details(error):
        # A status the server made (a planes error), whatever its code: keep its metadata and details.
        return from_status(code, error.details() or "", error.trailing_metadata())
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(error.details() or "deadline exceeded")
    if code == grpc.StatusCode.CANCELLED:
        return Cancelled(error.details() or "call cancelled")
    if code == grpc.StatusCode.UNAVAILABLE:
        return Unavailable(error.details() or "server unavailable")
    return from_status(code, error.details() or "", error.trailing_metadata())


def _has_details(error: grpc.RpcError) -> bool:
    return any(key == STATUS_DETAILS_KEY for key, _ in (error.trailing_metadata() or ()))

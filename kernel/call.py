"""The context every plane operation receives: identity, correlation, deadline."""

from __future__ import annotations

import contextvars
import os
import time
from dataclasses import dataclass, field, replace

from .identity import Identity

_current: contextvars.ContextVar[CallContext | None] = contextvars.ContextVar(
    "planes_call", default=None
)


def new_trace_id() -> str:
    return os.urandom(16).hex()


def new_span_id() -> str:
    return os.urandom(8).hex()


def new_correlation_id() -> str:
    return os.urandom(16).hex()


@dataclass(frozen=True, slots=True)
class TraceContext:
    """W3C trace context (https://www.w3.org/TR/trace-context/), version 00."""

    trace_id: str
    span_id: str
    sampled: bool = False

    @classmethod
    def parse(cls, header: str) -> TraceContext | None:
        """Parse a ``traceparent`` header; None when it is malformed.

        A malformed header is ignored, as the specification asks, and the
        kernel starts a new trace instead of failing the call.
        """
        parts = header.strip().split("-")
        if len(parts) < 4 or len(parts[0]) != 2 or parts[0] == "ff":
            return None
        version, trace_id, span_id, flags = parts[:4]
        if version == "00" and len(parts) != 4:
            return None
        if len(trace_id) != 32 or len(span_id) != 16 or len(flags) != 2:
            return None
        try:
            int(trace_id, 16), int(span_id, 16)
            flag_bits = int(flags, 16)
        except ValueError:
            return None
        if trace_id == "0" * 32 or span_id == "0" * 16:
            return None
        return cls(trace_id.lower(), span_id.lower(), bool(flag_bits & 1))

    def header(self) -> str:
        return f"00-{self.trace_id}-{self.span_id}-{'01' if self.sampled else '00'}"

    def child(self) -> TraceContext:
        return TraceContext(self.trace_id, new_span_id(), self.sampled)


@dataclass(frozen=True, slots=True)
class CallContext:
    """One call of a plane operation, in-process or over gRPC.

    ``deadline`` is an absolute ``time.monotonic()`` value, or None for none.
    """

    identity: Identity
    correlation_id: str
    trace: TraceContext
    request_id: str = ""
    deadline: float | None = None
    method: str = ""
    extras: dict[str, str] = field(default_factory=dict)

    @property
    def tenant(self) -> str:
        return self.identity.tenant

    def time_remaining(self) -> float | None:
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - time.monotonic())

    def with_identity(self, identity: Identity) -> CallContext:
        return replace(self, identity=identity)


def current_call() -> CallContext | None:
    """The call being served by this task, if any (for logging and clients)."""
    return _current.get()


def _set_current(call: CallContext | None) -> contextvars.Token:
    return _current.set(call)


def _reset_current(token: contextvars.Token) -> None:
    _current.reset(token)

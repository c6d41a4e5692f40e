"""The context every plane operation receives: identity, correlation, deadline."""

from __future__ import annotations

import contextlib
import contextvars
import os
import random
import re
import time
from collections.abc import Iterator
from typing import NamedTuple

from .identity import Identity

_current: contextvars.ContextVar[CallContext | None] = contextvars.ContextVar(
    "planes_call", default=None
)

_HEX = re.compile(r"[0-9a-fA-F]+")


# Trace and span ids must be unique, not secret: a PRNG seeded from the OS
# avoids a getrandom() system call on every call (about 10 us under load).
_ids = random.Random(os.urandom(32))


def new_span_id() -> str:
    return f"{_ids.getrandbits(64):016x}"


def _reseed_after_fork() -> None:
    _ids.seed(os.urandom(32))


os.register_at_fork(after_in_child=_reseed_after_fork)


class TraceContext(NamedTuple):
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
        if not (_HEX.fullmatch(trace_id) and _HEX.fullmatch(span_id) and _HEX.fullmatch(flags)):
            return None  # int(x, 16) alone would take '_', '+' and spaces, and the id reaches evidence
        flag_bits = int(flags, 16)
        if trace_id == "0" * 32 or span_id == "0" * 16:
            return None
        return cls(trace_id.lower(), span_id.lower(), bool(flag_bits & 1))

    @classmethod
    def new(cls) -> TraceContext:
        """A new trace with its first span (one random draw for both ids)."""
        ids = f"{_ids.getrandbits(192):048x}"
        return cls(ids[:32], ids[32:])

    def header(self) -> str:
        return f"00-{self.trace_id}-{self.span_id}-{'01' if self.sampled else '00'}"

    def child(self) -> TraceContext:
        return TraceContext(self.trace_id, new_span_id(), self.sampled)


class CallContext:
    """One call of a plane operation, in-process or over gRPC. Treat it as read-only.

    ``deadline`` is an absolute ``time.monotonic()`` value, or None for none.
    The trace context and correlation id are made on first use: most calls
    never read them, and making them costs more than the rest of admission.
    A new correlation starts with the id of the trace it belongs to.
    """

    __slots__ = ("identity", "request_id", "deadline", "method", "_correlation_id", "_trace", "_traceparent")

    def __init__(
        self,
        identity: Identity,
        correlation_id: str | None = None,
        trace: TraceContext | None = None,
        request_id: str = "",
        deadline: float | None = None,
        method: str = "",
        *,
        traceparent: str | None = None,
    ) -> None:
        self.identity = identity
        self.request_id = request_id
        self.deadline = deadline
        self.method = method
        self._correlation_id = correlation_id
        self._trace = trace
        self._traceparent = traceparent

    @property
    def trace(self) -> TraceContext:
        """This call's span: a child of the caller's ``traceparent``, or a new trace."""
        trace = self._trace
        if trace is None:
            parent = TraceContext.parse(self._traceparent) if self._traceparent else None
            trace = self._trace = parent.child() if parent is not None else TraceContext.new()
        return trace

    @property
    def correlation_id(self) -> str:
        correlation = self._correlation_id
        if correlation is None:
            correlation = self._correlation_id = self.trace.trace_id
        return correlation

    @property
    def tenant(self) -> str:
        return self.identity.tenant

    def time_remaining(self) -> float | None:
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - time.monotonic())

    def with_identity(self, identity: Identity) -> CallContext:
        return CallContext(identity, self.correlation_id, self.trace, self.request_id, self.deadline, self.method)

    def __repr__(self) -> str:
        return (f"CallContext(principal={self.identity.principal!r}, tenant={self.identity.tenant!r}, "
                f"method={self.method!r}, correlation_id={self.correlation_id!r})")


def current_call() -> CallContext | None:
    """The call being served by this task, if any (for logging and clients)."""
    return _current.get()


def _set_current(call: CallContext | None) -> contextvars.Token:
    return _current.set(call)


@contextlib.contextmanager
def acting_for(identity: Identity, correlation_id: str, *, request_id: str = "",
               trace_id: str = "") -> Iterator[CallContext]:
    """Make the calls of this block part of a correlation, as if serving a call of it.

    For code that works for a request outside a served call (a worker running
    a task): every plane call made in the block carries ``correlation_id``
    (and a child span of ``trace_id`` when given), so what the planes record
    joins the request's evidence.
    """
    parsed = TraceContext.parse(f"00-{trace_id}-{new_span_id()}-01") if trace_id else None
    trace = parsed if parsed is not None else None
    token = _set_current(CallContext(identity, correlation_id, trace, request_id))
    try:
        yield current_call()
    finally:
        _reset_current(token)


def _reset_current(token: contextvars.Token) -> None:
    try:
        _current.reset(token)
    except ValueError:
        # An async generator finalized from another context (its stream was
        # dropped): that context is discarded anyway, nothing to restore.
        pass

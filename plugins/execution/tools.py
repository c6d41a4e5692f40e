"""The tool adapter extension point: what a worker needs to run one tool call.

A tool adapter is a plugin extension (``planes.plugins`` entry point) that
provides ``Provision(ToolAdapter, supports=("1.0", "2.0"), name="<adapter>")``.
A tool contract in the control plane names its adapter (``adapter = "mcp"``)
and the adapter's own settings (``target``). Workers load every adapter at
start-up and validate it then, and register with the names of the adapters
they have: the execution plane leases a worker only tasks it has every
adapter for. A task whose tool names an adapter no registered worker has
stays queued (one may yet register) and says so once: a ``task.updated``
change (seen by watchers and in evidence) and a kernel log warning name the
tool and the missing adapter. A worker that still gets such a task (it
registered no adapters, or a new revision changed the contract) fails that
attempt with ``tool.adapter_missing``, never the worker, and the task is
queued for another.

See docs/tool-adapters.md for a complete example.
"""

from __future__ import annotations

import abc
import asyncio
import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from planes.common.v1 import common_pb2
from planes.kernel.contract import ContractVersion
from planes.kernel.errors import DeadlineExceeded, FailedPrecondition, PermissionDenied, Unavailable

from .config import ToolContract

__all__ = ["DataAccess", "Reconciliation", "Secrets", "ToolAdapter", "ToolCall", "ToolContext",
           "ToolDescription", "ToolResult"]


class Reconciliation(enum.Enum):
    """What an adapter found out about an effect whose outcome was lost."""

    #: The effect happened: record it as committed, do not repeat it.
    APPLIED = "applied"
    #: The effect did not happen: it may be performed now, under the same key.
    NOT_APPLIED = "not_applied"
    #: Cannot tell: the effect is escalated to a person, never repeated.
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class ToolDescription:
    """What the adapter will run for a contract, for people and for evidence."""

    adapter: str
    summary: str
    #: Adapter-specific facts worth recording (never secrets).
    details: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ToolCall:
    action_id: str
    tool: str
    arguments: dict[str, Any]
    inputs: tuple[common_pb2.PayloadRef, ...]
    contract: ToolContract
    #: Stable across attempts: an idempotent tool dedupes on it.
    idempotency_key: str


class Secrets:
    """Tool credentials, resolved by reference only when a tool is invoked.

    A tool may resolve only the ``credential_ref`` its contract names. The
    default source is a directory of 0600 files (one per reference) that the
    worker's operator provisions; the value never enters logs or evidence.
    """

    def __init__(self, resolve: Callable[[str], bytes], allowed: str):
        self._resolve = resolve
        self._allowed = allowed

    def get(self, ref: str) -> bytes:
        if not ref or ref != self._allowed:
            raise PermissionDenied(f"this tool may not use credential {ref!r}")
        return self._resolve(ref)


class DataAccess:
    """Payload reads and writes through the data plane, under the attempt's credential.

    ``reader(ref, credential_token) -> bytes`` and ``writer(tenant, data,
    credential_token, **options) -> PayloadRef`` are the worker's hooks onto a
    data plane client; both always send the attempt's credential. Reads are
    limited to the payloads the credential names; what a call writes is kept
    in :attr:`written` and becomes the call's output references. Without a
    hook, reads and writes raise :class:`~planes.kernel.errors.Unavailable`
    (missing data is an error, never invented).
    """

    def __init__(self, credential_token: str, payload_ids: frozenset[str], reader=None, *, writer=None,
                 tenant: str = "", correlation: common_pb2.Correlation | None = None,
                 refs: tuple[common_pb2.PayloadRef, ...] = (), destination: str = ""):
        self.credential_token = credential_token
        #: Where what is read goes (``tool:NAME`` or ``model_route:NAME``): the
        #: data plane's egress rules decide, and record, before any byte is read.
        self.destination = destination
        self.payload_ids = payload_ids
        self.tenant = tenant
        self.correlation = correlation
        self.written: list[common_pb2.PayloadRef] = []
        #: The task's own references by id: a read by id alone still checks the digest submitted with it.
        self.refs = {ref.payload_id: ref for ref in refs}
        self._reader = reader
        self._writer = writer

    async def read(self, ref: common_pb2.PayloadRef | str) -> bytes:
        """The bytes of a payload (a reference, or the id of one of the task's references)."""
        if isinstance(ref, str):
            ref = self.refs.get(ref) or common_pb2.PayloadRef(payload_id=ref)
        if ref.payload_id not in self.payload_ids:
            raise PermissionDenied(f"payload {ref.payload_id!r} is outside this task's credential")
        if self._reader is None:
            raise Unavailable("no data plane is reachable from this worker")
        if not ref.tenant and self.tenant:
            filled = common_pb2.PayloadRef()
            filled.CopyFrom(ref)
            filled.tenant = self.tenant
            ref = filled
        return await self._reader(ref, self.credential_token, destination=self.destination,
                                  correlation=self.correlation)

    async def write(self, data: bytes, *, classification: str = "internal", name: str = "",
                    media_type: str = "") -> common_pb2.PayloadRef:
        """Store ``data`` as a new payload of the task's tenant, correlated with the task; returns its reference."""
        if self._writer is None:
            raise Unavailable("no data plane is reachable from this worker")
        if not self.credential_token:
            raise PermissionDenied("this attempt holds no task credential to write with")
        ref = await self._writer(self.tenant, data, self.credential_token, classification=classification,
                                 name=name, media_type=media_type, correlation=self.correlation)
        self.written.append(ref)
        return ref


@dataclass
class ToolContext:
    """Everything an invocation may use besides its arguments."""

    tenant: str
    task_id: str
    attempt_epoch: int
    correlation: common_pb2.Correlation
    secrets: Secrets
    data: DataAccess
    #: Set when the task is cancelled or its lease lost: stop as soon as possible.
    cancelled: asyncio.Event
    #: ``time.monotonic()`` by which the call must end.
    deadline: float
    #: ``egress_allowed(destination)``: the contract's allow-list and the tenant's egress rules.
    egress_allowed: Callable[[str], bool]
    #: The call's idempotency key (stable across attempts).
    idempotency_key: str = ""
    #: Facts the adapter reports (``isolation``...), recorded as evidence.
    notes: dict[str, str] = field(default_factory=dict)

    def remaining(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded("the tool call ran out of time")
        return left

    def check_egress(self, destination: str) -> None:
        if not self.egress_allowed(destination):
            raise PermissionDenied(f"egress to {destination} is not allowed for this tool")

    def check_cancelled(self) -> None:
        if self.cancelled.is_set():
            raise FailedPrecondition("the task was cancelled")


@dataclass
class ToolResult:
    #: A small JSON-compatible result; bulk output goes to payloads.
    output: dict[str, Any] = field(default_factory=dict)
    outputs: list[common_pb2.PayloadRef] = field(default_factory=list)


class ToolAdapter(abc.ABC):
    """Contract of the ``tool_adapter`` extension point."""

    extension_point = "tool_adapter"
    version = ContractVersion(1, 0)

    @abc.abstractmethod
    def describe(self, contract: ToolContract) -> ToolDescription:
        """Check a tool contract's ``target`` for this adapter and say what it runs.

        The worker does not call it: an adapter calls it from :meth:`invoke`
        (the built-in ones do), so a bad target fails the call that uses it.
        Raise :class:`~planes.kernel.errors.InvalidArgument` naming the field
        when the target is unusable.
        """

    @abc.abstractmethod
    async def invoke(self, call: ToolCall, context: ToolContext) -> ToolResult:
        """Run one tool call and return its result.

        Called by a worker, under the contract's timeout (``context.deadline``)
        and retry policy, after the effect ledger allowed it. Stop promptly
        when cancelled (the worker cancels this coroutine) and release what
        was started. Raise a :class:`~planes.kernel.errors.PlanesError` for a
        failure the caller should see by kind (``PermissionDenied`` for egress,
        ``DeadlineExceeded``, ``Unavailable`` for one worth retrying).
        """

    async def reconcile(self, call: ToolCall, context: ToolContext) -> Reconciliation:
        """Find out whether a non-idempotent effect whose outcome was lost happened.

        Called on resumption for an intent with no outcome. The default cannot
        tell, so the effect is escalated, never repeated.
        """
        return Reconciliation.UNKNOWN

    async def close(self) -> None:
        """Release what the adapter holds (connections, servers) when the worker stops. Optional: holds nothing."""
        return None

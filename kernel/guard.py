"""The call guard: what every RPC passes through before and after its handler.

In order: authentication, authorization by role, contract-version
negotiation, correlation and W3C trace context, tenant scope, the deadline,
then the handler, then error mapping. Each gRPC method gets its wrapped handler
built once, at server assembly; per call there is one pass over the metadata,
one cached token lookup and a few comparisons. (grpc.aio server interceptors
would rebuild a handler per call, which costs more than all of this.)

The same admission runs for in-process plane clients (:meth:`CallGuard.admit_local`),
so a call fails the same way whether or not it crossed the wire.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from . import errors
from .auth import Authenticator
from .call import CallContext, TraceContext, _current, current_call
from .contract import ContractVersion, Rpc
from .errors import InvalidArgument, PermissionDenied, PlanesError, VersionMismatch
from .identity import ALL_TENANTS, Identity

log = logging.getLogger("planes.kernel.guard")
_UNSEEN = object()

CORRELATION_KEY = "x-correlation-id"
REQUEST_ID_KEY = "x-request-id"
TRACEPARENT_KEY = "traceparent"
CONTRACT_KEY = "x-planes-contract"
AUTHORIZATION_KEY = "authorization"

#: Correlation and request ids longer than this are replaced, not trusted.
MAX_ID_LENGTH = 128


class MethodGuard:
    """Admission rules of one method: roles, tenant scope and contract version."""

    __slots__ = ("path", "roles", "tenant_scoped", "plane", "version", "public", "_negotiated")

    def __init__(
        self,
        path: str,
        roles: frozenset[str],
        *,
        tenant_scoped: bool = False,
        plane: str = "",
        version: ContractVersion | None = None,
        public: bool = False,
    ):
        self.path = path
        self.roles = roles
        self.tenant_scoped = tenant_scoped
        self.plane = plane
        self.version = version
        self.public = public
        #: Contract header value -> None (compatible) or the error to raise.
        #: Callers send a handful of distinct values, so parse each once.
        self._negotiated: dict[str, PlanesError | None] = {}

    @classmethod
    def for_rpc(cls, rpc: Rpc, plane: str, version: ContractVersion) -> MethodGuard:
        return cls(rpc.path, rpc.roles, tenant_scoped=rpc.tenant_scoped, plane=plane, version=version)


class CallGuard:
    """Builds guarded gRPC handlers and admits in-process calls."""

    def __init__(self, authenticator: Authenticator):
        self.authenticator = authenticator

    # -- admission ---------------------------------------------------------

    def admit(self, method: MethodGuard, context: grpc.aio.ServicerContext) -> CallContext:
        authorization = correlation = request_id = traceparent = contract = None
        for key, value in context.invocation_metadata() or ():
            if key == AUTHORIZATION_KEY:
                authorization = value
            elif key == CORRELATION_KEY:
                correlation = value
            elif key == TRACEPARENT_KEY:
                traceparent = value
            elif key == CONTRACT_KEY:
                contract = value
            elif key == REQUEST_ID_KEY:
                request_id = value
        identity = self.authenticator.identify(authorization, context.auth_context)
        self._authorize(method, identity)
        if contract is not None and method.version is not None:
            refusal = method._negotiated.get(contract, _UNSEEN)
            if refusal is _UNSEEN:
                refusal = self._negotiate(method, contract)
            if refusal is not None:
                raise refusal
        trace = TraceContext.parse(traceparent) if traceparent else None
        if trace is None:
            trace = TraceContext.new()
        else:
            trace = trace.child()
        if not correlation or len(correlation) > MAX_ID_LENGTH:
            # A new correlation starts with the trace it belongs to.
            correlation = trace.trace_id
            context.set_trailing_metadata(((CORRELATION_KEY, correlation),))
        remaining = context.time_remaining()
        return CallContext(
            identity=identity,
            correlation_id=correlation,
            trace=trace,
            request_id=request_id[:MAX_ID_LENGTH] if request_id else "",
            deadline=time.monotonic() + remaining if remaining is not None else None,
            method=method.path,
        )

    def admit_local(self, method: MethodGuard, identity: Identity, client_version: ContractVersion) -> CallContext:
        """Admission for an in-process call made by a plugin with ``identity``."""
        self._authorize(method, identity)
        if method.version is not None and not method.version.serves(client_version):
            raise VersionMismatch(method.plane, str(client_version), str(method.version))
        ambient = current_call()
        if ambient is not None:
            return CallContext(
                identity=identity,
                correlation_id=ambient.correlation_id,
                trace=ambient.trace.child(),
                request_id=ambient.request_id,
                deadline=ambient.deadline,
                method=method.path,
            )
        trace = TraceContext.new()
        return CallContext(identity, trace.trace_id, trace, method=method.path)

    @staticmethod
    def _authorize(method: MethodGuard, identity: Identity) -> None:
        if not identity.has_any_role(method.roles):
            raise PermissionDenied(
                f"{method.path} needs one of the roles {', '.join(sorted(method.roles))}; "
                f"{identity.principal} has {', '.join(sorted(identity.roles)) or 'none'}"
            )

    @staticmethod
    def _negotiate(method: MethodGuard, header: str) -> PlanesError | None:
        try:
            client = ContractVersion.parse(header)
        except ValueError:
            # Not cached: arbitrary garbage must not grow the cache.
            return InvalidArgument(f"{CONTRACT_KEY} must look like '1.0', got {header[:32]!r}")
        refusal = None
        if not method.version.serves(client):
            refusal = VersionMismatch(method.plane, str(client), str(method.version))
        if len(method._negotiated) < 64:
            method._negotiated[header] = refusal
        return refusal

    @staticmethod
    def scope_tenant(request: Any, identity: Identity) -> None:
        """Refuse a request for another tenant; fill an empty tenant with the caller's."""
        tenant = request.tenant
        if not tenant:
            if identity.tenant == ALL_TENANTS:
                raise InvalidArgument("tenant is required: this identity may act for every tenant")
            request.tenant = identity.tenant
        elif not identity.may_act_for(tenant):
            raise PermissionDenied(f"{identity.principal} may not act for tenant {tenant!r}")

    # -- gRPC handlers -----------------------------------------------------

    def wrap(self, method: MethodGuard, handler: grpc.RpcMethodHandler,
             target: Callable[..., Any] | None = None) -> grpc.RpcMethodHandler:
        """A handler that admits each call, then runs ``target(request, call)``.

        Without ``target`` the original handler's behaviour runs as
        ``behaviour(request, context)`` (for health and reflection).
        """
        if handler.unary_unary:
            inner = target or _raw(handler.unary_unary)
            return grpc.unary_unary_rpc_method_handler(
                self._unary(method, inner, streaming_request=False),
                handler.request_deserializer, handler.response_serializer)
        if handler.stream_unary:
            inner = target or _raw(handler.stream_unary)
            return grpc.stream_unary_rpc_method_handler(
                self._unary(method, inner, streaming_request=True),
                handler.request_deserializer, handler.response_serializer)
        if handler.unary_stream:
            inner = target or _raw(handler.unary_stream)
            return grpc.unary_stream_rpc_method_handler(
                self._stream(method, inner, streaming_request=False),
                handler.request_deserializer, handler.response_serializer)
        inner = target or _raw(handler.stream_stream)
        return grpc.stream_stream_rpc_method_handler(
            self._stream(method, inner, streaming_request=True),
            handler.request_deserializer, handler.response_serializer)

    def _unary(self, method: MethodGuard, inner, *, streaming_request: bool):
        scoped = method.tenant_scoped

        async def behaviour(request, context):
            failure = None
            token = None
            try:
                call = self.admit(method, context)
                if streaming_request:
                    request = _scoped_stream(request, call.identity) if scoped else request
                elif scoped:
                    self.scope_tenant(request, call.identity)
                token = _current.set(call)
                if call.deadline is None:
                    return await inner(request, call, context)
                async with asyncio.timeout(call.time_remaining()):
                    return await inner(request, call, context)
            except PlanesError as exc:
                failure = exc
            except TimeoutError:
                failure = errors.DeadlineExceeded(f"{method.path} ran past its deadline")
            except Exception:
                failure = _internal(method)
            finally:
                if token is not None:
                    _current.reset(token)
            await context.abort(*errors.to_status(failure))

        return behaviour

    def _stream(self, method: MethodGuard, inner, *, streaming_request: bool):
        scoped = method.tenant_scoped

        async def behaviour(request, context):
            failure = None
            token = None
            try:
                call = self.admit(method, context)
                if streaming_request:
                    request = _scoped_stream(request, call.identity) if scoped else request
                elif scoped:
                    self.scope_tenant(request, call.identity)
                token = _current.set(call)
                if call.deadline is None:
                    async for item in inner(request, call, context):
                        yield item
                else:
                    async with asyncio.timeout(call.time_remaining()):
                        async for item in inner(request, call, context):
                            yield item
            except PlanesError as exc:
                failure = exc
            except TimeoutError:
                failure = errors.DeadlineExceeded(f"{method.path} ran past its deadline")
            except Exception:
                failure = _internal(method)
            finally:
                if token is not None:
                    _current.reset(token)
            if failure is not None:
                await context.abort(*errors.to_status(failure))

        return behaviour


def _internal(method: MethodGuard) -> errors.Internal:
    call = current_call()
    correlation = call.correlation_id if call else "-"
    # The traceback goes to the log, never to the caller; handlers must not put
    # payload bytes into exception messages (see errors.py).
    log.exception("unhandled error in %s (correlation %s)", method.path, correlation)
    return errors.Internal(f"internal error in {method.path}; correlation id {correlation}")


def _raw(behaviour):
    """Adapt a grpc behaviour(request, context) to the guard's (request, call, context)."""
    if _is_async_gen(behaviour):
        async def stream(request, call, context):
            async for item in behaviour(request, context):
                yield item
        return stream

    async def unary(request, call, context):
        result = behaviour(request, context)
        return await result if asyncio.iscoroutine(result) else result
    return unary


def _is_async_gen(function) -> bool:
    import inspect
    return inspect.isasyncgenfunction(function)


async def _scoped_stream(requests: AsyncIterator[Any], identity: Identity) -> AsyncIterator[Any]:
    async for request in requests:
        CallGuard.scope_tenant(request, identity)
        yield request

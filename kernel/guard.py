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
import errno
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from . import errors
from .auth import Authenticator
from .call import CallContext, TraceContext, _current, _reset_current, current_call
from .contract import ContractVersion, Encoded, Rpc, wire_tenant, with_tenant
from .errors import InvalidArgument, PermissionDenied, PlanesError, VersionMismatch
from .identity import ALL_TENANTS, Identity

log = logging.getLogger("planes.kernel.guard")
_UNSEEN = object()

CORRELATION_KEY = "x-correlation-id"
REQUEST_ID_KEY = "x-request-id"
TRACEPARENT_KEY = "traceparent"
CONTRACT_KEY = "x-planes-contract"
AUTHORIZATION_KEY = "authorization"
USER_AGENT_KEY = "user-agent"
#: Product token in the user-agent that carries a client's contract version:
#: ``planes-contract/<plane>=<major>.<minor>``. The kernel's clients put it in
#: the channel's user-agent, which gRPC sends on every call anyway, so version
#: negotiation costs no extra header (each header costs about 3% of a
#: loopback call). Foreign clients may send ``x-planes-contract`` instead.
USER_AGENT_CONTRACT = "planes-contract/"

#: Correlation and request ids longer than this are replaced, not trusted.
MAX_ID_LENGTH = 128


class MethodGuard:
    """Admission rules of one method: roles, tenant scope and contract version."""

    __slots__ = ("path", "roles", "tenant_scoped", "tenant_field", "plane", "version", "public", "_by_header",
                 "_by_agent")

    def __init__(
        self,
        path: str,
        roles: frozenset[str],
        *,
        tenant_scoped: bool = False,
        tenant_field: int = 1,
        plane: str = "",
        version: ContractVersion | None = None,
        public: bool = False,
    ):
        self.path = path
        self.roles = roles
        self.tenant_scoped = tenant_scoped
        self.tenant_field = tenant_field
        self.plane = plane
        self.version = version
        self.public = public
        #: Offered version text -> None (compatible) or the client version to
        #: refuse, one cache for the header and one for the user-agent.
        #: Callers send a handful of distinct values, so each is parsed once.
        #: (A refusal is cached as data, not as an exception object: raising
        #: one instance again and again would grow its traceback each time.)
        self._by_header: dict[str, str | None] = {}
        self._by_agent: dict[str, str | None] = {}

    @classmethod
    def for_rpc(cls, rpc: Rpc, plane: str, version: ContractVersion) -> MethodGuard:
        return cls(rpc.path, rpc.roles, tenant_scoped=rpc.tenant_scoped, tenant_field=rpc.tenant_field or 1,
                   plane=plane, version=version)


class CallGuard:
    """Builds guarded gRPC handlers and admits in-process calls."""

    def __init__(self, authenticator: Authenticator):
        self.authenticator = authenticator

    # -- admission ---------------------------------------------------------

    def admit(self, method: MethodGuard, context: grpc.aio.ServicerContext) -> CallContext:
        authorization = correlation = request_id = traceparent = contract = user_agent = None
        for key, value in context.invocation_metadata() or ():
            if key == AUTHORIZATION_KEY:
                authorization = value
            elif key == USER_AGENT_KEY:
                user_agent = value
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
        if method.version is not None and (contract is not None or user_agent is not None):
            if contract is not None:
                refused = method._by_header.get(contract, _UNSEEN)
                if refused is _UNSEEN:
                    refused = self._negotiate(method, contract, from_header=True)
            else:
                refused = method._by_agent.get(user_agent, _UNSEEN)
                if refused is _UNSEEN:
                    refused = self._negotiate(method, user_agent, from_header=False)
            if refused is not None:
                raise VersionMismatch(method.plane, refused, str(method.version))
        if correlation is not None and len(correlation) > MAX_ID_LENGTH:
            correlation = None
        remaining = context.time_remaining()
        return CallContext(
            identity,
            correlation,
            None,
            request_id[:MAX_ID_LENGTH] if request_id else "",
            time.monotonic() + remaining if remaining is not None else None,
            method.path,
            traceparent=traceparent,
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
    def _negotiate(method: MethodGuard, offered: str, *, from_header: bool) -> str | None:
        """Parse an offered version; the client version to refuse, or None to serve it."""
        cache = method._by_header if from_header else method._by_agent
        if from_header:
            text = offered
        else:
            prefix = f"{USER_AGENT_CONTRACT}{method.plane}="
            text = next((part[len(prefix):] for part in offered.split() if part.startswith(prefix)), None)
            if text is None:  # a client that does not negotiate: serve it as is
                if len(cache) < 64:
                    cache[offered] = None
                return None
        try:
            client = ContractVersion.parse(text)
        except ValueError:
            # Not cached: arbitrary garbage must not grow the cache.
            raise InvalidArgument(f"contract version must look like '1.0', got {text[:32]!r}") from None
        refused = None if method.version.serves(client) else str(client)
        if len(cache) < 64:
            cache[offered] = refused
        return refused

    @staticmethod
    def scope_tenant(request: Any, identity: Identity, tenant_field: int = 1) -> None:
        """Refuse a request for another tenant; fill an empty tenant with the caller's.

        A request in wire form (:class:`Encoded`) is read for its tenant field
        only, and an empty one is filled by appending the field to its bytes.
        """
        wire = type(request) is Encoded
        if wire:
            try:
                tenant = wire_tenant(request.data, tenant_field)
            except DecodeError:
                raise InvalidArgument("the request is not a valid protobuf message") from None
        else:
            tenant = request.tenant
        if not tenant:
            if identity.tenant == ALL_TENANTS:
                raise InvalidArgument("tenant is required: this identity may act for every tenant, so the request "
                                      "must name one (on the command line: --tenant)")
            if wire:
                request.data = with_tenant(request.data, tenant_field, identity.tenant)
            else:
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
        raw = target is None
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(method, target or handler.unary_unary, streaming_request=False, raw=raw),
                handler.request_deserializer, handler.response_serializer)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                self._unary(method, target or handler.stream_unary, streaming_request=True, raw=raw),
                handler.request_deserializer, handler.response_serializer)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._stream(method, target or handler.unary_stream, streaming_request=False, raw=raw),
                handler.request_deserializer, handler.response_serializer)
        return grpc.stream_stream_rpc_method_handler(
            self._stream(method, target or handler.stream_stream, streaming_request=True, raw=raw),
            handler.request_deserializer, handler.response_serializer)

    def _unary(self, method: MethodGuard, inner, *, streaming_request: bool, raw: bool):
        scoped = method.tenant_scoped

        async def behaviour(request, context):
            failure = None
            token = None
            call = None
            try:
                call = self.admit(method, context)
                if streaming_request:
                    request = _scoped_stream(request, call.identity, method.tenant_field) if scoped else request
                elif scoped:
                    self.scope_tenant(request, call.identity, method.tenant_field)
                token = _current.set(call)
                if call.deadline is None:
                    return await inner(request, context if raw else call)
                async with asyncio.timeout(call.time_remaining()):
                    return await inner(request, context if raw else call)
            except PlanesError as exc:
                failure = exc
            except TimeoutError:
                failure = errors.DeadlineExceeded(f"{method.path} ran past its deadline")
            except Exception as exc:
                failure = out_of_space(method, exc) or _internal(method)
            finally:
                if token is not None:
                    _reset_current(token)
            await _abort(context, failure, call)

        return behaviour

    def _stream(self, method: MethodGuard, inner, *, streaming_request: bool, raw: bool):
        scoped = method.tenant_scoped

        async def behaviour(request, context):
            failure = None
            token = None
            call = None
            try:
                call = self.admit(method, context)
                if streaming_request:
                    request = _scoped_stream(request, call.identity, method.tenant_field) if scoped else request
                elif scoped:
                    self.scope_tenant(request, call.identity, method.tenant_field)
                token = _current.set(call)
                if call.deadline is None:
                    async for item in inner(request, context if raw else call):
                        yield item
                else:
                    async with asyncio.timeout(call.time_remaining()):
                        async for item in inner(request, context if raw else call):
                            yield item
            except PlanesError as exc:
                failure = exc
            except TimeoutError:
                failure = errors.DeadlineExceeded(f"{method.path} ran past its deadline")
            except Exception as exc:
                failure = out_of_space(method, exc) or _internal(method)
            finally:
                if token is not None:
                    _reset_current(token)
            if failure is not None:
                await _abort(context, failure, call)

        return behaviour


async def _abort(context: grpc.aio.ServicerContext, failure: PlanesError, call: CallContext | None) -> None:
    code, message, trailers = errors.to_status(failure)
    if call is not None:
        # The caller quotes this id when it reports the failure.
        trailers = (*trailers, (CORRELATION_KEY, call.correlation_id))
    await context.abort(code, message, trailers)


def out_of_space(method: MethodGuard, exc: BaseException) -> errors.Unavailable | None:
    """UNAVAILABLE for a store that ran out of disk (ENOSPC, a quota, SQLite's SQLITE_FULL), else None.

    A full disk is the operator's to fix and passes: the caller should retry
    later, not report a bug. Whatever raised it acknowledged nothing.
    """
    seen = 0
    while exc is not None and seen < 8:
        full = (isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)) or (
            isinstance(exc, sqlite3.Error) and (getattr(exc, "sqlite_errorcode", None) == 13  # SQLITE_FULL
                                                or "database or disk is full" in str(exc)))
        if full:
            call = current_call()
            log.error("no space left while serving %s (correlation %s): %s", method.path,
                      call.correlation_id if call else "-", type(exc).__name__)
            return errors.Unavailable(f"the server's storage is full: {method.path} stored nothing; "
                                      "retry once its operator has freed space", retry_after=30.0)
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def _internal(method: MethodGuard) -> errors.Internal:
    call = current_call()
    correlation = call.correlation_id if call else "-"
    # The traceback goes to the log, never to the caller; handlers must not put
    # payload bytes into exception messages (see errors.py).
    log.exception("unhandled error in %s (correlation %s)", method.path, correlation)
    return errors.Internal(f"internal error in {method.path}; correlation id {correlation}")


async def _scoped_stream(requests: AsyncIterator[Any], identity: Identity, tenant_field: int) -> AsyncIterator[Any]:
    async for request in requests:
        CallGuard.scope_tenant(request, identity, tenant_field)
        yield request


class AuthenticateFirst(grpc.aio.ServerInterceptor):
    """Refuses a call whose token does not verify before its request is read.

    The guard admits a call inside its handler, and by then gRPC has read the
    whole request: an unauthenticated caller could make the server buffer
    ``max_message_bytes`` per call, as many calls as it likes. This runs on
    the call's metadata alone; a call it refuses gets a handler that reads
    no message and aborts UNAUTHENTICATED, as the guard would. A call
    without a token goes on when client certificates are accepted (the guard
    reads the certificate), and health checks need no token. The guard still
    admits every call it lets through: this only answers earlier.
    """

    OPEN = ("/grpc.health.v1.Health/",)

    def __init__(self, authenticator: Callable[[], Authenticator | None]):
        #: The kernel's authenticator once it is open (the port is bound before, with no handler yet).
        self._authenticator = authenticator

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        authenticator = self._authenticator()
        if authenticator is None or details.method.startswith(self.OPEN):
            return await continuation(details)
        authorization = None
        for key, value in details.invocation_metadata or ():
            if key == AUTHORIZATION_KEY:
                authorization = value  # the last one, as the guard takes it
        if not authorization and authenticator.mtls:  # an empty header too: the guard reads the certificate
            return await continuation(details)
        try:
            authenticator.identify(authorization)
        except errors.Unauthenticated as exc:
            return _refusal(exc)
        return await continuation(details)


def _refusal(failure: PlanesError) -> grpc.RpcMethodHandler:
    """A handler that aborts with ``failure`` and never reads the request (request streaming: read on demand)."""
    async def refuse(_requests, context) -> None:
        code, message, trailers = errors.to_status(failure)
        await context.abort(code, message, trailers)
    return grpc.stream_stream_rpc_method_handler(refuse)

"""Plane clients: one Python interface, in-process or over gRPC.

Both clients expose one method per RPC of a plane, named as in the plane's
contract, taking the request (or, for client streaming, an async iterator of
requests) and an optional ``timeout`` in seconds. They run the same admission
(roles, tenant scope, contract version) and raise the same
:mod:`~planes.kernel.errors` exceptions, so a caller cannot tell whether the
plane lives in its process or on another host.

Correlation id, trace context and the remaining deadline of the call being
served (if any) flow into every outgoing call.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Generic, TypeVar

import grpc

from . import errors
from .call import CallContext, _current, _reset_current, _set_current, current_call
from .contract import ContractVersion, Encoded, PlaneContract, PlaneSpec, Rpc
from .errors import PlanesError, SettingsError
from .guard import AUTHORIZATION_KEY, CONTRACT_KEY, USER_AGENT_CONTRACT, CORRELATION_KEY, REQUEST_ID_KEY, TRACEPARENT_KEY, CallGuard, MethodGuard, out_of_space
from .identity import Identity

C = TypeVar("C", bound=PlaneContract)
log = logging.getLogger("planes.kernel.clients")


class PlaneClient(Generic[C]):
    """Base of both clients; ``spec`` tells which plane and contract version."""

    def __init__(self, spec: PlaneSpec):
        self.spec = spec

    @property
    def plane(self) -> str:
        return self.spec.plane


def _effective_deadline(timeout: float | None) -> float | None:
    deadlines = []
    if timeout is not None:
        deadlines.append(time.monotonic() + timeout)
    ambient = current_call()
    if ambient is not None and ambient.deadline is not None:
        deadlines.append(ambient.deadline)
    return min(deadlines) if deadlines else None


class LocalPlaneClient(PlaneClient[C]):
    """Calls a plane implemented in this process, through the same admission."""

    def __init__(self, spec: PlaneSpec, implementation: C, guard: CallGuard, identity: Identity,
                 client_version: ContractVersion | None = None):
        super().__init__(spec)
        self.identity = identity
        version = client_version or spec.version
        self._wire: dict[str, Callable[..., Any]] = {}
        for rpc in spec.rpcs.values():
            method = MethodGuard.for_rpc(rpc, spec.plane, spec.version)
            target = getattr(implementation, rpc.attribute)
            setattr(self, rpc.attribute, _local_method(rpc, method, target, guard, identity, version))
            self._wire[rpc.attribute] = _local_method(rpc, method, target, guard, identity, version, wire=True)

    def wire(self, attribute: str) -> Callable[..., Any]:
        """The RPC ``attribute`` answering in wire form: ``bytes`` instead of messages.

        Requests may be messages or :class:`~planes.kernel.contract.Encoded`.
        A response the plane produced already encoded is passed on as it is.
        """
        return self._wire[attribute]


def _local_method(rpc: Rpc, method: MethodGuard, target, guard: CallGuard, identity: Identity,
                  version: ContractVersion, *, wire: bool = False) -> Callable[..., Any]:
    def admit(request: Any, timeout: float | None) -> tuple[Any, CallContext]:
        call = guard.admit_local(method, identity, version)
        deadline = _effective_deadline(timeout)
        if deadline is not None:
            call.deadline = deadline
        if rpc.tenant_scoped:
            if rpc.client_streaming:
                request = _scoped(request, identity, method.tenant_field)
            else:
                guard.scope_tenant(request, identity, method.tenant_field)
        return request, call

    def translate(exc: BaseException) -> PlanesError:
        if isinstance(exc, PlanesError):
            return exc
        if isinstance(exc, TimeoutError):
            return errors.DeadlineExceeded(f"{method.path} ran past its deadline")
        full = out_of_space(method, exc)
        if full is not None:
            return full
        log.error("unhandled error in %s", method.path, exc_info=exc)
        return errors.Internal(f"internal error in {method.path}")

    if wire:
        def parse(item):
            return item.data if type(item) is Encoded else item.SerializeToString()
    else:
        def parse(item):
            return rpc.response_type.FromString(item.data) if type(item) is Encoded else item

    if rpc.server_streaming:
        async def stream(request, *, timeout: float | None = None):
            request, call = admit(request, timeout)
            token = _set_current(call)
            items = target(request, call).__aiter__()
            try:
                while True:
                    # The deadline covers waiting for the plane, never the caller's own work between items
                    # (a timeout around the yield would cancel the caller's task, not raise DeadlineExceeded).
                    remaining = call.time_remaining()
                    if remaining is not None and remaining <= 0:
                        raise TimeoutError  # as a remote stream ends, even when the plane has its next item ready
                    try:
                        async with asyncio.timeout(remaining):
                            item = await items.__anext__()
                    except StopAsyncIteration:
                        break
                    yield parse(item)
            except Exception as exc:
                raise translate(exc) from None
            finally:
                closing = getattr(items, "aclose", None)
                if closing is not None:
                    await closing()
                _reset_current(token)
        stream.__name__ = rpc.attribute
        return stream

    async def unary(request, *, timeout: float | None = None):
        request, call = admit(request, timeout)
        token = _set_current(call)
        try:
            async with asyncio.timeout(call.time_remaining()):
                return parse(await target(request, call))
        except Exception as exc:
            raise translate(exc) from None
        finally:
            _reset_current(token)
    unary.__name__ = rpc.attribute
    return unary


async def _scoped(requests: AsyncIterator[Any], identity: Identity, tenant_field: int) -> AsyncIterator[Any]:
    async for request in requests:
        CallGuard.scope_tenant(request, identity, tenant_field)
        yield request


class TokenSource:
    """The bearer token a remote client sends: fixed, or minted and renewed."""

    def __init__(self, token: str | None = None, mint: Callable[[], tuple[str, float]] | None = None):
        self._token = token
        self._mint = mint
        self._expires = float("inf") if token else 0.0

    def __call__(self) -> str | None:
        if self._mint is not None and time.time() > self._expires - 60:
            self._token, self._expires = self._mint()
        return self._token

    @property
    def fixed(self) -> bool:
        return self._mint is None


class RemotePlaneClient(PlaneClient[C]):
    """Calls a plane over gRPC; errors come back as the same typed exceptions."""

    def __init__(self, spec: PlaneSpec, channel: grpc.aio.Channel, token: TokenSource | str | None,
                 client_version: ContractVersion | None = None, *, version_in_user_agent: bool = False):
        """``version_in_user_agent``: the channel was made with :func:`channel_options`
        for this plane, so its user-agent already carries the contract version."""
        super().__init__(spec)
        self.channel = channel
        tokens = token if isinstance(token, TokenSource) else TokenSource(token)
        version = None if version_in_user_agent else str(client_version or spec.version)
        outgoing = _Outgoing(tokens, version)
        self._wire: dict[str, Callable[..., Any]] = {}
        for rpc in spec.rpcs.values():
            setattr(self, rpc.attribute, _remote_method(channel, rpc, outgoing))
            self._wire[rpc.attribute] = _remote_method(channel, rpc, outgoing, wire=True)

    def wire(self, attribute: str) -> Callable[..., Any]:
        """The RPC ``attribute`` answering in wire form: the received ``bytes``, undecoded.

        Requests may be messages or :class:`~planes.kernel.contract.Encoded`
        (sent as they are), so a native codec can both build and read the
        messages without protobuf copies.
        """
        return self._wire[attribute]

    async def close(self) -> None:
        await self.channel.close()


class _Outgoing:
    """Builds each call's metadata and timeout; the fixed part is built once."""

    __slots__ = ("tokens", "version", "_fixed")

    def __init__(self, tokens: TokenSource, version: str | None):
        self.tokens = tokens
        self.version = version
        # grpc.aio converts a tuple into its Metadata class on every call
        # (about 2% of a loopback call); hand it one built once instead.
        self._fixed = grpc.aio.Metadata(*self._base()) if tokens.fixed else None

    def _base(self) -> tuple[tuple[str, str], ...]:
        token = self.tokens()
        auth = ((AUTHORIZATION_KEY, f"Bearer {token}"),) if token else ()
        return ((CONTRACT_KEY, self.version), *auth) if self.version else auth

    def __call__(self, timeout: float | None):
        ambient = _current.get()
        if ambient is None:
            return (self._fixed if self._fixed is not None else self._base()), timeout
        metadata = [*self._base(), (CORRELATION_KEY, ambient.correlation_id),
                    (TRACEPARENT_KEY, ambient.trace.child().header())]
        if ambient.request_id:
            metadata.append((REQUEST_ID_KEY, ambient.request_id))
        deadline = _effective_deadline(timeout)
        return tuple(metadata), (None if deadline is None else max(0.0, deadline - time.monotonic()))


def _remote_method(channel: grpc.aio.Channel, rpc: Rpc, outgoing: _Outgoing, *, wire: bool = False):
    serialize = _serializer(rpc.request_type)
    deserialize = None if wire else rpc.response_type.FromString
    factory = getattr(channel, rpc.shape)
    multicallable = factory(rpc.path, request_serializer=serialize, response_deserializer=deserialize)

    if rpc.server_streaming:
        async def stream(request, *, timeout: float | None = None):
            metadata, remaining = outgoing(timeout)
            call = multicallable(request, metadata=metadata, timeout=remaining)
            ended = _EndStatus(call) if rpc.client_streaming else None
            try:
                # read() rather than iteration: grpc's iterator keeps the last
                # message while it waits for the next, and so would a loop
                # variable; with large chunks each held message counts.
                while (item := await call.read()) is not grpc.aio.EOF:
                    yield item
                    del item
            except grpc.RpcError as exc:
                raise errors.from_rpc_error(ended.instead_of(exc) if ended else exc) from None
            finally:
                # A caller that stops reading early ends the call, so the server stops sending.
                if not call.done():
                    call.cancel()
        stream.__name__ = rpc.attribute
        return stream

    if rpc.client_streaming:
        async def collect(requests, *, timeout: float | None = None):
            metadata, remaining = outgoing(timeout)
            call = multicallable(requests, metadata=metadata, timeout=remaining)
            ended = _EndStatus(call)
            try:
                return await call
            except grpc.RpcError as exc:
                raise errors.from_rpc_error(ended.instead_of(exc)) from None
        collect.__name__ = rpc.attribute
        return collect

    async def unary(request, *, timeout: float | None = None):
        metadata, remaining = outgoing(timeout)
        try:
            return await multicallable(request, metadata=metadata, timeout=remaining)
        except grpc.RpcError as exc:
            raise errors.from_rpc_error(exc) from None
    unary.__name__ = rpc.attribute
    return unary


#: What grpc.aio reports when a request write fails in Core (see :class:`_EndStatus`).
_WRITE_FAILED = (grpc.StatusCode.INTERNAL, "Internal error from Core")


class _EndStatus:
    """The status a client-streaming call really ended with, kept from being overwritten.

    A server may refuse a request stream early (a quota, a limit, a full disk)
    and end the call while the client is still writing. grpc.aio then fails the
    write in flight and, depending on which the event loop sees first,
    overwrites the server's status with ``INTERNAL: Internal error from Core``
    (grpc/grpc#36066; the sync API and other languages keep the server's
    status). The call announces each status it takes to its done callbacks,
    so the one the server sent is seen here before any overwrite.
    """

    __slots__ = ("statuses",)

    def __init__(self, call: grpc.aio.Call):
        self.statuses: list[grpc.aio.AioRpcError] = []
        call.add_done_callback(self._ended)

    def _ended(self, call: grpc.aio.Call) -> None:
        # Runs inside grpc as the status is set: nothing may escape, nothing may wait.
        try:
            code, details, trailing = _at_once(call.code()), _at_once(call.details()), \
                _at_once(call.trailing_metadata())
        except Exception:  # pragma: no cover - a grpc that works otherwise
            return
        if code is not None:
            self.statuses.append(grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailing or grpc.aio.Metadata(),
                                                      details))

    def instead_of(self, error: grpc.RpcError) -> grpc.RpcError:
        """``error``, unless it is a failed write's and the server's own status was seen: then that."""
        if (error.code(), error.details()) != _WRITE_FAILED:
            return error
        for status in self.statuses:
            if (status.code(), status.details()) != _WRITE_FAILED:
                return status
        return error


def _at_once(awaitable):
    """The result of a coroutine that completes without waiting (a call's status once set); else None."""
    try:
        awaitable.send(None)
    except StopIteration as done:
        return done.value
    awaitable.close()
    return None


def _serializer(response_type):
    serialize = response_type.SerializeToString

    def encode(message) -> bytes:
        # A handler may hand over wire bytes it encoded itself (see Encoded).
        return message.data if type(message) is Encoded else serialize(message)
    return encode


def plane_handlers(spec: PlaneSpec, implementation: PlaneContract, guard: CallGuard) -> dict[str, grpc.RpcMethodHandler]:
    """The guarded gRPC handlers serving ``implementation``: decode, call, encode."""
    handlers = {}
    for rpc in spec.rpcs.values():
        target = getattr(implementation, rpc.attribute)
        deserialize = Encoded if rpc.attribute in implementation.wire_requests else rpc.request_type.FromString
        raw = getattr(grpc, f"{rpc.shape}_rpc_method_handler")(
            _never_called, deserialize, _serializer(rpc.response_type))
        handlers[rpc.name] = guard.wrap(MethodGuard.for_rpc(rpc, spec.plane, spec.version), raw, target=target)
    return handlers


def _never_called(request, context):  # pragma: no cover - replaced by the guarded target
    raise AssertionError("unguarded handler called")


def channel_options(max_message_bytes: int, contract: tuple[str, ContractVersion] | None = None
                    ) -> list[tuple[str, Any]]:
    """gRPC options for a channel; with ``contract`` (plane, version) its user-agent
    carries the contract version (see :data:`~planes.kernel.guard.USER_AGENT_CONTRACT`)."""
    options: list[tuple[str, Any]] = [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]
    if contract is not None:
        plane, version = contract
        options.append(("grpc.primary_user_agent", f"{USER_AGENT_CONTRACT}{plane}={version}"))
    return options


def is_loopback(address: str) -> bool:
    """True if ``address`` (a gRPC target or a bind address) never leaves this host.

    Loopback IPs (127.0.0.0/8, ::1), ``localhost`` and Unix sockets count;
    anything else, including a name that merely resolves to loopback today
    and a target this cannot parse, does not.
    """
    if address.startswith(("unix:", "unix-abstract:")):
        return True
    scheme, sep, rest = address.partition(":")
    if sep and scheme in ("ipv4", "ipv6"):
        hosts = [_host_of(part) for part in rest.split(",")]
        return all(_is_loopback_host(host) for host in hosts)
    if sep and scheme == "dns":
        rest = rest.removeprefix("//")
        # dns://<dns server>/<name>: only the name is the peer
        address = rest.split("/", 1)[1] if "/" in rest else rest
    return _is_loopback_host(_host_of(address))


def _host_of(address: str) -> str:
    if address.startswith("["):
        return address[1:].split("]", 1)[0]
    try:
        ipaddress.ip_address(address)
        return address  # a bare IPv6 address has colons but no port
    except ValueError:
        return address.rsplit(":", 1)[0] if ":" in address else address


def _is_loopback_host(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def connect(address: str, contract: type[C], *, token: str | None = None,
            root_certificates: bytes | None = None, client_certificate: tuple[bytes, bytes] | None = None,
            max_message_bytes: int = 64 * 1024 * 1024, client_version: ContractVersion | None = None,
            allow_insecure: bool = False) -> C:
    """A remote client for ``contract`` at ``address`` (``host:port``).

    With ``root_certificates`` the channel uses TLS; ``client_certificate`` is
    ``(private_key_pem, certificate_chain_pem)`` for mTLS. Without them the
    channel is plaintext, which only a loopback address (see
    :func:`is_loopback`) gets: for any other address this raises
    :class:`~planes.kernel.errors.SettingsError` before connecting, because
    the bearer token and the payloads would cross the network in clear text.
    ``allow_insecure=True`` opts out, for a network you trust, as
    ``server.allow_insecure_remote`` does for the server.
    """
    if root_certificates is None and not allow_insecure and not is_loopback(address):
        raise SettingsError(
            f"refusing to connect to {address} without TLS: the token would cross the network in clear text. "
            "Pass the server's CA certificate (--ca-file on the command line, root_certificates= in Python), "
            "or, only on a network you trust, --allow-insecure-remote (allow_insecure=True)"
        )
    spec = PlaneSpec(contract)
    version = client_version or spec.version
    options = channel_options(max_message_bytes, (spec.plane, version))
    if root_certificates is not None:
        key, chain = client_certificate or (None, None)
        credentials = grpc.ssl_channel_credentials(root_certificates, key, chain)
        channel = grpc.aio.secure_channel(address, credentials, options=options)
    else:
        channel = grpc.aio.insecure_channel(address, options=options)
    return RemotePlaneClient(spec, channel, token, version, version_in_user_agent=True)  # type: ignore[return-value]

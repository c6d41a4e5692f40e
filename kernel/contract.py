"""Plane contracts: the Python side of each plane's protobuf service.

A plane's contract is a subclass of :class:`PlaneContract` whose abstract
methods mirror the RPCs of one protobuf service, one for one, in snake case:

* unary RPC ``PutResource``         -> ``async def put_resource(self, request, call) -> Response``
* server-streaming ``WatchSnapshots`` -> ``def watch_snapshots(self, request, call) -> AsyncIterator[Response]``
  (implemented as an ``async def`` generator)
* client-streaming ``AppendEventStream`` -> ``async def append_event_stream(self, requests, call) -> Response``
  where ``requests`` is an ``AsyncIterator`` of request messages
* bidirectional streaming           -> ``def name(self, requests, call) -> AsyncIterator[Response]``

``call`` is the :class:`~planes.kernel.call.CallContext`. The kernel builds the
gRPC servicer and both plane clients (in-process and remote) from this table,
so a contract never needs hand-written gRPC glue.
"""

from __future__ import annotations

import abc
import inspect
import re
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Any, ClassVar

from google.protobuf import descriptor_pool, message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor

from .errors import PluginError


@dataclass(frozen=True, slots=True, order=True)
class ContractVersion:
    """``major.minor``: minors add fields and RPCs, a major breaks."""

    major: int
    minor: int

    @classmethod
    def parse(cls, text: str) -> ContractVersion:
        match = re.fullmatch(r"\s*(\d+)\.(\d+)\s*", text)
        if not match:
            raise ValueError(f"contract version must look like '1.0', got {text!r}")
        return cls(int(match.group(1)), int(match.group(2)))

    def serves(self, client: ContractVersion) -> bool:
        """True if a server at this version can serve a client at ``client``."""
        return self.major == client.major and self.minor >= client.minor

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}"


def snake_case(rpc_name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", rpc_name).lower()


@dataclass(frozen=True, slots=True)
class Rpc:
    """One RPC of a plane service, resolved from its descriptor."""

    name: str
    attribute: str
    path: str
    request_type: type
    response_type: type
    client_streaming: bool
    server_streaming: bool
    roles: frozenset[str]
    #: True when the request message has a top-level ``tenant`` string field.
    tenant_scoped: bool
    #: That field's number (0 when not tenant-scoped), for requests in wire form.
    tenant_field: int = 0

    @property
    def shape(self) -> str:
        return {
            (False, False): "unary_unary",
            (False, True): "unary_stream",
            (True, False): "stream_unary",
            (True, True): "stream_stream",
        }[(self.client_streaming, self.server_streaming)]


def _roles_of(method: MethodDescriptor) -> frozenset[str]:
    from planes.common.v1 import common_pb2, options_pb2

    options = method.GetOptions()
    if not options.HasExtension(options_pb2.method_policy):
        return frozenset()
    policy = options.Extensions[options_pb2.method_policy]
    return frozenset(
        common_pb2.Role.Name(role).removeprefix("ROLE_").lower() for role in policy.roles
    )


def resolve_rpcs(service: ServiceDescriptor) -> dict[str, Rpc]:
    """The RPC table of a service, keyed by the Python attribute name."""
    rpcs: dict[str, Rpc] = {}
    for method in service.methods:
        request_type = message_factory.GetMessageClass(method.input_type)
        tenant_field = method.input_type.fields_by_name.get("tenant")
        rpcs[snake_case(method.name)] = Rpc(
            name=method.name,
            attribute=snake_case(method.name),
            path=f"/{service.full_name}/{method.name}",
            request_type=request_type,
            response_type=message_factory.GetMessageClass(method.output_type),
            client_streaming=method.client_streaming,
            server_streaming=method.server_streaming,
            roles=_roles_of(method),
            tenant_scoped=tenant_field is not None
            and tenant_field.type == tenant_field.TYPE_STRING
            and not tenant_field.message_type,
            tenant_field=tenant_field.number if tenant_field is not None else 0,
        )
    return rpcs


@lru_cache(maxsize=None)
def _tenant_reader(number: int) -> type:
    """A message class with only ``string tenant = number``: parsing skips every other field in C."""
    from google.protobuf import descriptor_pb2

    pool = descriptor_pool.DescriptorPool()
    proto = descriptor_pb2.FileDescriptorProto(name=f"planes_tenant_{number}.proto",
                                               package="planes.kernel.wire", syntax="proto3")
    proto.message_type.add(name="TenantOnly").field.add(
        name="tenant", number=number, type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
        label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("planes.kernel.wire.TenantOnly"))


def wire_tenant(data: bytes, number: int = 1) -> str:
    """The ``tenant`` (field ``number``) of a request in wire form, as protobuf reads it (last one wins).

    Raises:
        google.protobuf.message.DecodeError: ``data`` is not a valid message.
    """
    return _tenant_reader(number).FromString(data).tenant


def with_tenant(data: bytes, number: int, tenant: str) -> bytes:
    """``data`` with its tenant set: a field appended, which protobuf reads as the value."""
    return data + _tenant_reader(number)(tenant=tenant).SerializeToString()


class Encoded:
    """A response already in wire form: the server sends its bytes as they are.

    A handler may return (or yield) ``Encoded(message.SerializeToString())``
    instead of the message, for example to encode a large message once and
    send it to many subscribers, or to build it straight from Arrow memory.
    In-process callers still receive the message: the local client parses it.
    (A wrapper, not a bytes subclass: grpc accepts only exact ``bytes``.)
    """

    __slots__ = ("data",)

    def __init__(self, data: bytes):
        if type(data) is not bytes:
            raise TypeError(f"Encoded takes bytes, got {type(data).__name__}")
        self.data = data


class PlaneContract(abc.ABC):
    """Base class of a plane's in-process contract.

    Subclasses set ``plane``, ``service`` (the protobuf service's full name)
    and ``version``, and declare one abstract method per RPC. A plugin that
    provides the plane subclasses the contract and implements every method.
    """

    plane: ClassVar[str]
    service: ClassVar[str]
    version: ClassVar[ContractVersion]
    #: RPCs (by attribute name) whose requests the server hands to the plane
    #: undecoded, as :class:`Encoded` wire bytes, so a native codec can read
    #: them without a protobuf copy. In-process callers may still pass
    #: messages, so such a method accepts both. The tenant of a tenant-scoped
    #: one is still checked (and filled when empty) by the kernel, reading
    #: only that field; the plane reads it back with :func:`wire_tenant`.
    wire_requests: ClassVar[frozenset[str]] = frozenset()


@dataclass(frozen=True)
class PlaneSpec:
    """A contract class joined with its service descriptor and RPC table."""

    contract: type[PlaneContract]

    @property
    def plane(self) -> str:
        return self.contract.plane

    @property
    def version(self) -> ContractVersion:
        return self.contract.version

    @cached_property
    def descriptor(self) -> ServiceDescriptor:
        try:
            return descriptor_pool.Default().FindServiceByName(self.contract.service)
        except KeyError:
            raise PluginError(
                self.contract.plane,
                f"protobuf service {self.contract.service} is not loaded; "
                "import its generated _pb2 module in the contract's module",
            ) from None

    @cached_property
    def rpcs(self) -> dict[str, Rpc]:
        return resolve_rpcs(self.descriptor)

    def check_contract_class(self) -> None:
        """The contract class mirrors its service exactly, and every RPC has roles."""
        declared = {
            name
            for name, member in inspect.getmembers(self.contract)
            if getattr(member, "__isabstractmethod__", False)
        }
        expected = set(self.rpcs)
        if declared != expected:
            raise PluginError(
                self.plane,
                f"contract {self.contract.__qualname__} does not mirror {self.contract.service}: "
                f"missing {sorted(expected - declared)}, extra {sorted(declared - expected)}",
            )
        unguarded = sorted(r.name for r in self.rpcs.values() if not r.roles)
        if unguarded:
            raise PluginError(self.plane, f"RPCs without a method_policy: {unguarded}")

    def missing_methods(self, implementation: Any) -> list[str]:
        """Names of RPC methods that ``implementation`` lacks or shapes wrongly."""
        problems = []
        for rpc in self.rpcs.values():
            method = getattr(implementation, rpc.attribute, None)
            if method is None or getattr(method, "__isabstractmethod__", False):
                problems.append(f"{rpc.attribute} (missing)")
                continue
            if rpc.server_streaming:
                if not inspect.isasyncgenfunction(method):
                    problems.append(f"{rpc.attribute} (must be an async generator)")
            elif not inspect.iscoroutinefunction(method):
                problems.append(f"{rpc.attribute} (must be async def)")
        for name in sorted(getattr(implementation, "wire_requests", ())):
            if not any(r.attribute == name for r in self.rpcs.values()):
                problems.append(f"wire_requests names {name}, which is not an RPC of {self.contract.service}")
        return problems

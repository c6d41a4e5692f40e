"""The diagnostics plane plugin (see :mod:`planes.kernel.contracts.diagnostics`)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from planes.common.v1 import common_pb2
from planes.kernel.call import CallContext
from planes.kernel.contracts.diagnostics import DiagnosticsPlane, pb
from planes.kernel.plugin import Plugin, Provision

__all__ = ["Diagnostics", "DiagnosticsPlugin"]


class Diagnostics(DiagnosticsPlane):
    async def echo(self, request: pb.EchoRequest, call: CallContext) -> pb.EchoResponse:
        return pb.EchoResponse(tenant=request.tenant, payload=request.payload)

    async def stream_echo(self, request: pb.StreamEchoRequest, call: CallContext) -> AsyncIterator[pb.StreamEchoResponse]:
        for index in range(request.count):
            yield pb.StreamEchoResponse(index=index, payload=request.payload)

    async def collect_echo(self, requests: AsyncIterator[pb.CollectEchoRequest], call: CallContext) -> pb.CollectEchoResponse:
        messages = size = 0
        async for request in requests:
            messages += 1
            size += len(request.payload)
        return pb.CollectEchoResponse(messages=messages, bytes=size)

    async def who_am_i(self, request: pb.WhoAmIRequest, call: CallContext) -> pb.WhoAmIResponse:
        identity = call.identity
        remaining = call.time_remaining()
        return pb.WhoAmIResponse(
            principal=identity.principal,
            tenant=identity.tenant,
            roles=[common_pb2.Role.Value(f"ROLE_{role.upper()}") for role in sorted(identity.roles)
                   if f"ROLE_{role.upper()}" in common_pb2.Role.keys()],
            source=identity.source,
            correlation=common_pb2.Correlation(
                correlation_id=call.correlation_id,
                request_id=call.request_id,
                trace_id=call.trace.trace_id,
                span_id=call.trace.span_id,
                tenant=identity.tenant,
                actor=identity.principal,
            ),
            deadline_seconds=remaining or 0.0,
        )


@dataclass(frozen=True)
class _NoSettings:
    """The diagnostics plane has no settings."""


class DiagnosticsPlugin(Plugin):
    name = "diagnostics"
    version = "0.1.0"
    provides = (Provision(DiagnosticsPlane, supports=("1.0", "2.0")),)

    def __init__(self) -> None:
        self._plane = Diagnostics()

    def setup(self, kernel) -> None:
        kernel.settings.plugin_settings_as(self.name, _NoSettings)  # a [plugin.diagnostics] key is a typo

    def implementation(self, provision: Provision) -> Diagnostics:
        return self._plane

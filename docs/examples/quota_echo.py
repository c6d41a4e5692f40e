"""A complete small plugin: the diagnostics plane with a per-tenant byte quota.

Walked through in docs/plugins.md; tests/docs/test_plugin_guide.py runs it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass

from planes.kernel import CallContext, Kernel, LimitExceeded, Plugin, Provision
from planes.kernel.contracts.diagnostics import DiagnosticsPlane, pb


class QuotaEcho(DiagnosticsPlane):
    """Echoes payloads until a tenant has echoed ``max_bytes`` in total."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.used: Counter[str] = Counter()

    def _charge(self, tenant: str, size: int) -> None:
        # The kernel has already checked the caller may act for this tenant
        # and filled it in when the request left it empty.
        if self.used[tenant] + size > self.max_bytes:
            raise LimitExceeded("echo_bytes", self.max_bytes, self.used[tenant] + size)
        self.used[tenant] += size

    async def echo(self, request: pb.EchoRequest, call: CallContext) -> pb.EchoResponse:
        self._charge(request.tenant, len(request.payload))
        return pb.EchoResponse(tenant=request.tenant, payload=request.payload)

    async def stream_echo(self, request: pb.StreamEchoRequest, call: CallContext) -> AsyncIterator[pb.StreamEchoResponse]:
        for index in range(request.count):
            self._charge(request.tenant, len(request.payload))
            yield pb.StreamEchoResponse(index=index, payload=request.payload)

    async def collect_echo(self, requests: AsyncIterator[pb.CollectEchoRequest], call: CallContext) -> pb.CollectEchoResponse:
        messages = size = 0
        async for request in requests:
            self._charge(request.tenant, len(request.payload))
            messages, size = messages + 1, size + len(request.payload)
        return pb.CollectEchoResponse(messages=messages, bytes=size)

    async def who_am_i(self, request: pb.WhoAmIRequest, call: CallContext) -> pb.WhoAmIResponse:
        return pb.WhoAmIResponse(principal=call.identity.principal, tenant=call.identity.tenant,
                                 source=call.identity.source)


@dataclass(frozen=True)
class QuotaEchoSettings:
    """``[plugin.quota-echo]``: a typo or a wrongly typed value fails start-up, naming the key."""

    max_bytes: int = 1024


class QuotaEchoPlugin(Plugin):
    name = "quota-echo"
    version = "1.0.0"
    provides = (Provision(DiagnosticsPlane, supports=("1.0", "2.0")),)

    def setup(self, kernel: Kernel) -> None:
        settings = kernel.settings.plugin_settings_as(self.name, QuotaEchoSettings)  # [plugin.quota-echo]
        self.plane = QuotaEcho(max_bytes=settings.max_bytes)

    def implementation(self, provision: Provision) -> QuotaEcho:
        return self.plane

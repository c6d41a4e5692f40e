"""The diagnostics plane: reachability, credentials and round-trip checks.

It holds no state. ``planes ping`` and ``planes whoami`` call it, and the
kernel's own tests and benchmarks use it as the smallest plane there is.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator

from planes.diagnostics.v1 import diagnostics_service_pb2 as pb

from ..call import CallContext
from ..contract import ContractVersion, PlaneContract

__all__ = ["DiagnosticsPlane", "pb"]


class DiagnosticsPlane(PlaneContract):
    """Contract of ``planes.diagnostics.v1.DiagnosticsService``."""

    plane = "diagnostics"
    service = "planes.diagnostics.v1.DiagnosticsService"
    version = ContractVersion(1, 0)

    @abc.abstractmethod
    async def echo(self, request: pb.EchoRequest, call: CallContext) -> pb.EchoResponse:
        """Return the payload unchanged."""

    @abc.abstractmethod
    def stream_echo(self, request: pb.StreamEchoRequest, call: CallContext) -> AsyncIterator[pb.StreamEchoResponse]:
        """Yield ``request.count`` copies of the payload."""

    @abc.abstractmethod
    async def collect_echo(
        self, requests: AsyncIterator[pb.CollectEchoRequest], call: CallContext
    ) -> pb.CollectEchoResponse:
        """Count the messages and payload bytes of a request stream."""

    @abc.abstractmethod
    async def who_am_i(self, request: pb.WhoAmIRequest, call: CallContext) -> pb.WhoAmIResponse:
        """Describe the caller's identity and the call's correlation."""

"""A real kernel with the evidence and data planes on loopback gRPC, and clients for it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from planes.evidence.v1 import evidence_service_pb2 as epb
from planes.kernel.clients import connect
from planes.kernel.contracts import DataPlane, EvidencePlane
from planes.kernel.host import Candidate, PluginHost
from planes.kernel.kernel import Kernel
from planes.kernel.server import KernelServer
from planes.kernel.tokens import issue_token
from planes.plugins.control import ControlPlugin
from planes.plugins.data import DataPlugin
from planes.plugins.data.client import DataClient
from planes.plugins.evidence import EvidencePlugin
from tests.conftest import make_settings


@dataclass
class Served:
    kernel: Kernel
    port: int
    plugin: DataPlugin
    state_dir: Path
    made: list = field(default_factory=list)

    def remote(self, contract=DataPlane, roles=("service",), tenant="acme", principal=None):
        token = issue_token(self.kernel.signing_key, principal=principal or f"{roles[0]}-{tenant}", tenant=tenant,
                            roles=list(roles), ttl_seconds=300)
        client = connect(f"127.0.0.1:{self.port}", contract, token=token)
        self.made.append(client)
        return client

    def data(self, tenant="acme", roles=("service",), **options) -> DataClient:
        return DataClient(self.remote(DataPlane, roles, tenant), tenant, **options)

    async def events(self, tenant="acme", prefix="data."):
        reviewer = self.remote(EvidencePlane, ("reviewer",), tenant)
        events = [e async for page in reviewer.query_events(epb.QueryEventsRequest(tenant=tenant))
                  for e in page.events]
        return [e for e in events if e.event_type.startswith(prefix)]


def fields(event) -> dict[str, str]:
    return {f.name: f.string_value for f in event.fields}


@pytest.fixture
def serve(run, tmp_path):
    """``serve(scenario, data_settings={...})`` runs ``await scenario(served)`` against a fresh kernel."""

    def go(scenario, data_settings=None, state_dir=None, control=False):
        """``control``: with the control plane too, which the data plane then follows for egress rules."""
        async def main():
            state = state_dir or tmp_path
            settings = make_settings(state, plugin={"data": dict(data_settings or {})})
            data = DataPlugin()
            plugins = [EvidencePlugin(), *([ControlPlugin()] if control else []), data]
            kernel = Kernel(settings, PluginHost.load(settings, [Candidate(p.name, "t", p) for p in plugins])).open()
            server = KernelServer(kernel)
            port = await server.start()
            served = Served(kernel, port, data, state)
            try:
                return await scenario(served)
            finally:
                for client in served.made:
                    await client.close()
                await server.stop(grace=1)
        return run(main())
    return go

"""Role policies from the real plane contracts, enforced over the wire before any handler runs."""

from __future__ import annotations

import pytest

from planes.kernel import errors
from planes.kernel.clients import connect
from planes.kernel.contract import PlaneSpec
from planes.kernel.contracts import ControlPlane, DataPlane, EvidencePlane
from planes.kernel.errors import PluginError
from planes.kernel.host import Candidate, PluginHost
from planes.kernel.kernel import Kernel
from planes.kernel.plugin import Plugin, Provision
from planes.kernel.server import KernelServer
from tests.conftest import make_settings


def recording_plane(contract, calls: list[str]):
    """An implementation of every RPC of ``contract`` that records its calls."""
    namespace = {}
    for name, rpc in PlaneSpec(contract).rpcs.items():
        if rpc.server_streaming:
            async def method(self, request, call, _name=name):
                calls.append(_name)
                return
                yield
        else:
            async def method(self, request, call, _name=name, _response=rpc.response_type):
                calls.append(_name)
                return _response()
        namespace[name] = method
    return type(f"Recording{contract.__name__}", (contract,), namespace)()


def plugin_for(contract, calls, *, name=None, requires=()):
    class RecordingPlugin(Plugin):
        provides = (Provision(contract, supports=("1.0", "2.0")),)

        def implementation(self, provision):
            return recording_plane(contract, calls)

    RecordingPlugin.name = name or f"recording-{contract.plane}"
    RecordingPlugin.requires = tuple(requires)
    return RecordingPlugin()


@pytest.fixture
def planes_server(run, tmp_path):
    calls: list[str] = []
    settings = make_settings(tmp_path)
    plugins = [plugin_for(c, calls) for c in (ControlPlane, DataPlane, EvidencePlane)]
    kernel = Kernel(settings, PluginHost.load(settings, [Candidate(p.name, "test", p) for p in plugins])).open()
    return kernel, calls


def _call(run, kernel, contract, method, request, *, roles, tenant):
    async def scenario():
        server = KernelServer(kernel)
        port = await server.start()
        from planes.kernel.tokens import issue_token
        token = issue_token(kernel.signing_key, principal="p", tenant=tenant, roles=list(roles), ttl_seconds=60)
        client = connect(f"127.0.0.1:{port}", contract, token=token)
        try:
            result = getattr(client, method)(request, timeout=5)
            if hasattr(result, "__aiter__"):
                return [item async for item in result]
            return await result
        finally:
            await client.close()
            await server.stop(grace=1)
    return run(scenario())


def test_admin_token_cannot_read_payloads(run, planes_server):
    kernel, calls = planes_server
    from planes.data.v1 import data_service_pb2 as data
    with pytest.raises(errors.PermissionDenied) as denied:
        _call(run, kernel, DataPlane, "get_payload", data.GetPayloadRequest(tenant="acme", payload_id="p1"),
              roles=("admin",), tenant="*")
    assert "needs one of the roles service, worker" in denied.value.message
    assert calls == []


def test_admin_token_cannot_read_evidence(run, planes_server):
    kernel, calls = planes_server
    from planes.evidence.v1 import evidence_service_pb2 as evidence
    with pytest.raises(errors.PermissionDenied):
        _call(run, kernel, EvidencePlane, "query_events", evidence.QueryEventsRequest(tenant="acme"),
              roles=("admin",), tenant="*")
    assert calls == []


def test_service_token_cannot_mutate_desired_state(run, planes_server):
    kernel, calls = planes_server
    from planes.control.v1 import control_service_pb2 as control
    with pytest.raises(errors.PermissionDenied):
        _call(run, kernel, ControlPlane, "put_resource", control.PutResourceRequest(tenant="acme"),
              roles=("service",), tenant="acme")
    assert calls == []


def test_allowed_roles_reach_the_handler(run, planes_server):
    kernel, calls = planes_server
    from planes.control.v1 import control_service_pb2 as control
    from planes.evidence.v1 import evidence_service_pb2 as evidence
    assert _call(run, kernel, EvidencePlane, "query_events", evidence.QueryEventsRequest(tenant="acme"),
                 roles=("reviewer",), tenant="acme") == []
    _call(run, kernel, ControlPlane, "put_resource", control.PutResourceRequest(tenant="acme"),
          roles=("admin",), tenant="*")
    assert calls == ["query_events", "put_resource"]


def test_dependency_cycle_is_refused_with_the_cycle(tmp_path):
    calls: list[str] = []
    data = plugin_for(DataPlane, calls, name="data", requires=("evidence",))
    evidence = plugin_for(EvidencePlane, calls, name="evidence", requires=("data",))
    with pytest.raises(PluginError) as raised:
        PluginHost.load(make_settings(tmp_path), [Candidate(p.name, "test", p) for p in (data, evidence)])
    assert "dependency cycle: data -> evidence -> data" in raised.value.message


def test_every_contract_declares_roles_for_every_rpc():
    from planes.kernel.contracts import CONTRACTS
    for contract in CONTRACTS:
        for rpc in PlaneSpec(contract).rpcs.values():
            assert rpc.roles, rpc.path
        if contract in (DataPlane, EvidencePlane):
            readers = [r for r in PlaneSpec(contract).rpcs.values() if r.name in ("GetPayload", "QueryEvents",
                                                                                  "ExportBundle")]
            assert readers and all("admin" not in r.roles for r in readers)

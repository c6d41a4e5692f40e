"""Requests in wire form: the plane gets bytes, the kernel still checks (and fills) the tenant."""

from __future__ import annotations

import pytest

from planes.kernel import errors
from planes.kernel.contract import Encoded, wire_tenant, with_tenant
from planes.kernel.contracts.diagnostics import pb
from planes.kernel.identity import Identity
from planes.kernel.contracts.diagnostics import DiagnosticsPlane
from tests.conftest import RecordingDiagnostics, RecordingPlugin, running_kernel


class WireEcho(RecordingDiagnostics):
    """Takes echo requests undecoded and answers with the tenant and size it was handed."""

    wire_requests = frozenset({"echo"})

    async def echo(self, request, call):
        assert type(request) is Encoded, "the server hands wire requests over undecoded"
        parsed = pb.EchoRequest.FromString(request.data)
        return pb.EchoResponse(tenant=wire_tenant(request.data), payload=parsed.payload)


class WirePlugin(RecordingPlugin):
    def __init__(self) -> None:
        self.plane = WireEcho()


def encoded(**fields) -> Encoded:
    return Encoded(pb.EchoRequest(**fields).SerializeToString())


@pytest.mark.parametrize("mode", ["remote", "in-process"])
def test_wire_request_tenant_is_checked_and_filled(run, tmp_path, mode):
    async def scenario():
        async with running_kernel(tmp_path, plugin=WirePlugin()) as k:
            if mode == "remote":
                client = k.client(k.token(tenant="acme"))
            else:
                client = k.kernel.client(DiagnosticsPlane, Identity("svc", "acme", frozenset({"service"})))
            echo = client.wire("echo")
            outcomes = {}
            for name, request in {
                "own tenant": encoded(tenant="acme", payload=b"a"),
                "empty tenant": encoded(payload=b"b"),
                "other tenant": encoded(tenant="globex", payload=b"c"),
                # Protobuf reads the last occurrence: so must the check.
                "smuggled second tenant": Encoded(encoded(tenant="acme").data + encoded(tenant="globex").data),
                "not protobuf": Encoded(b"\xff\xff\xff"),
            }.items():
                try:
                    reply = pb.EchoResponse.FromString(await echo(request, timeout=5))
                    outcomes[name] = (reply.tenant, reply.payload)
                except errors.PlanesError as exc:
                    outcomes[name] = type(exc).__name__
            return outcomes

    assert run(scenario()) == {
        "own tenant": ("acme", b"a"),
        "empty tenant": ("acme", b"b"),
        "other tenant": "PermissionDenied",
        "smuggled second tenant": "PermissionDenied",
        "not protobuf": "InvalidArgument",
    }


def test_with_tenant_sets_the_field_protobuf_reads():
    data = with_tenant(pb.EchoRequest(payload=b"x").SerializeToString(), 1, "acme")
    assert pb.EchoRequest.FromString(data).tenant == "acme" and wire_tenant(data) == "acme"

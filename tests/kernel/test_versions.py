"""Contract-version negotiation: an incompatible caller gets FAILED_PRECONDITION naming both versions."""

from __future__ import annotations

import pytest

from planes.kernel import errors
from planes.kernel.clients import connect
from planes.kernel.contract import ContractVersion
from planes.kernel.contracts.diagnostics import DiagnosticsPlane, pb
from tests.conftest import running_kernel


@pytest.mark.parametrize(("client", "compatible"), [("1.0", True), ("1.1", False), ("2.0", False), ("0.9", False)])
def test_negotiation(run, tmp_path, client, compatible):
    async def scenario():
        async with running_kernel(tmp_path) as k:
            remote = connect(k.address, DiagnosticsPlane, token=k.token(),
                             client_version=ContractVersion.parse(client))
            k.clients.append(remote)
            try:
                await remote.echo(pb.EchoRequest(payload=b"v"), timeout=5)
            except errors.VersionMismatch as exc:
                return exc, list(k.plane.calls)
            return None, list(k.plane.calls)

    error, calls = run(scenario())
    if compatible:
        assert error is None and len(calls) == 1
    else:
        assert error.code.name == "FAILED_PRECONDITION"
        assert (error.client_version, error.server_version) == (client, "1.0")
        assert f"diagnostics contract {client} requested, this server serves 1.0" == error.message
        assert calls == []


def test_serves_rule():
    server = ContractVersion(1, 3)
    assert server.serves(ContractVersion(1, 0)) and server.serves(ContractVersion(1, 3))
    assert not server.serves(ContractVersion(1, 4)) and not server.serves(ContractVersion(2, 0))
    with pytest.raises(ValueError):
        ContractVersion.parse("1")


def _raw_echo(k, metadata, options=None):
    import grpc

    async def call():
        async with grpc.aio.insecure_channel(k.address, options=options) as channel:
            echo = channel.unary_unary("/planes.diagnostics.v1.DiagnosticsService/Echo",
                                       request_serializer=pb.EchoRequest.SerializeToString,
                                       response_deserializer=pb.EchoResponse.FromString)
            try:
                await echo(pb.EchoRequest(tenant="acme"), timeout=5,
                           metadata=(("authorization", f"Bearer {k.token()}"), *metadata))
            except grpc.aio.AioRpcError as exc:
                return errors.from_rpc_error(exc)
            return None
    return call()


def test_foreign_client_negotiates_with_the_header(run, tmp_path):
    """A client with only proto/ sends x-planes-contract; the header wins over the user-agent."""
    async def scenario():
        async with running_kernel(tmp_path) as k:
            refused = await _raw_echo(k, (("x-planes-contract", "2.0"),),
                                      options=[("grpc.primary_user_agent", "planes-contract/diagnostics=1.0")])
            accepted = await _raw_echo(k, (("x-planes-contract", "1.0"),))
            return refused, accepted

    refused, accepted = run(scenario())
    assert isinstance(refused, errors.VersionMismatch)
    assert (refused.client_version, refused.server_version) == ("2.0", "1.0")
    assert accepted is None


def test_client_that_does_not_negotiate_is_served(run, tmp_path):
    async def scenario():
        async with running_kernel(tmp_path) as k:
            plain = await _raw_echo(k, ())
            other_plane = await _raw_echo(k, (), options=[("grpc.primary_user_agent", "planes-contract/control=9.0")])
            return plain, other_plane

    assert run(scenario()) == (None, None)


def test_repeated_refusals_are_fresh_errors():
    """A misconfigured client refused many times must not grow one error's traceback."""
    from planes.kernel.auth import Authenticator
    from planes.kernel.contract import PlaneSpec
    from planes.kernel.guard import CallGuard, MethodGuard
    from planes.kernel.tokens import SigningKey, TokenVerifier, issue_token

    key = SigningKey.generate()
    token = issue_token(key, principal="p", tenant="acme", roles=["service"], ttl_seconds=60)
    guard = CallGuard(Authenticator(TokenVerifier({key.kid: key.public_key})))
    spec = PlaneSpec(DiagnosticsPlane)
    method = MethodGuard.for_rpc(spec.rpcs["echo"], spec.plane, spec.version)

    class Context:
        def invocation_metadata(self):
            return (("authorization", f"Bearer {token}"), ("x-planes-contract", "2.0"))

        def auth_context(self):
            return {}

        def time_remaining(self):
            return None

    raised = []
    for _ in range(3):
        with pytest.raises(errors.VersionMismatch) as refusal:
            guard.admit(method, Context())
        raised.append(refusal.value)
    assert len({id(error) for error in raised}) == 3
    assert all(error.client_version == "2.0" for error in raised)


def test_header_and_user_agent_are_judged_separately(run, tmp_path):
    async def scenario():
        async with running_kernel(tmp_path) as k:
            agent = "planes-contract/other=1.0"
            as_agent = await _raw_echo(k, (), options=[("grpc.primary_user_agent", agent)])
            as_header = await _raw_echo(k, (("x-planes-contract", "nonsense"),))
            return as_agent, as_header

    as_agent, as_header = run(scenario())
    assert as_agent is None
    assert isinstance(as_header, errors.InvalidArgument)

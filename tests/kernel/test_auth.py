"""Authentication and authorization over real gRPC: refused calls never reach the handler."""

from __future__ import annotations

import time

import grpc
import pytest

from planes.kernel import errors
from planes.kernel.contracts.diagnostics import pb
from planes.kernel.tokens import SigningKey, issue_token
from tests.conftest import running_kernel


def _refused(run, tmp_path, make_token, request=None, *, expected):
    async def scenario():
        async with running_kernel(tmp_path) as k:
            client = k.client(make_token(k))
            with pytest.raises(expected) as raised:
                await client.echo(request or pb.EchoRequest(payload=b"x"), timeout=5)
            return raised.value, list(k.plane.calls)

    return run(scenario())


def test_no_token_is_unauthenticated_and_handler_never_runs(run, tmp_path):
    error, calls = _refused(run, tmp_path, lambda k: None, expected=errors.Unauthenticated)
    assert "needs a token" in error.message
    assert calls == []


def test_expired_token_is_unauthenticated(run, tmp_path):
    expired = lambda k: k.token(now=time.time() - 1000, ttl=60)  # noqa: E731
    error, calls = _refused(run, tmp_path, expired, expected=errors.Unauthenticated)
    assert error.message == "token expired"
    assert calls == []


def test_forged_signature_is_unauthenticated(run, tmp_path):
    def forged(k):
        # Same claims and key id as a real token, signed by another key.
        impostor = SigningKey(SigningKey.generate().private_key, k.kernel.signing_key.kid)
        return issue_token(impostor, principal="svc", tenant="acme", roles=["service"], ttl_seconds=60)

    error, calls = _refused(run, tmp_path, forged, expected=errors.Unauthenticated)
    assert error.message == "token signature is invalid"
    assert calls == []


def test_tampered_claims_are_unauthenticated(run, tmp_path):
    def tampered(k):
        import base64
        import json
        prefix, claims, signature = k.token(roles=("service",)).split(".")
        decoded = json.loads(base64.urlsafe_b64decode(claims + "=="))
        decoded["roles"] = ["admin", "service"]
        forged = base64.urlsafe_b64encode(json.dumps(decoded).encode()).rstrip(b"=").decode()
        return f"{prefix}.{forged}.{signature}"

    error, calls = _refused(run, tmp_path, tampered, expected=errors.Unauthenticated)
    assert error.message == "token signature is invalid"
    assert calls == []


def test_token_from_unknown_key_is_unauthenticated(run, tmp_path):
    stranger = lambda k: issue_token(SigningKey.generate(), principal="svc", tenant="acme",  # noqa: E731
                                     roles=["service"], ttl_seconds=60)
    error, _ = _refused(run, tmp_path, stranger, expected=errors.Unauthenticated)
    assert error.message == "token signed by an unknown key"


@pytest.mark.parametrize("garbage", ["not-a-token", "pt1.%%%.@@@", "pt1." + "A" * 5000 + ".x", "pt2.e30.AA"])
def test_malformed_tokens_are_unauthenticated(run, tmp_path, garbage):
    _, calls = _refused(run, tmp_path, lambda k: garbage, expected=errors.Unauthenticated)
    assert calls == []


def test_wrong_scheme_is_unauthenticated(run, tmp_path):
    async def scenario():
        async with running_kernel(tmp_path) as k:
            async with grpc.aio.insecure_channel(k.address) as channel:
                echo = channel.unary_unary("/planes.diagnostics.v1.DiagnosticsService/Echo",
                                           request_serializer=pb.EchoRequest.SerializeToString,
                                           response_deserializer=pb.EchoResponse.FromString)
                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    await echo(pb.EchoRequest(), metadata=(("authorization", f"Basic {k.token()}"),))
            return raised.value.code(), raised.value.details(), k.plane.calls

    code, details, calls = run(scenario())
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert "Bearer" in details
    assert calls == []


def test_wrong_tenant_is_permission_denied_and_handler_never_runs(run, tmp_path):
    error, calls = _refused(run, tmp_path, lambda k: k.token(tenant="acme"),
                            pb.EchoRequest(tenant="globex", payload=b"x"), expected=errors.PermissionDenied)
    assert "may not act for tenant 'globex'" in error.message
    assert calls == []


def test_empty_tenant_is_filled_with_the_callers(run, tmp_path):
    async def scenario():
        async with running_kernel(tmp_path) as k:
            reply = await k.client(k.token(tenant="acme")).echo(pb.EchoRequest(payload=b"x"), timeout=5)
            return reply.tenant

    assert run(scenario()) == "acme"


def test_all_tenant_identity_must_name_the_tenant(run, tmp_path):
    error, calls = _refused(run, tmp_path, lambda k: k.token(tenant="*", roles=("admin",)),
                            expected=errors.InvalidArgument)
    assert "tenant is required" in error.message
    assert calls == []


def test_tenant_scope_is_checked_on_every_streamed_message(run, tmp_path):
    async def scenario():
        async with running_kernel(tmp_path) as k:
            client = k.client(k.token(tenant="acme"))

            async def requests():
                yield pb.CollectEchoRequest(tenant="acme", payload=b"ok")
                yield pb.CollectEchoRequest(tenant="globex", payload=b"sneaky")

            with pytest.raises(errors.PermissionDenied) as raised:
                await client.collect_echo(requests(), timeout=5)
            return raised.value

    assert "globex" in run(scenario()).message


def test_health_needs_no_token_but_reflection_does(run, tmp_path):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    async def scenario():
        async with running_kernel(tmp_path) as k:
            async with grpc.aio.insecure_channel(k.address) as channel:
                health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
                stub = reflection_pb2_grpc.ServerReflectionStub(channel)
                request = reflection_pb2.ServerReflectionRequest(list_services="")

                async def one():
                    yield request

                with pytest.raises(grpc.aio.AioRpcError) as anonymous:
                    async for _ in stub.ServerReflectionInfo(one(), timeout=5):
                        pass
                names = []
                async for response in stub.ServerReflectionInfo(
                        one(), timeout=5, metadata=(("authorization", f"Bearer {k.token()}"),)):
                    names = [s.name for s in response.list_services_response.service]
            return health.status, anonymous.value.code(), names

    status, anonymous, names = run(scenario())
    assert status == 1  # SERVING
    assert anonymous == grpc.StatusCode.UNAUTHENTICATED
    assert "planes.diagnostics.v1.DiagnosticsService" in names
    assert "grpc.health.v1.Health" in names

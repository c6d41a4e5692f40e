"""Micro-benchmarks of what the kernel does on every call (pytest-benchmark).

Each group pairs a kernel step with its baseline so the report reads as a ratio:
token check from the cache vs a full Ed25519 verification; admission; error mapping.
"""

from __future__ import annotations

import pytest

from planes.kernel import errors
from planes.kernel.auth import Authenticator
from planes.kernel.contract import PlaneSpec
from planes.kernel.contracts.diagnostics import DiagnosticsPlane, pb
from planes.kernel.guard import CallGuard, MethodGuard
from planes.kernel.tokens import SigningKey, TokenVerifier, issue_token


@pytest.fixture(scope="module")
def setup():
    key = SigningKey.generate()
    token = issue_token(key, principal="bench", tenant="acme", roles=["service"], ttl_seconds=3600)
    verifier = TokenVerifier({key.kid: key.public_key})
    guard = CallGuard(Authenticator(verifier))
    spec = PlaneSpec(DiagnosticsPlane)
    method = MethodGuard.for_rpc(spec.rpcs["echo"], spec.plane, spec.version)
    return key, token, verifier, guard, method


class FakeContext:
    """The three ServicerContext calls admission makes, without a server."""

    def __init__(self, metadata):
        self._metadata = metadata

    def invocation_metadata(self):
        return self._metadata

    def auth_context(self):
        return {}

    def time_remaining(self):
        return None


@pytest.mark.benchmark(group="token")
def test_token_cached(benchmark, setup):
    _, token, verifier, _, _ = setup
    verifier.verify(token)
    benchmark(verifier.verify, token)


@pytest.mark.benchmark(group="token")
def test_token_full_ed25519_verification(benchmark, setup):
    key, token, _, _, _ = setup

    def verify_uncached():
        TokenVerifier({key.kid: key.public_key}, cache_size=1).verify(token)

    benchmark(verify_uncached)


@pytest.mark.benchmark(group="admission")
def test_admit(benchmark, setup):
    _, token, _, guard, method = setup
    context = FakeContext((("authorization", f"Bearer {token}"),
                           ("user-agent", "planes-contract/diagnostics=1.0 grpc-python-asyncio/1.85 grpc-c/58")))
    benchmark(guard.admit, method, context)


@pytest.mark.benchmark(group="admission")
def test_admit_and_scope_tenant(benchmark, setup):
    _, token, _, guard, method = setup
    context = FakeContext((("authorization", f"Bearer {token}"),))
    request = pb.EchoRequest(tenant="acme")

    def admit():
        guard.scope_tenant(request, guard.admit(method, context).identity)

    benchmark(admit)


@pytest.mark.benchmark(group="errors")
def test_error_to_status(benchmark):
    benchmark(errors.to_status, errors.LimitExceeded("chunk_bytes", 1024, 2048, retry_after=1.0))


@pytest.mark.benchmark(group="errors")
def test_error_from_status(benchmark):
    code, message, trailers = errors.to_status(errors.LimitExceeded("chunk_bytes", 1024, 2048, retry_after=1.0))
    benchmark(errors.from_status, code, message, trailers)

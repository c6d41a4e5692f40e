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

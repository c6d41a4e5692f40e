"""The plugin author's guide's example runs as documented."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from planes.kernel import LimitExceeded, Settings, connect
from planes.kernel.contracts.diagnostics import DiagnosticsPlane, pb
from planes.kernel.host import Candidate, PluginHost
from planes.kernel.kernel import Kernel
from planes.kernel.server import KernelServer
from planes.kernel.settings import ServerSettings
from planes.kernel.tokens import issue_token

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "examples" / "quota_echo.py"


@pytest.fixture
def example():
    spec = importlib.util.spec_from_file_location("quota_echo", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # as an import would: dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_quota_echo_plugin_over_grpc(run, tmp_path, example):
    async def scenario():
        settings = Settings(state_dir=tmp_path, server=ServerSettings(bind="127.0.0.1:0"),
                            plugin={"quota-echo": {"max_bytes": 10}})
        plugin = example.QuotaEchoPlugin()
        kernel = Kernel(settings, PluginHost.load(settings, [Candidate(plugin.name, "test", plugin)])).open()
        server = KernelServer(kernel)
        port = await server.start()
        tokens = {tenant: issue_token(kernel.signing_key, principal="svc", tenant=tenant, roles=["service"],
                                      ttl_seconds=60) for tenant in ("acme", "globex")}
        acme = connect(f"127.0.0.1:{port}", DiagnosticsPlane, token=tokens["acme"])
        globex = connect(f"127.0.0.1:{port}", DiagnosticsPlane, token=tokens["globex"])
        try:
            under = await acme.echo(pb.EchoRequest(payload=b"x" * 9), timeout=5)
            with pytest.raises(LimitExceeded) as over:
                await acme.echo(pb.EchoRequest(payload=b"yy"), timeout=5)
            exact = await acme.echo(pb.EchoRequest(payload=b"z"), timeout=5)
            other = await globex.echo(pb.EchoRequest(payload=b"w" * 10), timeout=5)
            return under, over.value, exact, other, dict(plugin.plane.used)
        finally:
            await acme.close()
            await globex.close()
            await server.stop(grace=1)

    under, over, exact, other, used = run(scenario())
    assert under.payload == b"x" * 9 and under.tenant == "acme"
    assert (over.name, over.limit, over.actual) == ("echo_bytes", 10, 11)
    assert exact.payload == b"z", "a payload that reaches the limit exactly passes"
    assert other.tenant == "globex"
    assert used == {"acme": 10, "globex": 10}, "the refused payload was not charged"

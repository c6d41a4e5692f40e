"""SIGKILL of a serving kernel in the middle of a put: what was acknowledged survives, the partial put vanishes."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from planes.kernel import errors
from planes.kernel.clients import connect
from planes.kernel.contracts import DataPlane
from planes.kernel.tokens import SigningKey, issue_token
from planes.plugins.data.client import DataClient
from tests.conftest import serve_env, start_serve, stop_serve

MiB = 1 << 20


@pytest.mark.slow
def test_kill_during_a_put_keeps_acknowledged_payloads_and_drops_the_partial_one(run, tmp_path):
    env = serve_env(tmp_path)
    port = int(env["PLANES_SERVER__BIND"].rsplit(":", 1)[1])
    server = start_serve(env)
    key, _ = SigningKey.load_or_create(tmp_path / "keys" / "kernel-signing.pem")
    token = issue_token(key, principal="svc", tenant="acme", roles=["service"], ttl_seconds=600)
    kept_bytes = os.urandom(3 * MiB)

    async def before_kill():
        client = connect(f"127.0.0.1:{port}", DataPlane, token=token)
        data = DataClient(client, "acme", chunk_bytes=64 * 1024)
        kept = await data.put(kept_bytes, classification="confidential")
        big = bytes(512 * MiB)
        incoming = tmp_path / "data" / "incoming"

        async def watch():
            # Kill the server once the big payload is being written.
            while not os.listdir(incoming) and not put.done():
                await asyncio.sleep(0.005)
            await asyncio.sleep(0.1)
            server.send_signal(signal.SIGKILL)

        put = asyncio.ensure_future(data.put(big, classification="internal", chunk_bytes=MiB, timeout=60))
        killer = asyncio.ensure_future(watch())
        with pytest.raises(errors.PlanesError):
            await put
        await killer
        await client.close()
        return kept

    kept = run(before_kill())
    server.wait(timeout=30)
    incoming_at_kill = os.listdir(tmp_path / "data" / "incoming")
    server = start_serve(env)
    try:
        async def after_restart():
            client = connect(f"127.0.0.1:{port}", DataPlane, token=token)
            try:
                data = DataClient(client, "acme")
                return await data.get_bytes(kept.ref.payload_id, verify=True)
            finally:
                await client.close()

        assert run(after_restart()) == kept_bytes, "the acknowledged payload survives"
        assert incoming_at_kill, "the kill landed in the middle of the put"
        assert os.listdir(tmp_path / "data" / "incoming") == [], "the partial put is removed at start"
        assert sorted(os.listdir(tmp_path / "data" / "objects")) == [kept.ref.payload_id]
    finally:
        stop_serve(server)

"""A server that ends a request stream early is heard: its status, not grpc.aio's failed write.

grpc.aio overwrites the status of a client-streaming call with ``INTERNAL:
Internal error from Core`` when a write is still in flight as the server's
status arrives (grpc/grpc#36066), about four times in five with 1 MiB
messages on loopback. The remote client keeps the server's status.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest

from planes.kernel import errors
from planes.kernel.clients import connect
from planes.kernel.contracts.diagnostics import DiagnosticsPlane, pb

SERVICE = "planes.diagnostics.v1.DiagnosticsService"
MIB = 1 << 20
ATTEMPTS = 40


async def _refuse_after_first(requests, context):
    async for _ in requests:
        break
    code, message, trailers = errors.to_status(errors.Unavailable("no room for 16777216 bytes", retry_after=7.0))
    await context.abort(code, message, trailers)


async def _count(requests, context):
    messages = size = 0
    async for request in requests:
        messages += 1
        size += len(request.payload)
    return pb.CollectEchoResponse(messages=messages, bytes=size)


async def _serve(collect):
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 8 * MIB)])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {
        "CollectEcho": grpc.stream_unary_rpc_method_handler(
            collect, pb.CollectEchoRequest.FromString, pb.CollectEchoResponse.SerializeToString)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


async def _chunks(count: int, size: int = MIB):
    for _ in range(count):
        yield pb.CollectEchoRequest(payload=bytes(size))


def test_an_early_refusal_reaches_the_client_with_its_type_and_message(run):
    async def scenario():
        server, port = await _serve(_refuse_after_first)
        client = connect(f"127.0.0.1:{port}", DiagnosticsPlane, token="t")
        seen = []
        try:
            for _ in range(ATTEMPTS):
                with pytest.raises(errors.PlanesError) as raised:
                    await client.collect_echo(_chunks(16), timeout=20)
                seen.append(raised.value)
        finally:
            await client.close()
            await server.stop(0)
        return seen

    seen = run(scenario())
    kinds = {(type(error).__name__, error.message) for error in seen}
    assert kinds == {("Unavailable", "no room for 16777216 bytes")}
    assert {error.retry_after for error in seen} == {7.0}


def test_a_stream_the_server_reads_whole_still_succeeds(run):
    async def scenario():
        server, port = await _serve(_count)
        client = connect(f"127.0.0.1:{port}", DiagnosticsPlane, token="t")
        try:
            return await client.collect_echo(_chunks(8), timeout=20)
        finally:
            await client.close()
            await server.stop(0)

    reply = run(scenario())
    assert (reply.messages, reply.bytes) == (8, 8 * MIB)


def test_a_client_that_cancels_still_sees_cancelled(run):
    async def slow(requests, context):
        await asyncio.sleep(30)

    async def scenario():
        server, port = await _serve(slow)
        client = connect(f"127.0.0.1:{port}", DiagnosticsPlane, token="t")
        try:
            with pytest.raises(errors.DeadlineExceeded):
                await client.collect_echo(_chunks(2), timeout=0.5)
        finally:
            await client.close()
            await server.stop(0)

    run(scenario())

"""Correlation ids and W3C trace context reach every handler and come back to the caller."""

from __future__ import annotations

import grpc
import pytest

from planes.kernel.call import TraceContext
from planes.kernel.contracts.diagnostics import pb
from tests.conftest import running_kernel

WHO = "/planes.diagnostics.v1.DiagnosticsService/WhoAmI"
ECHO = "/planes.diagnostics.v1.DiagnosticsService/Echo"


async def _raw_call(k, path, request, response_type, metadata):
    async with grpc.aio.insecure_channel(k.address) as channel:
        method = channel.unary_unary(path, request_serializer=type(request).SerializeToString,
                                     response_deserializer=response_type.FromString)
        call = method(request, metadata=(("authorization", f"Bearer {k.token()}"), *metadata), timeout=5)
        reply = await call
        return reply, dict(await call.trailing_metadata())


def test_incoming_trace_and_correlation_reach_the_handler(run, tmp_path):
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"

    async def scenario():
        async with running_kernel(tmp_path) as k:
            return await _raw_call(k, WHO, pb.WhoAmIRequest(), pb.WhoAmIResponse,
                                   (("traceparent", parent), ("x-correlation-id", "order-1234"),
                                    ("x-request-id", "req-9")))

    reply, trailers = run(scenario())
    assert reply.correlation.trace_id == "0af7651916cd43dd8448eb211c80319c"
    assert reply.correlation.span_id not in ("b7ad6b7169203331", "")
    assert reply.correlation.correlation_id == "order-1234"
    assert reply.correlation.request_id == "req-9"
    assert "x-correlation-id" not in trailers, "a correlation id the caller chose is not echoed back"


@pytest.mark.parametrize("bad", ["garbage", "00-zz-yy-01", "00-" + "0" * 32 + "-b7ad6b7169203331-01", "ff-a-b-c",
                                 # int(x, 16) takes these; the W3C format does not, and the id reaches evidence
                                 "00-1_2222222222222222222222222222222-b7ad6b7169203331-01",
                                 "00-+0af7651916cd43dd8448eb211c80319-b7ad6b7169203331-01",
                                 "00- 0af7651916cd43dd8448eb211c80319-b7ad6b7169203331-01",
                                 "00-0af7651916cd43dd8448eb211c80319c-b7ad6b71692033_1-01"])
def test_malformed_traceparent_starts_a_new_trace(run, tmp_path, bad):
    async def scenario():
        async with running_kernel(tmp_path) as k:
            return await _raw_call(k, WHO, pb.WhoAmIRequest(), pb.WhoAmIResponse, (("traceparent", bad),))

    reply, _ = run(scenario())
    assert len(reply.correlation.trace_id) == 32 and reply.correlation.trace_id != "0" * 32
    assert reply.correlation.correlation_id == reply.correlation.trace_id, "a new correlation starts with the trace"


def test_failed_call_returns_its_correlation_id(run, tmp_path):
    async def scenario():
        async with running_kernel(tmp_path) as k:
            async with grpc.aio.insecure_channel(k.address) as channel:
                echo = channel.unary_unary(ECHO, request_serializer=pb.EchoRequest.SerializeToString,
                                           response_deserializer=pb.EchoResponse.FromString)
                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    await echo(pb.EchoRequest(tenant="acme", payload=b"missing"), timeout=5,
                               metadata=(("authorization", f"Bearer {k.token()}"),
                                         ("x-correlation-id", "order-77")))
                with pytest.raises(grpc.aio.AioRpcError) as anonymous:
                    await echo(pb.EchoRequest(tenant="acme", payload=b"missing"), timeout=5,
                               metadata=(("authorization", f"Bearer {k.token()}"),))
            return dict(raised.value.trailing_metadata()), dict(anonymous.value.trailing_metadata())

    chosen, made = run(scenario())
    assert chosen["x-correlation-id"] == "order-77"
    assert len(made["x-correlation-id"]) == 32


def test_oversized_correlation_id_is_replaced(run, tmp_path):
    async def scenario():
        async with running_kernel(tmp_path) as k:
            return await _raw_call(k, WHO, pb.WhoAmIRequest(), pb.WhoAmIResponse, (("x-correlation-id", "x" * 500),))

    reply, _ = run(scenario())
    assert reply.correlation.correlation_id != "x" * 500 and len(reply.correlation.correlation_id) == 32


def test_malformed_contract_header_is_invalid_argument(run, tmp_path):
    async def scenario():
        async with running_kernel(tmp_path) as k:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await _raw_call(k, ECHO, pb.EchoRequest(tenant="acme"), pb.EchoResponse,
                                (("x-planes-contract", "one"),))
            return raised.value, k.plane.calls

    error, calls = run(scenario())
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert calls == []


def test_deadline_reaches_the_handler(run, tmp_path):
    async def scenario():
        async with running_kernel(tmp_path) as k:
            return await k.client(k.token()).who_am_i(pb.WhoAmIRequest(), timeout=3)

    # gRPC rounds the grpc-timeout header up, so the handler may see a little more than 3 s.
    assert 2 < run(scenario()).deadline_seconds < 3.5


def test_trace_context_header_round_trip():
    parsed = TraceContext.parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    assert parsed.sampled and parsed.header() == "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    assert TraceContext.parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra") is None
    # A future version may append fields; they are ignored, as the spec asks.
    assert TraceContext.parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-extra") is not None


def test_calls_made_while_acting_for_a_request_carry_its_correlation(run, tmp_path):
    from planes.kernel.call import acting_for
    from planes.kernel.contracts.diagnostics import pb as dpb
    from planes.kernel.identity import Identity
    from tests.conftest import running_kernel

    trace = "4bf92f3577b34da6a3ce929d0e0e4736"

    async def scenario():
        async with running_kernel(tmp_path) as k:
            client = k.client(k.token())
            with acting_for(Identity("worker", "acme", frozenset()), "task-corr-1", request_id="req-9", trace_id=trace):
                inside = await client.who_am_i(dpb.WhoAmIRequest(), timeout=5)
            outside = await client.who_am_i(dpb.WhoAmIRequest(), timeout=5)
            return inside.correlation, outside.correlation

    inside, outside = run(scenario())
    assert (inside.correlation_id, inside.request_id, inside.trace_id) == ("task-corr-1", "req-9", trace)
    assert outside.correlation_id not in ("", "task-corr-1")

"""In-process and remote plane clients behave the same, errors included."""

from __future__ import annotations

import asyncio

import pytest

from planes.kernel import errors
from planes.kernel.contracts.diagnostics import DiagnosticsPlane, pb
from planes.kernel.identity import Identity
from tests.conftest import running_kernel


@pytest.fixture(params=["in-process", "remote"])
def mode(request):
    return request.param


def _client(k, mode, *, tenant="acme", roles=("service",)):
    if mode == "remote":
        return k.client(k.token(tenant=tenant, roles=roles))
    identity = Identity(principal="svc", tenant=tenant, roles=frozenset(roles), source="token")
    return k.kernel.client(DiagnosticsPlane, identity=identity)


def test_unary_stream_and_client_stream_results_match(run, tmp_path, mode):
    async def scenario():
        async with running_kernel(tmp_path) as k:
            client = _client(k, mode)
            echoed = await client.echo(pb.EchoRequest(payload=b"\x00abc"), timeout=5)
            streamed = [r.index async for r in client.stream_echo(pb.StreamEchoRequest(payload=b"p", count=4))]

            async def requests():
                for size in (1, 2, 3):
                    yield pb.CollectEchoRequest(payload=b"x" * size)

            collected = await client.collect_echo(requests(), timeout=5)
            return echoed, streamed, collected

    echoed, streamed, collected = run(scenario())
    assert (echoed.tenant, echoed.payload) == ("acme", b"\x00abc")
    assert streamed == [0, 1, 2, 3]
    assert (collected.messages, collected.bytes) == (3, 6)


def test_not_found_is_the_same_exception(run, tmp_path, mode):
    async def scenario():
        async with running_kernel(tmp_path) as k:
            with pytest.raises(errors.NotFound) as raised:
                await _client(k, mode).echo(pb.EchoRequest(payload=b"missing"), timeout=5)
            return raised.value

    error = run(scenario())
    assert error == errors.NotFound("payload ref-1 not found")


def test_limit_error_carries_limit_actual_and_retry(run, tmp_path, mode):
    async def scenario():
        async with running_kernel(tmp_path) as k:
            with pytest.raises(errors.LimitExceeded) as raised:
                await _client(k, mode).echo(pb.EchoRequest(payload=b"too-big"), timeout=5)
            return raised.value

    error = run(scenario())
    assert (error.name, error.limit, error.actual, error.retry_after) == ("chunk_bytes", 1024, 1025, 2.5)


def test_error_in_the_middle_of_a_stream(run, tmp_path, mode):
    async def scenario():
        async with running_kernel(tmp_path) as k:
            seen = []
            with pytest.raises(errors.NotFound):
                async for reply in _client(k, mode).stream_echo(pb.StreamEchoRequest(payload=b"missing", count=5)):
                    seen.append(reply.index)
            return seen

    assert run(scenario()) == [0, 1]


def test_unexpected_exception_is_internal_and_hides_its_text(run, tmp_path, mode, caplog):
    async def scenario():
        async with running_kernel(tmp_path) as k:
            with pytest.raises(errors.Internal) as raised:
                await _client(k, mode).echo(pb.EchoRequest(payload=b"crash:s3cr3t-payload"), timeout=5)
            return raised.value

    error = run(scenario())
    assert "s3cr3t" not in error.message
    assert "internal error in /planes.diagnostics.v1.DiagnosticsService/Echo" in error.message


@pytest.mark.parametrize("payload", [b"disk-full", b"sqlite-full"])
def test_a_full_disk_is_unavailable_with_a_retry_not_an_internal_error(run, tmp_path, mode, payload):
    async def scenario():
        async with running_kernel(tmp_path) as k:
            with pytest.raises(errors.Unavailable) as raised:
                await _client(k, mode).echo(pb.EchoRequest(payload=payload), timeout=5)
            return raised.value

    error = run(scenario())
    assert error.message == ("the server's storage is full: /planes.diagnostics.v1.DiagnosticsService/Echo stored "
                             "nothing; retry once its operator has freed space")
    assert error.retry_after == 30.0


def test_deadline_is_honoured(run, tmp_path, mode):
    async def scenario():
        async with running_kernel(tmp_path) as k:
            with pytest.raises(errors.DeadlineExceeded):
                await _client(k, mode).echo(pb.EchoRequest(payload=b"slow:2"), timeout=0.2)
            return list(k.plane.finished)

    assert run(scenario()) == [], "the handler was cancelled at the deadline, not run to the end"


def test_a_stream_past_its_deadline_is_deadline_exceeded_while_the_caller_works_between_items(run, tmp_path, mode):
    """Local and remote alike: the caller's own work between items does not turn into its task's cancellation."""
    async def scenario():
        async with running_kernel(tmp_path) as k:
            seen = []
            with pytest.raises(errors.DeadlineExceeded):
                async for reply in _client(k, mode).stream_echo(pb.StreamEchoRequest(payload=b"p", count=50),
                                                                timeout=0.5):
                    seen.append(reply.index)
                    await asyncio.sleep(0.2)  # the caller's work, not the plane's
            return seen, asyncio.current_task().cancelling()

    seen, cancelling = run(scenario())
    assert 0 < len(seen) < 50 and cancelling == 0


def test_an_abandoned_stream_does_not_cancel_the_callers_later_work(run, tmp_path, mode):
    async def scenario():
        async with running_kernel(tmp_path) as k:
            stream = _client(k, mode).stream_echo(pb.StreamEchoRequest(payload=b"p", count=50), timeout=0.3)
            async for _ in stream:
                break  # stop reading, keep the generator
            await asyncio.sleep(0.6)  # past the stream's deadline: unrelated work must finish
            await stream.aclose()
            return "finished"

    assert run(scenario()) == "finished"


def test_wrong_tenant_refused_before_the_handler(run, tmp_path, mode):
    async def scenario():
        async with running_kernel(tmp_path) as k:
            with pytest.raises(errors.PermissionDenied):
                await _client(k, mode, tenant="acme").echo(pb.EchoRequest(tenant="globex"), timeout=5)
            return k.plane.calls

    assert run(scenario()) == []


def test_in_process_calls_inherit_correlation_and_trace(run, tmp_path):
    """A plane serving a remote call that calls another plane in-process keeps the correlation."""
    from planes.kernel.call import CallContext, TraceContext, _reset_current, _set_current

    async def scenario():
        async with running_kernel(tmp_path) as k:
            ambient = CallContext(Identity("caller", "acme", frozenset({"service"})), "corr-42",
                                  TraceContext("a" * 32, "b" * 16), request_id="req-7")
            token = _set_current(ambient)
            try:
                reply = await k.kernel.client(DiagnosticsPlane).who_am_i(pb.WhoAmIRequest(), timeout=5)
            finally:
                _reset_current(token)
            return reply

    reply = run(scenario())
    assert reply.correlation.correlation_id == "corr-42"
    assert reply.correlation.request_id == "req-7"
    assert reply.correlation.trace_id == "a" * 32
    assert reply.correlation.span_id != "b" * 16
    assert reply.principal == "kernel"


def test_pre_encoded_responses_arrive_as_messages(run, tmp_path, mode):
    """A handler may return wire bytes (Encoded); every caller still gets the message."""
    async def scenario():
        async with running_kernel(tmp_path) as k:
            client = _client(k, mode)
            reply = await client.echo(pb.EchoRequest(payload=b"pre-encoded"), timeout=5)
            streamed = [r async for r in client.stream_echo(pb.StreamEchoRequest(payload=b"pre-encoded", count=3))]
            return reply, streamed

    reply, streamed = run(scenario())
    assert isinstance(reply, pb.EchoResponse) and (reply.tenant, reply.payload) == ("acme", b"pre-encoded")
    assert [type(r) for r in streamed] == [pb.StreamEchoResponse] * 3
    assert [r.index for r in streamed] == [0, 1, 2]

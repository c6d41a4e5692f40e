"""Puts in progress are bounded: per tenant, per process, and in how long a producer may stay silent.

A put that stalls must not pin threads, files or budgets: over a limit it is
refused before it costs any; silent for ``put_idle_seconds`` it is aborted and
everything it held comes back. A put given up before any byte is recorded as
abandoned, not quarantined.
"""

from __future__ import annotations

import asyncio
import re
import threading

import blake3
import pytest

from planes.data.v1 import data_service_pb2 as pb
from planes.kernel import errors
from planes.kernel.errors import SettingsError
from planes.plugins.data.limits import DataSettings

from .conftest import fields
from .test_admission import chunk, header, nothing_left, put_raw, trailer

DATA = bytes(range(250)) * 4


class Producer:
    """A put whose stream sends its header, then waits to be told to go on (or to stall for good)."""

    def __init__(self, client, *, tenant="acme", first=(), digest: bytes | None = None):
        self.go = asyncio.Event()
        self.first = first

        async def stream():
            yield header(len(DATA), tenant=tenant, digest=digest)
            for message in first:
                yield message
            await self.go.wait()
            yield chunk(DATA[500:], 500) if first else chunk(DATA, 0)
            yield trailer(DATA)
        self.task = asyncio.create_task(client.wire("put_payload")(stream(), timeout=30))

    async def finish(self) -> pb.PutPayloadResponse:
        self.go.set()
        return pb.PutPayloadResponse.FromString(await self.task)


async def until(condition, what: str, *, seconds: float = 20.0) -> None:
    """Wait for ``condition()``; the bound only turns a hang into a failure, it measures no speed."""
    async with asyncio.timeout(seconds):
        while not condition():
            await asyncio.sleep(0.01)
    assert condition(), what


def lanes() -> int:
    return sum(thread.name.startswith("data-put-") for thread in threading.enumerate())


def in_progress(served, tenant="acme") -> int:
    return served.plugin.plane._puts.get(tenant, 0)


async def refused_or_stored(client, data=DATA, tenant="acme"):
    try:
        response = await put_raw(client, header(len(data), tenant=tenant), chunk(data, 0), trailer(data))
        return response.payload.ref.size
    except errors.LimitExceeded as exc:
        return exc.name, exc.limit, exc.actual, exc.retry_after


def test_concurrent_puts_per_tenant_at_limit_minus_one_limit_and_plus_one(serve):
    async def scenario(served):
        client = served.remote()
        held = [Producer(client) for _ in range(2)]
        await until(lambda: in_progress(served) == 2, "two puts held open")
        # The third put in progress (the limit) goes through beside the two held open.
        third = await refused_or_stored(client)
        held.append(Producer(client))
        await until(lambda: in_progress(served) == 3, "three puts held open")
        fourth = await refused_or_stored(client)
        other_tenant = await refused_or_stored(served.remote(tenant="globex"), tenant="globex")
        stored = [(await p.finish()).payload.ref.size for p in held]
        after = await refused_or_stored(client)
        return third, fourth, other_tenant, stored, after, dict(served.plugin.plane._puts)

    third, fourth, other_tenant, stored, after, left = serve(scenario, data_settings={"max_concurrent_puts": 3})
    assert third == len(DATA), "the limit-th concurrent put is stored"
    assert fourth == ("tenant concurrent puts", 3, 4, 1.0), "limit+1 is refused with the numbers and a retry hint"
    assert other_tenant == len(DATA), "another tenant's puts are counted apart"
    assert stored == [len(DATA)] * 3, "the held puts, released, are stored whole"
    assert after == len(DATA) and left == {}, "the slots come back when the puts end"


def test_concurrent_puts_in_the_process_are_bounded_over_all_tenants(serve):
    async def scenario(served):
        acme, globex = served.remote(), served.remote(tenant="globex")
        held = [Producer(acme), Producer(globex, tenant="globex")]
        await until(lambda: served.plugin.plane._puts_total == 2, "two puts held open")
        at_limit = await refused_or_stored(globex, tenant="globex")
        held.append(Producer(globex, tenant="globex"))
        await until(lambda: served.plugin.plane._puts_total == 3, "three puts held open")
        over = await refused_or_stored(acme)
        for producer in held:
            await producer.finish()
        return at_limit, over, served.plugin.plane._puts_total

    at_limit, over, left = serve(scenario, data_settings={"max_concurrent_puts_total": 3})
    assert at_limit == len(DATA)
    assert over == ("concurrent puts", 3, 4, 1.0)
    assert left == 0


def test_a_refused_put_leaves_nothing_and_starts_no_thread(serve):
    async def scenario(served):
        client = served.remote()
        held = Producer(client)
        await until(lambda: in_progress(served) == 1, "one put held open")
        before = threading.active_count()
        with pytest.raises(errors.LimitExceeded):
            await put_raw(client, header(len(DATA)), chunk(DATA, 0), trailer(DATA))
        threads = threading.active_count()
        held.task.cancel()
        await until(lambda: in_progress(served) == 0, "the held put ends")
        return before, threads

    before, threads = serve(scenario, data_settings={"max_concurrent_puts": 1})
    assert threads == before


def test_a_silent_producer_is_aborted_and_everything_it_held_comes_back(serve):
    async def scenario(served):
        client = served.remote()
        await refused_or_stored(client)
        plane = served.plugin.plane
        # Stalled after its header: counted, but holding no thread.
        header_only = Producer(client)
        await until(lambda: in_progress(served) == 1, "the header-only put admitted")
        lanes_header_only = lanes()
        with pytest.raises(errors.DeadlineExceeded) as idle_header:
            await header_only.task
        # Stalled after a chunk: two lane threads and half the bytes, until the idle time runs out.
        baseline = threading.active_count()
        half = Producer(client, first=(chunk(DATA[:500], 0),))
        await until(lambda: lanes() == 2, "the lanes started")
        threads_stalled = threading.active_count()
        with pytest.raises(errors.DeadlineExceeded) as idle_chunk:
            await half.task
        await until(lambda: threading.active_count() == baseline, "the lanes ended")
        held = dict(plane._puts), plane._puts_total, dict(plane._reserved), plane.tenant_budget("acme").used
        assert list((served.state_dir / "data" / "incoming").iterdir()) == [], "no partial file left"
        assert len(list((served.state_dir / "data" / "objects").iterdir())) == 1, "only the first put's object"
        quarantined = await served.remote(roles=("operator",)).list_quarantine(pb.ListQuarantineRequest(tenant="acme"))
        normal = await refused_or_stored(client)
        return (lanes_header_only, threads_stalled - baseline, idle_header.value, idle_chunk.value, held,
                quarantined, normal, await served.events())

    (lanes_header_only, threads_stalled, idle_header, idle_chunk, held, quarantined, normal,
     events) = serve(scenario, data_settings={"put_idle_seconds": 0.5})
    assert lanes_header_only == 0, "a put that has sent no chunk holds no thread"
    assert threads_stalled == 2, "a put stalled after a chunk holds its two lanes, until the idle time ends it"
    for refused, received in ((idle_header, 0), (idle_chunk, 500)):
        assert re.fullmatch(r"payload pl_[0-9a-f]{32} abandoned: PutPayload sent nothing for 0\.5 s .*", refused.message)
        assert f"{received} of {len(DATA)} bytes received" in refused.message
    assert held == ({}, 0, {"acme": 0}, 0), "slots, quota reservation and in-flight bytes all given back"
    assert list(quarantined.payloads) == [], "an abandoned put is not a payload to review"
    assert normal == len(DATA), "puts after the aborted ones are unaffected"
    abandoned = [fields(e) for e in events if e.event_type == "data.abandoned"]
    # (The kernel's client drops the details of a DEADLINE_EXCEEDED status, so the id is read from the message.)
    assert [(a["payload_id"], a["received"]) for a in abandoned] == [
        (idle_header.message.split()[1], "0"), (idle_chunk.message.split()[1], "500")]
    assert all(a["reason"] == "the producer sent nothing for 0.5 s" for a in abandoned)
    assert [e.event_type for e in events].count("data.stored") == 2


def test_a_producer_silent_before_its_header_is_aborted(serve):
    async def scenario(served):
        async def nothing():
            await asyncio.Event().wait()
            yield header(1)
        with pytest.raises(errors.DeadlineExceeded, match="no header in 0.5 s"):
            await served.remote().wire("put_payload")(nothing(), timeout=30)
        return served.plugin.plane._puts_total

    assert serve(scenario, data_settings={"put_idle_seconds": 0.5}) == 0


def test_a_put_ended_or_cancelled_before_any_byte_is_abandoned_not_quarantined(serve):
    async def scenario(served):
        client = served.remote()
        with pytest.raises(errors.InvalidArgument, match="abandoned") as ended:
            await put_raw(client, header(len(DATA)), trailer(DATA))
        cancelled = Producer(client)
        await until(lambda: in_progress(served) == 1, "the put admitted")
        cancelled.task.cancel()
        await until(lambda: in_progress(served) == 0, "the cancelled put ends")
        incoming = served.state_dir / "data" / "incoming"
        await until(lambda: not any(incoming.iterdir()), "its partial file removed")
        nothing_left(served)
        quarantined = await served.remote(roles=("operator",)).list_quarantine(pb.ListQuarantineRequest(tenant="acme"))
        for _ in range(100):  # the cancelled put's evidence is recorded after its call ended
            events = await served.events()
            if len([e for e in events if e.event_type == "data.abandoned"]) == 2:
                break
            await asyncio.sleep(0.05)
        return ended.value, quarantined, events

    ended, quarantined, events = serve(scenario)
    assert "before any of its 1000 declared bytes" in ended.message
    assert list(quarantined.payloads) == []
    abandoned = [fields(e) for e in events if e.event_type == "data.abandoned"]
    assert len(abandoned) == 2 and abandoned[0]["payload_id"] == ended.metadata["payload_id"]
    assert all(a["received"] == "0" and a["declared_size"] == "1000" for a in abandoned)
    assert not any(e.event_type == "data.quarantined" for e in events)


@pytest.mark.parametrize("digest_in_header", [False, True], ids=["digest-in-trailer", "digest-in-header"])
def test_a_put_cancelled_after_some_chunks_is_abandoned_not_lost_or_quarantined(serve, digest_in_header):
    async def scenario(served):
        plane = served.plugin.plane
        decoded = asyncio.Event()
        decode = plane._decode

        def watched(value):  # observes the plane receiving the chunk; changes nothing
            result = decode(value)
            decoded.set()
            return result

        plane._decode = watched
        cancelled = Producer(served.remote(), first=(chunk(DATA[:500], 0),),
                             digest=blake3.blake3(DATA).digest() if digest_in_header else None)
        await asyncio.wait_for(decoded.wait(), 20)
        await asyncio.sleep(0.1)  # let the chunk reach its lanes; the outcome must not depend on it
        cancelled.task.cancel()
        await until(lambda: in_progress(served) == 0, "the cancelled put ends")
        incoming = served.state_dir / "data" / "incoming"
        await until(lambda: not any(incoming.iterdir()), "its partial file removed")
        nothing_left(served)
        for _ in range(200):  # the cancelled put's evidence is recorded after its call ended
            events = await served.events()
            if any(e.event_type == "data.abandoned" for e in events):
                break
            await asyncio.sleep(0.05)
        quarantined = await served.remote(roles=("operator",)).list_quarantine(pb.ListQuarantineRequest(tenant="acme"))
        return quarantined, events

    quarantined, events = serve(scenario)
    abandoned = [fields(e) for e in events if e.event_type == "data.abandoned"]
    assert len(abandoned) == 1
    assert abandoned[0]["received"] == "500" and abandoned[0]["chunks"] == "1"
    assert abandoned[0]["declared_size"] == "1000"
    # gRPC ends a cancelled call's request stream before it cancels the handler: with the digest still
    # to come in the trailer, the put is refused for lacking one; with it in the header, the
    # cancellation reaches the put while its bytes are being stored.
    assert abandoned[0]["reason"] == ("the call was cancelled" if digest_in_header else
                                      "the stream ended without a declared content digest, after 500 of 1000 bytes")
    assert list(quarantined.payloads) == []
    assert not any(e.event_type in ("data.quarantined", "data.stored") for e in events)


@pytest.mark.parametrize("setting, value", [
    ("max_concurrent_puts", 0), ("max_concurrent_puts_total", -1), ("put_idle_seconds", 0),
    ("put_idle_seconds", "30"),
])
def test_put_limit_settings_are_checked(setting, value):
    with pytest.raises(SettingsError, match=setting):
        DataSettings.from_mapping({setting: value})


def test_put_limit_defaults():
    made = DataSettings.from_mapping({})
    assert (made.max_concurrent_puts, made.max_concurrent_puts_total, made.put_idle_seconds) == (16, 256, 30.0)

"""A get's receive budget: messages small enough that what gRPC holds beside the payload stays bounded."""

from __future__ import annotations

import os

from planes.native import load
from planes.plugins.data.client import HELD_MESSAGES, MIN_GET_MESSAGE

codec = load("codec")

MiB = 1 << 20


def _recording(data):
    """Wrap the client's wire Get so each received chunk's size is recorded."""
    sizes, real = [], data._get

    def get(request, **options):
        async def stream():
            async for raw in real(request, **options):
                if sizes or raw[:1] == b"\x12":  # the chunks, not the leading info message
                    sizes.append(codec.decode_chunk(raw, max_chunk_bytes=64 * MiB)[1].size)
                yield raw
        return stream()
    data._get = get
    return sizes


def test_a_budget_bounds_the_message_size_asked_for_and_the_payload_arrives_whole(serve):
    payload = os.urandom(4 * MiB + 123)

    async def scenario(served):
        bounded = served.data(receive_budget_bytes=8 * MiB)
        unbounded = served.data(receive_budget_bytes=0)
        info = await bounded.put(payload, classification="internal", chunk_bytes=4 * MiB)
        sizes = _recording(bounded), _recording(unbounded)
        got = [(await client.get(info.ref.payload_id, chunk_bytes=4 * MiB, verify=True))[1].to_pybytes()
               for client in (bounded, unbounded)]
        return sizes, got

    (bounded, unbounded), got = serve(scenario)
    assert got == [payload, payload]
    assert max(bounded) == 8 * MiB // HELD_MESSAGES and sum(bounded) == len(payload), \
        "within an 8 MiB budget a get asks for small messages, whatever chunk_bytes says"
    assert max(unbounded) == 4 * MiB and len(unbounded) == 2, "without a budget it asks for chunk_bytes"


def test_the_default_budget_leaves_chunks_up_to_4_mib_alone_and_caps_larger_ones(serve):
    async def scenario(served):
        data = served.data()
        return data.get_message_bytes(), data.get_message_bytes(4 * MiB), data.get_message_bytes(16 * MiB)

    assert serve(scenario) == (MiB, 4 * MiB, 64 * MiB // HELD_MESSAGES)


def test_a_tiny_budget_still_asks_for_useful_messages(serve):
    async def scenario(served):
        return served.data(receive_budget_bytes=1024).get_message_bytes(4 * MiB)

    assert serve(scenario) == MIN_GET_MESSAGE

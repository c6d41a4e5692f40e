"""Evidence appends per second: in-process batched, gRPC streaming batches, gRPC unary.

Every append is durable when acknowledged (SQLite WAL, synchronous=FULL, one
transaction per batch). Events carry two fields (a 64-byte string and a
32-byte digest), so each costs three commitments, a leaf hash and a chain hash.

    python -m bench.evidence_append [--events 100000] [--batch 1000] [--unary 2000]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from planes.common.v1 import common_pb2
from planes.evidence.v1 import evidence_service_pb2 as pb
from planes.kernel.clients import connect
from planes.kernel.contracts import EvidencePlane
from planes.kernel.host import Candidate, PluginHost
from planes.kernel.identity import Identity
from planes.kernel.kernel import Kernel
from planes.kernel.runtime import run
from planes.kernel.server import KernelServer
from planes.kernel.settings import ServerSettings, Settings
from planes.kernel.tokens import issue_token
from planes.plugins.evidence import EvidencePlugin, open_log


def make_events(prefix: str, count: int) -> list[pb.Event]:
    events = []
    for index in range(count):
        event = pb.Event(event_id=f"{prefix}-{index}", event_type="tool.invoked",
                         correlation=common_pb2.Correlation(correlation_id=f"c-{index // 10}"))
        event.fields.add(name="tool", string_value="x" * 64)
        event.fields.add(name="payload_digest", bytes_value=bytes(32))
        events.append(event)
    return events


def in_process(events: int, batch: int) -> float:
    with tempfile.TemporaryDirectory() as state:
        log = open_log(Path(state), {"checkpoint_every": 100_000})
        who = Identity("bench", "acme", frozenset({"service"}))
        batches = [make_events(f"b{i}", batch) for i in range(events // batch)]
        start = time.perf_counter()
        for item in batches:
            log.append("acme", item, who)
        elapsed = time.perf_counter() - start
        log.store.close()
        return len(batches) * batch / elapsed


async def over_grpc(events: int, batch: int, unary: int) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as state:
        settings = Settings(state_dir=Path(state), server=ServerSettings(bind="127.0.0.1:0"),
                            plugin={"evidence": {"checkpoint_every": 100_000}})
        plugin = EvidencePlugin()
        kernel = Kernel(settings, PluginHost.load(settings, [Candidate(plugin.name, "bench", plugin)])).open()
        server = KernelServer(kernel)
        port = await server.start()
        token = issue_token(kernel.signing_key, principal="bench", tenant="acme", roles=["service"], ttl_seconds=600)
        client = connect(f"127.0.0.1:{port}", EvidencePlane, token=token)
        try:
            requests = [pb.AppendEventStreamRequest(events=make_events(f"s{i}", batch))
                        for i in range(events // batch)]

            async def stream():
                for request in requests:
                    yield request

            start = time.perf_counter()
            reply = await client.append_event_stream(stream(), timeout=600)
            streaming = reply.appended / (time.perf_counter() - start)
            singles = [pb.AppendEventsRequest(events=[e]) for e in make_events("u", unary)]
            start = time.perf_counter()
            for request in singles:
                await client.append_events(request, timeout=30)
            unary_rate = unary / (time.perf_counter() - start)
        finally:
            await client.close()
            await server.stop(grace=1)
        return streaming, unary_rate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--unary", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    local, streaming, unary = [], [], []
    for _ in range(args.repeat):
        local.append(in_process(args.events, args.batch))
        s, u = run(over_grpc(args.events, args.batch, args.unary))
        streaming.append(s)
        unary.append(u)
    print(f"evidence appends: {args.events} events in batches of {args.batch}, {args.unary} unary; "
          f"median of {args.repeat} runs, durable (synchronous=FULL)")
    print(f"{'path':<28} {'events/s':>12}")
    print(f"{'in-process, batched':<28} {statistics.median(local):>12,.0f}")
    print(f"{'gRPC streaming batches':<28} {statistics.median(streaming):>12,.0f}")
    print(f"{'gRPC unary, one event':<28} {statistics.median(unary):>12,.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Evidence appends per second: in-process batched, gRPC streaming batches, gRPC unary.

Every append is durable when acknowledged: the batch's segment is written to
the segment file and fdatasync'ed, then its index row committed in SQLite
(WAL, synchronous=FULL). Events carry two fields (a 64-byte string and a
32-byte digest), so each costs two salted commitments, a leaf hash, a chain
hash and a Merkle node.

Rows, interleaved: every row runs once a round, in an order that reverses
round by round (each figure the median of the rounds):

- in-process from request bytes (``EvidenceLog.append_encoded``: what the
  gRPC servicer calls), with two encode threads (the default) and with one;
  pipelined (``append_many``), also with the events of 1,000 requests
  interleaved (each event a correlation run of its own) instead of runs of ten;
- in-process from a list of ``pb.Event`` (``EvidenceLog.append``, which
  serializes the list first);
- baselines on the same batches, for the ratios: *encode + chain only*
  (the native encoder, then the chain and the Merkle frontier, one thread,
  no storage), the same CPU work as an append does it (the encoder on two
  threads, chaining behind its helper, then the frontier) and *file floor*
  (the same number of bytes per batch appended to a plain file with one
  fdatasync per batch, the issue's 1.06 M rows/s reference);
- over gRPC (127.0.0.1, one process): streaming batches and unary calls.

    python -m bench.evidence_append [--events 100000] [--batch 10000] [--unary 1000] [--repeat 3] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import os
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
from planes.native import load
from planes.plugins.evidence import EvidencePlugin, open_log

chain = load("chain")
eventbatch = load("eventbatch")
WHO = Identity("bench", "acme", frozenset({"service"}))


def make_events(prefix: str, count: int, interleaved: int = 0) -> list[pb.Event]:
    """Events of requests of ten events each, one request after another; with ``interleaved``, that many
    requests at once, their events taking turns (as concurrent requests' events reach the log)."""
    events = []
    for index in range(count):
        correlation = f"c-{prefix}-{index % interleaved}" if interleaved else f"c-{index // 10}"
        event = pb.Event(event_id=f"{prefix}-{index}", event_type="tool.invoked",
                         correlation=common_pb2.Correlation(correlation_id=correlation))
        event.fields.add(name="tool", string_value="x" * 64)
        event.fields.add(name="payload_digest", bytes_value=bytes(32))
        events.append(event)
    return events


def request_bytes(prefix: str, events: int, batch: int, interleaved: int = 0) -> list[bytes]:
    return [pb.AppendEventsRequest(events=make_events(f"{prefix}{i}", batch, interleaved)).SerializeToString()
            for i in range(events // batch)]


def in_process_bytes(events: int, batch: int, threads: int, profile: bool = False, pipelined: bool = False,
                     interleaved: int = 0) -> float:
    requests = request_bytes(f"t{threads}{'p' if pipelined else ''}{interleaved or ''}-", events, batch, interleaved)
    with tempfile.TemporaryDirectory() as state:
        log = open_log(Path(state), {"checkpoint_every": 100_000, "encode_threads": threads})
        profiler = cProfile.Profile() if profile else None
        start = time.perf_counter()
        if profiler is not None:
            profiler.enable()
        if pipelined:
            log.append_many([("acme", data) for data in requests], WHO)
        else:
            for data in requests:
                log.append_encoded("acme", data, WHO)
        if profiler is not None:
            profiler.disable()
        elapsed = time.perf_counter() - start
        log.close()
    if profiler is not None:
        print(f"in-process appends under cProfile: {elapsed / len(requests) * 1e3:.2f} ms a batch; "
              "the encoder's native time shows as EvidenceLog._append's own")
        pstats.Stats(profiler).sort_stats("tottime").print_stats(12)
    return len(requests) * batch / elapsed


def in_process_messages(events: int, batch: int) -> float:
    batches = [make_events(f"m{i}", batch) for i in range(events // batch)]
    with tempfile.TemporaryDirectory() as state:
        log = open_log(Path(state), {"checkpoint_every": 100_000})
        start = time.perf_counter()
        for item in batches:
            log.append("acme", item, WHO)
        elapsed = time.perf_counter() - start
        log.close()
    return len(batches) * batch / elapsed


def encode_and_chain_only(events: int, batch: int, threads: int = 1) -> tuple[float, int]:
    """The CPU work of an append without storage; also the bytes a batch's segment takes.

    One thread: the encoder, then the chain. More: the encoder chains behind its helper, as the log has it.
    """
    requests = request_bytes(f"e{threads}", events, batch)
    head, frontier, size, sequence = bytes(32), chain.MerkleFrontier(), 0, 1
    start = time.perf_counter()
    for data in requests:
        encoded = eventbatch.encode_events(data, "acme", "bench", sequence, 0, max_events=10_000, max_fields=64,
                                           max_value_bytes=65_536, max_id_chars=128, threads=threads,
                                           previous_head=head if threads > 1 else None)
        heads = encoded.heads if threads > 1 else chain.chain(head, encoded.leaf_hashes)
        frontier.append(encoded.leaf_hashes)
        head, sequence = heads[-32:], sequence + len(encoded)
        size = (len(encoded.leaves) + len(encoded.values) + len(encoded.offsets) * 8 + len(encoded) * 72)
    return len(requests) * batch / (time.perf_counter() - start), size


def file_floor(events: int, batch: int, segment_bytes: int) -> float:
    """The same bytes per batch appended to a plain file, one fdatasync per batch."""
    block = os.urandom(segment_bytes)
    with tempfile.TemporaryDirectory() as state:
        fd = os.open(Path(state) / "floor", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            start = time.perf_counter()
            for _ in range(events // batch):
                os.write(fd, block)
                os.fdatasync(fd)
            elapsed = time.perf_counter() - start
        finally:
            os.close(fd)
    return events // batch * batch / elapsed


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
    parser.add_argument("--batch", type=int, default=10_000)
    parser.add_argument("--unary", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--profile", action="store_true",
                        help="only profile the in-process appends (cProfile, by own time) and stop")
    parser.add_argument("--pipelined", action="store_true", help="with --profile: profile append_many")
    args = parser.parse_args(argv)
    if args.profile:
        in_process_bytes(args.events, args.batch, 2, profile=True, pipelined=args.pipelined)
        return 0
    rows: dict[str, list[float]] = {name: [] for name in (
        "in-process, batched, pipelined (append_many)", "same, 1,000 requests interleaved",
        "in-process, batched, request bytes",
        "in-process, batched, 1 encode thread",
        "in-process, batched, pb.Event list", "encode + chain only (no storage)",
        "encode + chain, 2 threads (no storage)", "file floor (write + fdatasync)",
        "gRPC streaming batches", "gRPC unary, one event")}
    names = list(rows)
    segment_bytes = encode_and_chain_only(args.batch, args.batch)[1]  # a batch's segment, for the file floor

    def grpc_rows() -> None:
        streaming, unary = run(over_grpc(args.events, args.batch, args.unary))
        rows[names[8]].append(streaming)
        rows[names[9]].append(unary)

    steps = [
        lambda: rows[names[0]].append(in_process_bytes(args.events, args.batch, 2, pipelined=True)),
        lambda: rows[names[1]].append(in_process_bytes(args.events, args.batch, 2, pipelined=True,
                                                       interleaved=1000)),
        lambda: rows[names[2]].append(in_process_bytes(args.events, args.batch, 2)),
        lambda: rows[names[3]].append(in_process_bytes(args.events, args.batch, 1)),
        lambda: rows[names[4]].append(in_process_messages(args.events, args.batch)),
        lambda: rows[names[5]].append(encode_and_chain_only(args.events, args.batch)[0]),
        lambda: rows[names[6]].append(encode_and_chain_only(args.events, args.batch, 2)[0]),
        lambda: rows[names[7]].append(file_floor(args.events, args.batch, segment_bytes)),
        grpc_rows,
    ]
    for round_ in range(args.repeat):
        for step in steps if round_ % 2 == 0 else steps[::-1]:  # every row, baselines too, alternates
            step()
    print(f"evidence appends: {args.events} events in batches of {args.batch}, {args.unary} unary; "
          f"median of {args.repeat} rounds, durable (segment fdatasync + SQLite synchronous=FULL)")
    encode_only = statistics.median(rows[names[5]])
    floor = statistics.median(rows[names[7]])
    print(f"{'path':<42} {'events/s':>12} {'/ encode-only':>14} {'/ file floor':>13}")
    for name, values in rows.items():
        value = statistics.median(values)
        print(f"{name:<42} {value:>12,.0f} {value / encode_only:>14.2f} {value / floor:>13.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The data chunk codec side by side: native, its twin and the generated protobuf classes, in one run.

For each chunk size (1, 4 and 16 MiB by default) and each of encode and
decode, with and without the SHA-256 chunk digest, the sides run interleaved
(alternating order round by round, so a noisy machine slows them alike):

* encode: ``encode_chunk(arrow_buffer, offset, digest=...)`` (native, twin)
  against ``PutPayloadRequest(chunk=DataChunk(offset, data, digest))
  .SerializeToString()`` (protobuf; given ``bytes``, its best case, and with
  ``hashlib.sha256`` for the digest).
* decode: ``decode_chunk(message, verify=...)`` (native, twin; a zero-copy
  Arrow slice, the sent digest checked when ``verify``) against
  ``PutPayloadRequest.FromString`` (protobuf; the digest checked with hashlib
  over ``chunk.data``).

Each timed call handles ``--mib`` MiB (default 64) in chunks of the size under
test; MB/s is that over the median time.

* assemble: a ``--mib`` MiB payload from its encoded chunk messages:
  ``decode_chunk`` then ``PayloadAssembler.add`` and ``finish`` (native,
  twin), against ``FromString``, a copy into a preallocated ``bytearray`` and
  hashlib (protobuf). "chunk digests" checks each chunk's digest and computes
  the content digest (two SHA-256 streams); "content digest only" ignores the
  sent chunk digests (one stream). Ratio = median over rounds of
protobuf time / side time (> 1: faster than the generated classes).

    python -m bench.codec_runner [--sizes 1,4,16] [--rounds 9] [--mib 64]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from hashlib import sha256

import numpy as np
import pyarrow as pa
from planes.data.v1 import data_service_pb2 as pb
from planes.native import codec as native
from planes.native import codec_py as twin

MiB = 1 << 20


def interleaved(sides: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    """Seconds per call of each side, per round, the order alternating round by round."""
    times: dict[str, list[float]] = {name: [] for name in sides}
    names = list(sides)
    for round_ in range(rounds):
        for name in names if round_ % 2 == 0 else reversed(names):
            start = time.perf_counter()
            sides[name]()
            times[name].append(time.perf_counter() - start)
    return times


def report(title: str, sides: dict[str, Callable[[], object]], rounds: int, nbytes: int) -> None:
    for side in sides.values():      # warm-up, outside the timed rounds
        side()
    times = interleaved(sides, rounds)
    print(f"{title}")
    print(f"  {'side':<10} {'median ms':>10} {'MB/s':>9} {'vs protobuf':>12}")
    for name, per_round in times.items():
        median = statistics.median(per_round)
        ratio = statistics.median(b / t for b, t in zip(times["protobuf"], per_round))
        print(f"  {name:<10} {median * 1e3:>10.1f} {nbytes / median / 1e6:>9.0f} {ratio:>11.2f}x")


def protobuf_encode(data: bytes, offset: int, digest: bool) -> bytes:
    chunk = pb.DataChunk(offset=offset, data=data, digest=sha256(data).digest() if digest else b"")
    return pb.PutPayloadRequest(chunk=chunk).SerializeToString()


def protobuf_decode(message: bytes, verify: bool) -> tuple[int, bytes, bytes]:
    chunk = pb.PutPayloadRequest.FromString(message).chunk
    if verify and chunk.digest and sha256(chunk.data).digest() != chunk.digest:
        raise ValueError("digest mismatch")
    return chunk.offset, chunk.data, chunk.digest


def bench_size(size: int, rounds: int, total: int) -> None:
    calls = max(1, total // size)
    raw = os.urandom(size)
    arrow = pa.py_buffer(np.frombuffer(raw, dtype=np.uint8))
    for digest in (False, True):
        bench_codec(raw, arrow, 3 * size, digest, calls, rounds)


def bench_codec(raw: bytes, arrow: pa.Buffer, offset: int, digest: bool, calls: int, rounds: int) -> None:
    size = len(raw)
    label = "with digest" if digest else "no digest"
    message = protobuf_encode(raw, offset, digest)
    assert native.encode_chunk(arrow, offset, digest=digest) == message
    assert twin.encode_chunk(arrow, offset, digest=digest) == message
    sides = {
        "protobuf": lambda: [protobuf_encode(raw, offset, digest) for _ in range(calls)],
        "twin": lambda: [twin.encode_chunk(arrow, offset, digest=digest) for _ in range(calls)],
        "native": lambda: [native.encode_chunk(arrow, offset, digest=digest) for _ in range(calls)],
    }
    report(f"encode {size // MiB} MiB chunks, {label} ({calls} per call)", sides, rounds, calls * size)

    for side in (native, twin):
        got = side.decode_chunk(message, max_chunk_bytes=size, verify=digest)
        assert got[0] == offset and got[1].to_pybytes() == raw
    sides = {
        "protobuf": lambda: [protobuf_decode(message, digest) for _ in range(calls)],
        "twin": lambda: [twin.decode_chunk(message, max_chunk_bytes=size, verify=digest) for _ in range(calls)],
        "native": lambda: [native.decode_chunk(message, max_chunk_bytes=size, verify=digest) for _ in range(calls)],
    }
    report(f"decode {size // MiB} MiB chunks, {label}{' (verified)' if digest else ''} ({calls} per call)",
           sides, rounds, calls * size)


def protobuf_assemble(messages: list[bytes], total: int, check: bool) -> tuple[bytearray, bytes]:
    out, running = bytearray(total), sha256()
    view = memoryview(out)
    for message in messages:
        chunk = pb.PutPayloadRequest.FromString(message).chunk
        if check and sha256(chunk.data).digest() != chunk.digest:
            raise ValueError("digest mismatch")
        view[chunk.offset:chunk.offset + len(chunk.data)] = chunk.data
        running.update(chunk.data)
    return out, running.digest()


def codec_assemble(side, messages: list[bytes], total: int, size: int, check: bool):
    target = side.PayloadAssembler(total, max_total_bytes=total, max_chunks=len(messages), max_chunk_bytes=size)
    for message in messages:
        offset, data, digest = side.decode_chunk(message, max_chunk_bytes=size)
        target.add(offset, data, digest if check else b"")
    return target.finish()


def bench_assemble(size: int, rounds: int, total: int) -> None:
    payload = os.urandom(max(total, size))
    messages = [native.encode_chunk(payload[i:i + size], i) for i in range(0, len(payload), size)]
    expected = sha256(payload).digest()
    for check in (True, False):
        label = "chunk digests" if check else "content digest only"
        assert protobuf_assemble(messages, len(payload), check)[1] == expected
        for side in (native, twin):
            buffer, digest = codec_assemble(side, messages, len(payload), size, check)
            assert digest == expected and buffer.to_pybytes() == payload
        sides = {
            "protobuf": lambda check=check: protobuf_assemble(messages, len(payload), check),
            "twin": lambda check=check: codec_assemble(twin, messages, len(payload), size, check),
            "native": lambda check=check: codec_assemble(native, messages, len(payload), size, check),
        }
        report(f"assemble {len(payload) // MiB} MiB from {len(messages)} chunks of {size // MiB} MiB, {label}",
               sides, rounds, len(payload))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1,4,16", help="chunk sizes in MiB, comma-separated")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--mib", type=int, default=64, help="MiB handled per timed call")
    args = parser.parse_args()
    print(f"python {platform.python_version()}, {os.cpu_count()} CPUs, protobuf "
          f"{pb.DESCRIPTOR.__class__.__module__}, {args.rounds} rounds")
    for size in (int(s) * MiB for s in args.sizes.split(",")):
        bench_size(size, args.rounds, args.mib * MiB)
    for size in (int(s) * MiB for s in args.sizes.split(",")):
        bench_assemble(size, args.rounds, args.mib * MiB)


if __name__ == "__main__":
    main()

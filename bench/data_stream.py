"""Put and Get of a large float32 tensor over loopback: the data plane against raw grpcio, protobuf and Flight.

One server process hosts every side, so the bench process is the client of
all of them and the two processes have a core each:

* ``raw``: grpcio with identity serializers, ``bytes`` chunks (Put: the
  server counts them; Get: the server sends ``bytes`` slices of a payload in
  memory, one copy per chunk, as any sender of ``bytes`` must).
* ``protobuf``: the same RPC shapes carrying the generated ``PutPayloadRequest``
  and ``GetPayloadResponse`` messages (chunk in, chunk out).
* ``flight``: ``pyarrow.flight`` DoPut and DoGet of the same bytes as a
  float32 column, one record batch per chunk.
* ``planes``: the data plane through ``DataClient``: Put streams the tensor
  (content digest hashed on a thread while sending, checked by the server,
  which hashes and writes each chunk to disk and fsyncs before acknowledging),
  Get streams it back into one contiguous buffer viewed as a numpy array.
  ``planes-nosync`` is the same with ``durable = false`` (no fsync), to show
  what the disk costs; ``planes-sha256`` (on request) the durable one with
  SHA-256 instead of BLAKE3 content digests.

Every Get side ends with the tensor in one contiguous buffer (raw, protobuf
and flight copy each chunk into a preallocated array; planes reassembles
through the native codec). Sides run interleaved round by round (order
alternating), and each figure is the median over rounds; ratios are medians of
per-round ratios against ``raw`` in the same round. Peak memory is the
receiver's (the client for Get, the server for Put): the growth of its peak
resident set (``VmHWM``, reset through ``/proc/self/clear_refs``) during the
transfer, relative to the payload size. CPU is what each process spent during
the transfer, all its threads, user and system (``time.process_time``): the
client is this process, the server the one hosting every side (idle sides
cost it nothing); the kernel's own writeback threads count for neither. On
two cores shared by both, a side whose two figures add up to about twice its
time is CPU-bound.

    python -m bench.data_stream [--mib 256] [--chunks 1,4,16] [--rounds 5] [--probes 3] [--sides raw,protobuf,flight,planes] [--directions get,put]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import NamedTuple

import grpc
import numpy as np
import pyarrow as pa
import pyarrow.flight as flight

from planes.data.v1 import data_service_pb2 as pb

MiB = 1 << 20
OPTIONS = [("grpc.max_send_message_length", 64 * MiB), ("grpc.max_receive_message_length", 64 * MiB)]
SIDES = ("raw", "protobuf", "flight", "planes", "planes-nosync")
#: Also available: ``planes-sha256`` (durable, SHA-256 content digests), not run by default.


# -- memory ----------------------------------------------------------------------

def reset_peak() -> int:
    """Reset this process's peak RSS to its current RSS; returns the current RSS in bytes."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status("VmRSS")


def peak() -> int:
    return _status("VmHWM")


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


# -- the server process --------------------------------------------------------------

class FlightSide(flight.FlightServerBase):
    def __init__(self, location: str, payload: np.ndarray):
        super().__init__(location)
        self.payload = payload

    def do_put(self, context, descriptor, reader, writer):
        received = 0
        for chunk in reader:
            received += chunk.data.nbytes
        if received != self.payload.nbytes:
            raise flight.FlightServerError(f"received {received} bytes")

    def do_get(self, context, ticket):
        step = int(ticket.ticket.decode()) // 4
        values = self.payload
        batches = (pa.record_batch([pa.array(values[i:i + step])], names=["x"]) for i in range(0, values.size, step))
        return flight.GeneratorStream(pa.schema([("x", pa.float32())]), batches)


def system_allocator() -> None:
    """Arrow allocations through malloc, which returns large blocks to the system when freed, so
    the resident-set peak of one transfer is not hidden by memory a pool kept from the last one."""
    pa.set_memory_pool(pa.system_memory_pool())


async def serve(mib: int) -> None:
    system_allocator()
    from planes.kernel.host import PluginHost
    from planes.kernel.kernel import Kernel
    from planes.kernel.server import KernelServer
    from planes.kernel.settings import ServerSettings, Settings
    from planes.kernel.tokens import issue_token

    payload = np.random.default_rng(7).standard_normal(mib * MiB // 4).astype(np.float32)
    raw_bytes = memoryview(payload).cast("B")
    state = Path(tempfile.mkdtemp(prefix="planes-bench-data-"))
    ports, tokens, servers = {}, {}, []
    for side, durable in (("planes", True), ("planes-nosync", False)):
        settings = Settings(state_dir=state / side, server=ServerSettings(bind="127.0.0.1:0"),
                            plugin={"data": {"durable": durable, "max_payload_bytes": 2 * mib * MiB},
                                    "evidence": {"synchronous": "FULL" if durable else "NORMAL"}})
        kernel = Kernel(settings, PluginHost.load(settings)).open()
        server = KernelServer(kernel)
        ports[side] = await server.start()
        tokens[side] = issue_token(kernel.signing_key, principal="bench", tenant="bench", roles=["service"],
                                   ttl_seconds=86400)
        servers.append(server)

    async def raw_put(requests, context):
        received = 0
        async for chunk in requests:
            received += len(chunk)
        return received.to_bytes(8, "little")

    async def raw_get(request, context):
        step = int.from_bytes(request, "little")
        for offset in range(0, len(raw_bytes), step):
            yield bytes(raw_bytes[offset:offset + step])

    async def proto_put(requests, context):
        received = 0
        async for request in requests:
            received += len(request.chunk.data)
        return pb.PutPayloadResponse(payload=pb.PayloadInfo(chunk_count=received))

    async def proto_get(request, context):
        step = request.chunk_size
        for offset in range(0, len(raw_bytes), step):
            yield pb.GetPayloadResponse(chunk=pb.DataChunk(offset=offset, data=bytes(raw_bytes[offset:offset + step])))

    handlers = grpc.method_handlers_generic_handler("bench.Raw", {
        "Put": grpc.stream_unary_rpc_method_handler(raw_put),
        "Get": grpc.unary_stream_rpc_method_handler(raw_get),
        "ProtoPut": grpc.stream_unary_rpc_method_handler(
            proto_put, pb.PutPayloadRequest.FromString, pb.PutPayloadResponse.SerializeToString),
        "ProtoGet": grpc.unary_stream_rpc_method_handler(
            proto_get, pb.GetPayloadRequest.FromString, pb.GetPayloadResponse.SerializeToString),
    })
    raw_server = grpc.aio.server(options=OPTIONS)
    raw_server.add_generic_rpc_handlers((handlers,))
    ports["raw"] = raw_server.add_insecure_port("127.0.0.1:0")
    await raw_server.start()
    flight_server = FlightSide("grpc://127.0.0.1:0", payload)
    ports["flight"] = flight_server.port
    print(json.dumps({"ports": ports, "tokens": tokens}), flush=True)

    def commands() -> None:
        for line in sys.stdin:
            command = line.strip()
            if command == "reset":
                print(reset_peak(), flush=True)
            elif command == "peak":
                print(peak(), flush=True)
            elif command == "cpu":
                print(time.process_time_ns() // 1000, flush=True)
        # Each run stores a payload or two per side (hundreds of MiB): leave nothing behind.
        shutil.rmtree(state, ignore_errors=True)
        os._exit(0)

    threading.Thread(target=commands, daemon=True).start()
    await asyncio.Event().wait()


# -- the client (this process) ---------------------------------------------------------

class Remote:
    """The server process: its ports, tokens and peak-memory probe."""

    def __init__(self, mib: int):
        self.process = subprocess.Popen([sys.executable, "-m", "bench.data_stream", "--serve", "--mib", str(mib)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        hello = json.loads(self.process.stdout.readline())
        self.ports, self.tokens = hello["ports"], hello["tokens"]

    def ask(self, command: str) -> int:
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return int(self.process.stdout.readline())

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=30)


class Client:
    def __init__(self, remote: Remote, payload: np.ndarray):
        from planes.kernel.clients import connect
        from planes.kernel.contracts import DataPlane
        from planes.plugins.data.client import DataClient

        self.remote = remote
        self.payload = payload
        self.bytes = memoryview(payload).cast("B")
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{remote.ports['raw']}", options=OPTIONS)
        self.raw_put = self.channel.stream_unary("/bench.Raw/Put")
        self.raw_get = self.channel.unary_stream("/bench.Raw/Get")
        self.proto_put = self.channel.stream_unary("/bench.Raw/ProtoPut", pb.PutPayloadRequest.SerializeToString,
                                                   pb.PutPayloadResponse.FromString)
        self.proto_get = self.channel.unary_stream("/bench.Raw/ProtoGet", pb.GetPayloadRequest.SerializeToString,
                                                   pb.GetPayloadResponse.FromString)
        self.flight = flight.connect(f"grpc://127.0.0.1:{remote.ports['flight']}")
        self.data = {side: DataClient(connect(f"127.0.0.1:{remote.ports[side]}", DataPlane,
                                              token=remote.tokens[side]), "bench", max_chunk_bytes=16 * MiB)
                     for side in ("planes", "planes-nosync")}
        # The durable plane again, with SHA-256 content digests instead of BLAKE3.
        self.data["planes-sha256"] = DataClient(connect(f"127.0.0.1:{remote.ports['planes']}", DataPlane,
                                                        token=remote.tokens["planes"]), "bench",
                                                max_chunk_bytes=16 * MiB, digest_algorithm="sha256")
        self.stored: dict[str, str] = {}
        self.old: list[tuple[str, str | None]] = []

    # Put: the payload from this process to the server.

    async def put(self, side: str, step: int) -> None:
        view, total = self.bytes, len(self.bytes)
        if side == "raw":
            async def chunks():
                for offset in range(0, total, step):
                    yield bytes(view[offset:offset + step])
            assert int.from_bytes(await self.raw_put(chunks()), "little") == total
        elif side == "protobuf":
            async def messages():
                for offset in range(0, total, step):
                    yield pb.PutPayloadRequest(chunk=pb.DataChunk(offset=offset, data=bytes(view[offset:offset + step])))
            assert (await self.proto_put(messages())).payload.chunk_count == total
        elif side == "flight":
            await asyncio.to_thread(self._flight_put, step)
        else:
            data = self.data[side]
            info = await data.put_tensor(self.payload, classification="internal", chunk_bytes=step)
            assert info.ref.size == total
            self.old.append((side, self.stored.get(side)))
            self.stored[side] = info.ref.payload_id

    async def forget_old(self) -> None:
        """Delete replaced payloads (outside the timed part)."""
        while self.old:
            side, payload_id = self.old.pop()
            if payload_id:
                await self.data[side].delete(payload_id)

    def _flight_put(self, step: int) -> None:
        values, count = self.payload, step // 4
        schema = pa.schema([("x", pa.float32())])
        writer, _ = self.flight.do_put(flight.FlightDescriptor.for_path("bench"), schema)
        for i in range(0, values.size, count):
            writer.write_batch(pa.record_batch([pa.array(values[i:i + count])], schema=schema))
        writer.close()

    # Get: the payload from the server into one contiguous array here.

    async def get(self, side: str, step: int) -> np.ndarray:
        total = len(self.bytes)
        if side in ("raw", "protobuf"):
            out = np.empty(total, np.uint8)
            position = 0
            if side == "raw":
                async for chunk in self.raw_get(step.to_bytes(8, "little")):
                    out[position:position + len(chunk)] = np.frombuffer(chunk, np.uint8)
                    position += len(chunk)
            else:
                async for message in self.proto_get(pb.GetPayloadRequest(chunk_size=step)):
                    data = message.chunk.data
                    out[message.chunk.offset:message.chunk.offset + len(data)] = np.frombuffer(data, np.uint8)
                    position += len(data)
            assert position == total
            return out.view(np.float32)
        if side == "flight":
            return await asyncio.to_thread(self._flight_get, step)
        if side not in self.stored:
            await self.put(side, step)
        return await self.data[side].get_tensor(self.stored[side], chunk_bytes=step)

    async def connect(self, side: str) -> None:
        if side in ("raw", "protobuf"):
            await self.channel.channel_ready()
        elif side == "flight":
            await asyncio.to_thread(self.flight.wait_for_available)
        else:
            await self.data[side].stat(self.stored[side])

    def _flight_get(self, step: int) -> np.ndarray:
        out = np.empty(self.payload.size, np.float32)
        position = 0
        for chunk in self.flight.do_get(flight.Ticket(str(step).encode())):
            column = chunk.data.column(0).to_numpy()
            out[position:position + column.size] = column
            position += column.size
        return out


class Transfer(NamedTuple):
    seconds: float
    grown: int            # the receiver's peak memory growth in bytes (0 for a get: see probe_get)
    client_cpu: float     # CPU seconds, all threads, of this process and of the server process
    server_cpu: float


async def measure(client: Client, remote: Remote, direction: str, side: str, step: int) -> Transfer:
    """One transfer: its time, the receiver's peak memory growth, and what each process spent in CPU."""
    before = remote.ask("reset") if direction == "put" else 0
    server_cpu = remote.ask("cpu")
    client_cpu = time.process_time()
    start = time.perf_counter()
    if direction == "get":
        result = await client.get(side, step)
        assert result.nbytes == client.payload.nbytes
    else:
        await client.put(side, step)
    elapsed = time.perf_counter() - start
    client_cpu = time.process_time() - client_cpu
    server_cpu = (remote.ask("cpu") - server_cpu) / 1e6
    grown = remote.ask("peak") - before if direction == "put" else 0
    if direction == "put":
        await client.forget_old()
    return Transfer(elapsed, grown, client_cpu, server_cpu)


async def run_bench(args) -> None:
    system_allocator()
    remote = Remote(args.mib)
    try:
        payload = np.random.default_rng(7).standard_normal(args.mib * MiB // 4).astype(np.float32)
        client = Client(remote, payload)
        total = payload.nbytes
        sides = [s for s in args.sides.split(",") if s]
        print(f"# {args.mib} MiB float32 tensor over loopback; {args.rounds} rounds; Python "
              f"{platform.python_version()}, grpcio {grpc.__version__}, pyarrow {pa.__version__}, "
              f"{os.cpu_count()} cores")
        for direction in [d for d in args.directions.split(",") if d]:
            for chunk_mib in [int(c) for c in args.chunks.split(",")]:
                step = chunk_mib * MiB
                for side in sides:                          # warm-up, not timed
                    await measure(client, remote, direction, side, step)
                times = {side: [] for side in sides}
                memory = {side: [] for side in sides}
                cpu = {side: [] for side in sides}
                if direction == "get":
                    # In a fresh process each: this one holds the source tensor and
                    # whatever the previous transfers left to its allocators. The
                    # peak depends on how far gRPC reads ahead, which varies with
                    # timing: several probes, interleaved, and their median.
                    for _ in range(args.probes):
                        for side in sides:
                            memory[side].append(probe_get(remote, client, side, step))
                for round_ in range(args.rounds):
                    for side in sides if round_ % 2 == 0 else list(reversed(sides)):
                        transfer = await measure(client, remote, direction, side, step)
                        times[side].append(transfer.seconds)
                        cpu[side].append((transfer.client_cpu, transfer.server_cpu))
                        if direction == "put":
                            memory[side].append(transfer.grown)
                print(f"\n{direction} {args.mib} MiB in {chunk_mib} MiB chunks")
                print(f"  {'side':<14} {'median ms':>10} {'MB/s':>8} {'vs raw':>7} {'vs protobuf':>12} "
                      f"{'vs flight':>10} {'peak mem':>9} {'client CPU ms':>14} {'server CPU ms':>14}")
                for side in sides:
                    median = statistics.median(times[side])

                    def ratio(base: str, times=times, side=side) -> str:
                        if base not in times:
                            return "-"
                        return f"{statistics.median(b / t for b, t in zip(times[base], times[side])):.2f}x"
                    mem = statistics.median(memory[side]) / total
                    print(f"  {side:<14} {median * 1e3:>10.0f} {total / median / 1e6:>8.0f} {ratio('raw'):>7} "
                          f"{ratio('protobuf'):>12} {ratio('flight'):>10} {mem:>8.2f}x "
                          f"{statistics.median(c for c, _ in cpu[side]) * 1e3:>14.0f} "
                          f"{statistics.median(s for _, s in cpu[side]) * 1e3:>14.0f}")
    finally:
        remote.close()


def probe_get(remote: Remote, client: Client, side: str, step: int) -> int:
    """The peak memory growth of one get, in a fresh client process."""
    setup = {"ports": remote.ports, "tokens": remote.tokens, "stored": client.stored, "side": side, "step": step,
             "mib": client.payload.nbytes // MiB}
    out = subprocess.run([sys.executable, "-m", "bench.data_stream", "--probe", json.dumps(setup)],
                         capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


async def probe(setup: dict) -> None:
    system_allocator()
    remote = Remote.__new__(Remote)
    remote.ports, remote.tokens = setup["ports"], setup["tokens"]
    client = Client(remote, np.empty(setup["mib"] * MiB // 4, np.float32))  # never touched: no resident pages
    client.stored = setup["stored"]
    await client.connect(setup["side"])          # connected, with no payload bytes moved yet
    before = reset_peak()
    result = await client.get(setup["side"], setup["step"])
    print(peak() - before)
    del result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256, help="payload size in MiB")
    parser.add_argument("--chunks", default="1,4,16", help="chunk sizes in MiB")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--probes", type=int, default=3, help="fresh-process Get memory probes per side and size")
    parser.add_argument("--sides", default=",".join(SIDES))
    parser.add_argument("--directions", default="get,put", help="get, put or both")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--probe", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    from planes.kernel.runtime import run

    if args.probe:
        run(probe(json.loads(args.probe)))
    else:
        run(serve(args.mib) if args.serve else run_bench(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())

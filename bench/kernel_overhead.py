"""Per-RPC kernel overhead against a bare grpc.aio handler of the same shape.

Both servers run in this process on one uvloop loop, on loopback:

* bare:   a grpc.aio generic handler for the diagnostics Echo method that
          returns EchoResponse(tenant, payload); the client sends no metadata.
* kernel: the same method served by the kernel (token authentication,
          role and tenant checks, contract-version negotiation, correlation and
          trace context, deadline, error mapping), called through the kernel's
          remote plane client (which adds the token, version and correlation
          metadata).

Rounds alternate which side goes first; each round times ``--calls``
sequential calls per side (latency) and ``--calls`` calls with
``--concurrency`` in flight (throughput). The report gives the median per-call
time of each side over the rounds, and kernel/bare ratios.

    python -m bench.kernel_overhead [--rounds 15] [--calls 2000] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc

from planes.kernel.clients import connect
from planes.kernel.contracts.diagnostics import DiagnosticsPlane, pb
from planes.kernel.host import Candidate, PluginHost
from planes.kernel.kernel import Kernel
from planes.kernel.runtime import run
from planes.kernel.server import KernelServer
from planes.kernel.settings import ServerSettings, Settings
from planes.kernel.tokens import issue_token
from planes.plugins.diagnostics import DiagnosticsPlugin

ECHO = "/planes.diagnostics.v1.DiagnosticsService/Echo"


async def start_bare() -> tuple[grpc.aio.Server, int]:
    async def echo(request: pb.EchoRequest, context) -> pb.EchoResponse:
        return pb.EchoResponse(tenant=request.tenant, payload=request.payload)

    handler = grpc.unary_unary_rpc_method_handler(echo, pb.EchoRequest.FromString, pb.EchoResponse.SerializeToString)
    server = grpc.aio.server()
    service = "planes.diagnostics.v1.DiagnosticsService"
    if hasattr(server, "add_registered_method_handlers"):
        server.add_registered_method_handlers(service, {"Echo": handler})
    else:
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, {"Echo": handler}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


async def start_kernel(state: Path) -> tuple[KernelServer, int, str]:
    settings = Settings(state_dir=state, server=ServerSettings(bind="127.0.0.1:0"))
    plugin = DiagnosticsPlugin()
    kernel = Kernel(settings, PluginHost.load(settings, [Candidate(plugin.name, "bench", plugin)])).open()
    server = KernelServer(kernel)
    port = await server.start()
    token = issue_token(kernel.signing_key, principal="bench", tenant="acme", roles=["service"], ttl_seconds=3600)
    return server, port, token


async def sequential(call, request, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        await call(request)
    return (time.perf_counter() - start) / calls


async def concurrent(call, request, calls: int, concurrency: int) -> float:
    per_worker = calls // concurrency

    async def worker():
        for _ in range(per_worker):
            await call(request)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return (time.perf_counter() - start) / (per_worker * concurrency)


async def measure(rounds: int, calls: int, concurrency: int, payload: int,
                  breakdown: bool = False) -> dict[str, list[float]]:
    with tempfile.TemporaryDirectory() as state:
        bare_server, bare_port = await start_bare()
        kernel_server, kernel_port, token = await start_kernel(Path(state))
        bare_channel = grpc.aio.insecure_channel(f"127.0.0.1:{bare_port}")
        bare_echo = bare_channel.unary_unary(ECHO, request_serializer=pb.EchoRequest.SerializeToString,
                                             response_deserializer=pb.EchoResponse.FromString)
        kernel_client = connect(f"127.0.0.1:{kernel_port}", DiagnosticsPlane, token=token)
        request = pb.EchoRequest(tenant="acme", payload=os.urandom(payload))
        sides = {"bare": bare_echo, "kernel": kernel_client.echo}
        if breakdown:
            # The same metadata the kernel client sends, on the bare server (wire cost),
            # and on the kernel server from a raw client (server-side cost).
            metadata = (("authorization", f"Bearer {token}"),)
            kernel_channel = grpc.aio.insecure_channel(
                f"127.0.0.1:{kernel_port}", options=[("grpc.primary_user_agent", "planes-contract/diagnostics=1.0")])
            kernel_raw = kernel_channel.unary_unary(ECHO, request_serializer=pb.EchoRequest.SerializeToString,
                                                    response_deserializer=pb.EchoResponse.FromString)
            sides = {
                "bare": bare_echo,
                "bare+metadata": lambda r: bare_echo(r, metadata=metadata),
                "kernel-server": lambda r: kernel_raw(r, metadata=metadata),
                "kernel": kernel_client.echo,
            }
        results: dict[str, list[float]] = {f"{side}/{mode}": [] for side in sides for mode in ("seq", "conc")}
        try:
            for side in sides.values():  # warm up connections, caches and code paths
                await sequential(side, request, 200)
            for index in range(rounds):
                order = list(sides.items()) if index % 2 == 0 else list(reversed(sides.items()))
                for name, call in order:
                    results[f"{name}/seq"].append(await sequential(call, request, calls))
                for name, call in order:
                    results[f"{name}/conc"].append(await concurrent(call, request, calls, concurrency))
        finally:
            await bare_channel.close()
            await kernel_client.close()
            await bare_server.stop(None)
            await kernel_server.stop(grace=1)
        return results


def report_breakdown(results: dict[str, list[float]], args: argparse.Namespace) -> str:
    lines = [f"where the time goes ({args.rounds} rounds x {args.calls} calls):",
             f"{'side':<15} {'seq us/call':>12} {'ratio':>7} {f'{args.concurrency} in flight us/call':>24} {'ratio':>7}"]
    for name in ("bare", "bare+metadata", "kernel-server", "kernel"):
        row = f"{name:<15}"
        for mode, width in (("seq", 12), ("conc", 24)):
            mine, bare = results[f"{name}/{mode}"], results[f"bare/{mode}"]
            ratio = statistics.median(m / b for m, b in zip(mine, bare))
            row += f" {statistics.median(mine) * 1e6:>{width}.1f} {ratio:>7.3f}"
        lines.append(row)
    return "\n".join(lines)


def report(results: dict[str, list[float]], args: argparse.Namespace) -> str:
    lines = [
        f"kernel per-RPC overhead: {args.rounds} rounds x {args.calls} calls, payload {args.payload} B, "
        f"concurrency {args.concurrency}; python {platform.python_version()}, grpcio {grpc.__version__}, "
        f"{os.cpu_count()} cpus",
        f"{'mode':<12} {'bare us/call':>13} {'kernel us/call':>15} {'bare calls/s':>13} {'kernel calls/s':>15} "
        f"{'ratio (time)':>13} {'overhead':>9}",
    ]
    for mode, label in (("seq", "sequential"), ("conc", f"{args.concurrency} in flight")):
        bare = statistics.median(results[f"bare/{mode}"])
        kernel = statistics.median(results[f"kernel/{mode}"])
        # Ratio of medians, and the median of per-round ratios (robust to drift).
        per_round = statistics.median(k / b for k, b in zip(results[f"kernel/{mode}"], results[f"bare/{mode}"]))
        lines.append(f"{label:<12} {bare * 1e6:>13.1f} {kernel * 1e6:>15.1f} {1 / bare:>13.0f} {1 / kernel:>15.0f} "
                     f"{per_round:>13.3f} {(per_round - 1) * 100:>8.1f}%")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--payload", type=int, default=64, help="payload bytes per echo")
    parser.add_argument("--breakdown", action="store_true",
                        help="attribute the overhead: wire metadata, server side, client side")
    args = parser.parse_args(argv)
    if args.calls < args.concurrency:
        parser.error("--calls must be at least --concurrency")
    results = run(measure(args.rounds, args.calls, args.concurrency, args.payload, args.breakdown))
    print(report_breakdown(results, args) if args.breakdown else report(results, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())

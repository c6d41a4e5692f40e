"""Publish-to-applied latency of control snapshots, against a bare grpc.aio push.

For 1, 10 and 100 subscribers watching over loopback (one channel each, one
process), each round changes one resource (not timed), publishes a snapshot
and times until the last subscriber has verified it (Ed25519 signature over
the header, BLAKE3 digest of the content). The kernel pushes each revision
as a delta to the previous one, which every subscriber rebuilds into the
whole content before verifying it (``--full-snapshots``: whole snapshots).
The baseline, in the same run and interleaved: a bare grpc.aio server stream
pushing whole signed snapshots of the same size to the same number of
subscribers, each verifying the same way. Each subscriber count runs ``--repeat`` times,
kernel and bare alternating which goes first; the summary row gives the
median over runs of each figure and of the per-run p99 ratio. Also: snapshot
size, publish (cut, digest, sign, commit) and Ed25519 sign and subscriber
verify times at 1,000 and 10,000 resources.

With ``--remote-subscribers`` the subscribers (kernel and bare alike) run in
a second process, as they would on other hosts, and tell the publishing
process over a pipe when the last of them has verified a revision; the
publisher's loop then no longer verifies 100 snapshots itself.

    python -m bench.control_publish [--rounds 20] [--repeat 3] [--subscribers 1,10,100] [--remote-subscribers]
                                    [--full-snapshots]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc
from google.protobuf import json_format, struct_pb2

from planes.control.v1 import control_service_pb2 as pb
from planes.kernel.clients import connect
from planes.kernel.contracts import ControlPlane
from planes.kernel.host import Candidate, PluginHost
from planes.kernel.kernel import Kernel
from planes.kernel.runtime import run
from planes.kernel.server import KernelServer
from planes.kernel.settings import ServerSettings, Settings
from planes.kernel.tokens import SigningKey, issue_token
from planes.plugins.control import ControlPlugin
from planes.plugins.control.store import ControlStore
from planes.plugins.control.delta import element_bounds, rebuild
from planes.plugins.control.subscriber import SNAPSHOT_CONTEXT, verify_snapshot
from planes.plugins.evidence import EvidencePlugin

SPEC = json_format.ParseDict({"adapter": "echo", "endpoint": "http://127.0.0.1:9/v1",
                              "allowed_classifications": ["public", "internal"]}, struct_pb2.Struct())
OTHER_SPEC = json_format.ParseDict({"adapter": "echo", "endpoint": "http://127.0.0.1:9/v2",
                                    "allowed_classifications": ["public", "internal"]}, struct_pb2.Struct())


class Applied:
    """What one subscriber runs: each push rebuilt (a delta) and verified as CachedConfig does, minus its disk writes."""

    def __init__(self, keys: dict):
        self.keys = keys
        self.content = b""
        self.bounds: list[int] | None = None

    def apply(self, message: pb.WatchSnapshotsResponse) -> int:
        if message.HasField("delta"):
            content, bounds = rebuild(message.delta.runs, self.content, self.bounds)
            signed = pb.SignedSnapshot()
            signed.CopyFrom(message.delta.snapshot)
            signed.content = content
            revision = verify_snapshot(signed, self.keys, time.time()).revision
        else:
            signed = message.snapshot
            revision = verify_snapshot(signed, self.keys, time.time()).revision
            bounds = element_bounds(signed.content)       # as CachedConfig finds them, for the next delta
        self.content, self.bounds = signed.content, bounds
        return revision


def _pushes(message: pb.WatchSnapshotsResponse) -> bool:
    return message.HasField("snapshot") or message.HasField("delta")


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def _remote_subscribers(conn, address: str, kind: str, count: int, token: str, pems: dict[str, bytes]) -> None:
    """Child process: ``count`` subscribers that verify each push; sends a revision once all have it."""
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    async def main() -> None:
        keys = {kid: load_pem_public_key(pem) for kid, pem in pems.items()}
        have = [0] * count
        reported = [0]

        def applied(index: int, revision: int) -> None:
            have[index] = revision
            done = min(have)
            if done > reported[0]:
                reported[0] = done
                conn.send(done)

        async def kernel_subscriber(index: int) -> None:
            client = connect(address, ControlPlane, token=token)
            state = Applied(keys)
            async for message in client.watch_snapshots(pb.WatchSnapshotsRequest(subscriber_id=f"s{index}")):
                if _pushes(message):
                    applied(index, state.apply(message))

        async def bare_subscriber(index: int) -> None:
            channel = grpc.aio.insecure_channel(address)
            watch = channel.unary_stream("/bench.Push/Watch", request_serializer=lambda b: b,
                                         response_deserializer=lambda b: b)
            async for data in watch(b""):
                applied(index, verify_snapshot(pb.SignedSnapshot.FromString(data), keys, time.time()).revision)

        subscriber = kernel_subscriber if kind == "kernel" else bare_subscriber
        await asyncio.gather(*(subscriber(i) for i in range(count)))

    run(main())


class RemoteSubscribers:
    """The subscribers in a second process; :meth:`applied` waits until all have verified a revision."""

    def __init__(self, address: str, kind: str, count: int, token: str, keys: dict):
        from cryptography.hazmat.primitives import serialization

        pems = {kid: key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
                for kid, key in keys.items()}
        context = multiprocessing.get_context("spawn")
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_remote_subscribers, args=(child, address, kind, count, token, pems),
                                       daemon=True)
        self.process.start()
        self.latest = 0

    async def applied(self, revision: int) -> None:
        loop = asyncio.get_running_loop()
        while self.latest < revision:
            ready = loop.create_future()
            loop.add_reader(self.conn.fileno(), ready.set_result, None)
            try:
                await ready
            finally:
                loop.remove_reader(self.conn.fileno())
            while self.conn.poll():
                self.latest = max(self.latest, self.conn.recv())

    def close(self) -> None:
        self.process.terminate()
        self.process.join(10)


async def kernel_side(state: Path, subscribers: int, rounds: int, resources: int,
                      remote: bool = False, deltas: bool = True) -> tuple[list[float], list[float]]:
    settings = Settings(state_dir=state, server=ServerSettings(bind="127.0.0.1:0"),
                        plugin={"control": {"deltas": deltas}})
    plugins = [EvidencePlugin(), ControlPlugin()]
    kernel = Kernel(settings, PluginHost.load(settings, [Candidate(p.name, "b", p) for p in plugins])).open()
    server = KernelServer(kernel)
    port = await server.start()
    admin_token = issue_token(kernel.signing_key, principal="admin", tenant="*", roles=["admin"], ttl_seconds=3600)
    worker_token = issue_token(kernel.signing_key, principal="w", tenant="*", roles=["worker"], ttl_seconds=3600)
    admin = connect(f"127.0.0.1:{port}", ControlPlane, token=admin_token)
    for index in range(resources):
        await admin.put_resource(pb.PutResourceRequest(tenant="acme", kind=pb.RESOURCE_KIND_MODEL_ROUTE,
                                                       name=f"route-{index}", spec=SPEC), timeout=30)
    key = plugins[1].plane.key
    keys = {key.kid: key.public_key}
    clients = [connect(f"127.0.0.1:{port}", ControlPlane, token=worker_token) for _ in range(subscribers)]
    applied: list[asyncio.Event] = [asyncio.Event() for _ in range(subscribers)]
    target = [0]

    async def subscriber(index: int, client) -> None:
        state = Applied(keys)
        async for message in client.watch_snapshots(pb.WatchSnapshotsRequest(subscriber_id=f"s{index}")):
            if _pushes(message) and state.apply(message) >= target[0]:
                applied[index].set()

    remote_side = RemoteSubscribers(f"127.0.0.1:{port}", "kernel", subscribers, worker_token, keys) if remote else None
    tasks = [] if remote else [asyncio.create_task(subscriber(i, c)) for i, c in enumerate(clients)]
    latencies, publishing = [], []
    versions: dict[int, int] = {}
    try:
        for revision in range(1, rounds + 2):
            for event in applied:
                event.clear()
            target[0] = revision
            # One resource changes between publishes, as in a config change (not timed).
            changed = SPEC if revision % 2 else OTHER_SPEC
            await admin.put_resource(pb.PutResourceRequest(tenant="acme", kind=pb.RESOURCE_KIND_MODEL_ROUTE,
                                                           name=f"route-{revision % resources}", spec=changed,
                                                           expected_resource_version=versions.get(revision % resources, 1)),
                                     timeout=30)
            versions[revision % resources] = versions.get(revision % resources, 1) + 1
            start = time.perf_counter()
            await admin.publish_snapshot(pb.PublishSnapshotRequest(expected_revision=revision - 1), timeout=30)
            published = time.perf_counter()
            if remote_side is not None:
                await remote_side.applied(revision)
            else:
                await asyncio.gather(*(event.wait() for event in applied))
            if revision > 1:  # the first round warms up the streams
                latencies.append(time.perf_counter() - start)
                publishing.append(published - start)
    finally:
        if remote_side is not None:
            remote_side.close()
        for task in tasks:
            task.cancel()
        for client in clients:
            await client.close()
        await admin.close()
        await server.stop(grace=1)
    return latencies, publishing


async def bare_side(signed: list[bytes], subscribers: int, keys, remote: bool = False) -> list[float]:
    current = [b""]
    changed = asyncio.Condition()

    async def push(request: bytes, context):
        sent = b""
        while True:
            async with changed:
                await changed.wait_for(lambda sent=sent: current[0] is not sent)
                sent = current[0]
            yield sent

    server = grpc.aio.server()
    handler = grpc.unary_stream_rpc_method_handler(push, lambda b: b, lambda b: b)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bench.Push", {"Watch": handler}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}") for _ in range(subscribers)]
    applied = [asyncio.Event() for _ in range(subscribers)]

    async def subscriber(index: int, channel) -> None:
        watch = channel.unary_stream("/bench.Push/Watch", request_serializer=lambda b: b,
                                     response_deserializer=lambda b: b)
        async for data in watch(b""):
            verify_snapshot(pb.SignedSnapshot.FromString(data), keys, time.time())
            applied[index].set()

    remote_side = RemoteSubscribers(f"127.0.0.1:{port}", "bare", subscribers, "", keys) if remote else None
    tasks = [] if remote else [asyncio.create_task(subscriber(i, c)) for i, c in enumerate(channels)]
    latencies = []
    try:
        for index, data in enumerate(signed):
            for event in applied:
                event.clear()
            start = time.perf_counter()
            async with changed:
                current[0] = data
                changed.notify_all()
            if remote_side is not None:
                await remote_side.applied(pb.Snapshot.FromString(pb.SignedSnapshot.FromString(data).snapshot).revision)
            else:
                await asyncio.gather(*(event.wait() for event in applied))
            if index:
                latencies.append(time.perf_counter() - start)
    finally:
        if remote_side is not None:
            remote_side.close()
        for task in tasks:
            task.cancel()
        for channel in channels:
            await channel.close()
        await server.stop(None)
    return latencies


def signed_snapshots(count: int, resources: int) -> tuple[list[bytes], dict, dict[str, float], int]:
    """Snapshots like the kernel's, signed with a fresh key; median publish, sign and verify times."""
    with tempfile.TemporaryDirectory() as state:
        store = ControlStore(Path(state) / "c.sqlite3")
        with store.transaction():
            for index in range(resources):
                store.put(pb.RESOURCE_KIND_MODEL_ROUTE, "acme", f"route-{index}", SPEC, 0, "bench")
        key = SigningKey.generate()
        signed, publish_times = [], []
        for revision in range(count):
            start = time.perf_counter()
            snapshot = store.publish(key, expected_revision=revision, actor="bench")
            publish_times.append(time.perf_counter() - start)
            signed.append(snapshot.SerializeToString())
        store.close()
    keys = {key.kid: key.public_key}
    header = pb.SignedSnapshot.FromString(signed[0]).snapshot
    sign_times, verify_times = [], []
    for data in signed:
        start = time.perf_counter()
        key.private_key.sign(SNAPSHOT_CONTEXT + header)
        sign_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        verify_snapshot(pb.SignedSnapshot.FromString(data), keys, time.time())
        verify_times.append(time.perf_counter() - start)
    times = {"publish": statistics.median(publish_times), "sign": statistics.median(sign_times),
             "verify": statistics.median(verify_times)}
    return signed, keys, times, len(signed[0])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=3, help="runs per subscriber count, kernel and bare alternating")
    parser.add_argument("--subscribers", default="1,10,100")
    parser.add_argument("--resources", type=int, default=1000, help="resources in the distributed snapshot")
    parser.add_argument("--sizes", default="1000,10000", help="resource counts for the size/sign/verify table")
    parser.add_argument("--remote-subscribers", action="store_true",
                        help="run the subscribers in a second process (as on other hosts)")
    parser.add_argument("--full-snapshots", action="store_true",
                        help="the kernel pushes every revision whole (no deltas), as the bare side does")
    args = parser.parse_args(argv)
    print(f"publish-to-applied, {args.rounds} rounds per run, snapshot of {args.resources} resources, signature "
          "and digest verified by every subscriber"
          + (", subscribers in a second process" if args.remote_subscribers else ", subscribers in this process")
          + "; one resource changes per round; the kernel pushes "
          + ("full snapshots" if args.full_snapshots else "deltas (rebuilt, then verified whole)")
          + ", the bare side full snapshots")
    print("kernel: from the PublishSnapshot call to the last subscriber verified; publish RPC: that call alone "
          "(evidence record + signed, fsynced commit)")
    print(f"{'subscribers':>11} {'run':>4} {'kernel p50 ms':>14} {'kernel p99 ms':>14} {'publish RPC p50':>16} "
          f"{'bare p50 ms':>12} {'bare p99 ms':>12} {'p99 ratio':>10}")
    signed, keys, _, _ = signed_snapshots(args.rounds + 1, args.resources)
    for count in (int(n) for n in args.subscribers.split(",")):
        rows = []
        for run_index in range(args.repeat):
            def kernel_run(count=count):
                with tempfile.TemporaryDirectory() as state:
                    return run(kernel_side(Path(state), count, args.rounds, args.resources,
                                           args.remote_subscribers, not args.full_snapshots))

            def bare_run(count=count):
                return run(bare_side(signed, count, keys, args.remote_subscribers))

            if run_index % 2:
                bare = bare_run()
                kernel, publishing = kernel_run()
            else:
                kernel, publishing = kernel_run()
                bare = bare_run()
            row = (percentile(kernel, .5), percentile(kernel, .99), percentile(publishing, .5),
                   percentile(bare, .5), percentile(bare, .99), percentile(kernel, .99) / percentile(bare, .99))
            rows.append(row)
            print(f"{count:>11} {run_index + 1:>4} " + _row(row))
        if args.repeat > 1:
            print(f"{count:>11} {'med':>4} " + _row(tuple(statistics.median(r[i] for r in rows) for i in range(6))))
    print(f"{'resources':>9} {'snapshot KiB':>13} {'publish ms':>11} {'Ed25519 sign ms':>16} {'verify ms':>10}")
    for size in (int(n) for n in args.sizes.split(",")):
        _, _, times, length = signed_snapshots(5, size)
        print(f"{size:>9} {length / 1024:>13.1f} {times['publish'] * 1e3:>11.1f} {times['sign'] * 1e3:>16.3f} "
              f"{times['verify'] * 1e3:>10.2f}")
    return 0


def _row(row: tuple[float, ...]) -> str:
    kernel50, kernel99, publish50, bare50, bare99, ratio = row
    return (f"{kernel50 * 1e3:>14.1f} {kernel99 * 1e3:>14.1f} {publish50 * 1e3:>16.1f} "
            f"{bare50 * 1e3:>12.1f} {bare99 * 1e3:>12.1f} {ratio:>10.2f}")


if __name__ == "__main__":
    sys.exit(main())

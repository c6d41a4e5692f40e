"""The evidence hash chain side by side: native against a hashlib loop, in one run.

Sections (each reports medians over rounds; the sides of a section run
interleaved, in alternating order, so a noisy machine slows them alike):

* chain: leaf hash then chain hash of ``--events`` 256-byte events. Sides: a
  Python hashlib loop doing the same work over a list of events (the
  baseline), the pure-Python twin, and native ``hash_and_chain`` on one
  thread and on every CPU. Ratio = median over rounds of baseline time / side time.
* verify: ``verify_chain`` of a ``--log``-event log (default 1M), native on one
  thread and on every CPU, and the twin.
* root: ``merkle_root`` of ``--log`` leaves, same sides.
* proof: an inclusion proof in a ``--log``-leaf tree: its size, the time to
  build it (native) and to verify it (native and twin).
* hashes: SHA-256 of ``--messages`` independent messages of 256 and of 65
  bytes (a leaf and a Merkle node with their prefix byte), one thread:
  ``planes.native.sha256.hash_many`` with each implementation this CPU runs
  (multi-buffer AVX-512 and AVX2, OpenSSL one message at a time) against a
  Python hashlib loop. Ratio = median over rounds of OpenSSL time / side time.

    python -m bench.chain_runner [--events 200000] [--log 1000000] [--messages 200000] [--rounds 7]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from array import array
from collections.abc import Callable
from hashlib import sha256

from planes.native import chain as native
from planes.native import chain_py as twin
from planes.native import sha256 as multi

ZERO = bytes(32)


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


def ratios(times: dict[str, list[float]], baseline: str) -> dict[str, float]:
    """Median over rounds of baseline time / side time (> 1: faster than the baseline)."""
    return {name: statistics.median(b / t for b, t in zip(times[baseline], per_round))
            for name, per_round in times.items()}


def hashlib_loop(events: list[bytes]) -> tuple[bytes, bytes]:
    """The baseline: what the native batch does, as a plain Python loop."""
    head, leaves, heads = ZERO, [], []
    for event in events:
        leaf = sha256(b"\x00" + event).digest()
        head = sha256(head + leaf).digest()
        leaves.append(leaf)
        heads.append(head)
    return b"".join(leaves), b"".join(heads)


def bench_chain(count: int, rounds: int, threads: int) -> None:
    events = [os.urandom(256) for _ in range(count)]
    data = b"".join(events)
    offsets = array("Q", range(0, 256 * count + 1, 256))
    expected = hashlib_loop(events)
    sides = {
        "hashlib-loop": lambda: hashlib_loop(events),
        "twin": lambda: twin.hash_and_chain(ZERO, data, offsets),
        "native-1-thread": lambda: native.hash_and_chain(ZERO, data, offsets, threads=1),
        f"native-{threads}-threads": lambda: native.hash_and_chain(ZERO, data, offsets, threads=threads),
    }
    for name, side in sides.items():
        assert side() == expected, name
    times = interleaved(sides, rounds)
    ratio = ratios(times, "hashlib-loop")
    print(f"chain: {count:,} events of 256 bytes x {rounds} rounds (leaf hash + chain hash per event)")
    print(f"{'side':<20} {'median ms':>10} {'M events/s':>11} {'vs hashlib':>11}")
    for name, per_round in times.items():
        median = statistics.median(per_round)
        print(f"{name:<20} {median * 1e3:>10.1f} {count / median / 1e6:>11.3f} {ratio[name]:>10.2f}x")


def bench_log(count: int, rounds: int, threads: int) -> None:
    leaves = os.urandom(32 * count)
    heads = native.chain(ZERO, leaves)
    assert native.verify_chain(ZERO, leaves, heads) == -1 == twin.verify_chain(ZERO, leaves, heads)
    sides = {
        "twin": lambda: twin.verify_chain(ZERO, leaves, heads),
        "native-1-thread": lambda: native.verify_chain(ZERO, leaves, heads, threads=1),
        f"native-{threads}-threads": lambda: native.verify_chain(ZERO, leaves, heads, threads=threads),
    }
    report(f"verify: verify_chain of a {count:,}-event log", sides, rounds, count, "M events/s")
    root = native.merkle_root(leaves)
    assert root == twin.merkle_root(leaves)
    sides = {
        "twin": lambda: twin.merkle_root(leaves),
        "native-1-thread": lambda: native.merkle_root(leaves, threads=1),
        f"native-{threads}-threads": lambda: native.merkle_root(leaves, threads=threads),
    }
    report(f"root: merkle_root of {count:,} leaves", sides, rounds, count, "M leaves/s")

    index = count * 2 // 3 + 1
    leaf = leaves[32 * index:32 * index + 32]
    start = time.perf_counter()
    proof = native.inclusion_proof(leaves, index, count)
    build = time.perf_counter() - start
    assert proof == twin.inclusion_proof(leaves, index, count)
    calls = 20_000
    sides = {
        "twin": lambda: [twin.verify_inclusion(leaf, index, count, proof, root) for _ in range(calls)],
        "native": lambda: [native.verify_inclusion(leaf, index, count, proof, root) for _ in range(calls)],
    }
    assert all(side()[0] for side in sides.values())
    times = interleaved(sides, rounds)
    print(f"proof: inclusion proof of leaf {index:,} in a {count:,}-leaf tree: {len(proof)} hashes = "
          f"{32 * len(proof)} bytes; built natively in {build * 1e3:.1f} ms")
    for name, per_round in times.items():
        print(f"{name:<20} verify {statistics.median(per_round) / calls * 1e6:>8.2f} us")


def bench_hashes(count: int, rounds: int) -> None:
    for size in (256, 65):
        bench_hashes_of_size(size, count, rounds)


def bench_hashes_of_size(size: int, count: int, rounds: int) -> None:
    messages = [os.urandom(size) for _ in range(count)]
    data = b"".join(messages)
    offsets = array("Q", range(0, size * count + 1, size))
    sides: dict[str, Callable[[], object]] = {
        name: (lambda name=name: multi.hash_many(data, offsets, implementation=name))
        for name in multi.implementations()
    }
    sides["hashlib-loop"] = lambda: b"".join([sha256(message).digest() for message in messages])
    expected = sides["hashlib-loop"]()
    for name, side in sides.items():
        assert side() == expected, name
    times = interleaved(sides, rounds)
    ratio = ratios(times, "openssl")
    blocks = (size + 8) // 64 + 1
    print(f"hashes: {count:,} messages of {size} bytes ({blocks} blocks each) x {rounds} rounds, one thread")
    print(f"{'side':<20} {'median ms':>10} {'M hashes/s':>11} {'M blocks/s':>11} {'vs openssl':>11}")
    for name, per_round in times.items():
        median = statistics.median(per_round)
        print(f"{name:<20} {median * 1e3:>10.1f} {count / median / 1e6:>11.2f} "
              f"{count * blocks / median / 1e6:>11.1f} {ratio[name]:>10.2f}x")


def report(title: str, sides: dict[str, Callable[[], object]], rounds: int, count: int, unit: str) -> None:
    times = interleaved(sides, rounds)
    ratio = ratios(times, "twin")
    print(f"{title} x {rounds} rounds")
    print(f"{'side':<20} {'median ms':>10} {unit:>11} {'vs twin':>11}")
    for name, per_round in times.items():
        median = statistics.median(per_round)
        print(f"{name:<20} {median * 1e3:>10.1f} {count / median / 1e6:>11.3f} {ratio[name]:>10.2f}x")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000, help="256-byte events per chain round")
    parser.add_argument("--log", type=int, default=1_000_000, help="events in the log to verify, leaves in the tree")
    parser.add_argument("--messages", type=int, default=200_000, help="messages per size in the hashes part")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=native.DEFAULT_THREADS, help="threads for the native side")
    parser.add_argument("--only", choices=("chain", "log", "hashes"), help="run one part")
    args = parser.parse_args(argv)
    print(f"# {platform.python_implementation()} {platform.python_version()}, {os.cpu_count()} CPUs, "
          f"native default threads {native.DEFAULT_THREADS}, SHA-256 implementation {multi.implementation()}")
    if args.only in (None, "chain"):
        bench_chain(args.events, args.rounds, args.threads)
    if args.only in (None, "log"):
        bench_log(args.log, args.rounds, args.threads)
    if args.only in (None, "hashes"):
        bench_hashes(args.messages, args.rounds)


if __name__ == "__main__":
    main()

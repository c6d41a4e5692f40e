"""The benchmark runner keeps working (a tiny run; it reports, nothing is timed here)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_kernel_overhead_runner_reports_ratios():
    result = subprocess.run([sys.executable, "-m", "bench.kernel_overhead", "--rounds", "2", "--calls", "40",
                             "--concurrency", "4"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("kernel per-RPC overhead: 2 rounds x 40 calls")
    rows = {line.split()[0]: line.split() for line in lines[2:]}
    assert set(rows) == {"sequential", "4"}
    for row in rows.values():
        assert float(row[-2]) > 0 and row[-1].endswith("%")


def test_kernel_overhead_breakdown_names_every_side():
    result = subprocess.run([sys.executable, "-m", "bench.kernel_overhead", "--breakdown", "--rounds", "1",
                             "--calls", "20", "--concurrency", "4"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    sides = [line.split()[0] for line in result.stdout.splitlines()[2:]]
    assert sides == ["bare", "bare+metadata", "kernel-server", "kernel"]


def test_chain_runner_compares_native_with_hashlib():
    result = subprocess.run([sys.executable, "-m", "bench.chain_runner", "--events", "2000", "--log", "3000",
                             "--rounds", "1"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    sides = {line.split()[0] for line in result.stdout.splitlines() if line and not line[0].isspace()}
    assert {"native-1-thread", "native-2-threads", "twin"} <= sides
    assert "inclusion proof" in result.stdout


def test_evidence_append_runner_reports_each_path():
    result = subprocess.run([sys.executable, "-m", "bench.evidence_append", "--events", "200", "--batch", "100",
                             "--unary", "20", "--repeat", "1"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "in-process, batched" in result.stdout and "gRPC unary, one event" in result.stdout

"""Exports never hold the log thread, and are bounded: events and bytes per bundle, and how many at once."""

from __future__ import annotations

import asyncio
import contextlib
import base64
import json
import queue
import subprocess
import sys
import threading

import pytest

from planes.evidence.v1 import evidence_service_pb2 as pb
from planes.kernel import errors
from planes.plugins.evidence import bundle
from planes.plugins.evidence.export import ExportLimits
from planes.plugins.evidence.plane import Evidence
from tests.plugins.evidence.conftest import SERVICE, event, serve_evidence


async def _export(reviewer, **request) -> tuple[bytes, pb.BundleSummary]:
    chunks, summary = [], None
    async for part in reviewer.export_bundle(pb.ExportBundleRequest(**request), timeout=60):
        chunks.append(part.data)
        if part.HasField("summary"):
            summary = part.summary
    return b"".join(chunks), summary


class HeldBuilds:
    """Holds every bundle build at its start (on its export thread) until released: an export "in progress"."""

    def __init__(self, monkeypatch):
        self.entered: queue.Queue[str] = queue.Queue()
        self.release = threading.Event()
        real = bundle.build

        def held(**arguments):
            self.entered.put(arguments["tenant"])
            assert self.release.wait(60), "never released"
            return real(**arguments)

        monkeypatch.setattr(bundle, "build", held)

    async def wait_entered(self) -> str:
        return await asyncio.to_thread(self.entered.get, True, 30)


def _verify_offline(tmp_path, data: bytes) -> subprocess.CompletedProcess:
    path = tmp_path / "bundle.json"
    path.write_bytes(data)
    return subprocess.run([sys.executable, "-m", "planes.kernel.cli", "evidence", "verify", str(path),
                           "--public-key", str(tmp_path / "keys" / "evidence-signing.pub.pem")],
                          capture_output=True, text=True, cwd="/")


def test_another_tenants_append_is_acknowledged_while_an_export_is_held_mid_way(run, tmp_path, monkeypatch):
    """The export holds its thread until the appends are acknowledged: the appends cannot be waiting behind it."""
    held = HeldBuilds(monkeypatch)

    async def scenario(client):
        await client("service").append_events(pb.AppendEventsRequest(
            events=[event(f"a{n}", correlation="case", blob=b"v" * 60_000) for n in range(20)]), timeout=10)
        export = asyncio.ensure_future(_export(client("reviewer"), correlation_id="case"))
        assert await held.wait_entered() == "acme"
        other = await client("service", "globex").append_events(
            pb.AppendEventsRequest(events=[event("g1", correlation="case")]), timeout=10)
        same = await client("service").append_events(
            pb.AppendEventsRequest(events=[event("a-late", correlation="case")]), timeout=10)
        pending_when_acknowledged = not export.done()
        held.release.set()
        data, summary = await export
        found = [e.event_id async for page in client("reviewer", "globex").query_events(pb.QueryEventsRequest())
                 for e in page.events]
        return other, same, pending_when_acknowledged, data, summary, found

    other, same, pending, data, summary, found = serve_evidence(run, tmp_path, scenario)
    assert pending and list(other.sequences) == [21] and list(same.sequences) == [22]
    assert found == ["g1"], "the append was stored, not only acknowledged"
    assert (summary.event_count, summary.tree_size) == (20, 20), "the export's snapshot: the tree at its start"
    assert [e["sequence"] for e in json.loads(data)["events"]] == list(range(1, 21)), "a-late is after the snapshot"
    verified = _verify_offline(tmp_path, data)
    assert verified.returncode == 0, verified.stderr
    assert "20 events proven against a checkpoint of tree size 20" in verified.stdout


def test_exports_over_the_caps_are_refused_with_retry_after_and_the_slots_come_back(run, tmp_path, monkeypatch):
    held = HeldBuilds(monkeypatch)

    async def scenario(client):
        for tenant in ("acme", "globex", "initech"):
            await client("service", tenant).append_events(
                pb.AppendEventsRequest(events=[event(f"{tenant}-1", correlation="c")]), timeout=10)
        acme = client("reviewer")
        running = [asyncio.ensure_future(_export(acme, correlation_id="c")) for _ in range(2)]
        entered = [await held.wait_entered(), await held.wait_entered()]
        with pytest.raises(errors.LimitExceeded) as per_tenant:
            await _export(acme, correlation_id="c")
        running.append(asyncio.ensure_future(_export(client("reviewer", "globex"), correlation_id="c")))
        entered.append(await held.wait_entered())
        with pytest.raises(errors.LimitExceeded) as process:
            await _export(client("reviewer", "initech"), correlation_id="c")
        held.release.set()
        finished = [summary.event_count for _, summary in await asyncio.gather(*running)]
        again = await asyncio.gather(*(_export(acme, correlation_id="c") for _ in range(2)),
                                     _export(client("reviewer", "initech"), correlation_id="c"))
        return entered, per_tenant.value, process.value, finished, [summary.event_count for _, summary in again]

    entered, per_tenant, process, finished, again = serve_evidence(run, tmp_path, scenario, export_max_per_tenant=2,
                                                           export_max_concurrent=3)
    assert entered == ["acme", "acme", "globex"]
    assert (per_tenant.name, per_tenant.limit, per_tenant.actual) == ("export_max_per_tenant", 2, 3)
    assert per_tenant.retry_after == 5.0 and "retry" in per_tenant.message
    assert (process.name, process.limit, process.actual) == ("export_max_concurrent", 3, 4)
    assert process.retry_after == 5.0
    assert finished == [1, 1, 1], "the admitted exports were not disturbed by the refusals"
    assert again == [1, 1, 1], "finished exports give their slots back"


def test_an_export_over_the_byte_limit_is_refused_over_the_wire_with_a_hint(run, tmp_path):
    async def scenario(client):
        await client("service").append_events(pb.AppendEventsRequest(
            events=[event(f"big{n}", correlation="bulk", blob=b"x" * 60_000) for n in range(10)]), timeout=10)
        reviewer = client("reviewer")
        with pytest.raises(errors.LimitExceeded) as refused:
            await _export(reviewer, correlation_id="bulk")
        small = await client("service").append_events(
            pb.AppendEventsRequest(events=[event("small", correlation="one")]), timeout=10)
        data, summary = await _export(reviewer, correlation_id="one")
        return refused.value, small, summary

    refused, small, summary = serve_evidence(run, tmp_path, scenario, export_max_bytes=500_000)
    assert (refused.name, refused.limit) == ("export_max_bytes", 500_000)
    assert refused.actual > 600_000 and "narrow the time range" in refused.message
    assert list(small.sequences) == [11] and summary.event_count == 1, "a refused export leaves its slot free"


@pytest.fixture
def ten(log):
    log.append("acme", [event(f"e{n}", correlation="c1", prompt=f"value {n}", blob=bytes(100 * n))
                        for n in range(10)] + [event("other", correlation="c2", prompt="not selected")], SERVICE)
    return log


def _export_with(log, **limits):
    return Evidence(log, ExportLimits(**limits))._export(pb.ExportBundleRequest(tenant="acme", correlation_id="c1"))


@pytest.mark.parametrize("limit, refused", [(9, True), (10, False), (11, False)], ids=["limit-1", "limit", "limit+1"])
def test_the_event_limit_around_a_selection_of_ten(ten, limit, refused):
    size_before = ten.size
    if refused:
        with pytest.raises(errors.LimitExceeded) as raised:
            _export_with(ten, max_events=limit)
        assert (raised.value.name, raised.value.limit, raised.value.actual) == ("export_max_events", 9, 10)
        assert "narrow the time range" in raised.value.message
    else:
        data, count, _ = _export_with(ten, max_events=limit)
        assert count == 10 and bundle.verify(data, public_key_pem=ten.key.public_pem()).ok
    assert ten.size == size_before, "an export appends nothing"


def _stored_bytes(data: bytes) -> int:
    """The stored bytes a bundle carries: its leaves, raw values and salts (what export_max_bytes counts)."""
    total = 0
    for entry in json.loads(data)["events"]:
        total += len(base64.b64decode(entry["leaf"]))
        total += sum(len(base64.b64decode(v["salt"])) + len(base64.b64decode(v["value"]))
                     for v in entry["values"].values())
    return total


@pytest.mark.parametrize("offset, refused", [(-1, True), (0, False), (1, False)],
                         ids=["limit-1", "limit", "limit+1"])
def test_the_byte_limit_around_the_selections_stored_bytes(ten, offset, refused):
    data, _, _ = _export_with(ten)
    stored = _stored_bytes(data)
    assert stored > 10 * 100 * 4, "the values are counted, not only the leaves"
    if refused:
        with pytest.raises(errors.LimitExceeded) as raised:
            _export_with(ten, max_bytes=stored + offset)
        assert (raised.value.name, raised.value.limit, raised.value.actual) == ("export_max_bytes", stored - 1, stored)
    else:
        again, count, _ = _export_with(ten, max_bytes=stored + offset)
        assert count == 10 and bundle.verify(again, public_key_pem=ten.key.public_pem()).ok


def test_redacted_values_do_not_count_against_the_byte_limit(ten):
    ten.redact("acme", "e9", "blob", "too big", SERVICE)
    data, _, _ = _export_with(ten)
    assert "blob" not in json.loads(data)["events"][9]["values"]
    with pytest.raises(errors.LimitExceeded) as raised:
        _export_with(ten, max_bytes=1)
    assert raised.value.actual == _stored_bytes(data), "what the bundle carries, not what the segment once held"


def test_export_limits_come_from_the_settings_and_refuse_nonsense():
    limits = ExportLimits.from_settings({"export_max_events": 5, "export_max_bytes": 1024, "export_max_per_tenant": 1,
                                         "export_max_concurrent": 3})
    assert (limits.max_events, limits.max_bytes, limits.per_tenant, limits.process) == (5, 1024, 1, 3)
    assert ExportLimits.from_settings({}) == ExportLimits()
    with pytest.raises(errors.InvalidArgument, match="export_max_bytes must be at least 1"):
        ExportLimits.from_settings({"export_max_bytes": 0})


def test_an_append_is_acknowledged_while_a_query_page_and_a_proof_are_held(run, tmp_path, monkeypatch):
    """Query pages and proofs run on reader threads too: held there, they hold no append."""
    from planes.plugins.evidence.log import EvidenceLog

    entered, release = queue.Queue(), threading.Event()

    def holding(real, name):
        def held(self, *args, **kwargs):
            entered.put(name)
            assert release.wait(60), "never released"
            return real(self, *args, **kwargs)
        return held

    monkeypatch.setattr(EvidenceLog, "query", holding(EvidenceLog.query, "query"))
    monkeypatch.setattr(EvidenceLog, "prove_inclusion_at", holding(EvidenceLog.prove_inclusion_at, "proof"))

    async def scenario(client):
        await client("service").append_events(pb.AppendEventsRequest(events=[event("q1")]), timeout=10)
        reviewer = client("reviewer")

        async def query():
            return [e.event_id async for page in reviewer.query_events(pb.QueryEventsRequest(), timeout=60)
                    for e in page.events]

        reads = [asyncio.ensure_future(query()),
                 asyncio.ensure_future(reviewer.prove_inclusion(pb.ProveInclusionRequest(event_id="q1"), timeout=60))]
        held = sorted([await asyncio.to_thread(entered.get, True, 30) for _ in reads])
        appended = await client("service", "globex").append_events(
            pb.AppendEventsRequest(events=[event("g1")]), timeout=10)
        pending = [not read.done() for read in reads]
        release.set()
        found, proof = await asyncio.gather(*reads)
        return held, appended, pending, found, proof

    held, appended, pending, found, proof = serve_evidence(run, tmp_path, scenario)
    assert held == ["proof", "query"] and pending == [True, True]
    assert list(appended.sequences) == [2]
    assert found == ["q1"] and proof.leaf_index == 0 and proof.checkpoint.checkpoint


def test_a_caller_that_leaves_mid_build_keeps_its_slot_until_the_build_ends(run, tmp_path, monkeypatch):
    """A build thread cannot be stopped: cancelling and retrying must not pile builds up past the caps."""
    held = HeldBuilds(monkeypatch)

    async def scenario(client):
        await client("service").append_events(pb.AppendEventsRequest(events=[event("a1", correlation="c")]),
                                              timeout=10)
        acme = client("reviewer")
        leaving = asyncio.ensure_future(_export(acme, correlation_id="c"))
        assert await held.wait_entered() == "acme"
        leaving.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await leaving
        with pytest.raises(errors.LimitExceeded) as still_held:
            await _export(acme, correlation_id="c")
        held.release.set()
        for _ in range(100):  # the abandoned build ends on its thread, then its slot comes back
            try:
                _, summary = await _export(acme, correlation_id="c")
                return still_held.value, summary.event_count
            except errors.LimitExceeded:
                await asyncio.sleep(0.05)
        raise AssertionError("the slot never came back")

    still_held, count = serve_evidence(run, tmp_path, scenario, export_max_per_tenant=1, export_max_concurrent=1)
    assert (still_held.limit, still_held.actual) == (1, 2)
    assert count == 1

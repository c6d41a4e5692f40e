"""The evidence plane over real gRPC: roles, tenant scope, streaming append, export to verify."""

from __future__ import annotations

import contextlib
import subprocess
import sys

import pytest

from planes.evidence.v1 import evidence_service_pb2 as pb
from planes.kernel import errors
from planes.kernel.clients import connect
from planes.kernel.contracts import EvidencePlane
from tests.plugins.evidence.conftest import event, serve_evidence


def test_append_query_and_tenant_scope(run, tmp_path):
    async def scenario(client):
        service = client(("service",))
        reply = await service.append_events(pb.AppendEventsRequest(events=[event("e1", prompt="x")]), timeout=5)

        async def batches():
            yield pb.AppendEventStreamRequest(events=[event("e2"), event("e3")])
            yield pb.AppendEventStreamRequest(events=[event("e3"), event("e4")])

        streamed = await service.append_event_stream(batches(), timeout=5)
        reviewer = client(("reviewer",))
        found = [e.event_id async for page in reviewer.query_events(pb.QueryEventsRequest(correlation_id="corr-1"))
                 for e in page.events]
        with pytest.raises(errors.PermissionDenied):
            await client(("service",), tenant="globex").append_events(
                pb.AppendEventsRequest(tenant="acme", events=[event("x")]), timeout=5)
        other = [e async for page in client(("reviewer",), tenant="globex").query_events(pb.QueryEventsRequest())
                 for e in page.events]
        with pytest.raises(errors.PermissionDenied):
            [p async for p in client(("admin",), tenant="*").query_events(pb.QueryEventsRequest(tenant="acme"))]
        return reply, streamed, found, other

    reply, streamed, found, other = serve_evidence(run, tmp_path, scenario)
    assert list(reply.sequences) == [1] and len(reply.chain_head) == 32
    assert (streamed.appended, streamed.duplicates, streamed.last_sequence) == (3, 1, 4)
    assert found == ["e1", "e2", "e3", "e4"]
    assert other == [], "another tenant sees none of acme's events"


def test_a_changed_replay_reaches_a_remote_caller_as_already_exists(run, tmp_path):
    async def scenario(client):
        service = client(("service",))
        first = await service.append_events(pb.AppendEventsRequest(events=[event("e1", note="hello")]), timeout=5)
        with pytest.raises(errors.AlreadyExists) as caught:
            await service.append_events(pb.AppendEventsRequest(events=[event("e2"), event("e1", note="different")]),
                                        timeout=5)
        again = await service.append_events(pb.AppendEventsRequest(events=[event("e1", note="hello")]), timeout=5)
        found = [e.event_id async for page in client(("reviewer",)).query_events(pb.QueryEventsRequest())
                 for e in page.events]
        return first, caught.value, again, found

    first, refused, again, found = serve_evidence(run, tmp_path, scenario)
    assert "event id 'e1' was already appended (sequence 1) with different content (field 'note')" in refused.message
    assert refused.metadata["event_id"] == "e1"
    assert list(again.sequences) == [1] and again.chain_head == first.chain_head
    assert found == ["e1"], "nothing of the refused request was stored"


def test_a_stream_with_a_bad_batch_keeps_the_batches_before_it_and_names_the_bad_one(run, tmp_path):
    async def scenario(client):
        service = client(("service",))

        async def batches():
            for n in range(3):
                yield pb.AppendEventStreamRequest(events=[event(f"s{n}-{i}") for i in range(100)])
            yield pb.AppendEventStreamRequest(events=[event("bad", event_type="Not A Type")])
            yield pb.AppendEventStreamRequest(events=[event("after")])

        with pytest.raises(errors.InvalidArgument) as raised:
            await service.append_event_stream(batches(), timeout=10)
        stored = [e.event_id async for page in client(("reviewer",)).query_events(pb.QueryEventsRequest(limit=1000))
                  for e in page.events]

        async def again():
            for n in range(3):
                yield pb.AppendEventStreamRequest(events=[event(f"s{n}-{i}") for i in range(100)])
            yield pb.AppendEventStreamRequest(events=[event("after")])

        resent = await service.append_event_stream(again(), timeout=10)
        return raised.value, stored, resent

    error, stored, resent = serve_evidence(run, tmp_path, scenario)
    assert error.message.startswith("batch 3: event 0: event_type must be"), error.message
    assert stored == [f"s{n}-{i}" for n in range(3) for i in range(100)], "the batches before the bad one, in order"
    assert (resent.appended, resent.duplicates, resent.last_sequence) == (1, 300, 301), "resending is harmless"


def test_limit_error_crosses_the_wire_with_its_numbers(run, tmp_path):
    async def scenario(client):
        with pytest.raises(errors.LimitExceeded) as raised:
            await client(("service",)).append_events(
                pb.AppendEventsRequest(events=[event("big", blob=b"x" * (64 * 1024 + 1))]), timeout=5)
        return raised.value

    error = serve_evidence(run, tmp_path, scenario)
    assert (error.name, error.limit, error.actual) == ("field_value_bytes", 65536, 65537)


def test_export_over_grpc_then_verify_offline_with_the_cli(run, tmp_path):
    async def scenario(client):
        await client(("service",)).append_events(
            pb.AppendEventsRequest(events=[event("e1", correlation="order-9", prompt="p"),
                                           event("e2", correlation="order-9")]), timeout=5)
        chunks, summary = [], None
        async for part in client(("reviewer",)).export_bundle(pb.ExportBundleRequest(correlation_id="order-9")):
            if part.data:
                chunks.append(part.data)
            if part.HasField("summary"):
                summary = part.summary
        with pytest.raises(errors.PermissionDenied):
            [p async for p in client(("service",)).export_bundle(pb.ExportBundleRequest(correlation_id="order-9"))]
        return b"".join(chunks), summary

    data, summary = serve_evidence(run, tmp_path, scenario)
    assert summary.event_count == 2
    path = tmp_path / "bundle.json"
    path.write_bytes(data)
    public = tmp_path / "keys" / "evidence-signing.pub.pem"
    ok = subprocess.run([sys.executable, "-m", "planes.kernel.cli", "evidence", "verify", str(path),
                         "--public-key", str(public)], capture_output=True, text=True, cwd="/")
    assert ok.returncode == 0, ok.stderr
    assert "2 events proven" in ok.stdout
    path.write_bytes(data.replace(b'"sequence": 2', b'"sequence": 3'))
    bad = subprocess.run([sys.executable, "-m", "planes.kernel.cli", "evidence", "verify", str(path)],
                         capture_output=True, text=True, cwd="/")
    assert bad.returncode == 1 and "INVALID" in bad.stderr


def test_stopping_signs_a_checkpoint_covering_every_event(run, tmp_path):
    async def scenario(client):
        await client(("service",)).append_events(pb.AppendEventsRequest(events=[event("last-1"), event("last-2")]),
                                                 timeout=5)

    serve_evidence(run, tmp_path, scenario)
    from planes.plugins.evidence import open_log
    reopened = open_log(tmp_path)
    assert reopened.store.checkpoint()[0] == 2


@contextlib.contextmanager
def _cli_kernel(tmp_path):
    """A kernel served by ``planes serve`` in a child process: (cli, env, tokens by role, port)."""
    import os
    import socket
    import time

    state = tmp_path / "state"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("PLANES_")},
           "PLANES_STATE_DIR": str(state), "PLANES_SERVER__BIND": f"127.0.0.1:{port}"}
    cli = [sys.executable, "-m", "planes.kernel.cli"]
    server = subprocess.Popen([*cli, "serve"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and "serving on" not in server.stdout.readline():
            pass
        tokens = {}
        for role in ("service", "reviewer"):
            path = tmp_path / f"{role}.token"
            issued = subprocess.run([*cli, "token", "issue", "--principal", role, "--tenant", "acme", "--role", role,
                                     "--out", str(path)], env=env, capture_output=True, text=True)
            assert issued.returncode == 0, issued.stderr
            tokens[role] = path.read_text().strip()
        yield cli, env, tokens, port
    finally:
        server.terminate()
        server.communicate(timeout=30)


def _append_over_grpc(port, token, events):
    async def append():
        client = connect(f"127.0.0.1:{port}", EvidencePlane, token=token)
        try:
            await client.append_events(pb.AppendEventsRequest(events=events), timeout=10)
        finally:
            await client.close()

    from planes.kernel.runtime import run as run_loop
    run_loop(append())


def test_export_and_verify_with_the_cli_against_a_real_server(tmp_path):
    """A reviewer's whole path as commands: serve, export, verify."""
    with _cli_kernel(tmp_path) as (cli, env, tokens, port):
        state = tmp_path / "state"
        _append_over_grpc(port, tokens["service"], [event("x1", correlation="case-7")])
        bundle = tmp_path / "case-7.json"
        exported = subprocess.run([*cli, "evidence", "export", "--correlation-id", "case-7", "--out", str(bundle),
                                   "--token-file", str(tmp_path / "reviewer.token")], env=env,
                                  capture_output=True, text=True)
        assert exported.returncode == 0, exported.stderr
        assert "1 events" in exported.stdout
        denied = subprocess.run([*cli, "evidence", "export", "--correlation-id", "case-7", "--out",
                                 str(tmp_path / "no.json"), "--token-file", str(tmp_path / "service.token")],
                                env=env, capture_output=True, text=True)
        assert denied.returncode == 1 and "needs one of the roles reviewer" in denied.stderr
        assert not (tmp_path / "no.json").exists()
        verified = subprocess.run([*cli, "evidence", "verify", str(bundle), "--public-key",
                                   str(state / "keys" / "evidence-signing.pub.pem")], capture_output=True, text=True)
        assert verified.returncode == 0, verified.stderr


def test_the_cli_prints_a_tenants_events_by_correlation_type_and_time(tmp_path):
    """``planes evidence query``: what a plugin author reads to see which tool ran, as lines or JSON."""
    import json

    with _cli_kernel(tmp_path) as (cli, env, tokens, port):
        _append_over_grpc(port, tokens["service"], [
            event("x1", correlation="case-7", tool="search", digest=bytes(range(20))),
            event("x2", correlation="case-7", event_type="tool.failed", tool="search"),
            event("x3", correlation="case-8")])

        def query(*extra, token="reviewer"):
            return subprocess.run([*cli, "evidence", "query", "--token-file", str(tmp_path / f"{token}.token"),
                                   *extra], env=env, capture_output=True, text=True)

        lines = query("--correlation-id", "case-7")
        failed = query("--correlation-id", "case-7", "--type", "tool.failed", "--json")
        later = query("--since", "2999-01-01T00:00")
        malformed = query("--since", "yesterday")
        by_service = query("--correlation-id", "case-7", token="service")

    assert lines.returncode == 0, lines.stderr
    printed = lines.stdout.splitlines()
    assert len(printed) == 2 and all("corr=case-7" in line for line in printed)
    assert "tool.invoked" in printed[0] and "tool='search'" in printed[0]
    assert "digest=0x000102030405060708090a0b0c0d0e0f..." in printed[0], "bytes shown short, in hex"
    assert failed.returncode == 0, failed.stderr
    [record] = [json.loads(line) for line in failed.stdout.splitlines()]
    assert (record["eventId"], record["eventType"]) == ("x2", "tool.failed")
    assert later.returncode == 0 and later.stdout == "" and "no events for tenant 'acme' match" in later.stderr
    assert malformed.returncode == 1 and "--since 'yesterday' is not an ISO 8601 time" in malformed.stderr
    assert "Traceback" not in malformed.stderr
    assert by_service.returncode == 1 and "needs one of the roles" in by_service.stderr, "a service cannot read"


def test_the_cli_exports_nothing_as_an_error_and_a_bundle_owner_only_never_over_a_file(tmp_path):
    """No matching events: one line, exit 1, no file. A bundle (raw values) is 0600, whole, and never replaces a file."""
    import base64
    import os
    import stat

    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with _cli_kernel(tmp_path) as (cli, env, tokens, port):
        _append_over_grpc(port, tokens["service"], [event("x1", correlation="case-7", prompt="card 4111")])

        def export(correlation_id, out, *extra):
            return subprocess.run([*cli, "evidence", "export", "--correlation-id", correlation_id, "--out", str(out),
                                   "--token-file", str(tmp_path / "reviewer.token"), *extra], env=env,
                                  capture_output=True, text=True)

        nothing = export("case-8", out_dir / "empty.json")
        assert nothing.returncode == 1 and nothing.stdout == "", nothing.stdout
        assert nothing.stderr.strip().count("\n") == 0 and "Traceback" not in nothing.stderr
        assert "no events for tenant 'acme' match correlation id 'case-8'; nothing written" in nothing.stderr
        named = export("case-7", out_dir / "other.json", "--tenant", "globex")  # a reviewer of acme: refused
        assert named.returncode == 1 and not (out_dir / "other.json").exists()

        old_umask = os.umask(0)  # even a permissive umask leaves the bundle owner-only
        try:
            bundle = out_dir / "case-7.json"
            written = export("case-7", bundle)
        finally:
            os.umask(old_umask)
        assert written.returncode == 0, written.stderr
        assert "wrote" in written.stdout and "1 events" in written.stdout
        assert stat.S_IMODE(bundle.stat().st_mode) == 0o600
        assert sorted(p.name for p in out_dir.iterdir()) == ["case-7.json"], "no file beside it, no temporary left"
        content = bundle.read_bytes()
        assert base64.b64encode(b"card 4111") in content, "the bundle holds raw values: why it is owner-only"

        existing = out_dir / "kept.json"
        existing.write_bytes(b"mine")
        again = export("case-7", existing)
        assert again.returncode == 1 and "exists; choose another path" in again.stderr
        assert existing.read_bytes() == b"mine" and bundle.read_bytes() == content


def test_export_to_a_remote_kernel_needs_tls_before_any_connection(tmp_path):
    """The reviewer token never crosses the network in clear: a non-loopback address without a CA is refused."""
    token = tmp_path / "reviewer.token"
    token.write_text("not-sent")
    token.chmod(0o600)
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("PLANES_")}
    result = subprocess.run([sys.executable, "-m", "planes.kernel.cli", "evidence", "export", "--correlation-id",
                             "c", "--out", str(tmp_path / "b.json"), "--address", "192.0.2.7:50051",
                             "--token-file", str(token), "--state-dir", str(tmp_path / "state")],
                            env=env, capture_output=True, text=True, cwd="/")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "refusing to connect to 192.0.2.7:50051 without TLS" in result.stderr
    assert "--ca-file" in subprocess.run([sys.executable, "-m", "planes.kernel.cli", "evidence", "export", "--help"],
                                         env=env, capture_output=True, text=True, cwd="/").stdout
    assert not (tmp_path / "b.json").exists()


def _export(reviewer, request):
    async def collect():
        chunks, summary = [], None
        async for part in reviewer.export_bundle(request):
            chunks.append(part.data)
            if part.HasField("summary"):
                summary = part.summary
        return b"".join(chunks), summary
    return collect()


def test_request_numbers_past_int64_are_clamped_or_refused_by_name(run, tmp_path):
    """Valid protobuf timestamps reach year 9999 and uint64 fields 2^64-1; the store keeps int64."""
    from google.protobuf.timestamp_pb2 import Timestamp

    from planes.plugins.evidence import bundle

    async def scenario(client):
        await client(("service",)).append_events(
            pb.AppendEventsRequest(events=[event("e1", prompt="p"), event("e2")]), timeout=5)
        reviewer = client(("reviewer",))

        async def ids(**fields):
            return [e.event_id async for page in reviewer.query_events(pb.QueryEventsRequest(**fields))
                    for e in page.events]

        year_2300, year_9999 = Timestamp(seconds=10413792000), Timestamp(seconds=253402300799)
        found = {"end 2300": await ids(end_time=year_2300), "start 9999": await ids(start_time=year_9999),
                 "start 9999, end 2300": await ids(start_time=year_9999, end_time=year_2300),
                 "end before 1677": await ids(end_time=Timestamp(seconds=-10**11))}
        refused = {}
        with pytest.raises(errors.InvalidArgument) as caught:
            await ids(after_sequence=2**63)
        refused["after_sequence"] = caught.value
        with pytest.raises(errors.NotFound) as caught:
            await reviewer.get_checkpoint(pb.GetCheckpointRequest(tree_size=2**64 - 1), timeout=5)
        refused["get_checkpoint"] = caught.value
        with pytest.raises(errors.NotFound) as caught:
            await reviewer.prove_inclusion(pb.ProveInclusionRequest(event_id="e1", tree_size=2**63 + 5), timeout=5)
        refused["prove_inclusion"] = caught.value
        exported = await _export(reviewer, pb.ExportBundleRequest(start_time=Timestamp(seconds=-10**11)))
        after = await ids()
        return found, refused, exported, after

    found, refused, (data, summary), after = serve_evidence(run, tmp_path, scenario)
    assert found == {"end 2300": ["e1", "e2"], "start 9999": [], "start 9999, end 2300": [], "end before 1677": []}
    assert "after_sequence must be at most 9223372036854775807" in refused["after_sequence"].message
    assert "got 9223372036854775808" in refused["after_sequence"].message
    assert "no checkpoint at tree size 18446744073709551615" in refused["get_checkpoint"].message
    assert "no checkpoint at tree size 9223372036854775813" in refused["prove_inclusion"].message
    assert summary.event_count == 2
    public = (tmp_path / "keys" / "evidence-signing.pub.pem").read_bytes()
    assert bundle.verify(data, public_key_pem=public).ok
    assert after == ["e1", "e2"], "nothing was changed or lost"


def test_prove_consistency_to_size_0_means_the_latest_checkpoint(run, tmp_path):
    from planes.native import load

    chain = load("chain")

    async def scenario(client):
        service, reviewer = client(("service",)), client(("reviewer",))
        sizes = []
        for batch in range(3):
            await service.append_events(pb.AppendEventsRequest(
                events=[event(f"e{batch}-{i}") for i in range(4)]), timeout=5)
            signed = (await reviewer.get_checkpoint(pb.GetCheckpointRequest(), timeout=5)).checkpoint
            sizes.append(pb.Checkpoint.FromString(signed.checkpoint).tree_size)
        return sizes, await reviewer.prove_consistency(pb.ProveConsistencyRequest(first_tree_size=4), timeout=5)

    sizes, reply = serve_evidence(run, tmp_path, scenario, checkpoint_every=4)
    first, second = (pb.Checkpoint.FromString(s.checkpoint) for s in (reply.first, reply.second))
    assert sizes == [4, 8, 12] and (first.tree_size, second.tree_size) == (4, 12)
    assert chain.verify_consistency(4, 12, first.root_hash, second.root_hash, list(reply.proof))
    assert not chain.verify_consistency(4, 12, first.root_hash, bytes(32), list(reply.proof))

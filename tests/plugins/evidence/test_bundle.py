"""Export bundles verify offline, and each kind of tampering is named."""

from __future__ import annotations

import base64
import json

import pytest

from planes.evidence.v1 import evidence_service_pb2 as pb
from planes.plugins.evidence import bundle
from planes.plugins.evidence.plane import Evidence
from planes.kernel.tokens import SigningKey
from tests.plugins.evidence.conftest import SERVICE, event


@pytest.fixture
def exported(log):
    log.append("acme", [event("e1", correlation="c1", prompt="hello", note=b"\x01"),
                        event("x1", correlation="other"),
                        event("e2", correlation="c1", answer="world"),
                        event("e3", correlation="c1")], SERVICE)
    data, count, size = Evidence(log)._export(pb.ExportBundleRequest(tenant="acme", correlation_id="c1"))
    return log, data, count, size


def _edit(data: bytes, change) -> bytes:
    document = json.loads(data)
    change(document)
    return json.dumps(document).encode()


def test_round_trip(exported):
    log, data, count, size = exported
    assert (count, size) == (3, 4)
    verdict = bundle.verify(data, public_key_pem=log.key.public_pem())
    assert verdict.ok, verdict.problem
    assert (verdict.events, verdict.tree_size, verdict.key_id) == (3, 4, log.key.kid)
    assert verdict.notes == []


def test_unpinned_key_is_noted(exported):
    _, data, _, _ = exported
    verdict = bundle.verify(data)
    assert verdict.ok and "pin one" in verdict.notes[0]


def _set_value(document, index, name, raw: bytes):
    document["events"][index]["values"][name]["value"] = base64.b64encode(raw).decode()


@pytest.mark.parametrize(("change", "problem"), [
    (lambda d: _set_value(d, 0, "prompt", b"HELLO"),
     "event #0 (sequence 1, id 'e1'): tampered event: field 'prompt' does not match its commitment"),
    (lambda d: d["events"][1].update(leaf=d["events"][0]["leaf"]),
     "event #1 (sequence 1, id 'e1'): tampered event: leaf sequence 1, entry says 3"),
    (lambda d: d["events"][1]["audit_path"].reverse(),
     "event #1 (sequence 3, id 'e2'): wrong proof"),
    (lambda d: d["checkpoint"].update(signature=base64.b64encode(b"\x00" * 64).decode()),
     "wrong signature: the checkpoint is not signed"),
    (lambda d: d["events"].pop(1),
     "manifest signature invalid"),
    (lambda d: d.update(tenant="globex"),
     "event of tenant 'acme' in a bundle of tenant 'globex'"),
])
def test_each_tamper_is_named(exported, change, problem):
    log, data, _, _ = exported
    verdict = bundle.verify(_edit(data, change), public_key_pem=log.key.public_pem())
    assert not verdict.ok
    assert problem in verdict.problem


@pytest.mark.parametrize(("change", "problem"), [
    (lambda d: d["events"][0].update(values=[]), "event #0: malformed entry"),
    (lambda d: d["events"][0]["audit_path"].__setitem__(0, base64.b64encode(b"x" * 31).decode()),
     "event #0: malformed entry: every audit path node is 32 bytes"),
    (lambda d: d["events"][0].update(leaf=5), "event #0: malformed entry: expected a base64 string, got int"),
    (lambda d: d["events"][1].update(sequence="3"), "event #1: malformed entry: sequence must be a positive integer"),
    (lambda d: d["events"][1].update(sequence=True), "event #1: malformed entry: sequence must be a positive integer"),
    (lambda d: d["events"].__setitem__(2, "e3"), "event #2: malformed entry: an entry is an object, not str"),
    (lambda d: d["checkpoint"].update(signature=7), "checkpoint missing or not base64"),
    (lambda d: d.update(checkpoint=[]), "checkpoint missing or not base64"),
    (lambda d: d.update(manifest_signature=None), "manifest signature invalid"),
    (lambda d: d.update(public_key=3), "bad public key"),
], ids=["values-list", "short-node", "leaf-number", "sequence-string", "sequence-bool", "entry-string",
        "signature-number", "checkpoint-list", "manifest-null", "key-number"])
def test_a_malformed_bundle_is_a_named_verdict_never_an_exception(exported, change, problem):
    log, data, _, _ = exported
    verdict = bundle.verify(_edit(data, change), public_key_pem=log.key.public_pem())
    assert not verdict.ok and problem in verdict.problem, verdict.problem


def test_the_cli_names_a_malformed_bundle_in_one_line(exported, tmp_path):
    import subprocess
    import sys
    log, data, _, _ = exported
    path, key = tmp_path / "bad.json", tmp_path / "key.pem"
    path.write_bytes(_edit(data, lambda d: d["events"][0].update(values=[])))
    key.write_bytes(log.key.public_pem())
    result = subprocess.run([sys.executable, "-m", "planes.kernel.cli", "evidence", "verify", str(path),
                             "--public-key", str(key)], capture_output=True, text=True, cwd="/")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "event #0: malformed entry" in result.stderr


def test_a_bundle_from_another_key_fails_a_pinned_check(exported):
    _, data, _, _ = exported
    other = SigningKey.generate()
    verdict = bundle.verify(data, public_key_pem=other.public_pem())
    assert not verdict.ok and "wrong signature" in verdict.problem
    assert not bundle.verify(data, expected_key_id="0" * 16).ok


@pytest.mark.parametrize("garbage", [b"", b"{", b"[]", b'{"format": "x"}', b"\xff\xfe"])
def test_garbage_is_not_a_bundle(garbage):
    verdict = bundle.verify(garbage)
    assert not verdict.ok and verdict.problem.startswith(("not a bundle", "bad public key"))


def test_redacted_values_leave_the_bundle_valid(exported):
    log, _, _, _ = exported
    log.redact("acme", "e1", "prompt", "PII", SERVICE)
    data, _, _ = Evidence(log)._export(pb.ExportBundleRequest(tenant="acme", correlation_id="c1"))
    document = json.loads(data)
    assert "prompt" not in document["events"][0]["values"]
    assert bundle.verify(data, public_key_pem=log.key.public_pem()).ok


def test_export_needs_a_selection(log):
    from planes.kernel import errors
    with pytest.raises(errors.InvalidArgument, match="correlation_id or a time range"):
        Evidence(log)._export(pb.ExportBundleRequest(tenant="acme"))


def test_write_new_publishes_an_owner_only_file_whole_and_never_replaces_one(tmp_path):
    """The check before the export can race another writer: the link into place is what refuses to replace."""
    import os
    import stat

    from planes.plugins.evidence.bundle import write_new

    old_umask = os.umask(0)
    try:
        assert write_new(tmp_path / "b.json", b"{}")
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE((tmp_path / "b.json").stat().st_mode) == 0o600
    (tmp_path / "theirs.json").write_bytes(b"theirs")
    assert write_new(tmp_path / "theirs.json", b"{}") is False
    assert (tmp_path / "theirs.json").read_bytes() == b"theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.json", "theirs.json"], "no temporary file left"

"""`planes data` against a real `planes serve`: put a file, stat it, get it back, delete it, quarantine review."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.conftest import CLI, serve_env, start_serve, stop_serve


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    state = tmp_path_factory.mktemp("data-cli")
    env = serve_env(state)
    server = start_serve(env)
    yield env, state
    stop_serve(server)


def planes(env, *args, token=None):
    env = {**env, **({"PLANES_TOKEN": token} if token else {})}
    return subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=60)


def token(env, role, tenant="acme"):
    issued = planes(env, "token", "issue", "--principal", f"{role}-cli", "--tenant", tenant, "--role", role,
                    "--ttl", "600")
    assert issued.returncode == 0, issued.stderr
    return issued.stdout.strip()


def test_put_stat_get_and_delete_a_file(served, tmp_path):
    env, _ = served
    service = token(env, "service")
    source = tmp_path / "report.bin"
    source.write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    put = planes(env, "data", "put", str(source), "--classification", "confidential", token=service)
    assert put.returncode == 0, put.stderr
    info = json.loads(put.stdout)
    payload_id = info["ref"]["payloadId"]
    assert info["name"] == "report.bin" and info["encryptedAtRest"] is True and info["ref"]["tenant"] == "acme"

    stat = planes(env, "data", "stat", payload_id, token=service)
    assert json.loads(stat.stdout)["state"] == "PAYLOAD_STATE_AVAILABLE"
    out = tmp_path / "copy.bin"
    got = planes(env, "data", "get", payload_id, "-o", str(out), token=service)
    assert got.returncode == 0, got.stderr
    assert out.read_bytes() == source.read_bytes()
    assert oct(out.stat().st_mode & 0o777) == "0o600", "decrypted bytes are the caller's alone, whatever the umask"
    again = planes(env, "data", "get", payload_id, "-o", str(out), token=service)
    assert again.returncode != 0 and "exists" in again.stderr

    removed = planes(env, "data", "rm", payload_id, "--reason", "cleanup", token=service)
    assert json.loads(removed.stdout)["state"] == "PAYLOAD_STATE_DELETED"
    gone = planes(env, "data", "get", payload_id, "-o", str(tmp_path / "gone.bin"), token=service)
    assert gone.returncode != 0 and "was deleted" in gone.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy.bin", "report.bin"]


def test_a_get_that_fails_after_bytes_arrived_leaves_no_file(served, tmp_path):
    """The bytes are written to a partial file as they arrive; a digest that fails at the end removes it."""
    env, state = served
    service = token(env, "service")
    source = tmp_path / "plain.bin"
    source.write_bytes(os.urandom(2 * 1024 * 1024 + 5))
    put = planes(env, "data", "put", str(source), "--classification", "public", token=service)
    assert put.returncode == 0, put.stderr
    payload_id = json.loads(put.stdout)["ref"]["payloadId"]
    stored = state / "data" / "objects" / payload_id
    damaged = bytearray(stored.read_bytes())
    damaged[-1] ^= 0xFF  # in the last chunk: every earlier one is written out first
    stored.write_bytes(damaged)

    out = tmp_path / "out" / "copy.bin"
    out.parent.mkdir()
    got = planes(env, "data", "get", payload_id, "-o", str(out), token=service)
    assert got.returncode != 0 and f"received {len(damaged)} bytes not matching its info" in got.stderr
    assert list(out.parent.iterdir()) == [], "neither the file nor its partial .copy.bin.partial is left"


def test_put_with_a_ttl_of_zero_keeps_the_default(served, tmp_path):
    env, _ = served
    source = tmp_path / "x.bin"
    source.write_bytes(b"x" * 10)
    put = planes(env, "data", "put", str(source), "--classification", "internal", "--ttl", "0",
                 token=token(env, "service"))
    assert put.returncode == 0, put.stderr
    info = json.loads(put.stdout)
    assert "expiresAt" in info and info["expiresAt"] > info["createdAt"], "0 means the default, not forever"
    negative = planes(env, "data", "put", str(source), "--classification", "internal", "--ttl", "-1",
                      token=token(env, "service"))
    assert negative.returncode != 0 and "ttl is -1.000 s" in negative.stderr


def test_payload_commands_need_a_token_that_may_read(served, tmp_path):
    env, _ = served
    (tmp_path / "x").write_bytes(b"x")
    no_token = planes(env, "data", "put", str(tmp_path / "x"), "--classification", "public")
    assert no_token.returncode != 0 and "needs a token" in no_token.stderr
    admin = planes(env, "data", "put", str(tmp_path / "x"), "--classification", "public", "--tenant", "acme",
                   token=token(env, "admin", "*"))
    assert admin.returncode != 0 and "needs one of the roles service, worker" in admin.stderr


def test_quarantine_list_is_for_operators(served):
    env, _ = served
    listed = planes(env, "data", "quarantine", "list", token=token(env, "operator"))
    assert listed.returncode == 0 and listed.stdout == ""
    refused = planes(env, "data", "quarantine", "list", token=token(env, "service"))
    assert refused.returncode != 0


def test_quarantine_list_shows_no_task_credential(served):
    """A worker's put that lands in quarantine: the operator's listing carries its header, not its credential."""
    import asyncio
    import time

    from planes.kernel.clients import connect
    from planes.kernel.contracts import DataPlane
    from planes.kernel.kernel import SIGNING_KEY_FILE
    from planes.kernel.tokens import SigningKey
    from planes.plugins.data.client import DataClient
    from planes.plugins.execution.credentials import issue_credential

    env, state = served
    credential = issue_credential(SigningKey.load(state / SIGNING_KEY_FILE), tenant="globex", task_id="t-1",
                                  attempt_epoch=1, payload_ids=[], expires_at=time.time() + 60).token

    async def quarantined_put():
        client = connect(env["PLANES_SERVER__BIND"], DataPlane, token=token(env, "worker", "globex"))
        try:
            await DataClient(client, "globex", task_credential=credential).put(
                b"output", classification="internal", digest=bytes(32))
        except Exception as exc:
            return exc
        finally:
            await client.close()

    refused = asyncio.run(quarantined_put())
    assert "quarantined" in str(refused)
    listed = planes(env, "data", "quarantine", "list", token=token(env, "operator", "globex"))
    assert listed.returncode == 0, listed.stderr
    [entry] = [json.loads(line) for line in listed.stdout.splitlines()]
    assert entry["declared"]["tenant"] == "globex" and "taskCredential" not in entry["declared"]
    assert credential not in listed.stdout and credential.split(".")[-1] not in listed.stdout


def test_a_remote_kernel_needs_tls_before_the_token_is_sent(served, tmp_path):
    env, _ = served
    reader = token(env, "service")
    refused = planes(env, "data", "stat", "p-1", "--address", "192.0.2.7:50051", token=reader)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "refusing to connect to 192.0.2.7:50051 without TLS" in refused.stderr and reader not in refused.stderr
    assert "--ca-file" in planes(env, "data", "put", "--help").stdout

"""`planes task` against a served kernel: get shows the digest to approve, approve binds it."""

from __future__ import annotations

import asyncio
import os
import re
import sys

import pytest

from planes.execution.v1 import execution_service_pb2 as pb
from planes.kernel.secrets import write_secret

from .conftest import spec, tool


async def _planes(cluster, *args: str) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PLANES_")}
    env["PLANES_STATE_DIR"] = str(cluster.state_dir)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "planes.kernel.cli", *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), 60)
    return process.returncode, out.decode(), err.decode()


async def _held_for_approval(cluster) -> tuple[tuple[str, ...], str, tuple[int, str, str], str]:
    """A task held for approval, shown by ``planes task get`` to operator alice: (her CLI options, task id,
    what the command printed, the action digest it showed)."""
    token = cluster.state_dir / "alice.token"
    write_secret(token, cluster.token(("operator",), "acme", "alice").encode())
    common = ("--address", cluster.address, "--token-file", str(token))
    held = await cluster.tasks().submit_task(pb.SubmitTaskRequest(task=spec(tool("a", "deploy", text="v2"))))
    shown = await _planes(cluster, "task", "get", held.task.task_id, *common)
    return common, held.task.task_id, shown, re.search(r"digest ([0-9a-f]{64})", shown[1]).group(1)


def test_task_get_then_approve_with_the_digest_shown(scenario):
    async def body(cluster):
        common, task_id, shown, digest = await _held_for_approval(cluster)
        wrong = await _planes(cluster, "task", "approve", task_id, "--action-id", "a", "--digest", "00" * 32, *common)
        approved = await _planes(cluster, "task", "approve", task_id, "--action-id", "a", "--digest", digest, *common)
        return shown, wrong, approved
    shown, wrong, approved = scenario(body)
    assert shown[0] == 0 and "awaiting_approval" in shown[1] and "pending approval: action a" in shown[1]
    assert wrong[0] == 1 and "changed since it was shown" in wrong[2]
    assert approved[0] == 0, approved[2]
    assert "approved by alice" in approved[1] and " queued " in approved[1]



def test_task_deny_says_denied_by_whom(scenario):
    async def body(cluster):
        common, task_id, _, digest = await _held_for_approval(cluster)
        return await _planes(cluster, "task", "deny", task_id, "--action-id", "a", "--digest", digest,
                             "--comment", "not today", *common)
    code, out, err = scenario(body)
    assert code == 0, err
    assert out.startswith("denied by alice\n") and " failed " in out and "approval.denied: not today" in out

def test_task_submit_from_json_and_toml_files(scenario, tmp_path):
    json_spec = tmp_path / "deploy.json"
    json_spec.write_text('{"idempotencyKey": "deploy-v2", "allowedTools": ["deploy"], '
                         '"actions": [{"actionId": "a", "tool": {"tool": "deploy", "arguments": {"text": "v2"}}}]}')
    toml_spec = tmp_path / "deploy.toml"
    toml_spec.write_text('idempotency_key = "deploy-v3"\nallowed_tools = ["deploy"]\n'
                         '[[actions]]\naction_id = "a"\ntool = { tool = "deploy", arguments = { text = "v3" } }\n')
    broken, unknown = tmp_path / "broken.json", tmp_path / "unknown.yaml"
    broken.write_text('{"actions": [')
    unknown.write_text("idempotency_key: x\nno_such_field: 1\n")

    async def body(cluster):
        token = cluster.state_dir / "shop.token"
        write_secret(token, cluster.token(("service",), "acme", "shop").encode())
        common = ("--address", cluster.address, "--token-file", str(token))
        results = [await _planes(cluster, "task", "submit", "-f", str(path), *common)
                   for path in (json_spec, json_spec, toml_spec, broken, unknown)]
        operator = cluster.state_dir / "alice.token"
        write_secret(operator, cluster.token(("operator",), "acme", "alice").encode())
        results.append(await _planes(cluster, "task", "submit", "-f", str(json_spec), "--address", cluster.address,
                                     "--token-file", str(operator)))
        task_id = re.search(r"^(\S+) awaiting_approval", results[0][1], re.M).group(1)
        stored = (await cluster.tasks().get_task(pb.GetTaskRequest(task_id=task_id))).task
        return results, stored
    (first, again, toml, bad, odd, refused), stored = scenario(body)
    assert first[0] == 0 and first[1].startswith("submitted\n") and " awaiting_approval " in first[1], first[2]
    assert again[0] == 0 and again[1].startswith("already submitted (same idempotency key)")
    assert again[1].split("\n")[1].split()[0] == first[1].split("\n")[1].split()[0], "the same task"
    assert toml[0] == 0 and toml[1].startswith("submitted\n"), toml[2]
    assert stored.spec.idempotency_key == "deploy-v2" and stored.spec.correlation.tenant == "acme"
    assert bad[0] == 1 and "broken.json: not valid JSON" in bad[2]
    assert odd[0] == 1 and "unknown.yaml: not a TaskSpec" in odd[2] and "no_such_field" in odd[2]
    assert refused[0] == 1 and "needs one of the roles service; alice has operator" in refused[2]


# -- TLS options -------------------------------------------------------------------------------

def _parse(*argv: str):
    import argparse

    from planes.plugins.execution.cli import add_commands

    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers())
    return parser.parse_args(argv)


def test_every_client_command_takes_the_kernels_tls_options():
    for argv in (("worker",), ("task", "submit", "-f", "spec.json"), ("task", "get", "t-1"),
                 ("task", "watch", "t-1"), ("task", "cancel", "t-1"),
                 ("task", "approve", "t-1", "--action-id", "a", "--digest", "00"),
                 ("task", "deny", "t-1", "--action-id", "a", "--digest", "00")):
        args = _parse(*argv, "--ca-file", "ca.pem", "--allow-insecure-remote")
        assert (args.ca_file, args.allow_insecure_remote) == ("ca.pem", True), argv


def test_task_passes_the_ca_file_to_connect(monkeypatch, tmp_path):
    import planes.kernel.clients as clients

    ca = tmp_path / "ca.pem"
    ca.write_bytes(b"-----BEGIN CERTIFICATE-----\n")
    token = tmp_path / "token"
    write_secret(token, b"t")
    seen = {}

    def connect(address, contract, **options):
        seen.update(options, address=address)
        raise _Stop

    monkeypatch.setattr(clients, "connect", connect)
    args = _parse("task", "get", "t-1", "--address", "kernel.example:7443", "--token-file", str(token),
                  "--ca-file", str(ca), "--state-dir", str(tmp_path / "state"))
    try:
        args.handler(args)
    except _Stop:
        pass
    assert seen == {"address": "kernel.example:7443", "token": "t", "root_certificates": ca.read_bytes(),
                    "allow_insecure": False}


class _Stop(Exception):
    pass


def test_a_remote_address_without_tls_is_refused_with_the_kernels_message(run, tmp_path):
    token = tmp_path / "token"
    write_secret(token, b"t")

    class Local:
        state_dir = tmp_path

    async def main():
        return await asyncio.gather(
            _planes(Local, "task", "get", "t-1", "--address", "192.0.2.1:7443", "--token-file", str(token)),
            # No token given: nothing is sent; the state directory's admin token is no task token.
            _planes(Local, "task", "get", "t-1", "--address", "192.0.2.1:7443"))
    (code, _, err), (admin_code, _, admin_err) = run(main())
    assert code == 1 and "refusing to connect to 192.0.2.1:7443 without TLS" in err and "--ca-file" in err
    assert admin_code == 1 and "this command needs a token" in admin_err


# -- what a task's commands show and how they end ---------------------------------------------

def _lines(output: str, prefix: str) -> list[str]:
    return [line.strip().removeprefix(prefix) for line in output.splitlines() if line.strip().startswith(prefix)]


def test_task_submit_watch_shows_the_correlation_id_and_result_and_exits_0_once_completed(scenario, tmp_path):
    from planes.plugins.execution.worker import Worker, load_adapters

    spec_file = tmp_path / "upper.json"
    spec_file.write_text('{"allowedTools": ["upper"], '
                         '"actions": [{"actionId": "a", "tool": {"tool": "upper", "arguments": {"text": "hi"}}}]}')

    async def body(cluster):
        token = cluster.state_dir / "shop.token"
        write_secret(token, cluster.token(("service",), "acme", "shop").encode())
        tools, models = load_adapters(cluster.kernel.settings)
        worker = Worker(cluster.workers(), cache=cluster.plugin.cache, name="cli", adapters=tools, models=models)
        stop = asyncio.Event()
        running = asyncio.get_running_loop().create_task(worker.run(stop))
        try:
            done = await _planes(cluster, "task", "submit", "-f", str(spec_file), "--watch",
                                 "--address", cluster.address, "--token-file", str(token))
        finally:
            stop.set()
            await running
        task_id = done[1].split("\n")[1].split()[0]
        stored = (await cluster.tasks().get_task(pb.GetTaskRequest(task_id=task_id))).task
        events = await cluster.events(stored.spec.correlation.correlation_id)
        return done, stored, events
    (code, out, err), stored, events = scenario(body)
    assert code == 0, err
    assert stored.state == pb.TASK_STATE_COMPLETED
    shown = set(_lines(out, "correlation id: "))
    assert shown == {stored.spec.correlation.correlation_id} and events, "the id the evidence is filed under"
    results = _lines(out, "result: ")
    assert len(results) == 1 and '"REDACTED"' in results[0], out  # the policy's transform, then the tool's output


def test_task_submit_watch_exits_1_with_the_reason_when_the_task_is_denied(scenario, tmp_path):
    spec_file = tmp_path / "danger.json"
    spec_file.write_text('{"allowedTools": ["danger"], "actions": [{"actionId": "a", "tool": {"tool": "danger"}}]}')

    async def body(cluster):
        token = cluster.state_dir / "shop.token"
        write_secret(token, cluster.token(("service",), "acme", "shop").encode())
        # Denied at admission: the task has ended before the watch begins, which must not wait forever.
        return await _planes(cluster, "task", "submit", "-f", str(spec_file), "--watch",
                             "--address", cluster.address, "--token-file", str(token))
    code, out, err = scenario(body)
    task_id = out.split("\n")[1].split()[0]
    assert code == 1
    assert err.strip() == f"planes: task {task_id} was denied: policy.denied: a: danger is never allowed"


def test_task_deny_then_watch_and_cancel_then_watch_end_non_zero(scenario):
    async def body(cluster):
        token = cluster.state_dir / "alice.token"
        write_secret(token, cluster.token(("operator",), "acme", "alice").encode())
        common = ("--address", cluster.address, "--token-file", str(token))
        denied, cancelled = [(await cluster.tasks().submit_task(pb.SubmitTaskRequest(
            task=spec(tool("a", "deploy", text=text), key=text)))).task for text in ("v2", "v3")]
        shown = await _planes(cluster, "task", "get", denied.task_id, *common)
        digest = re.search(r"digest ([0-9a-f]{64})", shown[1]).group(1)
        deny = await _planes(cluster, "task", "deny", denied.task_id, "--action-id", "a", "--digest", digest,
                             "--comment", "not today", *common)
        cancel = await _planes(cluster, "task", "cancel", cancelled.task_id, "--reason", "superseded", *common)
        watched = [await _planes(cluster, "task", "watch", task.task_id, *common) for task in (denied, cancelled)]
        return denied.task_id, cancelled.task_id, deny, cancel, watched
    denied_id, cancelled_id, deny, cancel, (watch_denied, watch_cancelled) = scenario(body)
    assert deny[0] == 0 and deny[1].startswith("denied by alice\n"), deny
    assert cancel[0] == 0, cancel[2]
    assert watch_denied[0] == 1 and " failed " in watch_denied[1]
    assert watch_denied[2].strip() == f"planes: task {denied_id} was denied: approval.denied: not today"
    assert watch_cancelled[0] == 1
    assert watch_cancelled[2].strip() == f"planes: task {cancelled_id} was cancelled: cancelled: superseded"


def test_task_commands_ask_for_a_token_rather_than_send_the_admin_one(scenario):
    """The admin role reaches no TaskService call: without --token-file the command says what it needs."""
    async def body(cluster):
        return await _planes(cluster, "task", "get", "t-1", "--address", cluster.address)
    code, _, err = scenario(body)
    assert code == 1
    assert err.splitlines() == ["planes: error: this command needs a token: --token-file or PLANES_TOKEN"]


# -- a worker's name and directory ------------------------------------------------------------

def test_an_unnamed_worker_gets_the_host_name_back_after_a_restart_and_a_second_one_beside_it(tmp_path):
    """Its name is its control-plane identity and keeps its config cache (and rollback floor) across restarts."""
    import socket

    from planes.plugins.execution.cli import claim_worker_dir

    from planes.plugins.execution.cli import _machine_tag

    host = f"{socket.gethostname()}-{_machine_tag(tmp_path)}"
    first, first_lock = claim_worker_dir(tmp_path, None)
    second, second_lock = claim_worker_dir(tmp_path, None)
    assert (first, second) == (host, f"{host}-2")
    first_lock.release()  # the first worker stops
    again, again_lock = claim_worker_dir(tmp_path, None)
    assert again == host, "a restart finds its own directory, not a new one"
    assert sorted(path.name for path in tmp_path.iterdir()) == [host, f"{host}-2"]
    assert oct((tmp_path / host).stat().st_mode & 0o777) == "0o700"
    again_lock.release()
    second_lock.release()
    elsewhere, elsewhere_lock = claim_worker_dir(tmp_path / "other-state", None)
    assert elsewhere != host, "another state directory (or machine) gets another name for the same host name"
    elsewhere_lock.release()


def test_a_named_worker_already_running_is_refused(tmp_path):
    from planes.kernel.errors import InvalidArgument
    from planes.plugins.execution.cli import claim_worker_dir

    name, lock = claim_worker_dir(tmp_path, "w1")
    with pytest.raises(InvalidArgument, match=r"a worker named 'w1' is already running here \(pid \d+\)"):
        claim_worker_dir(tmp_path, "w1")
    lock.release()
    assert claim_worker_dir(tmp_path, "w1")[0] == "w1"


@pytest.mark.parametrize("name", ["../escape", "a/b", ".hidden", "", "x" * 65, "sp ace"])
def test_a_worker_name_that_is_not_a_plain_name_is_refused(tmp_path, name):
    from planes.kernel.errors import InvalidArgument
    from planes.plugins.execution.cli import claim_worker_dir

    with pytest.raises(InvalidArgument, match="a worker name is 1-64 letters"):
        claim_worker_dir(tmp_path / "workers", name)
    assert not (tmp_path / "workers").exists() and not (tmp_path / "escape").exists()


def test_a_worker_without_the_control_key_says_where_to_find_it_and_makes_nothing(run, tmp_path):
    token = tmp_path / "worker.token"
    write_secret(token, b"t")
    elsewhere = tmp_path / "not-the-kernels"

    class Local:
        state_dir = elsewhere

    async def main():
        return await asyncio.gather(
            _planes(Local, "worker", "--address", "127.0.0.1:1", "--token-file", str(token)),
            _planes(Local, "worker", "--address", "127.0.0.1:1", "--token-file", str(token),
                    "--control-public-key", str(tmp_path / "typo.pem")))
    (code, _, err), (named_code, _, named_err) = run(main())
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert f"no control-plane public key at {elsewhere}/keys/control-signing.pub.pem" in err
    assert "--state-dir" in err and "--control-public-key" in err
    assert named_code == 1 and f"no control-plane public key at {tmp_path}/typo.pem" in named_err
    assert "Check --control-public-key." in named_err
    assert not (elsewhere / "workers").exists(), "nothing made under a state directory that is not the kernel's"

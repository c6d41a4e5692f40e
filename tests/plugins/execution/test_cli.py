"""`planes task` against a served kernel: get shows the digest to approve, approve binds it."""

from __future__ import annotations

import asyncio
import os
import re
import sys

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


def test_task_get_then_approve_with_the_digest_shown(scenario):
    async def body(cluster):
        token = cluster.state_dir / "alice.token"
        write_secret(token, cluster.token(("operator",), "acme", "alice").encode())
        common = ("--address", cluster.address, "--token-file", str(token))
        held = await cluster.tasks().submit_task(pb.SubmitTaskRequest(task=spec(tool("a", "deploy", text="v2"))))
        task_id = held.task.task_id
        shown = await _planes(cluster, "task", "get", task_id, *common)
        digest = re.search(r"digest ([0-9a-f]{64})", shown[1]).group(1)
        wrong = await _planes(cluster, "task", "approve", task_id, "--action-id", "a", "--digest", "00" * 32, *common)
        approved = await _planes(cluster, "task", "approve", task_id, "--action-id", "a", "--digest", digest, *common)
        return shown, wrong, approved
    shown, wrong, approved = scenario(body)
    assert shown[0] == 0 and "awaiting_approval" in shown[1] and "pending approval: action a" in shown[1]
    assert wrong[0] == 1 and "changed since it was shown" in wrong[2]
    assert approved[0] == 0, approved[2]
    assert "approved by alice" in approved[1] and " queued " in approved[1]

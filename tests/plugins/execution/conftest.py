"""A real kernel with the evidence, control and execution planes on a loopback port,
seeded with tools, policies and model routes through the control plane's API."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from google.protobuf import json_format, struct_pb2

from planes.control.v1 import control_service_pb2 as cpb
from planes.evidence.v1 import evidence_service_pb2 as epb
from planes.execution.v1 import execution_service_pb2 as pb
from planes.kernel.clients import connect
from planes.kernel.contracts import ControlPlane, EvidencePlane, TaskPlane, WorkerPlane
from planes.kernel.host import Candidate, PluginHost
from planes.kernel.kernel import Kernel
from planes.kernel.secrets import write_secret
from planes.kernel.server import KernelServer
from planes.kernel.tokens import issue_token
from planes.plugins.control import ControlPlugin
from planes.plugins.evidence import EvidencePlugin
from planes.plugins.execution import BuiltinAdapters, ExecutionPlugin
from tests.conftest import make_settings

EXAMPLES = "planes.plugins.execution.examples"
#: Tools that write where their arguments say: allowed on the tests' workers only.
FAULT_TOOLS = "planes.plugins.execution.fault_tools"
ECHO_JSON = "import json, sys; print(json.dumps(json.load(sys.stdin)))"
TOOL = cpb.RESOURCE_KIND_TOOL_CONTRACT


def python_tool(function: str, side_effect: str = "none", **extra) -> dict:
    target = {"module": FAULT_TOOLS if function in ("sleep", "pause", "count") else EXAMPLES, "function": function}
    if function == "count":
        target["reconcile"] = "reconcile_count"
    return {"version": "1", "adapter": "python", "target": target, "side_effect": side_effect,
            "classification": "internal", **extra}


#: The seeded desired state of tenant acme: (kind, name, spec).
SEED = [
    (TOOL, "noop", python_tool("noop")),
    (TOOL, "upper", python_tool("upper")),
    (TOOL, "count", python_tool("count", "non_idempotent")),
    (TOOL, "count-idem", python_tool("count", "idempotent")),
    (TOOL, "count-blind", {**python_tool("count", "non_idempotent"),
                           "target": {"module": FAULT_TOOLS, "function": "count"}}),
    (TOOL, "sleep", python_tool("sleep", "idempotent", timeout_seconds=60)),
    (TOOL, "deploy", python_tool("upper", "non_idempotent", approval_triggers=["always"])),
    (TOOL, "danger", python_tool("noop")),
    (TOOL, "pause", python_tool("pause")),
    (TOOL, "shell", {"version": "1", "adapter": "subprocess", "side_effect": "none", "classification": "internal",
                     "target": {"command": ["python3", "-c", ECHO_JSON]}}),
    (TOOL, "clock", {"version": "1", "adapter": "mcp", "side_effect": "none", "classification": "internal",
                     "timeout_seconds": 60,
                     "target": {"command": "mcp-server-time", "tool": "get_current_time"}}),
    (cpb.RESOURCE_KIND_POLICY, "baseline", {"rules": [
        {"name": "no-danger", "effect": "deny", "tools": ["danger"], "reason": "danger is never allowed"},
        {"name": "quiet-upper", "effect": "transform", "tools": ["upper"], "set_arguments": {"text": "redacted"}},
        {"name": "risky", "effect": "require_approval", "min_risk": "high", "tools": ["count"]},
    ]}),
    (cpb.RESOURCE_KIND_MODEL_ROUTE, "public-echo", {"adapter": "echo", "allowed_classifications": ["public",
                                                                                                     "internal"]}),
    (cpb.RESOURCE_KIND_MODEL_ROUTE, "private-echo", {"adapter": "echo",
                                                     "allowed_classifications": ["confidential"]}),
]

EXECUTION_SETTINGS = {"lease_seconds": 2.0, "heartbeat_seconds": 0.4, "reap_seconds": 0.2, "max_attempts": 4}


@dataclass
class Cluster:
    kernel: Kernel
    server: KernelServer
    port: int
    plugin: ExecutionPlugin
    state_dir: Path
    clients: list = field(default_factory=list)
    processes: list = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def token(self, roles=("service",), tenant="acme", principal=None, ttl=600) -> str:
        return issue_token(self.kernel.signing_key, principal=principal or roles[0], tenant=tenant,
                           roles=list(roles), ttl_seconds=ttl)

    def client(self, contract, roles=("service",), tenant="acme", principal=None):
        made = connect(self.address, contract, token=self.token(roles, tenant, principal))
        self.clients.append(made)
        return made

    def tasks(self, roles=("service",), tenant="acme", principal=None) -> TaskPlane:
        return self.client(TaskPlane, roles, tenant, principal)

    def workers(self, principal="worker-1", tenant="*") -> WorkerPlane:
        return self.client(WorkerPlane, ("worker",), tenant, principal)

    async def publish(self, resources=SEED, tenant="acme") -> int:
        admin = self.client(ControlPlane, ("admin",), "*")
        for kind, name, spec in resources:
            body = json_format.ParseDict(spec, struct_pb2.Struct())
            try:
                current = await admin.get_resource(cpb.GetResourceRequest(tenant=tenant, kind=kind, name=name))
                version = current.resource.resource_version
            except Exception:
                version = 0
            await admin.put_resource(cpb.PutResourceRequest(tenant=tenant, kind=kind, name=name, spec=body,
                                                            expected_resource_version=version), timeout=10)
        listed = await admin.list_snapshots(cpb.ListSnapshotsRequest(), timeout=10)
        latest = listed.snapshots[0].revision if listed.snapshots else 0
        published = await admin.publish_snapshot(cpb.PublishSnapshotRequest(expected_revision=latest), timeout=10)
        revision = published.snapshot.revision
        await self.plugin.wait_for_revision(revision)
        return revision

    async def events(self, correlation_id: str, tenant="acme") -> list[epb.Event]:
        reviewer = self.client(EvidencePlane, ("reviewer",), tenant)
        request = epb.QueryEventsRequest(tenant=tenant, correlation_id=correlation_id)
        return [event async for page in reviewer.query_events(request) for event in page.events]

    def worker_process(self, name: str, *extra: str, principal: str = "worker-proc") -> subprocess.Popen:
        token_file = self.state_dir / f"{name}.token"
        if not token_file.exists():
            write_secret(token_file, self.token(("worker",), "*", principal).encode())
        env = {k: v for k, v in os.environ.items() if not k.startswith("PLANES_")}
        env["PLANES_STATE_DIR"] = str(self.state_dir)
        log = open(self.state_dir / f"{name}.log", "ab")
        process = subprocess.Popen(
            [sys.executable, "-m", "planes.kernel.cli", "worker", "--address", self.address, "--token-file",
             str(token_file), "--name", name, "--slots", "4", "--python-module", FAULT_TOOLS, *extra],
            env=env, stdout=log, stderr=subprocess.STDOUT)
        self.processes.append(process)
        return process


def spec(*actions: pb.Action, key: str = "", tools=None, **fields) -> pb.TaskSpec:
    names = tools if tools is not None else sorted({a.tool.tool for a in actions if a.WhichOneof("target") == "tool"})
    return pb.TaskSpec(idempotency_key=key, allowed_tools=names, actions=list(actions), **fields)


def tool(action_id: str, name: str, **arguments) -> pb.Action:
    body = struct_pb2.Struct()
    body.update(arguments)
    return pb.Action(action_id=action_id, tool=pb.ToolAction(tool=name, arguments=body))


async def wait_state(tasks: TaskPlane, task_id: str, *states: int, timeout: float = 30.0) -> pb.Task:
    """Follow the task's watch until it reaches one of ``states``."""
    async with asyncio.timeout(timeout):
        async for change in tasks.watch_task(pb.WatchTaskRequest(task_id=task_id)):
            if change.task.state in states:
                return change.task
    raise AssertionError(f"task {task_id} ended without reaching {states}")


@asynccontextmanager
async def cluster(state_dir: Path, *, execution: dict | None = None, seed=True, data: bool = False):
    """With ``data``, the data plane runs too (its default settings: egress rules included)."""
    settings = make_settings(state_dir, plugin={"execution": {**EXECUTION_SETTINGS, **(execution or {})},
                                                "execution-adapters": {"python_modules": [FAULT_TOOLS]}})
    plugins = [EvidencePlugin(), ControlPlugin(), ExecutionPlugin(), BuiltinAdapters()]
    if data:
        from planes.plugins.data import DataPlugin
        plugins.append(DataPlugin())
    kernel = Kernel(settings, PluginHost.load(settings, [Candidate(p.name, "test", p) for p in plugins])).open()
    server = KernelServer(kernel)
    port = await server.start()
    running = Cluster(kernel, server, port, plugins[2], state_dir)
    try:
        if seed:
            await running.publish()
        yield running
    finally:
        for process in running.processes:
            if process.poll() is None:
                process.kill()
            process.wait(timeout=10)
        for made in running.clients:
            await made.close()
        await server.stop(grace=1)


@pytest.fixture
def scenario(run, tmp_path):
    """Run ``async def body(cluster)`` against a fresh seeded cluster."""
    def go(body, **options):
        async def main():
            async with cluster(tmp_path / "state", **options) as running:
                return await body(running)
        return run(main())
    return go


__all__ = ["Cluster", "cluster", "spec", "tool", "wait_state"]

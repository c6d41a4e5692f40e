"""``planes demo``: one governed task, end to end, on a kernel of its own.

It starts a kernel with every plane embedded (control, data, evidence,
execution) on a loopback port of the system's choosing, seeds a ``demo``
tenant through the control plane (identity mappings, an ``echo`` model
route, an approval-gated python tool, a policy) and publishes the snapshot,
then starts a real ``planes worker`` subprocess. It puts an input payload
into the data plane and submits a task that reads it, calls the model route
and the tool (approved through ``ApproveTask`` with the digest of the action
as submitted), and writes an output payload; it follows the task with
``WatchTask``, reads the output back, exports the task's evidence bundle by
correlation id and has ``planes evidence verify`` check it offline.

Every step prints one line: ids, sizes and digests, never payload bytes or
tokens. Whatever it started (the worker, the server) it stops, on success
and on failure. The ``PLANES_*`` environment is ignored: the demo's kernel
is its own, not the one ``planes serve`` would run.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from google.protobuf import json_format, struct_pb2

from planes.common.v1 import common_pb2
from planes.control.v1 import control_service_pb2 as cpb
from planes.evidence.v1 import evidence_service_pb2 as epb
from planes.execution.v1 import execution_service_pb2 as pb
from planes.kernel.errors import NotFound, PlanesError

from .policy import action_digest

__all__ = ["DEMO_INPUT", "DEMO_TENANT", "DemoFailed", "run_demo", "seed_resources"]

DEMO_TENANT = "demo"
TOOL = "publish-report"
ROUTE = "echo"
#: The input payload the demo puts into the data plane.
DEMO_INPUT = (b"Quarterly operations note\n"
              b"All four planes ran on one host.\n"
              b"Every side effect was approved and recorded.\n")
PLANES = ("control", "data", "evidence", "execution")
TERMINAL = {pb.TASK_STATE_COMPLETED, pb.TASK_STATE_FAILED, pb.TASK_STATE_CANCELLED}


class DemoFailed(PlanesError):
    """A step of the demo did not do what it should; the message names the step."""


def seed_resources() -> list[tuple[int, str, str, dict]]:
    """The demo tenant's desired state: ``(kind, tenant, name, spec)``."""
    return [
        (cpb.RESOURCE_KIND_TENANT, "*", DEMO_TENANT, {"display_name": "planes demo"}),
        (cpb.RESOURCE_KIND_IDENTITY_MAPPING, DEMO_TENANT, "demo-operator",
         {"principal": "demo-operator", "roles": ["operator"]}),
        (cpb.RESOURCE_KIND_IDENTITY_MAPPING, DEMO_TENANT, "demo-auditor",
         {"principal": "demo-auditor", "roles": ["reviewer"]}),
        (cpb.RESOURCE_KIND_MODEL_ROUTE, DEMO_TENANT, ROUTE,
         {"adapter": "echo", "allowed_classifications": ["public", "internal"]}),
        # Writing a payload again only makes another copy of the same bytes: idempotent.
        (cpb.RESOURCE_KIND_TOOL_CONTRACT, DEMO_TENANT, TOOL,
         {"version": "1", "adapter": "python", "side_effect": "idempotent", "classification": "internal",
          "approval_triggers": ["always"], "timeout_seconds": 30,
          "target": {"module": "planes.plugins.execution.examples", "function": "publish_report"}}),
        (cpb.RESOURCE_KIND_POLICY, DEMO_TENANT, "demo-policy", {
            "description": "what the demo tenant may do",
            "rules": [
                {"name": "confidential-stays-in", "effect": "deny", "tools": ["*"],
                 "classifications": ["confidential", "restricted"],
                 "reason": "the demo's tools are cleared for internal data only"},
                {"name": "writes-need-a-person", "effect": "require_approval", "tools": ["*"],
                 "side_effects": ["idempotent", "non_idempotent"], "reason": "a tool that writes needs approval"},
            ]}),
    ]


class _Progress:
    def __init__(self, total: int):
        self.step, self.total = 0, total

    def __call__(self, what: str, detail: str) -> None:
        self.step += 1
        print(f"[{self.step}/{self.total}] {what}: {detail}", flush=True)

    @staticmethod
    def more(detail: str) -> None:
        print(f"      {detail}", flush=True)


def _short(digest: bytes) -> str:
    return digest.hex()[:16]


def run_demo(state_dir: Path | None, *, timeout: float = 60.0, bundle: Path | None = None,
             output: Path | None = None) -> int:
    from planes.kernel.errors import InvalidArgument
    from planes.kernel.runtime import run

    for flag, path in (("--bundle", bundle), ("--output", output)):
        if path is not None and (path.exists() or not path.parent.is_dir()):
            raise InvalidArgument(f"{flag} {path}: " + ("exists; choose another path" if path.exists()
                                                        else f"no directory {path.parent}"))
    fresh = state_dir is None
    state = Path(tempfile.mkdtemp(prefix="planes-demo-")) if fresh else Path(state_dir)
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    run(_demo(state, timeout, bundle, output))
    if fresh:
        print(f"state kept in {state} (remove it when done)", flush=True)
    return 0


async def _demo(state: Path, timeout: float, bundle: Path | None, output: Path | None) -> None:
    from planes.kernel.kernel import Kernel
    from planes.kernel.server import KernelServer
    from planes.kernel.settings import load_settings

    say = _Progress(10)
    settings = load_settings(None, env={}, overrides={"state_dir": str(state), "server.bind": "127.0.0.1:0"})
    kernel = Kernel(settings).open()
    running = {loaded.name for loaded in kernel.host.plugins}
    missing = [name for name in PLANES if name not in running]
    if missing:
        await kernel.stop()
        raise DemoFailed(f"the demo needs the {', '.join(PLANES)} planes; this installation lacks "
                         f"{', '.join(missing)} (see 'planes plugins')")
    server = KernelServer(kernel)
    port = await server.start()
    address = f"127.0.0.1:{port}"
    say("kernel", f"serving on {address} with the {', '.join(PLANES)} planes embedded; state in {state}")
    session = _Session(kernel, address, state, say)
    try:
        async with asyncio.timeout(timeout):
            await session.run(bundle, output)
    except TimeoutError:
        raise DemoFailed(f"the demo did not finish within {timeout:g} s (at step {say.step + 1}); "
                         f"worker log: {session.worker_log}") from None
    finally:
        await session.close()
        await server.stop(grace=1)


class _Session:
    """The demo's clients, one per role, and the worker it started."""

    def __init__(self, kernel, address: str, state: Path, say: _Progress):
        self.kernel, self.address, self.state, self.say = kernel, address, state, say
        self.dir = state / "demo"
        self.dir.mkdir(exist_ok=True, mode=0o700)
        self.worker_log = self.dir / "worker.log"
        self.worker: subprocess.Popen | None = None
        self.draining: asyncio.Task | None = None
        self.clients: list = []

    def token(self, principal: str, tenant: str, *roles: str) -> str:
        from planes.kernel.tokens import issue_token

        return issue_token(self.kernel.signing_key, principal=principal, tenant=tenant, roles=list(roles),
                           ttl_seconds=900)

    def client(self, contract, principal: str, tenant: str, *roles: str):
        from planes.kernel.clients import connect

        made = connect(self.address, contract, token=self.token(principal, tenant, *roles))
        self.clients.append(made)
        return made

    async def close(self) -> None:
        if self.worker is not None and self.worker.poll() is None:
            self.worker.terminate()
            try:
                await asyncio.to_thread(self.worker.wait, 10)
            except subprocess.TimeoutExpired:
                self.worker.kill()
                await asyncio.to_thread(self.worker.wait)
        if self.draining is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.draining, 5)
        for made in self.clients:
            with contextlib.suppress(Exception):
                await made.close()

    async def run(self, bundle: Path | None, output: Path | None) -> None:
        from planes.kernel.contracts import ControlPlane, DataPlane, EvidencePlane, TaskPlane
        from planes.plugins.data.client import DataClient  # the data plane's client library

        say = self.say
        revision = await self.seed(self.client(ControlPlane, "demo-admin", "*", "admin"))
        await self.start_worker()

        data = DataClient(self.client(DataPlane, "demo-client", DEMO_TENANT, "service"), DEMO_TENANT)
        correlation_id = f"demo-{os.urandom(8).hex()}"
        correlation = common_pb2.Correlation(tenant=DEMO_TENANT, correlation_id=correlation_id)
        put = await data.put(DEMO_INPUT, classification="internal", name="note.txt", media_type="text/plain",
                             correlation=correlation, timeout=30)
        say("input payload", f"{put.ref.payload_id} ({put.ref.size} bytes, internal, "
                             f"blake3 {_short(put.ref.digest.value)}...) put through the data plane")

        spec = self.task_spec(put.ref, correlation_id)
        tasks = self.client(TaskPlane, "demo-client", DEMO_TENANT, "service")
        submitted = await tasks.submit_task(pb.SubmitTaskRequest(tenant=DEMO_TENANT, task=spec), timeout=30)
        task = submitted.task
        say("task submitted", f"{task.task_id} under config revision {task.config.revision} "
                              f"(correlation {correlation_id}); following it with WatchTask")
        if task.config.revision < revision:
            raise DemoFailed(f"the task ran under revision {task.config.revision}, not the seeded {revision}")
        operator = self.client(TaskPlane, "demo-operator", DEMO_TENANT, "operator")
        final = await self.follow(tasks, operator, task.task_id, spec)

        outputs = list(final.result.outputs)
        if len(outputs) != 1:
            raise DemoFailed(f"task {final.task_id} completed with {len(outputs)} output payloads, expected 1")
        ref = outputs[0]
        info, body = await data.get(ref.payload_id, expected_digest=ref.digest, verify=True, timeout=30)
        content = body.to_pybytes()
        sha256 = hashlib.sha256(content).hexdigest()
        say("output payload", f"{ref.payload_id} read back: {len(content)} bytes, {info.media_type or 'blob'}, "
                              f"blake3 {_short(ref.digest.value)}... (verified), sha256 {sha256}")
        if output is not None:
            output.write_bytes(content)
            say.more(f"written to {output}")

        reviewer = self.client(EvidencePlane, "demo-auditor", DEMO_TENANT, "reviewer")
        path, events = await self.export(reviewer, correlation_id, bundle or self.dir / f"{final.task_id}.bundle")
        await self.verify(path)
        print(f"done: task {final.task_id} completed; output payload {ref.payload_id} sha256 {sha256}; "
              f"{events} evidence events in {path}, verified", flush=True)

    # -- the steps -------------------------------------------------------------------

    async def seed(self, admin) -> int:
        for kind, tenant, name, body in seed_resources():
            spec = json_format.ParseDict(body, struct_pb2.Struct())
            try:  # a reused state directory holds them already
                held = await admin.get_resource(cpb.GetResourceRequest(tenant=tenant, kind=kind, name=name),
                                                timeout=10)
                version = held.resource.resource_version
            except NotFound:
                version = 0
            await admin.put_resource(cpb.PutResourceRequest(tenant=tenant, kind=kind, name=name, spec=spec,
                                                            expected_resource_version=version), timeout=10)
        listed = await admin.list_snapshots(cpb.ListSnapshotsRequest(), timeout=10)
        latest = listed.snapshots[0].revision if listed.snapshots else 0
        published = (await admin.publish_snapshot(cpb.PublishSnapshotRequest(expected_revision=latest),
                                                  timeout=10)).snapshot
        execution = next(loaded.plugin for loaded in self.kernel.host.plugins if loaded.name == "execution")
        await execution.wait_for_revision(published.revision)
        self.say("desired state", f"tenant {DEMO_TENANT}, 2 identity mappings, model route {ROUTE}, "
                                  f"tool {TOOL} (approval always), policy demo-policy; published revision "
                                  f"{published.revision} (digest {_short(published.content_digest.value)}...), "
                                  "applied by the execution host")
        return published.revision

    async def start_worker(self) -> None:
        from planes.kernel.secrets import write_secret

        token_file = self.dir / "worker.token"
        token_file.unlink(missing_ok=True)
        write_secret(token_file, self.token("demo-worker", "*", "worker").encode())
        env = {k: v for k, v in os.environ.items() if not k.startswith("PLANES_")}
        argv = [sys.executable, "-m", "planes.kernel.cli", "worker", "--address", self.address,
                "--token-file", str(token_file), "--state-dir", str(self.state), "--name", "demo-worker",
                "--tenant", DEMO_TENANT, "--slots", "2"]
        with open(self.worker_log, "ab") as log:
            # subprocess.Popen (vfork, then exec) on a thread, not the event
            # loop's fork: a fork of this threaded gRPC process can crash the
            # child before it execs.
            self.worker = await asyncio.to_thread(subprocess.Popen, argv, env=env, stdin=subprocess.DEVNULL,
                                                  stdout=subprocess.PIPE, stderr=log)
        line = await asyncio.to_thread(self.worker.stdout.readline)
        with open(self.worker_log, "ab") as log:
            log.write(line)
        if not line:
            await asyncio.to_thread(self.worker.wait)
            raise DemoFailed(f"the worker exited ({self.worker.returncode}) before starting; see {self.worker_log}")
        # Keep draining its few lines so it never blocks on a full pipe.
        self.draining = asyncio.ensure_future(asyncio.to_thread(self._drain))
        self.say("worker", f"'planes worker' subprocess, pid {self.worker.pid}, tenant {DEMO_TENANT}; "
                           f"log {self.worker_log}")

    def _drain(self) -> None:
        with open(self.worker_log, "ab") as log:
            while self.worker is not None and (line := self.worker.stdout.readline()):
                log.write(line)
                log.flush()

    @staticmethod
    def task_spec(ref: common_pb2.PayloadRef, correlation_id: str) -> pb.TaskSpec:
        prompt = struct_pb2.Struct()
        prompt.update({"prompt": "Summarise the attached note in one line."})
        arguments = struct_pb2.Struct()
        arguments.update({"input": ref.payload_id, "name": "report.txt"})
        spec = pb.TaskSpec(
            correlation=common_pb2.Correlation(correlation_id=correlation_id), idempotency_key=correlation_id,
            risk=pb.RISK_MEDIUM, allowed_tools=[TOOL], inputs=[ref], evidence_required=True,
            budget=pb.Budget(max_tool_calls=1, max_model_calls=1),
            actions=[pb.Action(action_id="summarise", model=pb.ModelAction(route=ROUTE, parameters=prompt,
                                                                           inputs=[ref])),
                     pb.Action(action_id="publish", tool=pb.ToolAction(tool=TOOL, arguments=arguments,
                                                                       inputs=[ref]))])
        spec.deadline.FromSeconds(int(time.time()) + 600)
        return spec

    async def follow(self, tasks, operator, task_id: str, spec: pb.TaskSpec) -> pb.Task:
        """Print each state change; approve what policy holds, if it is what was submitted."""
        intended = {action.action_id: action_digest(action) for action in spec.actions}
        watch = tasks.watch_task(pb.WatchTaskRequest(tenant=DEMO_TENANT, task_id=task_id))
        stream = watch.__aiter__()
        worker_exit = asyncio.ensure_future(asyncio.to_thread(self.worker.wait))
        try:
            while True:
                following = asyncio.ensure_future(stream.__anext__())
                done, _ = await asyncio.wait({following, worker_exit}, return_when=asyncio.FIRST_COMPLETED)
                if following not in done:
                    following.cancel()
                    raise DemoFailed(f"the worker exited ({self.worker.returncode}) while task {task_id} ran; "
                                     f"see {self.worker_log}")
                try:
                    change = following.result()
                except StopAsyncIteration:
                    raise DemoFailed(f"the watch of task {task_id} ended before the task did") from None
                task = change.task
                state = pb.TaskState.Name(task.state).removeprefix("TASK_STATE_").lower()
                self.say.more(f"task {state} ({change.reason})")
                if task.state == pb.TASK_STATE_AWAITING_APPROVAL:
                    for pending in task.pending_approvals:
                        await self.approve(operator, task, pending, intended)
                if task.state in TERMINAL:
                    break
        finally:
            worker_exit.cancel()
            with contextlib.suppress(Exception):
                await stream.aclose()
        if task.state != pb.TASK_STATE_COMPLETED:
            raise DemoFailed(f"task {task_id} ended {state}: {task.failure.code}: {task.failure.message}")
        usage = task.result.usage
        self.say("task completed", f"{usage.model_calls} model call, {usage.tool_calls} tool call, "
                                   f"{usage.tokens} tokens; {len(task.result.outputs)} output payload")
        return task

    async def approve(self, operator, task: pb.Task, pending: pb.PendingApproval, intended: dict) -> None:
        action_id = pending.action.action_id
        shown = pending.action_digest.value
        mine = intended.get(action_id)
        self.say("approval", f"action {action_id} ({pending.action.tool.tool}) held: {pending.reason}; "
                             f"digest {shown.hex()}")
        # Approve only what was submitted: a held action whose digest differs
        # (a transform, a changed payload) is not what the submitter meant.
        if mine is None or mine.value != shown:
            raise DemoFailed(f"the held action {action_id} is not the action submitted (digest differs)")
        reply = await operator.approve_task(pb.ApproveTaskRequest(
            tenant=DEMO_TENANT, task_id=task.task_id, action_id=action_id, action_digest=mine,
            comment="approved by the planes demo"), timeout=10)
        self.say.more(f"approved by {reply.approval.approver} through ApproveTask, bound to digest "
                      f"{_short(reply.approval.action_digest.value)}...")

    async def export(self, reviewer, correlation_id: str, path: Path) -> tuple[Path, int]:
        chunks, summary = [], epb.BundleSummary()
        request = epb.ExportBundleRequest(tenant=DEMO_TENANT, correlation_id=correlation_id)
        async for part in reviewer.export_bundle(request, timeout=30):
            if part.data:
                chunks.append(part.data)
            if part.HasField("summary"):
                summary = part.summary
        data = b"".join(chunks)
        if hashlib.sha256(data).digest() != summary.digest.value:
            raise DemoFailed("the exported bundle does not match the digest the evidence plane sent")
        if not summary.event_count:
            raise DemoFailed(f"the evidence plane holds no events for correlation {correlation_id}")
        path.write_bytes(data)
        self.say("evidence export", f"{summary.event_count} events for correlation {correlation_id}, checkpoint "
                                    f"tree size {summary.tree_size}: {path} ({len(data)} bytes)")
        query = epb.QueryEventsRequest(tenant=DEMO_TENANT, correlation_id=correlation_id)
        types = [event.event_type async for page in reviewer.query_events(query, timeout=30) for event in page.events]
        self.say.more(f"events: {', '.join(types)}")
        return path, summary.event_count

    async def verify(self, path: Path) -> None:
        """Check the bundle as an auditor would: ``planes evidence verify``, offline, pinned to this host's key."""
        key = self.state / "keys" / "evidence-signing.pub.pem"
        pinned = ["--public-key", str(key)] if key.exists() else []
        env = {k: v for k, v in os.environ.items() if not k.startswith("PLANES_")}
        # On a thread, with subprocess (vfork, then exec), not the loop's fork: see start_worker.
        checker = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "planes.kernel.cli", "evidence", "verify", str(path), *pinned],
            env=env, stdin=subprocess.DEVNULL, capture_output=True, timeout=120)
        out, err = checker.stdout, checker.stderr
        if checker.returncode != 0:
            said = (err or out).decode().strip() or "no output"
            raise DemoFailed(f"'planes evidence verify {path}' refused the bundle (exit {checker.returncode}): "
                             f"{said}")
        verdict = out.decode().splitlines()[0] if out else "ok"
        self.say("evidence verify", f"'planes evidence verify'{' --public-key' if pinned else ''}: {verdict}")

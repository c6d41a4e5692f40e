"""End-to-end execution throughput and lease-expiry-to-resume latency.

What runs: a real `planes serve` (evidence, control and execution planes, SQLite
WAL with synchronous=FULL for both the task store and the evidence log),
seeded through the control plane's API with one python no-op tool, and 1 or 4
`planes worker` processes, all separate processes on loopback. This process
submits tasks and counts finished ones by reading the task store (a WAL
reader, no RPC), so counting costs the system under test nothing.

A task here is the whole governed path: submit -> admitted -> policy decided
-> queued -> leased -> running -> no-op tool -> completed, each transition
durable and an evidence event (6 events per task, plus one tool.invoked).

Modes:
* batched: SubmitTasks with 250 tasks per call (4 calls in flight); workers
  lease up to their free slots per call and complete with CompleteTasks.
* unbatched: one SubmitTask per task (64 calls in flight); workers complete
  each task with its own CompleteTask (leases still take up to the free
  slots per call).

Resume latency: a worker is SIGKILLed while it holds a task; the figure is
the time from the moment its lease expired to the moment a second worker's
lease of the task (a new epoch) was durable.

    .venv/bin/python -m bench.execution_tasks --tasks 5000 --repeat 3
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from google.protobuf import json_format, struct_pb2

from planes.control.v1 import control_service_pb2 as cpb
from planes.execution.v1 import execution_service_pb2 as pb
from planes.kernel.clients import connect
from planes.kernel.contracts import ControlPlane, TaskPlane
from planes.kernel.runtime import run
from planes.kernel.secrets import read_secret, write_secret
from planes.kernel.tokens import SigningKey, issue_token

EXAMPLES = "planes.plugins.execution.examples"
TOOLS = [
    ("noop", {"version": "1", "adapter": "python", "target": {"module": EXAMPLES, "function": "noop"},
              "side_effect": "none", "classification": "internal"}),
    ("pause", {"version": "1", "adapter": "python", "target": {"module": EXAMPLES, "function": "pause"},
               "side_effect": "none", "classification": "internal"}),
]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _env(state: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PLANES_")}
    env["PLANES_STATE_DIR"] = str(state)
    return env


class Deployment:
    """A served kernel and its workers, in a temporary state directory."""

    def __init__(self, lease_seconds: float, split_evidence: bool = False):
        self.tmp = tempfile.TemporaryDirectory(prefix="planes-exec-bench-")
        self.state = Path(self.tmp.name)
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.hosts: list[subprocess.Popen] = []
        extra = ""
        if split_evidence:
            # The evidence plane on a host of its own, trusting this host's key.
            evidence_state = self.state / "evidence-host"
            evidence_port = _free_port()
            SigningKey.load_or_create(self.state / "keys" / "kernel-signing.pem")
            public = self.state / "keys" / "kernel-signing.pub.pem"
            public.write_bytes(SigningKey.load(self.state / "keys" / "kernel-signing.pem").public_pem())
            evidence_config = self.state / "evidence.toml"
            evidence_config.write_text(
                f'log_level = "warning"\nstate_dir = "{evidence_state}"\n[server]\nbind = "127.0.0.1:{evidence_port}"\n'
                f'[auth]\ntrusted_public_keys = ["{public}"]\n[plugins]\n'
                'disabled = ["control", "execution", "execution-adapters", "diagnostics"]\n')
            self.hosts.append(self._serve(evidence_config, evidence_state))
            extra = (f'[planes.evidence]\nendpoint = "127.0.0.1:{evidence_port}"\n'
                     '[plugins]\ndisabled = ["evidence"]\n')
        config = self.state / "planes.toml"
        config.write_text(f'log_level = "warning"\n[server]\nbind = "{self.address}"\n'
                          f"[plugin.execution]\nlease_seconds = {lease_seconds}\nheartbeat_seconds = "
                          f"{lease_seconds / 4}\nreap_seconds = 0.1\n{extra}")
        self.config = config
        self.server = self._serve(config, self.state)
        self.hosts.append(self.server)
        self.workers: list[subprocess.Popen] = []
        key = SigningKey.load(self.state / "keys" / "kernel-signing.pem")
        self.key = key
        write_secret(self.state / "worker.token",
                     issue_token(key, principal="bench-worker", tenant="*", roles=["worker"],
                                 ttl_seconds=3600).encode())

    @staticmethod
    def _serve(config: Path, state: Path) -> subprocess.Popen:
        server = subprocess.Popen([sys.executable, "-m", "planes.kernel.cli", "serve", "--config", str(config)],
                                  env=_env(state), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = server.stdout.readline()
            if "serving on" in line:
                return server
            if not line and server.poll() is not None:
                break
        raise SystemExit(f"planes serve ({config.name}) did not start")

    def token(self, roles, tenant="acme") -> str:
        return issue_token(self.key, principal=roles[0], tenant=tenant, roles=list(roles), ttl_seconds=3600)

    async def seed(self) -> None:
        admin = connect(self.address, ControlPlane, token=read_secret(self.state / "admin.token").decode().strip())
        try:
            for name, spec in TOOLS:
                await admin.put_resource(cpb.PutResourceRequest(
                    tenant="acme", kind=cpb.RESOURCE_KIND_TOOL_CONTRACT, name=name,
                    spec=json_format.ParseDict(spec, struct_pb2.Struct())), timeout=10)
            await admin.publish_snapshot(cpb.PublishSnapshotRequest(expected_revision=0), timeout=10)
        finally:
            await admin.close()
        await asyncio.sleep(1.0)  # let the host and the workers apply the snapshot

    def start_worker(self, name: str, *extra: str, slots: int = 128) -> subprocess.Popen:
        process = subprocess.Popen(
            [sys.executable, "-m", "planes.kernel.cli", "worker", "--config", str(self.config), "--address",
             self.address, "--token-file", str(self.state / "worker.token"), "--name", name,
             "--slots", str(slots), *extra],
            env=_env(self.state), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.workers.append(process)
        return process

    def finished(self) -> int:
        db = sqlite3.connect(f"file:{self.state / 'execution' / 'tasks.sqlite3'}?mode=ro", uri=True)
        try:
            return db.execute("SELECT COUNT(*) FROM tasks WHERE state IN (7, 8, 9)").fetchone()[0]
        finally:
            db.close()

    def close(self) -> None:
        for process in self.workers:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.workers:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
        for host in reversed(self.hosts):
            host.send_signal(signal.SIGTERM)
            try:
                host.wait(timeout=30)
            except subprocess.TimeoutExpired:
                host.kill()
        self.tmp.cleanup()


def _task(index: int) -> pb.TaskSpec:
    return pb.TaskSpec(allowed_tools=["noop"], actions=[pb.Action(action_id="a", tool=pb.ToolAction(tool="noop"))])


async def _throughput(deployment: Deployment, tasks: int, batched: bool) -> float:
    client = connect(deployment.address, TaskPlane, token=deployment.token(("service",)))
    base = deployment.finished()
    specs = [_task(i) for i in range(tasks)]
    try:
        start = time.perf_counter()
        if batched:
            batches = [specs[i:i + 250] for i in range(0, tasks, 250)]
            gate = asyncio.Semaphore(4)

            async def submit_batch(batch):
                async with gate:
                    await client.submit_tasks(pb.SubmitTasksRequest(tasks=batch), timeout=120)
            await asyncio.gather(*(submit_batch(b) for b in batches))
        else:
            gate = asyncio.Semaphore(64)

            async def submit_one(spec):
                async with gate:
                    await client.submit_task(pb.SubmitTaskRequest(task=spec), timeout=120)
            await asyncio.gather(*(submit_one(s) for s in specs))
        while deployment.finished() - base < tasks:
            await asyncio.sleep(0.02)
        return tasks / (time.perf_counter() - start)
    finally:
        await client.close()


def throughput(workers: int, batched: bool, tasks: int, split: bool = False) -> float:
    deployment = Deployment(lease_seconds=30, split_evidence=split)
    try:
        run(deployment.seed())
        for index in range(workers):
            deployment.start_worker(f"w{index}", *(() if batched else ("--no-batch",)))
        time.sleep(1.5)
        run(_throughput(deployment, min(200, tasks), batched))  # warm-up
        return run(_throughput(deployment, tasks, batched))
    finally:
        deployment.close()


async def _resume_once(deployment: Deployment, marker: Path) -> float:
    client = connect(deployment.address, TaskPlane, token=deployment.token(("service",)))
    try:
        args = struct_pb2.Struct()
        args.update({"marker": str(marker)})
        spec = pb.TaskSpec(allowed_tools=["pause"],
                           actions=[pb.Action(action_id="a", tool=pb.ToolAction(tool="pause", arguments=args))])
        victim = deployment.start_worker(f"victim-{marker.name}", slots=1)
        submitted = await client.submit_task(pb.SubmitTaskRequest(task=spec), timeout=10)
        task_id = submitted.task.task_id
        while not marker.exists():
            await asyncio.sleep(0.01)
        # The heir is up and long-polling for work before the victim dies.
        heir = deployment.start_worker(f"heir-{marker.name}", slots=1)
        await asyncio.sleep(3.0)
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        held = (await client.get_task(pb.GetTaskRequest(task_id=task_id), timeout=10)).task
        expired_at = held.lease_expires_at.ToNanoseconds() / 1e9
        latency = None
        async for change in client.watch_task(pb.WatchTaskRequest(task_id=task_id, after_version=held.version)):
            if change.task.state == pb.TASK_STATE_LEASED and latency is None:
                latency = change.task.updated_at.ToNanoseconds() / 1e9 - expired_at
        heir.send_signal(signal.SIGTERM)
        heir.wait(timeout=30)
        if latency is None:
            raise RuntimeError("the task was not leased again")
        return latency
    finally:
        await client.close()


def resume_latency(rounds: int) -> list[float]:
    deployment = Deployment(lease_seconds=2)
    try:
        run(deployment.seed())
        return [run(_resume_once(deployment, deployment.state / f"marker-{i}")) for i in range(rounds)]
    finally:
        deployment.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--resume-rounds", type=int, default=5)
    parser.add_argument("--only", choices=["throughput", "resume", "split"], default=None)
    args = parser.parse_args(argv)
    if args.only == "split":
        print(f"| workers | mode | deployment | tasks/s (median of {args.repeat}) | runs |")
        print("| ---: | --- | --- | ---: | --- |")
        for split in (False, True):
            runs = [throughput(4, True, args.tasks, split) for _ in range(args.repeat)]
            print(f"| 4 | batched | {'evidence on its own host' if split else 'one host'} | "
                  f"{statistics.median(runs):,.0f} | {', '.join(f'{r:,.0f}' for r in runs)} |", flush=True)
        return 0
    if args.only in (None, "throughput"):
        print(f"| workers | mode | tasks/s (median of {args.repeat}) | runs |")
        print("| ---: | --- | ---: | --- |")
        for workers in (1, 4):
            for batched in (True, False):
                runs = [throughput(workers, batched, args.tasks) for _ in range(args.repeat)]
                print(f"| {workers} | {'batched' if batched else 'unbatched'} | {statistics.median(runs):,.0f} | "
                      f"{', '.join(f'{r:,.0f}' for r in runs)} |", flush=True)
    if args.only in (None, "resume"):
        latencies = resume_latency(args.resume_rounds)
        print(f"lease-expiry-to-resume: median {statistics.median(latencies) * 1000:.0f} ms, "
              f"min {min(latencies) * 1000:.0f} ms, max {max(latencies) * 1000:.0f} ms "
              f"over {len(latencies)} kills (lease 2 s, reaper every 0.1 s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

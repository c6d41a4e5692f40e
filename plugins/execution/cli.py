"""``planes worker``, ``planes demo`` and ``planes task``: the execution plane from the command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import signal
import sys
from pathlib import Path


def add_commands(commands) -> None:
    from planes.kernel.cli import add_client_arguments, add_tls_arguments

    worker = commands.add_parser("worker", help="run a worker that leases and runs tasks")
    worker.add_argument("--address", help="host:port of the kernel (default: $PLANES_ADDRESS or server.bind)")
    worker.add_argument("--token-file", help="worker token file (default: $PLANES_TOKEN); role worker")
    worker.add_argument("--config", help="settings TOML file")
    worker.add_argument("--state-dir", help="state directory (default: ./var)")
    worker.add_argument("--name", help="worker name: its control-plane identity and config cache, kept across "
                        "restarts (default: the host name and a tag of the machine id and state directory, "
                        "with -2, -3, ... beside running ones)")
    worker.add_argument("--tenant", default="*", help="tenant whose tasks to run ('*': every tenant)")
    worker.add_argument("--slots", type=int, default=8, help="tasks run at once (default 8)")
    worker.add_argument("--python-module", action="append", default=[],
                        help="allow python tools from this module (and below); repeat")
    worker.add_argument("--secrets-dir", help="directory of tool credential files, one per reference")
    worker.add_argument("--control-public-key", help="PEM of the snapshot signing key "
                                                     "(default: <state-dir>/keys/control-signing.pub.pem)")
    worker.add_argument("--no-batch", action="store_true", help="complete each task with its own call")
    add_tls_arguments(worker)
    worker.set_defaults(handler=cmd_worker)

    demo = commands.add_parser("demo", help="run one governed task end to end on a kernel of its own")
    demo.add_argument("--state-dir", help="state directory (default: a new temporary directory, kept)")
    demo.add_argument("--timeout", type=float, default=120.0, help="give up after this many seconds (default 120)")
    demo.add_argument("--bundle", help="where to write the evidence bundle (default: <state-dir>/demo/<task>.bundle)")
    demo.add_argument("--output", help="also write the output payload's bytes to this file")
    demo.set_defaults(handler=cmd_demo)

    task = commands.add_parser("task", help="submit, follow, cancel, approve or deny a task")
    actions = task.add_subparsers(dest="task_command", metavar="ACTION")
    for name, help_text in (("submit", "submit a task from a spec file"), ("get", "show a task"),
                            ("watch", "follow a task's changes until it ends; exit 1 unless it completed"),
                            ("cancel", "cancel a task"),
                            ("approve", "approve a pending action"), ("deny", "deny a pending action")):
        parser = actions.add_parser(name, help=help_text)
        if name == "submit":
            parser.add_argument("-f", "--file", required=True,
                                help="a TaskSpec with protobuf JSON field names: .json, .toml or .yaml/.yml, "
                                     "or - for JSON on stdin")
            parser.add_argument("--watch", action="store_true",
                                help="then follow the task until it ends; exit 1 unless it completed")
        else:
            parser.add_argument("task_id")
        parser.add_argument("--tenant", default="", help="tenant (default: the token's)")
        add_client_arguments(parser, token="token file (default: $PLANES_TOKEN)", timeout=10.0)
        if name in ("approve", "deny"):
            parser.add_argument("--action-id", required=True)
            parser.add_argument("--digest", required=True,
                                help="hex SHA-256 of the action as shown by 'planes task get' (the payload you saw)")
            parser.add_argument("--comment", default="", help="comment or reason")
        if name == "cancel":
            parser.add_argument("--reason", default="")
        parser.set_defaults(handler=cmd_task, task_action=name)
    task.set_defaults(handler=lambda args: (task.print_usage(sys.stderr), 2)[1])


def cmd_worker(args: argparse.Namespace) -> int:
    from planes.common.v1 import common_pb2
    from planes.kernel.cli import client_address, client_tls, client_token
    from planes.kernel.clients import connect
    from planes.kernel.contract import ContractVersion
    from planes.kernel.contracts import ControlPlane, DataPlane, WorkerPlane
    from planes.kernel.errors import SettingsError
    from planes.kernel.runtime import run
    from planes.kernel.settings import load_settings
    from planes.plugins.control.subscriber import CachedConfig, SnapshotSubscriber

    from . import CONTROL_PUBLIC_KEY, control_keys
    from .worker import DataPlaneIO, Worker, load_adapters

    settings = load_settings(args.config, overrides={"state_dir": args.state_dir})
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Plugins first: a broken adapter stops the worker here, naming its plugin, before it takes any task.
    tools, models = load_adapters(settings, tuple(args.python_module))
    address = client_address(args, settings)
    token = client_token(args, settings, admin_fallback=False, address=address)
    tls = client_tls(args)
    key_path = Path(args.control_public_key or settings.state_dir / CONTROL_PUBLIC_KEY)
    if not key_path.is_file():  # checked before the worker makes anything under the state directory
        raise SettingsError(
            f"no control-plane public key at {key_path}: the worker verifies the configuration it runs with it. "
            + ("Check --control-public-key." if args.control_public_key else
               "Give the kernel's state directory (--state-dir, or state_dir in --config) if this host shares "
               "it, or copy the kernel's keys/control-signing.pub.pem here and pass --control-public-key."))
    keys = control_keys(key_path)
    name = args.name

    worker_name, held = claim_worker_dir(settings.state_dir / "workers", name)

    async def main() -> None:
        cache = CachedConfig(settings.state_dir / "workers" / worker_name / "config", keys,
                             served={"execution": ContractVersion(1, 0)})
        client = connect(address, WorkerPlane, token=token, **tls)
        control = connect(address, ControlPlane, token=token, **tls)
        data = DataPlaneIO(connect(address, DataPlane, token=token, **tls))
        worker = Worker(client, cache=cache, name=worker_name, tenant=args.tenant, slots=args.slots,
                        adapters=tools, models=models, data_reader=data.read, data_writer=data.write,
                        secrets_dir=Path(args.secrets_dir) if args.secrets_dir else None,
                        batch_completions=not args.no_batch)
        subscriber = SnapshotSubscriber(control, cache, f"worker:{worker_name}",
                                        contracts=[common_pb2.ContractVersion(plane="execution", major=1)],
                                        health=worker._health)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        watching = loop.create_task(subscriber.run())
        print(f"worker {worker_name} on {address}: {args.slots} slots, tools {', '.join(sorted(tools))}, "
              f"models {', '.join(sorted(models))}", flush=True)
        try:
            await worker.run(stop)
        finally:
            watching.cancel()
            for adapter in tools.values():
                await adapter.close()
            await client.close()
            await control.close()
            await data.client.close()
        print(f"worker {worker_name} stopped after {worker.completed} tasks", flush=True)

    try:
        run(main())
    finally:
        held.release()
    return 0


_WORKER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def _machine_tag(root: Path) -> str:
    """Six hex digits from the machine's id (systemd's /etc/machine-id, else the host name) and ``root``."""
    import hashlib
    import socket

    try:
        machine = Path("/etc/machine-id").read_text().strip()
    except OSError:
        machine = ""
    seed = f"{machine or socket.gethostname()}\0{root.resolve()}"
    return hashlib.sha256(seed.encode()).hexdigest()[:6]


def claim_worker_dir(root: Path, name: str | None):
    """The worker's name and the lock on its directory under ``root`` (its config cache lives there).

    The name is the worker's identity to the control plane (subscriber
    ``worker:NAME``) and keeps its cache, with the revision floor that
    refuses a rollback, across restarts. Without ``--name`` it is the host
    name, or ``host-2``, ``host-3``, ... for the further workers running at
    once on one host: a restart gets its directory back instead of a new one.
    """
    import socket

    from planes.kernel.errors import InvalidArgument
    from planes.kernel.files import DirectoryInUse, DirectoryLock
    from planes.kernel.secrets import ensure_private_dir

    if name is not None and (not _WORKER_NAME.fullmatch(name) or ".." in name):
        raise InvalidArgument(f"--name {name!r}: a worker name is 1-64 letters, digits, '.', '_' or '-', "
                              "starting with a letter or digit")
    host = _WORKER_NAME.match(re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname()) or "worker")
    # Host names repeat (cloned VMs, containers with a fixed hostname): the machine's id and this state
    # directory make the default name one no other worker host picks, and the same at every restart.
    host = f"{(host.group(0) if host else 'worker')[:50]}-{_machine_tag(root)}"
    names = [name] if name else [host, *(f"{host}-{index}" for index in range(2, 65))]
    for candidate in names:
        lock = DirectoryLock(ensure_private_dir(root / candidate), "worker.lock")
        try:
            lock.acquire()
        except DirectoryInUse as exc:
            if name:
                raise InvalidArgument(f"a worker named {name!r} is already running here "
                                      f"(pid {exc.holder or 'unknown'}); give this one another --name") from None
            continue
        return candidate, lock
    raise InvalidArgument(f"64 workers named {host}... already run here; give this one a --name")


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(Path(args.state_dir) if args.state_dir else None, timeout=args.timeout,
                    bundle=Path(args.bundle) if args.bundle else None,
                    output=Path(args.output) if args.output else None)


def cmd_task(args: argparse.Namespace) -> int:
    from google.protobuf import json_format

    from planes.common.v1 import common_pb2
    from planes.execution.v1 import execution_service_pb2 as pb
    from planes.kernel.cli import client_address, client_tls, client_token
    from planes.kernel.clients import connect
    from planes.kernel.contracts import TaskPlane
    from planes.kernel.errors import InvalidArgument
    from planes.kernel.runtime import run
    from planes.kernel.settings import load_settings

    settings = load_settings(args.config, overrides={"state_dir": args.state_dir})
    address = client_address(args, settings)
    # No admin.token fallback: the admin role reaches no TaskService call, so it would
    # only turn "which token?" into a role error.
    token, tls = client_token(args, settings, admin_fallback=False, address=address), client_tls(args)
    spec = load_task_spec(args.file) if args.task_action == "submit" else None

    def show(task: pb.Task) -> None:
        print(f"{task.task_id} {_state(task)} version {task.version} epoch {task.attempt_epoch} "
              f"config revision {task.config.revision}")
        # What `planes evidence export --correlation-id` takes to gather the task's evidence.
        print(f"  correlation id: {task.spec.correlation.correlation_id}")
        for pending in task.pending_approvals:
            print(f"  pending approval: action {pending.action.action_id} digest {pending.action_digest.value.hex()}"
                  f" ({pending.reason})")
            print("    " + json_format.MessageToJson(pending.action, indent=None))
        if task.HasField("failure"):
            print(f"  failure: {task.failure.code}: {task.failure.message}")
        if task.HasField("result"):
            print("  result: " + json_format.MessageToJson(task.result.summary, indent=None, sort_keys=True))
            for ref in task.result.outputs:
                print(f"  output: payload {ref.payload_id} ({ref.size} bytes, "
                      f"{common_pb2.Classification.Name(ref.classification).removeprefix('CLASSIFICATION_').lower()})")

    async def watch(client, task: pb.Task) -> int:
        """Follow ``task`` until it ends: 0 if it completed, else 1 with the reason on stderr."""
        ended = (pb.TASK_STATE_COMPLETED, pb.TASK_STATE_FAILED, pb.TASK_STATE_CANCELLED)
        if task.state not in ended:  # an ended task has no further change to wait for
            async for change in client.watch_task(pb.WatchTaskRequest(tenant=args.tenant, task_id=task.task_id,
                                                                       after_version=task.version)):
                print(f"{change.reason}: ", end="")
                show(change.task)
                task = change.task
        if task.state == pb.TASK_STATE_COMPLETED:
            return 0
        print(f"planes: task {task.task_id} {_outcome(task)}", file=sys.stderr)
        return 1

    async def act() -> int:
        client = connect(address, TaskPlane, token=token, **tls)
        try:
            if args.task_action == "get":
                show((await client.get_task(pb.GetTaskRequest(tenant=args.tenant, task_id=args.task_id),
                                            timeout=args.timeout)).task)
            elif args.task_action == "submit":
                reply = await client.submit_task(pb.SubmitTaskRequest(tenant=args.tenant, task=spec),
                                                 timeout=args.timeout)
                print("submitted" if reply.created else "already submitted (same idempotency key)")
                show(reply.task)
                if args.watch:
                    return await watch(client, reply.task)
            elif args.task_action == "watch":
                return await watch(client, pb.Task(task_id=args.task_id))
            elif args.task_action == "cancel":
                show((await client.cancel_task(pb.CancelTaskRequest(tenant=args.tenant, task_id=args.task_id,
                                                                    reason=args.reason), timeout=args.timeout)).task)
            else:
                try:
                    value = bytes.fromhex(args.digest)
                except ValueError:
                    raise InvalidArgument("--digest must be hex") from None
                digest = common_pb2.Digest(algorithm=common_pb2.DIGEST_ALGORITHM_SHA256, value=value)
                if args.task_action == "approve":
                    reply = await client.approve_task(pb.ApproveTaskRequest(
                        tenant=args.tenant, task_id=args.task_id, action_id=args.action_id, action_digest=digest,
                        comment=args.comment), timeout=args.timeout)
                else:
                    reply = await client.deny_task(pb.DenyTaskRequest(
                        tenant=args.tenant, task_id=args.task_id, action_id=args.action_id, action_digest=digest,
                        reason=args.comment), timeout=args.timeout)
                print(f"{'approved' if args.task_action == 'approve' else 'denied'} by {reply.approval.approver}")
                show(reply.task)
        finally:
            await client.close()
        return 0

    return run(act())


def _state(task) -> str:
    from planes.execution.v1 import execution_service_pb2 as pb

    return pb.TaskState.Name(task.state).removeprefix("TASK_STATE_").lower()


def _outcome(task) -> str:
    """Why a task that ended did not complete, in one line (a denial is a failure with a denial code)."""
    from planes.execution.v1 import execution_service_pb2 as pb

    failure = task.failure
    if failure.code in ("policy.denied", "approval.denied"):
        verb = "was denied"
    elif task.state == pb.TASK_STATE_FAILED:
        verb = "failed"
    elif task.state == pb.TASK_STATE_CANCELLED:
        verb = "was cancelled"
    else:
        verb = f"ended {_state(task)}"
    detail = f": {failure.code}: {failure.message}" if failure.code else ""
    return (verb + detail).replace("\n", " ")


def load_task_spec(path: str):
    """A TaskSpec from a file (JSON, TOML or YAML in protobuf JSON field names); InvalidArgument naming the problem."""
    import json
    import tomllib

    from google.protobuf import json_format

    from planes.execution.v1 import execution_service_pb2 as pb
    from planes.kernel.errors import InvalidArgument

    if path == "-":
        raw, suffix = sys.stdin.buffer.read(), ".json"
    else:
        try:
            raw, suffix = Path(path).read_bytes(), Path(path).suffix.lower()
        except OSError as exc:
            raise InvalidArgument(f"{path}: {exc.strerror}") from None
    kind = {".toml": "TOML", ".yaml": "YAML", ".yml": "YAML"}.get(suffix, "JSON")
    try:
        if kind == "TOML":
            document = tomllib.loads(raw.decode())
        elif kind == "YAML":
            import yaml

            document = yaml.safe_load(raw)
        else:
            document = json.loads(raw)
    except Exception as exc:
        raise InvalidArgument(f"{path}: not valid {kind}: {exc}") from None
    if not isinstance(document, dict):
        raise InvalidArgument(f"{path}: expected a TaskSpec object at the top level")
    try:
        return json_format.ParseDict(document, pb.TaskSpec())
    except json_format.ParseError as exc:
        raise InvalidArgument(f"{path}: not a TaskSpec: {exc}") from None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(1)

"""``planes worker``: run a worker process against a kernel's execution plane."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path


def add_commands(commands) -> None:
    worker = commands.add_parser("worker", help="run a worker that leases and runs tasks")
    worker.add_argument("--address", help="host:port of the kernel (default: $PLANES_ADDRESS or server.bind)")
    worker.add_argument("--token-file", help="worker token file (default: $PLANES_TOKEN); role worker")
    worker.add_argument("--config", help="settings TOML file")
    worker.add_argument("--state-dir", help="state directory (default: ./var)")
    worker.add_argument("--name", help="worker name (default: host-pid)")
    worker.add_argument("--tenant", default="*", help="tenant whose tasks to run ('*': every tenant)")
    worker.add_argument("--slots", type=int, default=8, help="tasks run at once (default 8)")
    worker.add_argument("--python-module", action="append", default=[],
                        help="allow python tools from this module (and below); repeat")
    worker.add_argument("--secrets-dir", help="directory of tool credential files, one per reference")
    worker.add_argument("--control-public-key", help="PEM of the snapshot signing key "
                                                     "(default: <state-dir>/keys/control-signing.pub.pem)")
    worker.add_argument("--no-batch", action="store_true", help="complete each task with its own call")
    worker.set_defaults(handler=cmd_worker)


def cmd_worker(args: argparse.Namespace) -> int:
    from planes.common.v1 import common_pb2
    from planes.kernel.cli import client_address, client_token
    from planes.kernel.clients import connect
    from planes.kernel.contract import ContractVersion
    from planes.kernel.contracts import ControlPlane, WorkerPlane
    from planes.kernel.runtime import run
    from planes.kernel.settings import load_settings
    from planes.plugins.control.subscriber import CachedConfig, SnapshotSubscriber

    from . import CONTROL_PUBLIC_KEY, control_keys
    from .worker import Worker, load_adapters

    settings = load_settings(args.config, overrides={"state_dir": args.state_dir})
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    address = client_address(args, settings)
    token = client_token(args, settings, admin_fallback=False)
    tools, models = load_adapters(settings, tuple(args.python_module))
    key_path = Path(args.control_public_key or settings.state_dir / CONTROL_PUBLIC_KEY)
    name = args.name

    async def main() -> None:
        import os
        import socket

        worker_name = name or f"{socket.gethostname()}-{os.getpid()}"
        cache = CachedConfig(settings.state_dir / "workers" / worker_name / "config", control_keys(key_path),
                             served={"execution": ContractVersion(1, 0)})
        client = connect(address, WorkerPlane, token=token)
        control = connect(address, ControlPlane, token=token)
        worker = Worker(client, cache=cache, name=worker_name, tenant=args.tenant, slots=args.slots,
                        adapters=tools, models=models,
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
        print(f"worker {worker_name} stopped after {worker.completed} tasks", flush=True)

    run(main())
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(1)

"""The execution plane: durable governed tasks, fenced leases, the effect ledger.

:class:`ExecutionPlugin` serves ``TaskService`` and ``WorkerService`` over a
:class:`~.store.TaskStore` (SQLite WAL by default), deciding policy from the
control plane's snapshot (kept by a snapshot subscriber under a bounded
lease) and recording every transition in evidence. Workers are separate
processes (``planes worker``, :mod:`.worker`). :class:`BuiltinAdapters`
registers the built-in tool adapters (python, subprocess, http, mcp) and model
routes (echo, openai) as extensions, like any third-party adapter.

Settings (``[plugin.execution]``): ``lease_seconds`` (30), ``heartbeat_seconds``
(10), ``max_attempts`` (3), ``max_spec_bytes`` (1 MiB: a larger task spec is
refused with RESOURCE_EXHAUSTED; bulk data goes in payloads), ``reap_seconds`` (how often expired leases are
looked for, default a quarter of the lease, at most 1), ``synchronous``
(SQLite, ``FULL``), ``control_public_key`` (PEM of the snapshot signing key;
default the local control plane's).
State: ``<state_dir>/execution/``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

from planes.kernel.contracts.execution import TaskPlane, WorkerPlane
from planes.kernel.plugin import Plugin, Provision
from planes.plugins.control import PUBLIC_KEY_FILE
from planes.plugins.control.subscriber import control_keys

from .models import EchoModel, ModelAdapter, OpenAIChatModel
from .tools import ToolAdapter

__all__ = ["BuiltinAdapters", "ExecutionPlugin", "ModelAdapter", "ToolAdapter"]

log = logging.getLogger("planes.execution")

STORE_FILE = "execution/tasks.sqlite3"
#: Where the kernel's control plane keeps its public key; workers and the data plane verify snapshots with it.
CONTROL_PUBLIC_KEY = PUBLIC_KEY_FILE


class ExecutionPlugin(Plugin):
    name = "execution"
    version = "0.1.0"
    provides = (Provision(TaskPlane, supports=("1.0", "2.0")), Provision(WorkerPlane, supports=("1.0", "2.0")))
    requires = ("evidence", "control")

    def setup(self, kernel) -> None:
        from planes.kernel.contracts import ControlPlane, EvidencePlane
        from planes.kernel.errors import PluginError, SettingsError
        from planes.plugins.control.subscriber import CachedConfig
        from planes.plugins.evidence.writer import EvidenceWriter

        from .committer import Committer
        from .engine import EngineSettings, ExecutionEngine
        from .plane import Tasks, Workers
        from .store import SqliteTaskStore

        # Checked, not a dataclass: heartbeat_seconds and reap_seconds default to fractions of lease_seconds.
        settings = kernel.settings.plugin_settings_checked(self.name, {
            "lease_seconds": float, "heartbeat_seconds": float, "max_attempts": int, "max_spec_bytes": int,
            "reap_seconds": float, "synchronous": str, "control_public_key": str})
        if settings.get("synchronous", "FULL").upper() not in ("FULL", "NORMAL", "EXTRA"):
            raise SettingsError(f"plugin.execution.synchronous must be one of FULL, NORMAL, EXTRA, "
                                f"got {settings['synchronous']!r}")
        self.kernel = kernel
        lease = float(settings.get("lease_seconds", 30.0))
        self.engine_settings = EngineSettings(
            lease_seconds=lease, heartbeat_seconds=float(settings.get("heartbeat_seconds", min(10.0, lease / 3))),
            max_attempts=int(settings.get("max_attempts", 3)),
            max_spec_bytes=int(settings.get("max_spec_bytes", EngineSettings.max_spec_bytes)))
        self.reap_seconds = float(settings.get("reap_seconds", min(1.0, lease / 4)))
        key_path = Path(settings.get("control_public_key", kernel.state_dir / CONTROL_PUBLIC_KEY))
        if not key_path.exists():
            raise PluginError(self.name, f"no control-plane public key at {key_path}: snapshots cannot be verified "
                                         "(set [plugin.execution] control_public_key)")
        self.cache = CachedConfig(kernel.state_dir / "execution" / "config", control_keys(key_path),
                                  served=kernel.served_contracts())
        self.store = SqliteTaskStore(kernel.state_dir / STORE_FILE,
                                     synchronous=str(settings.get("synchronous", "FULL")))
        evidence = kernel.client(EvidencePlane, kernel.service_identity("execution"))
        spool = kernel.state_dir / "execution" / "evidence-spool"
        self.strict = EvidenceWriter(evidence, spool / "required", required=lambda _: True)
        self.buffered = EvidenceWriter(evidence, spool / "buffered", required=lambda _: False)
        self.committer = Committer(self.store, self.strict, self.buffered)
        self.engine = ExecutionEngine(self.committer, kernel.signing_key, self.config_view, self.engine_settings)
        self.tasks = Tasks(self.engine)
        self.workers = Workers(self.engine)
        self.control = kernel.client(ControlPlane, kernel.service_identity("execution"))
        self._background: list[asyncio.Task] = []
        self._run_config = None

    def config_view(self):
        from .config import RunConfig
        from .engine import ConfigView

        current = self.cache.current
        if current is None:
            config = RunConfig.empty()
        else:
            if self._run_config is None or self._run_config.revision != current.revision:
                self._run_config = RunConfig.from_verified(current)
            config = self._run_config
        state, reason = self.cache.state()
        return ConfigView(config, self.cache.admitting(), f"configuration {state.value}: {reason}")

    def implementation(self, provision: Provision):
        return self.tasks if provision.contract is TaskPlane else self.workers

    async def start(self) -> None:
        from planes.common.v1 import common_pb2
        from planes.plugins.control.subscriber import SnapshotSubscriber

        self.committer.start()
        subscriber = SnapshotSubscriber(
            self.control, self.cache, f"execution@{self.kernel.settings.server.bind}",
            contracts=[common_pb2.ContractVersion(plane="execution", major=1, minor=0)])
        loop = asyncio.get_running_loop()
        self._background = [loop.create_task(subscriber.run()), loop.create_task(self._reap()),
                            loop.create_task(self._replay())]

    async def wait_for_revision(self, revision: int, timeout: float = 10.0) -> None:
        """Return once this host runs config ``revision`` or newer (for tests and the demo)."""
        async with asyncio.timeout(timeout):
            while self.cache.current is None or self.cache.current.revision < revision:
                await asyncio.sleep(0.02)

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(self.reap_seconds)
            try:
                await self.engine.reap()
            except Exception:  # keep reaping after a failed round
                log.exception("lease reaper failed")

    async def _replay(self) -> None:
        said = None  # one log line per distinct failure, not one a second while an outage lasts
        while True:
            await asyncio.sleep(1.0)
            if self.buffered.backlog:
                try:
                    await self.buffered.replay()
                    said = None
                except Exception as exc:
                    text = f"{type(exc).__name__}: {getattr(exc, 'message', exc)}"
                    if text != said:
                        log.warning("evidence spool not replayed yet (retrying every second): %s", text)
                        said = text

    async def stop(self) -> None:
        for task in self._background:
            task.cancel()
        for task in self._background:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.committer.stop()
        self.store.close()

    def add_cli_commands(self, commands) -> None:
        from .cli import add_commands

        add_commands(commands)


class BuiltinAdapters(Plugin):
    """The built-in tool adapters and model routes, registered as extensions."""

    name = "execution-adapters"
    version = "0.1.0"
    provides = (
        Provision(ToolAdapter, supports=("1.0", "2.0"), name="python"),
        Provision(ToolAdapter, supports=("1.0", "2.0"), name="subprocess"),
        Provision(ToolAdapter, supports=("1.0", "2.0"), name="http"),
        Provision(ToolAdapter, supports=("1.0", "2.0"), name="mcp"),
        Provision(ModelAdapter, supports=("1.0", "2.0"), name="echo"),
        Provision(ModelAdapter, supports=("1.0", "2.0"), name="openai"),
    )

    def setup(self, kernel) -> None:
        from .worker import adapter_modules

        adapter_modules(kernel.settings)  # the worker reads the table; a typo fails serve as early

    def implementation(self, provision: Provision):
        from .adapters.http_tool import HttpAdapter
        from .adapters.mcp_tool import McpAdapter
        from .adapters.python_tool import PythonAdapter
        from .adapters.subprocess_tool import SubprocessAdapter

        return {"python": PythonAdapter, "subprocess": SubprocessAdapter, "http": HttpAdapter, "mcp": McpAdapter,
                "echo": EchoModel, "openai": OpenAIChatModel}[provision.name]()

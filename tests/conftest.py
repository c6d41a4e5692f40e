"""Shared fixtures: a real kernel on a real loopback port, real tokens, real files."""

from __future__ import annotations

import asyncio
import sqlite3
import errno
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from planes.kernel import errors
from planes.kernel.call import CallContext
from planes.kernel.contract import Encoded
from planes.kernel.clients import connect
from planes.kernel.contracts.diagnostics import DiagnosticsPlane, pb
from planes.kernel.host import Candidate, PluginHost
from planes.kernel.kernel import Kernel
from planes.kernel.plugin import Plugin, Provision
from planes.kernel.runtime import run as run_on_uvloop
from planes.kernel.server import KernelServer
from planes.kernel.settings import ServerSettings, Settings
from planes.kernel.tokens import issue_token


@pytest.fixture
def run():
    """Run a coroutine on a fresh uvloop loop (the loop planes runs on)."""
    return run_on_uvloop


class RecordingDiagnostics(DiagnosticsPlane):
    """A diagnostics plane that records calls and fails on request.

    Payload markers: ``b"missing"`` -> NotFound, ``b"too-big"`` -> LimitExceeded,
    ``b"crash:<secret>"`` -> an unexpected exception whose text must never reach
    the caller, ``b"slow:<seconds>"`` -> sleeps first.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[str, CallContext]] = []
        self.finished: list[str] = []

    async def _behave(self, payload: bytes) -> None:
        if payload == b"missing":
            raise errors.NotFound("payload ref-1 not found")
        if payload == b"too-big":
            raise errors.LimitExceeded("chunk_bytes", 1024, 1025, retry_after=2.5)
        if payload.startswith(b"crash:"):
            raise RuntimeError(payload.decode())
        if payload.startswith(b"slow:"):
            await asyncio.sleep(float(payload[5:]))
        if payload == b"disk-full":
            try:
                raise OSError(errno.ENOSPC, "No space left on device")
            except OSError as exc:  # as a store's write lets it through, under its own error
                raise RuntimeError("write failed") from exc
        if payload == b"sqlite-full":
            # A real SQLITE_FULL: an in-memory database allowed one page.
            db = sqlite3.connect(":memory:")
            db.execute("PRAGMA max_page_count = 2")
            db.execute("CREATE TABLE t (x BLOB)")
            db.execute("INSERT INTO t VALUES (?)", (b"x" * 100_000,))

    async def echo(self, request, call):
        self.calls.append(("echo", call))
        await self._behave(request.payload)
        self.finished.append("echo")
        reply = pb.EchoResponse(tenant=request.tenant, payload=request.payload)
        if request.payload == b"pre-encoded":
            return Encoded(reply.SerializeToString())
        return reply

    async def stream_echo(self, request, call):
        self.calls.append(("stream_echo", call))
        for index in range(request.count):
            if index == 2:
                await self._behave(request.payload)
            reply = pb.StreamEchoResponse(index=index, payload=request.payload)
            yield Encoded(reply.SerializeToString()) if request.payload == b"pre-encoded" else reply

    async def collect_echo(self, requests, call):
        self.calls.append(("collect_echo", call))
        messages = size = 0
        async for request in requests:
            await self._behave(request.payload)
            messages += 1
            size += len(request.payload)
        return pb.CollectEchoResponse(messages=messages, bytes=size)

    async def who_am_i(self, request, call):
        self.calls.append(("who_am_i", call))
        return pb.WhoAmIResponse(
            principal=call.identity.principal,
            tenant=call.identity.tenant,
            source=call.identity.source,
            correlation={"correlation_id": call.correlation_id, "trace_id": call.trace.trace_id,
                         "span_id": call.trace.span_id, "request_id": call.request_id},
            deadline_seconds=call.time_remaining() or 0.0,
        )


class RecordingPlugin(Plugin):
    name = "recording-diagnostics"
    version = "1.0.0"
    provides = (Provision(DiagnosticsPlane, supports=("1.0", "2.0")),)

    def __init__(self) -> None:
        self.plane = RecordingDiagnostics()

    def implementation(self, provision):
        return self.plane


def candidates(*plugins: Plugin) -> list[Candidate]:
    return [Candidate(p.name, "test", p) for p in plugins]


@dataclass
class RunningKernel:
    kernel: Kernel
    server: KernelServer
    port: int
    plane: RecordingDiagnostics
    clients: list = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def token(self, *, roles=("service",), tenant="acme", principal="svc", ttl=600, now=None) -> str:
        return issue_token(self.kernel.signing_key, principal=principal, tenant=tenant, roles=list(roles),
                           ttl_seconds=ttl, now=now)

    def client(self, token: str | None = None, **kwargs) -> DiagnosticsPlane:
        client = connect(self.address, DiagnosticsPlane, token=token, **kwargs)
        self.clients.append(client)
        return client


def make_settings(state_dir: Path, **changes) -> Settings:
    settings = Settings(state_dir=state_dir, server=ServerSettings(bind="127.0.0.1:0", grace_seconds=5))
    return replace(settings, **changes)


@asynccontextmanager
async def running_kernel(state_dir: Path, *, settings: Settings | None = None,
                         plugin: RecordingPlugin | None = None) -> AsyncIterator[RunningKernel]:
    plugin = plugin or RecordingPlugin()
    settings = settings or make_settings(state_dir)
    kernel = Kernel(settings, PluginHost.load(settings, candidates(plugin))).open()
    server = KernelServer(kernel)
    port = await server.start()
    running = RunningKernel(kernel, server, port, plugin.plane)
    try:
        yield running
    finally:
        for client in running.clients:
            await client.close()
        await server.stop(grace=1)


#: The ``planes`` command, as a fresh installation runs it.
CLI = [sys.executable, "-m", "planes.kernel.cli"]


def serve_env(state_dir: Path) -> dict[str, str]:
    """The environment of a ``planes serve`` on ``state_dir`` and a free loopback port (none of ours leaks in)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return {**{k: v for k, v in os.environ.items() if not k.startswith("PLANES_")},
            "PLANES_STATE_DIR": str(state_dir), "PLANES_SERVER__BIND": f"127.0.0.1:{port}"}


def start_serve(env: dict[str, str]) -> subprocess.Popen:
    """A real ``planes serve`` subprocess, once it says it is serving."""
    server = subprocess.Popen([*CLI, "serve"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = server.stdout.readline()
        if "serving on" in line:
            return server
        if not line and server.poll() is not None:
            break
    server.kill()
    pytest.fail("planes serve did not start")


def stop_serve(server: subprocess.Popen) -> None:
    server.terminate()
    server.communicate(timeout=30)

"""The MCP adapter: call a tool of any MCP server over stdio, with the ``mcp`` package.

``target = {command = "mcp-server-time", args = ["--local-timezone", "UTC"],
tool = "get_current_time"}`` (``tool`` defaults to the contract's name). One
server process per call: started, initialized, asked, stopped. Its
environment is the package's safe default (no secrets of the worker's); a
credential reference, when the contract has one, is passed as the
environment variable ``target.credential_env``. Its stderr is discarded, as
it may echo arguments.

The session is the ``mcp`` package's; the stdio transport is ours, for one
reason: the package spawns the server through the event loop, and uvloop
forks there, running gRPC's fork handlers in the child of a threaded worker
(which crashed it now and then; see the subprocess adapter). Here the server
is started by ``subprocess.Popen`` (vfork, then exec) on a thread (see
:func:`.processes.spawn`), and its pipes are read and written by the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path


from planes.kernel.errors import DeadlineExceeded, InvalidArgument, PlanesError, Unavailable

from ..tools import ToolAdapter, ToolCall, ToolContext, ToolDescription, ToolResult
from .processes import kill_group, spawn, wait_then_kill_group


class McpToolError(PlanesError):
    """The MCP server answered the call with ``isError``."""

    reason = "MCP_TOOL_ERROR"


def find_server(command: str) -> str:
    """The server's executable: on PATH, else beside this Python (its environment's scripts)."""
    found = shutil.which(command)
    if found is None and "/" not in command:
        beside = Path(sys.executable).parent / command
        found = str(beside) if beside.exists() else None
    return found or command


#: How long a server may take to exit once its stdin is closed, before it is killed.
STOP_GRACE_SECONDS = 2.0
#: The longest line (one JSON-RPC message) read from a server.
MAX_MESSAGE_BYTES = 16 << 20


@contextlib.asynccontextmanager
async def stdio_session_streams(argv: list[str], env: dict[str, str]) -> AsyncIterator[tuple]:
    """(read, write) streams for an ``mcp.ClientSession`` with a server started from ``argv``.

    One JSON-RPC message per line each way. A line that does not parse
    reaches the session as the exception, as with the package's transport.
    On exit the server's stdin is closed, it gets ``STOP_GRACE_SECONDS`` to
    exit, then its process group is killed.
    """
    import anyio
    from mcp import types
    from mcp.shared.message import SessionMessage

    process = await spawn(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    loop = asyncio.get_running_loop()
    transports = []
    try:
        reader = asyncio.StreamReader(limit=MAX_MESSAGE_BYTES)
        transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), process.stdout)
        transports.append(transport)
        transport, protocol = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin, process.stdin)
        transports.append(transport)
        writer = asyncio.StreamWriter(transport, protocol, None, loop)
        to_session, read = anyio.create_memory_object_stream(0)
        write, from_session = anyio.create_memory_object_stream(0)

        async def server_to_session() -> None:
            async with to_session:
                while True:
                    try:
                        line = await reader.readline()
                    except ValueError:
                        # Longer than MAX_MESSAGE_BYTES: the session ends, as the server's output can't be trusted.
                        await to_session.send(ValueError(f"an MCP message over {MAX_MESSAGE_BYTES} bytes"))
                        return
                    if not line:
                        return
                    try:
                        message = SessionMessage(types.jsonrpc_message_adapter.validate_json(line, by_name=False))
                    except ValueError as exc:
                        message = exc
                    await to_session.send(message)

        async def session_to_server() -> None:
            async with from_session:
                async for message in from_session:
                    data = message.message.model_dump_json(by_alias=True, exclude_unset=True)
                    writer.write(data.encode() + b"\n")
                    await writer.drain()

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(server_to_session)
            tasks.start_soon(session_to_server)
            try:
                yield read, write
            finally:
                tasks.cancel_scope.cancel()
    finally:
        # The transports own the pipes; closing stdin is the server's signal to exit.
        for transport in transports:
            transport.close()
        for pipe in (process.stdin, process.stdout):
            pipe.close()
        await asyncio.shield(_stop(process))


async def _stop(process: subprocess.Popen) -> None:
    """Give the server ``STOP_GRACE_SECONDS`` to exit, then kill its process group.

    The group is killed once the server has exited too: a child it left
    behind would otherwise run on, unsupervised.
    """
    ending = asyncio.ensure_future(asyncio.to_thread(wait_then_kill_group, process))
    try:
        await asyncio.wait_for(asyncio.shield(ending), STOP_GRACE_SECONDS)
    except TimeoutError:
        if process.returncode is None:  # not reaped, so the group id is still the server's
            kill_group(process)
        await ending


def _reason(error) -> str:
    """The JSON-RPC error code, and the SDK's own message for a closed connection; never what a server wrote."""
    from mcp.types import CONNECTION_CLOSED

    if isinstance(error, BaseExceptionGroup):
        return _reason(error.exceptions[0])
    return "the connection closed" if error.error.code == CONNECTION_CLOSED else f"JSON-RPC error {error.error.code}"


class McpAdapter(ToolAdapter):
    def describe(self, contract) -> ToolDescription:
        command = contract.target.get("command")
        if not isinstance(command, str) or not command:
            raise InvalidArgument(f"tool {contract.name}: target.command must name the MCP server's executable")
        args = contract.target.get("args", [])
        if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
            raise InvalidArgument(f"tool {contract.name}: target.args must be a list of strings")
        return ToolDescription("mcp", f"{command} {contract.target.get('tool', contract.name)}")

    async def invoke(self, call: ToolCall, context: ToolContext) -> ToolResult:
        # Imported here: the package takes about a second to import, and most workers never call MCP.
        from mcp import ClientSession
        from mcp.client.stdio import get_default_environment
        from mcp.shared.exceptions import MCPError

        self.describe(call.contract)
        target = call.contract.target
        command = find_server(str(target["command"]))
        env = get_default_environment()
        if target.get("credential_env") and call.contract.credential_ref:
            env[str(target["credential_env"])] = context.secrets.get(call.contract.credential_ref).decode().strip()
        argv = [command, *map(str, target.get("args", []))]
        name = str(target.get("tool", call.tool))
        context.notes["mcp_server"] = str(target["command"])
        context.notes["isolation"] = "process"
        try:
            async with asyncio.timeout(context.remaining()):
                async with stdio_session_streams(argv, env) as (read, write):
                    async with ClientSession(read, write) as session:
                        await session.initialize()
                        result = await session.call_tool(name, call.arguments)
        except TimeoutError:
            raise DeadlineExceeded(f"MCP tool {name} did not answer in time") from None
        except OSError as exc:
            raise Unavailable(f"cannot start MCP server {target['command']}: {exc.strerror}") from None
        except MCPError as exc:
            raise Unavailable(f"MCP server {target['command']} failed the session: {_reason(exc)}") from None
        except BaseExceptionGroup as group:
            # The session's task group wraps what its tasks raised.
            failed = group.subgroup(MCPError)
            if failed is None:
                raise
            raise Unavailable(f"MCP server {target['command']} failed the session: "
                              f"{_reason(failed.exceptions[0])}") from None
        texts = [getattr(item, "text", "") for item in getattr(result, "content", []) or []]
        if getattr(result, "isError", False) or getattr(result, "is_error", False):
            raise McpToolError(f"MCP tool {name} reported an error")
        structured = getattr(result, "structuredContent", None) or getattr(result, "structured_content", None)
        output: dict = {"content": texts}
        if isinstance(structured, dict):
            output["structured"] = structured
        elif len(texts) == 1:
            try:
                parsed = json.loads(texts[0])
                if isinstance(parsed, dict):
                    output["structured"] = parsed
            except ValueError:
                pass
        return ToolResult(output=output)

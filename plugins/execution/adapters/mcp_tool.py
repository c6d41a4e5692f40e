"""The MCP adapter: call a tool of any MCP server over stdio, with the ``mcp`` package.

``target = {command = "mcp-server-time", args = ["--local-timezone", "UTC"],
tool = "get_current_time"}`` (``tool`` defaults to the contract's name). One
server process per call: started, initialized, asked, stopped. Its
environment is the package's safe default (no secrets of the worker's); a
credential reference, when the contract has one, is passed as the
environment variable ``target.credential_env``.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
from pathlib import Path

from planes.kernel.errors import DeadlineExceeded, InvalidArgument, PlanesError, Unavailable

from ..tools import ToolAdapter, ToolCall, ToolContext, ToolDescription, ToolResult


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
        from mcp import ClientSession, StdioServerParameters
        from mcp.client.stdio import stdio_client

        self.describe(call.contract)
        target = call.contract.target
        command = find_server(str(target["command"]))
        env = {}
        if target.get("credential_env") and call.contract.credential_ref:
            env[str(target["credential_env"])] = context.secrets.get(call.contract.credential_ref).decode().strip()
        params = StdioServerParameters(command=command, args=list(target.get("args", [])), env=env or None)
        name = str(target.get("tool", call.tool))
        context.notes["mcp_server"] = str(target["command"])
        context.notes["isolation"] = "process"
        try:
            async with asyncio.timeout(context.remaining()):
                async with stdio_client(params) as streams:
                    read, write = streams[0], streams[1]
                    async with ClientSession(read, write) as session:
                        await session.initialize()
                        result = await session.call_tool(name, call.arguments)
        except TimeoutError:
            raise DeadlineExceeded(f"MCP tool {name} did not answer in time") from None
        except OSError as exc:
            raise Unavailable(f"cannot start MCP server {target['command']}: {exc.strerror}") from None
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

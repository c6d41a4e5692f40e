"""Example python tools: the ones the benchmark and the demo run.

The python adapter loads only allowed modules; this one is allowed by default,
so nothing here touches a path, a process or the network a task's arguments
name: its functions compute, or reach payloads through the task's own data
plane credential. Tools that write where their arguments say (for the crash
and retry tests) are in :mod:`.fault_tools`, which no worker allows unless
its operator names it.
"""

from __future__ import annotations


def noop(arguments: dict, context) -> dict:
    """Does nothing: the benchmark's tool."""
    return {}


def upper(arguments: dict, context) -> dict:
    return {"text": str(arguments.get("text", "")).upper()}


def render_report(text: bytes) -> bytes:
    """The demo's output for an input: deterministic, so a test can predict it."""
    lines = text.decode(errors="replace").splitlines()
    words = sum(len(line.split()) for line in lines)
    body = "\n".join(line.upper() for line in lines)
    return f"REPORT ({len(lines)} lines, {words} words)\n{body}\n".encode()


async def publish_report(arguments: dict, context) -> dict:
    """Reads the payload ``input`` (an id) through the data plane and writes a report payload.

    The demo's approval-gated tool: its effect is a new payload (ids and
    digests come back, never the bytes).
    """
    text = await context.data.read(str(arguments["input"]))
    ref = await context.data.write(render_report(text), classification="internal",
                                   name=str(arguments.get("name", "report.txt")), media_type="text/plain")
    return {"output_payload": ref.payload_id, "bytes": ref.size, "digest": ref.digest.value.hex()}

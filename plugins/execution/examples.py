"""Example python tools: the ones the tests, the benchmark and the demo run.

The python adapter loads only allowed modules; this one is allowed by default.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from planes.kernel.errors import Unavailable

from .tools import Reconciliation


def noop(arguments: dict, context) -> dict:
    """Does nothing: the benchmark's tool."""
    return {}


def upper(arguments: dict, context) -> dict:
    return {"text": str(arguments.get("text", "")).upper()}


async def sleep(arguments: dict, context) -> dict:
    """Sleeps ``seconds``; writes ``started`` (a path) first so a test can act mid-call."""
    if arguments.get("started"):
        Path(arguments["started"]).write_text("started")
    await asyncio.sleep(float(arguments.get("seconds", 1)))
    return {"slept": float(arguments.get("seconds", 1))}


async def _pause_once(marker: str | None) -> None:
    # Pauses the first time only, so the attempt that replaces a killed
    # worker runs through.
    if marker and not os.path.exists(marker):
        Path(marker).write_text("paused")
        await asyncio.sleep(3600)


async def count(arguments: dict, context) -> dict:
    """Appends the call's idempotency key to ``ledger``: a side effect that can be counted.

    ``dedupe``: behave as an idempotent service (a key already there is not
    appended again).

    ``pause_before`` / ``pause_after``: marker paths; the first call writes
    the marker and waits there (before or after the effect) to be killed.

    ``unavailable_while``: a path; while it exists, each call makes its
    effect and then fails with ``Unavailable``, as a service whose answer is
    lost after it acted.
    """
    ledger = Path(arguments["ledger"])
    await _pause_once(arguments.get("pause_before"))
    # An idempotent service (dedupe): a repeated key changes nothing.
    if not (arguments.get("dedupe") and ledger.exists()
            and context.idempotency_key in ledger.read_text().splitlines()):
        with ledger.open("a") as handle:
            handle.write(context.idempotency_key + "\n")
            handle.flush()
            os.fsync(handle.fileno())
    if arguments.get("unavailable_while") and os.path.exists(arguments["unavailable_while"]):
        raise Unavailable("the counter's answer was lost after it acted")
    await _pause_once(arguments.get("pause_after"))
    return {"calls": len(ledger.read_text().splitlines())}


def reconcile_count(call, context) -> Reconciliation:
    """The counter's own record says whether the effect happened."""
    ledger = Path(call.arguments["ledger"])
    keys = ledger.read_text().splitlines() if ledger.exists() else []
    return Reconciliation.APPLIED if call.idempotency_key in keys else Reconciliation.NOT_APPLIED


async def pause(arguments: dict, context) -> dict:
    """Waits at ``marker`` the first time (no side effect): a place to kill a worker."""
    await _pause_once(arguments.get("marker"))
    return {}


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

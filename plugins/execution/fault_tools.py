"""Python tools that write where their arguments say: for crash, retry and cancellation tests.

``count`` appends to the file its ``ledger`` argument names, ``sleep`` and
``pause`` write marker files: anyone who can submit a task could write any
file the worker can. No worker allows this module by default; a test (or a
sandboxed operator) names it with ``--python-module
planes.plugins.execution.fault_tools`` or ``[plugin.execution-adapters]
python_modules``. Never allow it on a worker that runs others' tasks.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from planes.kernel.errors import Unavailable

from .tools import Reconciliation


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

    ``unavailable_in_first_attempt``: every call of the task's first attempt
    makes its effect and then fails with ``Unavailable``, as a service whose
    answer is lost after it acted.
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
    if arguments.get("unavailable_in_first_attempt") and context.attempt_epoch == 1:
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

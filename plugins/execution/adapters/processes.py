"""Starting and ending the processes tool adapters run, so none outlives its call.

A tool's process is started in a new session, so it leads a process group
holding every child it forks (a shell's background jobs included). When the
call ends, for any reason, the whole group is killed: a child that kept the
output pipe open would otherwise block the call, and one that outlived it
would keep running unsupervised. A process that leaves the group itself
(``setsid``) escapes this; bubblewrap's PID namespace is what contains those.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import threading


async def spawn(argv: list[str], **options) -> subprocess.Popen:
    """``subprocess.Popen(argv, start_new_session=True, **options)`` on a thread, never left unsupervised.

    Popen (vfork, then exec) runs on a thread rather than the event loop's
    spawn: uvloop forks, and gRPC's fork handlers then run in the child of a
    threaded worker, which crashed it now and then. A call cancelled while the
    thread is starting the process would lose its handle, so then the process
    is killed and reaped as soon as the thread hands it over.
    """
    started = asyncio.get_running_loop().run_in_executor(
        None, lambda: subprocess.Popen(argv, start_new_session=True, **options))
    try:
        return await asyncio.shield(started)
    except asyncio.CancelledError:
        started.add_done_callback(_discard)
        raise


def _discard(started: asyncio.Future) -> None:
    if started.cancelled() or started.exception() is not None:
        return
    process = started.result()
    kill_group(process)
    # Reaped off the event loop: the kill makes the wait short, never unbounded work here.
    threading.Thread(target=_reap, args=(process,), daemon=True, name="tool-reaper").start()


def _reap(process: subprocess.Popen) -> None:
    process.wait()
    for stream in (process.stdin, process.stdout, process.stderr):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()


def kill_group(process: subprocess.Popen) -> None:
    """SIGKILL the process group ``process`` leads, if it is still there.

    Safe only while ``process`` is not yet reaped (its pid, and so the group id,
    cannot have been reused): callers kill first and reap after.
    """
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)


def wait_then_kill_group(process: subprocess.Popen) -> int:
    """Wait for ``process`` to exit, kill what is left of its group, then reap it. Blocks: run on a thread.

    The exit is observed without reaping (``WNOWAIT``), so the group id is
    still the process's own when the group is killed.
    """
    with contextlib.suppress(ChildProcessError):
        os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOWAIT)
    kill_group(process)
    return process.wait()

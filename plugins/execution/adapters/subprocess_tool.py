"""The subprocess adapter: run a command in a sandbox.

``target = {command = ["prog", "arg"], network = false, memory_mb = 512,
cpu_seconds = 30, max_output_bytes = 1048576}``. The call's arguments go to
the command's standard input as JSON; its standard output comes back (as
JSON when it parses, else as text).

Isolation: with bubblewrap (``bwrap``) present and working, the command runs
in new namespaces (no network unless the contract allows it, its own PID,
IPC and UTS namespaces), with the system directories read-only, a private
``/tmp`` and a private writable working directory, nothing else of the host
visible. Without it: resource limits (address space, CPU time, file size,
open files), a private temporary working directory, an empty environment
and a new session. The isolation actually used is reported in the call's
notes, which become evidence. Either way the whole process group is killed
when the call ends (exit, error, timeout or cancellation), so no background
child outlives it; see :mod:`.processes`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading

from planes.kernel.errors import DeadlineExceeded, InvalidArgument, LimitExceeded, PlanesError

from ..tools import ToolAdapter, ToolCall, ToolContext, ToolDescription, ToolResult
from .processes import kill_group, spawn, wait_then_kill_group

SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib64", "/lib32", "/etc")


class ToolFailed(PlanesError):
    """The command ran and exited non-zero."""

    reason = "TOOL_FAILED"


@functools.lru_cache(maxsize=1)
def bubblewrap() -> str | None:
    """The bwrap binary if it can actually make namespaces here (containers often forbid it)."""
    path = shutil.which("bwrap")
    if path is None:
        return None
    try:
        probe = subprocess.run([path, "--ro-bind", "/", "/", "--unshare-all", "--die-with-parent", "true"],
                               capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return path if probe.returncode == 0 else None


# Limits are set by a launcher that then execs the command: a preexec_fn
# runs between fork and exec in a process with gRPC threads, which is not
# safe (it crashed children here now and then).
_LAUNCHER = """
import os, resource, sys
memory, cpu, size = (int(v) for v in sys.argv[1:4])
for limit, value in ((resource.RLIMIT_AS, memory), (resource.RLIMIT_CPU, cpu), (resource.RLIMIT_FSIZE, size),
                     (resource.RLIMIT_NOFILE, 256), (resource.RLIMIT_CORE, 0)):
    resource.setrlimit(limit, (value, value))
os.execvp(sys.argv[4], sys.argv[4:])
"""


def _limited(argv: list[str], memory_mb: int, cpu_seconds: int, file_bytes: int) -> list[str]:
    """``argv`` run under resource limits (address space, CPU, file size, open files, no core)."""
    prlimit = shutil.which("prlimit")
    if prlimit is not None:
        return [prlimit, f"--as={memory_mb << 20}", f"--cpu={cpu_seconds}", f"--fsize={file_bytes}",
                "--nofile=256", "--core=0", "--", *argv]
    return [sys.executable, "-S", "-c", _LAUNCHER, str(memory_mb << 20), str(cpu_seconds), str(file_bytes), *argv]


#: How long, after the process group is killed, the threads reading its pipes
#: are waited for. Only a process that left the group (and so was not killed)
#: can hold a pipe open past that; the call then ends without the rest.
READER_GRACE_SECONDS = 2.0


def _exchange(process: subprocess.Popen, stdin: bytes, limit: int) -> tuple[bytes, int]:
    """Feed standard input, keep at most ``limit + 1`` bytes of standard output and count standard error.

    Runs on a thread. The call ends when the command exits: then its whole
    process group is killed, since a background child still holding standard
    output would otherwise keep the read (and the call) going, and outlive it.
    A command that writes more than ``limit`` is stopped there (its process
    group killed): its output is never held in full, and the caller sees
    ``limit + 1`` bytes and refuses it. A command that exits without reading
    its input is not an error of ours.
    """
    def feed() -> None:
        with contextlib.suppress(BrokenPipeError, OSError):
            process.stdin.write(stdin)
        with contextlib.suppress(BrokenPipeError, OSError):
            process.stdin.close()

    errors_seen = [0]

    def count_stderr() -> None:
        # Counted, never kept: stderr may echo inputs.
        with contextlib.suppress(OSError, ValueError):
            while chunk := process.stderr.read(65536):
                errors_seen[0] += len(chunk)

    out = bytearray()

    def read_stdout() -> None:
        with contextlib.suppress(OSError, ValueError):
            while len(out) <= limit:
                chunk = process.stdout.read1(min(65536, limit + 1 - len(out)))
                if not chunk:
                    break
                out.extend(chunk)
        if len(out) > limit:
            kill_group(process)

    helpers = [threading.Thread(target=target, daemon=True) for target in (feed, count_stderr, read_stdout)]
    for helper in helpers:
        helper.start()
    wait_then_kill_group(process)
    for helper in helpers:
        helper.join(READER_GRACE_SECONDS)
    return bytes(out), errors_seen[0]


class SubprocessAdapter(ToolAdapter):
    def __init__(self, *, use_bubblewrap: bool = True):
        self.use_bubblewrap = use_bubblewrap

    def describe(self, contract) -> ToolDescription:
        command = contract.target.get("command")
        if not isinstance(command, list) or not command or not all(isinstance(p, str) for p in command):
            raise InvalidArgument(f"tool {contract.name}: target.command must be a non-empty list of strings")
        isolation = "bubblewrap" if self.use_bubblewrap and bubblewrap() else "rlimits+private-tmp"
        return ToolDescription("subprocess", command[0], {"isolation": isolation})

    def _argv(self, command: list[str], workdir: str, network: bool) -> tuple[list[str], str]:
        bwrap = bubblewrap() if self.use_bubblewrap else None
        if bwrap is None:
            return command, "rlimits+private-tmp"
        argv = [bwrap, "--unshare-all", "--die-with-parent", "--new-session", "--clearenv",
                "--setenv", "PATH", "/usr/local/bin:/usr/bin:/bin", "--setenv", "HOME", "/work",
                "--setenv", "TMPDIR", "/tmp"]
        if network:
            argv.append("--share-net")
        for directory in SYSTEM_DIRS:
            if os.path.exists(directory):
                argv += ["--ro-bind", directory, directory]
        argv += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "--bind", workdir, "/work",
                 "--chdir", "/work", "--"]
        return argv + command, "bubblewrap"

    async def invoke(self, call: ToolCall, context: ToolContext) -> ToolResult:
        target = call.contract.target
        self.describe(call.contract)
        memory = int(target.get("memory_mb", 512))
        cpu = int(target.get("cpu_seconds", 30))
        limit = int(target.get("max_output_bytes", 1 << 20))
        with tempfile.TemporaryDirectory(prefix="planes-tool-") as workdir:
            os.chmod(workdir, 0o700)
            argv, isolation = self._argv(list(target["command"]), workdir, bool(target.get("network", False)))
            argv = _limited(argv, memory, cpu, 64 << 20)
            context.notes["isolation"] = isolation
            context.notes["network"] = "allowed" if target.get("network") else "none" if isolation == "bubblewrap" \
                else "not isolated"
            env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir}
            process = await spawn(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  cwd=workdir, env=env)
            stdin = json.dumps(call.arguments).encode()
            exchange = asyncio.ensure_future(asyncio.to_thread(_exchange, process, stdin, limit))
            try:
                stdout, stderr_bytes = await asyncio.wait_for(asyncio.shield(exchange), context.remaining())
            except TimeoutError:
                raise DeadlineExceeded(f"tool {call.tool} ran past its timeout") from None
            finally:
                if not exchange.done():
                    # Cancelled or out of time: end the group now. Only the
                    # exchange thread reaps the process, after killing the
                    # group itself, so an unreaped process's group id is ours.
                    if process.returncode is None:
                        kill_group(process)
                    # It ends once the group is gone (its reader threads are
                    # waited for a bounded time); wait for it so the working
                    # directory is removed after the process.
                    with contextlib.suppress(Exception):
                        await asyncio.shield(exchange)
        if len(stdout) > limit:
            raise LimitExceeded("tool output bytes", limit, len(stdout),
                                message=f"tool {call.tool} wrote more than its max_output_bytes ({limit}) to "
                                        "stdout; it was stopped")
        if process.returncode != 0:
            # stderr may echo inputs: only its size is reported.
            raise ToolFailed(f"tool {call.tool} exited with status {process.returncode} "
                             f"({stderr_bytes} bytes on stderr)")
        text = stdout.decode(errors="replace")
        try:
            output = json.loads(text)
            if not isinstance(output, dict):
                output = {"result": output}
        except ValueError:
            output = {"stdout": text}
        return ToolResult(output=output)

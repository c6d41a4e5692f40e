"""The built-in tool adapters against real things: bubblewrap, a local HTTP server, a real MCP server."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from planes.common.v1 import common_pb2
from planes.kernel import errors
from planes.plugins.execution.adapters import HttpAdapter, McpAdapter, PythonAdapter, SubprocessAdapter
from planes.plugins.execution.adapters.mcp_tool import find_server
from planes.plugins.execution.adapters.subprocess_tool import ToolFailed, bubblewrap
from planes.plugins.execution.config import ToolContract
from planes.plugins.execution.tools import DataAccess, Secrets, ToolCall, ToolContext

needs_bwrap = pytest.mark.skipif(bubblewrap() is None, reason="bubblewrap cannot make namespaces here")


def _context(*, egress=(), secrets=None, timeout=30.0, cancelled=None) -> ToolContext:
    allowed = set(egress)
    return ToolContext(tenant="acme", task_id="t-1", attempt_epoch=1,
                       correlation=common_pb2.Correlation(correlation_id="c-1"),
                       secrets=secrets or Secrets(lambda ref: b"", ""), data=DataAccess("", frozenset()),
                       cancelled=cancelled or asyncio.Event(), deadline=time.monotonic() + timeout,
                       egress_allowed=lambda destination: destination in allowed, idempotency_key="t-1/a")


def _call(adapter_name: str, target: dict, arguments: dict | None = None, **spec) -> ToolCall:
    contract = ToolContract("t", "acme", {"adapter": adapter_name, "target": target, "side_effect": "none",
                                          "classification": "internal", **spec})
    return ToolCall("a", "t", arguments or {}, (), contract, "t-1/a")


# -- subprocess ------------------------------------------------------------------------------

@needs_bwrap
def test_the_sandbox_denies_network_and_writes_outside_its_directory(run, tmp_path):
    outside = tmp_path / "outside.txt"
    script = (
        "import json, socket, sys, os\n"
        "result = {}\n"
        "try:\n"
        "    socket.create_connection(('127.0.0.1', 9), timeout=2); result['network'] = 'reached'\n"
        "except OSError as exc:\n"
        "    result['network'] = type(exc).__name__\n"
        f"for path in ({str(outside)!r}, '/usr/planes-escape', '/etc/planes-escape'):\n"
        "    try:\n"
        "        open(path, 'w').write('x'); result[path] = 'written'\n"
        "    except OSError as exc:\n"
        "        result[path] = 'refused'\n"
        "open('inside.txt', 'w').write('ok')\n"
        "result['inside'] = open('inside.txt').read()\n"
        "result['interfaces'] = sorted(os.listdir('/sys/class/net')) if os.path.isdir('/sys/class/net') else []\n"
        "print(json.dumps(result))\n")
    adapter = SubprocessAdapter()
    context = _context()
    result = run(adapter.invoke(_call("subprocess", {"command": ["python3", "-c", script]}), context))
    assert context.notes["isolation"] == "bubblewrap" and context.notes["network"] == "none"
    assert result.output["network"] != "reached"
    assert result.output[str(outside)] == "refused" and not outside.exists()
    assert result.output["/usr/planes-escape"] == "refused" and result.output["/etc/planes-escape"] == "refused"
    assert result.output["inside"] == "ok", "its own directory is writable"


@pytest.mark.parametrize("launcher", ["prlimit", "python"])
def test_without_bubblewrap_it_runs_under_limits_in_a_private_directory(run, tmp_path, monkeypatch, launcher):
    from planes.plugins.execution.adapters import subprocess_tool
    if launcher == "python":
        real = subprocess_tool.shutil.which
        monkeypatch.setattr(subprocess_tool.shutil, "which", lambda name: None if name == "prlimit" else real(name))
    elif subprocess_tool.shutil.which("prlimit") is None:
        pytest.skip("prlimit is not installed")
    adapter = SubprocessAdapter(use_bubblewrap=False)
    context = _context()
    script = ("import json, os, resource, sys\n"
              "data = json.load(sys.stdin)\n"
              "print(json.dumps({'cwd': os.getcwd(), 'env': sorted(os.environ),"
              " 'as': resource.getrlimit(resource.RLIMIT_AS)[0], 'echo': data['x']}))\n")
    result = run(adapter.invoke(_call("subprocess", {"command": ["python3", "-c", script], "memory_mb": 256},
                                      {"x": 7}), context))
    assert context.notes["isolation"] == "rlimits+private-tmp"
    assert result.output["echo"] == 7
    assert Path(result.output["cwd"]).name.startswith("planes-tool-") and not Path(result.output["cwd"]).exists()
    # (Python itself may add LC_CTYPE when it coerces the C locale.)
    assert set(result.output["env"]) - {"LC_CTYPE"} == {"HOME", "PATH", "TMPDIR"}, "nothing of the worker's"
    assert result.output["as"] == 256 << 20


def test_a_failing_or_slow_command_is_a_typed_error_and_is_killed(run):
    adapter = SubprocessAdapter(use_bubblewrap=False)
    with pytest.raises(ToolFailed, match="exited with status 3"):
        run(adapter.invoke(_call("subprocess", {"command": ["sh", "-c", "echo secret >&2; exit 3"]}), _context()))
    with pytest.raises(errors.InvalidArgument, match="target.command"):
        adapter.describe(_call("subprocess", {"command": "sleep 1"}).contract)


def test_a_command_past_its_deadline_is_killed_with_its_children(run, tmp_path):
    adapter = SubprocessAdapter(use_bubblewrap=False)
    script = f"sleep 30 & echo $! > {tmp_path}/child; echo $$ > {tmp_path}/main; wait"
    with pytest.raises(errors.DeadlineExceeded):
        run(adapter.invoke(_call("subprocess", {"command": ["sh", "-c", script]}), _context(timeout=1.0)))
    assert _ended(_pid(tmp_path / "main")) and _ended(_pid(tmp_path / "child"))


# A tool's process and its children, after the call: gone (or a zombie
# waiting for init). The bound only keeps a failing test from hanging.
def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _ended(pid: int, bound: float = 20.0) -> bool:
    until = time.monotonic() + bound
    while _alive(pid):
        if time.monotonic() > until:
            return False
        time.sleep(0.02)
    return True


def _pid(path: Path, bound: float = 20.0) -> int:
    until = time.monotonic() + bound
    while not path.exists() or not path.read_text().strip():
        assert time.monotonic() < until, f"{path.name} was never written"
        time.sleep(0.02)
    return int(path.read_text())


def test_a_background_child_does_not_outlive_a_successful_call(run, tmp_path):
    adapter = SubprocessAdapter(use_bubblewrap=False)
    script = f"sleep 77 & echo $! > {tmp_path}/child; echo hi"
    # The child keeps standard output open: the call still ends when the command does.
    result = run(asyncio.wait_for(adapter.invoke(_call("subprocess", {"command": ["sh", "-c", script]}),
                                                 _context()), 60))
    assert result.output == {"result": "hi"} or result.output == {"stdout": "hi\n"}
    assert _ended(_pid(tmp_path / "child"))


def test_a_cancelled_call_with_a_background_child_ends_and_leaves_no_process(run, tmp_path):
    adapter = SubprocessAdapter(use_bubblewrap=False)
    script = f"sleep 77 & echo $! > {tmp_path}/child; echo $$ > {tmp_path}/main; echo hi"

    async def main():
        work = asyncio.ensure_future(adapter.invoke(_call("subprocess", {"command": ["sh", "-c", script]}),
                                                    _context()))
        await asyncio.to_thread(_pid, tmp_path / "main")
        await asyncio.to_thread(_pid, tmp_path / "child")
        work.cancel()
        done, _ = await asyncio.wait({work}, timeout=60)  # a hang guard, not a timing check
        assert done, "the cancelled call never ended"
        # Cancelled, or already ended with the command (the child does not hold it open).
        assert work.cancelled() or work.result().output
    run(main())
    assert _ended(_pid(tmp_path / "main")) and _ended(_pid(tmp_path / "child"))


def test_a_process_started_as_its_call_is_cancelled_is_killed_and_reaped(run, monkeypatch):
    import subprocess
    started, gate, real = [], threading.Event(), subprocess.Popen

    def slow_start(*args, **options):
        process = real(*args, **options)
        started.append(process)
        gate.wait(30)  # the call is cancelled while the process is being handed over
        return process

    monkeypatch.setattr(subprocess, "Popen", slow_start)
    adapter = SubprocessAdapter(use_bubblewrap=False)

    async def main():
        work = asyncio.ensure_future(adapter.invoke(_call("subprocess", {"command": ["sleep", "55"]}), _context()))
        while not started:
            await asyncio.sleep(0.01)
        work.cancel()
        gate.set()
        with pytest.raises(asyncio.CancelledError):
            await work
    run(main())
    process = started[0]
    until = time.monotonic() + 20
    while process.returncode is None and time.monotonic() < until:
        time.sleep(0.02)
    assert process.returncode == -9, "the process was left running, unsupervised"
    assert not _alive(process.pid)


def test_output_past_its_limit_stops_the_command_and_is_refused(run):
    adapter = SubprocessAdapter(use_bubblewrap=False)

    def call(size):
        return _call("subprocess", {"command": ["sh", "-c", f"head -c {size} /dev/zero | tr '\\0' x"],
                                    "max_output_bytes": 1000})

    at_limit = run(adapter.invoke(_call("subprocess", {"command": ["sh", "-c", "head -c 1000 /dev/zero | tr '\\0' x"],
                                                        "max_output_bytes": 1000}), _context()))
    with pytest.raises(errors.LimitExceeded) as refused:
        run(adapter.invoke(call(10_000_000), _context(timeout=60)))
    assert at_limit.output == {"stdout": "x" * 1000}
    # 1,001 bytes read of ten million written: the output is never held in full.
    assert (refused.value.limit, refused.value.actual) == (1000, 1001)


# -- http ------------------------------------------------------------------------------------

class _Recorder(BaseHTTPRequestHandler):
    seen: list = []

    def do_POST(self):  # noqa: N802 - http.server's naming
        body = self.rfile.read(int(self.headers["Content-Length"]))
        _Recorder.seen.append((self.path, dict(self.headers), json.loads(body)))
        if self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "http://example.com/")
            self.end_headers()
            return
        reply = json.dumps({"ok": True, "echo": json.loads(body)}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args):
        pass


@pytest.fixture
def http_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Recorder.seen = []
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_http_calls_allowed_destinations_and_refuses_others_before_connecting(run, http_server):
    adapter = HttpAdapter()
    call = _call("http", {"url": f"http://{http_server}/things"}, {"n": 1}, credential_ref="api-key")
    context = _context(egress=[http_server], secrets=Secrets(lambda ref: b"s3cret", "api-key"))
    result = run(adapter.invoke(call, context))
    assert result.output == {"ok": True, "echo": {"n": 1}}
    path, headers, _ = _Recorder.seen[0]
    assert headers["Idempotency-Key"] == "t-1/a" and headers["X-Correlation-Id"] == "c-1"
    with pytest.raises(errors.PermissionDenied, match=f"egress to {http_server} is not allowed"):
        run(adapter.invoke(call, _context(egress=["127.0.0.1:1"])))
    with pytest.raises(errors.PermissionDenied, match="egress to example.com:80"):
        run(adapter.invoke(_call("http", {"url": "http://example.com/"}), _context(egress=[http_server])))
    assert len(_Recorder.seen) == 1, "refused calls never reached the server"
    with pytest.raises(errors.PlanesError, match="redirects are not followed|HTTP 302"):
        run(adapter.invoke(_call("http", {"url": f"http://{http_server}/redirect"}), _context(egress=[http_server])))


# -- mcp -------------------------------------------------------------------------------------

@pytest.mark.skipif(find_server("mcp-server-time") == "mcp-server-time", reason="mcp-server-time is not installed")
def test_mcp_calls_a_tool_of_a_real_mcp_server(run, monkeypatch):
    import anyio

    def through_the_loop(*args, **kwargs):
        raise AssertionError("spawned through the event loop, which forks under uvloop")
    monkeypatch.setattr(anyio, "open_process", through_the_loop)
    monkeypatch.setattr(asyncio, "create_subprocess_exec", through_the_loop)
    adapter = McpAdapter()
    call = _call("mcp", {"command": "mcp-server-time", "args": ["--local-timezone", "UTC"],
                         "tool": "get_current_time"}, {"timezone": "Europe/Paris"})
    context = _context(timeout=60)
    result = run(adapter.invoke(call, context))
    assert result.output["structured"]["timezone"] == "Europe/Paris"
    assert "datetime" in result.output["structured"]
    assert context.notes["mcp_server"] == "mcp-server-time"
    bad = _call("mcp", {"command": "mcp-server-time", "tool": "get_current_time"}, {"timezone": "Not/AZone"})
    with pytest.raises(errors.PlanesError):
        run(adapter.invoke(bad, _context(timeout=60)))


def test_mcp_server_that_cannot_start_is_unavailable(run):
    with pytest.raises(errors.Unavailable, match="cannot start MCP server"):
        run(McpAdapter().invoke(_call("mcp", {"command": "/nonexistent/mcp-server"}), _context()))


HANGING_SERVER = """
import os, signal, sys, time
from mcp.server.mcpserver import MCPServer

signal.signal(signal.SIGTERM, signal.SIG_IGN)
server = MCPServer("hangs")


@server.tool()
def wait() -> str:
    open(sys.argv[1], "w").write(str(os.getpid()))
    time.sleep(600)
    return "late"


server.run()
"""


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    with open(f"/proc/{pid}/stat") as stat:           # a zombie has exited too
        return stat.read().split(") ")[1].startswith("Z")


def test_mcp_server_past_the_deadline_is_stopped(run, tmp_path):
    """A server that hangs in a tool and ignores SIGTERM: the call times out and the server is killed."""
    script, pid_file = tmp_path / "hangs.py", tmp_path / "pid"
    script.write_text(HANGING_SERVER)
    call = _call("mcp", {"command": sys.executable, "args": [str(script), str(pid_file)], "tool": "wait"})
    with pytest.raises(errors.DeadlineExceeded, match="MCP tool wait did not answer in time"):
        run(McpAdapter().invoke(call, _context(timeout=8)))
    pid = int(pid_file.read_text())
    assert _gone(pid), "the server process outlived its call"


def test_mcp_server_that_writes_garbage_is_an_error_not_a_hang(run, tmp_path):
    script = tmp_path / "garbage.py"
    script.write_text("import sys\nsys.stdout.write('not json-rpc\\n{\"half\": \\n')\nsys.stdout.flush()\n")
    call = _call("mcp", {"command": sys.executable, "args": [str(script)], "tool": "anything"})
    with pytest.raises(errors.PlanesError) as raised:
        run(McpAdapter().invoke(call, _context(timeout=20)))
    assert "not json-rpc" not in str(raised.value), "what the server wrote is not echoed"


def test_mcp_message_over_the_line_limit_ends_the_session(run, tmp_path, monkeypatch):
    from planes.plugins.execution.adapters import mcp_tool

    monkeypatch.setattr(mcp_tool, "MAX_MESSAGE_BYTES", 1024)
    script = tmp_path / "long.py"
    script.write_text("import sys, time\nsys.stdout.write('x' * 4096 + '\\n')\nsys.stdout.flush()\ntime.sleep(60)\n")
    call = _call("mcp", {"command": sys.executable, "args": [str(script)], "tool": "anything"})
    with pytest.raises(errors.Unavailable, match="failed the session: the connection closed"):
        run(McpAdapter().invoke(call, _context(timeout=30)))


# -- python ----------------------------------------------------------------------------------

def test_python_tools_load_only_from_allowed_modules(run):
    adapter = PythonAdapter()
    ok = _call("python", {"module": "planes.plugins.execution.examples", "function": "upper"}, {"text": "a"})
    assert run(adapter.invoke(ok, _context())).output == {"text": "A"}
    with pytest.raises(errors.PermissionDenied, match="'os' is not allowed"):
        run(adapter.invoke(_call("python", {"module": "os", "function": "system"}, {}), _context()))


def test_tools_that_write_where_their_arguments_say_are_not_allowed_by_default(run, tmp_path):
    """A tenant that can submit tasks must not reach a file the worker can write (a shell rc, a cron file)."""
    target = tmp_path / "victim.sh"
    call = _call("python", {"module": "planes.plugins.execution.fault_tools", "function": "count"},
                 {"ledger": str(target)})
    with pytest.raises(errors.PermissionDenied, match="'planes.plugins.execution.fault_tools' is not allowed"):
        run(PythonAdapter().invoke(call, _context()))
    assert not target.exists()
    import planes.plugins.execution.examples as examples
    assert {name for name in vars(examples) if not name.startswith("_") and callable(vars(examples)[name])} == {
        "noop", "upper", "render_report", "publish_report"}, "the default-allowed module only computes"


def test_a_worker_allows_more_python_modules_only_by_setting_or_flag(tmp_path):
    from planes.plugins.execution.worker import load_adapters
    from tests.conftest import make_settings

    fault = "planes.plugins.execution.fault_tools"
    plain, _ = load_adapters(make_settings(tmp_path))
    assert fault not in plain["python"].allowed_modules
    by_setting, _ = load_adapters(make_settings(tmp_path, plugin={"execution-adapters": {"python_modules": [fault]}}))
    assert fault in by_setting["python"].allowed_modules
    by_flag, _ = load_adapters(make_settings(tmp_path), (fault,))
    assert fault in by_flag["python"].allowed_modules
    from planes.kernel.errors import PluginError
    with pytest.raises(PluginError, match="python_modules must be a list of module names"):
        load_adapters(make_settings(tmp_path, plugin={"execution-adapters": {"python_modules": fault}}))

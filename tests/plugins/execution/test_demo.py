"""`planes demo` as a person runs it: a real subprocess that starts its own kernel and worker."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys

from planes.plugins.execution.demo import DEMO_INPUT
from planes.plugins.execution.examples import render_report


def _planes(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PLANES_")}
    return subprocess.run([sys.executable, "-m", "planes.kernel.cli", *args], env=env, capture_output=True,
                          text=True, timeout=300)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_demo_runs_a_governed_task_end_to_end(tmp_path):
    state, output = tmp_path / "state", tmp_path / "report.txt"
    ran = _planes("demo", "--state-dir", str(state), "--output", str(output))
    assert ran.returncode == 0, ran.stdout + ran.stderr
    out = ran.stdout
    steps = re.findall(r"^\[(\d+)/10\] ([a-z ]+):", out, re.MULTILINE)
    assert [int(n) for n, _ in steps] == list(range(1, 11))
    assert [name for _, name in steps] == ["kernel", "desired state", "worker", "input payload", "task submitted",
                                           "approval", "task completed", "output payload", "evidence export",
                                           "evidence verify"]
    assert "control, data, evidence, execution planes embedded" in out
    # Held by policy, approved through the API, then run by the worker.
    states = re.findall(r"^      task (\w+) ", out, re.MULTILINE)
    assert states.index("awaiting_approval") < states.index("queued") < states.index("leased") < \
        states.index("completed")
    assert "approved by demo-operator through ApproveTask" in out

    # The output payload is what the tool made of the input, read back through the data plane.
    expected = render_report(DEMO_INPUT)
    assert output.read_bytes() == expected
    done = re.search(r"^done: task (t-\w+) completed; output payload (pl_\w+) sha256 ([0-9a-f]{64}); "
                     r"(\d+) evidence events in (\S+), verified$", out, re.MULTILINE)
    assert done, out
    assert done.group(3) == hashlib.sha256(expected).hexdigest()

    # The evidence names every governed step, and an auditor's own verify accepts the bundle.
    events = re.search(r"^      events: (.*)$", out, re.MULTILINE).group(1).split(", ")
    for kind in ("request.admitted", "policy.decided", "approval.requested", "approval.granted",
                 "effect.intent", "effect.committed", "model.called", "tool.invoked", "task.completed",
                 "data.stored"):
        assert kind in events
    # The data plane decided (and recorded, in the task's correlation) each hand-over of the
    # input: to the model route, then to the tool.
    assert events.count("data.transferred") == 2
    bundle = done.group(5)
    assert os.path.exists(bundle) and str(state) in bundle
    verified = _planes("evidence", "verify", bundle, "--public-key", str(state / "keys/evidence-signing.pub.pem"))
    assert verified.returncode == 0, verified.stderr
    assert f"evidence bundle OK: {done.group(4)} events" in verified.stdout

    # Everything it started has stopped: the worker said so and is gone.
    worker_pid = int(re.search(r"subprocess, pid (\d+)", out).group(1))
    assert not _alive(worker_pid)
    assert "worker demo-worker stopped after 1 tasks" in (state / "demo/worker.log").read_text()
    assert "planes: error" not in ran.stderr


def test_demo_runs_again_on_the_same_state_directory(tmp_path):
    state = tmp_path / "state"
    first = _planes("demo", "--state-dir", str(state))
    second = _planes("demo", "--state-dir", str(state))
    assert first.returncode == 0, first.stderr
    assert second.returncode == 0, second.stderr
    assert "published revision 1 " in first.stdout and "published revision 2 " in second.stdout
    tasks = [re.search(r"^done: task (t-\w+)", run.stdout, re.MULTILINE).group(1) for run in (first, second)]
    assert tasks[0] != tasks[1]
    assert len(list((state / "demo").glob("*.bundle"))) == 2


def test_demo_refuses_a_bundle_path_it_cannot_write_before_starting_anything(tmp_path):
    state = tmp_path / "state"
    ran = _planes("demo", "--state-dir", str(state), "--bundle", str(tmp_path / "missing" / "x.bundle"))
    assert ran.returncode == 1
    assert ran.stderr.startswith("planes: error: --bundle ") and "no directory" in ran.stderr
    assert not state.exists() and ran.stdout == ""

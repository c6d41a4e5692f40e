"""`planes config` against a real `planes serve`: apply files, publish, history, diff, rollback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

CLI = [sys.executable, "-m", "planes.kernel.cli"]

ROUTES = """
[[resource]]
kind = "model_route"
tenant = "acme"
name = "gpt"
[resource.spec]
adapter = "echo"
allowed_classifications = ["public", "internal"]

[[resource]]
kind = "tenant"
tenant = "*"
name = "acme"
[resource.spec]
display_name = "Acme"
"""

ROUTES_YAML = """
resource:
  - kind: model_route
    tenant: acme
    name: gpt
    spec: {adapter: openai, allowed_classifications: [public]}
  - kind: quota
    tenant: acme
    name: default
    spec: {tasks: 100}
"""


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    state = tmp_path_factory.mktemp("control-cli")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("PLANES_")},
           "PLANES_STATE_DIR": str(state), "PLANES_SERVER__BIND": f"127.0.0.1:{port}"}
    server = subprocess.Popen([*CLI, "serve"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and "serving on" not in server.stdout.readline():
        pass
    yield env, state
    server.terminate()
    server.communicate(timeout=30)


def config(env, *args, stdin=None):
    return subprocess.run([*CLI, "config", *args], env=env, capture_output=True, text=True, input=stdin, timeout=60)


def test_apply_publish_history_diff_rollback(served, tmp_path):
    env, _ = served
    first = tmp_path / "routes.toml"
    first.write_text(ROUTES)
    applied = config(env, "apply", "-f", str(first))
    assert applied.returncode == 0, applied.stderr
    assert "2 created, 0 updated, 0 unchanged" in applied.stdout
    assert "0 created, 0 updated, 2 unchanged" in config(env, "apply", "-f", str(first)).stdout
    assert "published revision 1 (2 resources)" in config(env, "publish", "--message", "first").stdout
    second = tmp_path / "routes.yaml"
    second.write_text(ROUTES_YAML)
    changed = config(env, "apply", "-f", str(second))
    assert "1 created, 1 updated, 0 unchanged" in changed.stdout, changed.stderr
    assert "published revision 2" in config(env, "publish").stdout
    diff = config(env, "diff", "1", "2")
    assert "~ model_route acme/gpt" in diff.stdout and "+ quota acme/default" in diff.stdout
    listed = config(env, "list", "--tenant", "acme")
    assert "model_route" in listed.stdout and "v2" in listed.stdout
    got = config(env, "get", "model_route", "gpt", "--tenant", "acme")
    assert '"adapter": "openai"' in got.stdout
    rolled = config(env, "rollback", "1", "--message", "undo")
    assert "published revision 3 with the content of revision 1" in rolled.stdout
    history = config(env, "history").stdout.splitlines()
    assert [line.split()[0] for line in history] == ["3", "2", "1"]
    assert "(content of 1)" in history[0]


@pytest.mark.parametrize(("text", "suffix", "message"), [
    ("[[resource]]\nkind = 'model_route'\ntenant = 'acme'\nname = 'x'\n[resource.spec]\nadapter = 'e'\n", ".toml",
     "model_route acme/x: model_route 'x': field 'allowed_classifications' is required"),
    ("[[resource]]\nkind = 'gadget'\ntenant = 'acme'\nname = 'x'\n", ".toml", "unknown kind 'gadget'"),
    ("resource: [1, 2]\n", ".yaml", "resource #1: must be a table"),
    ("[[resource]\n", ".toml", "not valid TOML"),
    ("nothing = 1\n", ".toml", "expected a list named 'resource'"),
])
def test_bad_files_are_one_line_errors(served, tmp_path, text, suffix, message):
    env, _ = served
    path = tmp_path / f"bad{suffix}"
    path.write_text(text)
    result = config(env, "apply", "-f", str(path))
    assert result.returncode == 1
    assert message in result.stderr
    assert "Traceback" not in result.stderr

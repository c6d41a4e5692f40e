"""`planes config` against a real `planes serve`: apply files, publish, history, diff, rollback."""

from __future__ import annotations

import subprocess

import pytest

from tests.conftest import CLI, serve_env, start_serve, stop_serve

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
    env = serve_env(state)
    server = start_serve(env)
    yield env, state
    stop_serve(server)


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


def test_status_shows_the_fleet_and_the_hosts_watching(served):
    env, _ = served
    result = config(env, "status")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("fleet revision ")
    # The kernel's own execution host subscribes to its control plane.
    assert any(line.startswith("execution@") and "watching" in line for line in result.stdout.splitlines())
    from planes.control.v1 import control_service_pb2 as pb
    from planes.plugins.control.cli import format_status

    assert format_status(pb.GetRolloutStatusResponse(fleet_revision=1))[-1] == "no subscribers yet"


def test_status_view_shows_who_runs_what_and_why_a_host_refused():
    from planes.common.v1 import common_pb2
    from planes.control.v1 import control_service_pb2 as pb
    from planes.plugins.control.cli import format_status

    reply = pb.GetRolloutStatusResponse(
        fleet_revision=3,
        rollout=pb.Rollout(rollout_id="ab12", revision=2, base_revision=1, canary_subscribers=["host-a"],
                           state=pb.ROLLOUT_STATE_ROLLED_BACK, rollback_revision=3,
                           reason="canary host-a NACKed revision 2: NACK_REASON_MISSING_CONTRACT"),
        subscribers=[
            pb.SubscriberStatus(
                subscriber_id="host-a", applied_revision=1, target_revision=3, last_outcome=pb.APPLY_OUTCOME_NACK,
                last_outcome_revision=2, nack_reason=pb.NACK_REASON_MISSING_CONTRACT,
                error="revision 2 needs the execution contract 1.5; this host serves 1.0",
                health=common_pb2.HealthSummary(state=common_pb2.HealthSummary.STATE_HEALTHY),
                contract_versions=[common_pb2.ContractVersion(plane="execution", major=1, minor=0)]),
            pb.SubscriberStatus(subscriber_id="host-b", applied_revision=3, target_revision=3, watching=True,
                                last_outcome=pb.APPLY_OUTCOME_ACK, last_outcome_revision=3)])
    lines = format_status(reply)
    assert lines[0] == "fleet revision 3"
    assert "rollout ab12: revision 2 over 1, rolled_back, canaries host-a" in lines[1]
    assert lines[1].endswith("rolled back as revision 3: canary host-a NACKed revision 2: NACK_REASON_MISSING_CONTRACT")
    assert "applied 1" in lines[2] and "contracts execution=1.0" in lines[2] and "offline" in lines[2]
    assert lines[2].endswith("; NACK 2 missing_contract: revision 2 needs the execution contract 1.5; "
                             "this host serves 1.0")
    assert "watching" in lines[3] and lines[3].endswith("; ACK 3")

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


HALF_VALID = """
[[resource]]
kind = "model_route"
tenant = "halfco"
name = "first"
[resource.spec]
adapter = "echo"
allowed_classifications = ["public"]

[[resource]]
kind = "quota"
tenant = "halfco"
name = "second"
[resource.spec]
tasks = 10

[[resource]]
kind = "model_route"
tenant = "halfco"
name = "third"
[resource.spec]
adapter = "echo"

[[resource]]
kind = "egress_rule"
tenant = "halfco"
name = "fourth"
[resource.spec]
classification = "public"
destinations = ["example.org"]
colour = "blue"
"""


def test_a_file_with_invalid_entries_applies_nothing_and_names_them_all(served, tmp_path):
    env, _ = served
    path = tmp_path / "half.toml"
    path.write_text(HALF_VALID)
    result = config(env, "apply", "-f", str(path))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "2 of 4 resources are invalid" in result.stderr
    assert "resource #3 model_route halfco/third: model_route 'third': field 'allowed_classifications' is required" \
        in result.stderr
    assert "resource #4 egress_rule halfco/fourth: egress_rule 'fourth': unknown field 'colour'" in result.stderr
    assert "nothing was applied" in result.stderr and "created" not in result.stdout
    listed = config(env, "list", "--tenant", "halfco")
    assert listed.returncode == 0 and listed.stdout == "", "the two valid entries were not written either"


def test_a_resource_twice_in_one_file_is_refused_before_sending(tmp_path):
    from planes.kernel.errors import InvalidArgument
    from planes.plugins.control.cli import load_resources

    path = tmp_path / "twice.toml"
    path.write_text(ROUTES + ROUTES.split("[[resource]]")[1].join(["[[resource]]", ""]))
    with pytest.raises(InvalidArgument) as raised:
        load_resources(str(path))
    assert "1 of 3 resources are invalid" in raised.value.message
    assert "resource #3 model_route acme/gpt: the same resource as #1" in raised.value.message


def test_a_conflict_midway_says_what_was_applied_and_what_not(run, tmp_path):
    """A concurrent change to the second resource between apply's read and its write: a real Conflict."""
    from google.protobuf import json_format, struct_pb2

    from planes.control.v1 import control_service_pb2 as pb
    from planes.kernel.contracts import ControlPlane
    from planes.kernel.errors import Conflict
    from planes.plugins.control.cli import apply_resources, load_resources
    from tests.plugins.control.test_plane import _serve

    path = tmp_path / "three.toml"
    path.write_text(HALF_VALID.split('[[resource]]\nkind = "egress_rule"')[0].replace(
        'name = "third"\n[resource.spec]\nadapter = "echo"\n',
        'name = "third"\n[resource.spec]\nadapter = "echo"\nallowed_classifications = ["public"]\n'))
    resources = load_resources(str(path))
    assert [r.name for r in resources] == ["first", "second", "third"]

    class RacedClient:
        """The admin's client, with another admin changing 'second' right after apply reads it."""

        def __init__(self, inner, rival):
            self.inner, self.rival = inner, rival

        async def get_resource(self, request, timeout):
            reply = await self.inner.get_resource(request, timeout=timeout)
            if request.name == "second":
                await self.rival.put_resource(pb.PutResourceRequest(
                    tenant="halfco", kind=pb.RESOURCE_KIND_QUOTA, name="second", expected_resource_version=1,
                    spec=json_format.ParseDict({"tasks": 99}, struct_pb2.Struct())), timeout=5)
            return reply

        async def put_resource(self, request, timeout):
            return await self.inner.put_resource(request, timeout=timeout)

    async def scenario(client, kernel, plugin):
        admin = client(ControlPlane, ("admin",))
        await admin.put_resource(pb.PutResourceRequest(
            tenant="halfco", kind=pb.RESOURCE_KIND_QUOTA, name="second",
            spec=json_format.ParseDict({"tasks": 1}, struct_pb2.Struct())), timeout=5)
        said = []
        with pytest.raises(Conflict) as raised:
            await apply_resources(RacedClient(admin, client(ControlPlane, ("admin",), principal="rival")),
                                  resources, 5, say=said.append)
        names = [(r.name, r.resource_version) for r in
                 (await admin.list_resources(pb.ListResourcesRequest(tenant="halfco"), timeout=5)).resources]
        return raised.value.message, said, sorted(names)

    message, said, stored = _serve(run, tmp_path / "kernel", scenario)
    first_line, applied, not_applied = message.splitlines()
    assert first_line.startswith("quota halfco/second: ")
    assert applied == "applied before the failure: model_route halfco/first (created)"
    assert not_applied == "not applied: quota halfco/second, model_route halfco/third"
    assert said == ["created model_route halfco/first"]
    assert stored == [("first", 1), ("second", 2)], "first applied, the rival's change kept, third not written"

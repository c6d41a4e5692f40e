"""Policy decisions from a snapshot's tool contracts, rules, data classes and risk."""

from __future__ import annotations

import pytest
from google.protobuf import json_format, struct_pb2

from planes.common.v1 import common_pb2
from planes.control.v1 import control_service_pb2 as cpb
from planes.execution.v1 import execution_service_pb2 as pb
from planes.kernel import errors
from planes.plugins.execution.config import RunConfig
from planes.plugins.execution.policy import PolicyEngine, action_digest

V = pb


def _config(tools: dict, rules: list) -> RunConfig:
    content = cpb.SnapshotContent()
    for name, body in tools.items():
        content.resources.add(kind=cpb.RESOURCE_KIND_TOOL_CONTRACT, tenant="acme", name=name,
                              spec=json_format.ParseDict(body, struct_pb2.Struct()))
    content.resources.add(kind=cpb.RESOURCE_KIND_POLICY, tenant="acme", name="p",
                          spec=json_format.ParseDict({"rules": rules}, struct_pb2.Struct()))
    return RunConfig(3, b"digest", content)


def _tool(classification="internal", side_effect="none", triggers=()):
    return {"version": "1", "side_effect": side_effect, "classification": classification,
            "approval_triggers": list(triggers)}


def _action(tool: str, inputs=(), **arguments) -> pb.Action:
    body = struct_pb2.Struct()
    body.update(arguments)
    refs = [common_pb2.PayloadRef(payload_id=f"p{i}", classification=c) for i, c in enumerate(inputs)]
    return pb.Action(action_id="a", tool=pb.ToolAction(tool=tool, arguments=body, inputs=refs))


def _decide(config, action, risk=pb.RISK_LOW):
    spec = pb.TaskSpec(risk=risk, allowed_tools=[action.tool.tool], actions=[action])
    return PolicyEngine(config).decide_action("acme", spec, action)


def test_the_strongest_matching_verdict_wins():
    config = _config({"t": _tool(side_effect="non_idempotent")}, [
        {"name": "shape", "effect": "transform", "tools": ["t"], "set_arguments": {"mode": "safe"},
         "remove_arguments": ["force"]},
        {"name": "big", "effect": "require_approval", "min_risk": "high"},
        {"name": "writes", "effect": "deny", "side_effects": ["non_idempotent"], "min_risk": "critical"},
    ])
    low = _decide(config, _action("t", force=True, mode="fast"))
    assert low.verdict == pb.POLICY_VERDICT_TRANSFORM and low.rules == ["p/shape"]
    assert dict(low.action.tool.arguments) == {"mode": "safe"}
    assert low.transforms == ["a: removed argument force", "a: set argument mode"]
    assert _decide(config, _action("t"), pb.RISK_HIGH).verdict == pb.POLICY_VERDICT_REQUIRE_APPROVAL
    critical = _decide(config, _action("t"), pb.RISK_CRITICAL)
    assert critical.verdict == pb.POLICY_VERDICT_DENY and critical.rules == ["p/shape", "p/big", "p/writes"]


def test_data_above_the_tools_class_is_denied_and_triggers_ask_approval():
    config = _config({"low": _tool("internal"), "vault": _tool("restricted", triggers=["class:confidential"]),
                      "ops": _tool("internal", triggers=["risk:medium"])}, [
        {"name": "no-secrets-out", "effect": "deny", "tools": ["*"], "classifications": ["restricted"]}])
    confidential = [common_pb2.CLASSIFICATION_CONFIDENTIAL]
    denied = _decide(config, _action("low", inputs=confidential))
    assert denied.verdict == pb.POLICY_VERDICT_DENY and denied.rules == ["data-classification"]
    assert "confidential input to a tool cleared for internal data" in denied.reason
    assert _decide(config, _action("vault", inputs=confidential)).verdict == pb.POLICY_VERDICT_REQUIRE_APPROVAL
    assert _decide(config, _action("vault", inputs=[common_pb2.CLASSIFICATION_RESTRICTED])).verdict == \
        pb.POLICY_VERDICT_DENY
    assert _decide(config, _action("vault", inputs=[common_pb2.CLASSIFICATION_PUBLIC])).verdict == \
        pb.POLICY_VERDICT_ALLOW
    assert _decide(config, _action("ops"), pb.RISK_MEDIUM).verdict == pb.POLICY_VERDICT_REQUIRE_APPROVAL
    assert _decide(config, _action("ops"), pb.RISK_LOW).verdict == pb.POLICY_VERDICT_ALLOW


def test_the_action_digest_is_deterministic_and_covers_the_payload():
    one = _action("t", b=2, a=1)
    same = _action("t", a=1, b=2)
    other = _action("t", a=1, b=3)
    assert action_digest(one) == action_digest(same)
    assert action_digest(one).value != action_digest(other).value
    assert action_digest(one).algorithm == common_pb2.DIGEST_ALGORITHM_SHA256


def test_specs_that_no_policy_could_allow_are_malformed():
    engine = PolicyEngine(_config({"t": _tool()}, []))
    with pytest.raises(errors.InvalidArgument, match="has no action_id"):
        engine.check_spec("acme", pb.TaskSpec(allowed_tools=["t"], actions=[pb.Action(tool=pb.ToolAction(tool="t"))]))
    with pytest.raises(errors.InvalidArgument, match="no model route 'gpt'"):
        engine.check_spec("acme", pb.TaskSpec(actions=[pb.Action(action_id="m", model=pb.ModelAction(route="gpt"))]))
    with pytest.raises(errors.InvalidArgument, match="no tool contract 't' in config revision 3"):
        PolicyEngine(_config({}, [])).check_spec("acme", pb.TaskSpec(allowed_tools=["t"], actions=[_action("t")]))


@pytest.mark.parametrize("action_id, ok", [
    ("a", True), ("step-1.retry_2:x", True), ("x" * 64, True),
    ("x" * 65, False), ("x\necho PWNED > /tmp/p #", False), ("a/b", False), ("a b", False), ("é", False),
])
def test_an_action_id_is_a_plain_name(action_id, ok):
    """It is part of the idempotency key a tool sees (``task/action``): no newline, slash or space gets in."""
    action = _action("t")
    action.action_id = action_id
    spec = pb.TaskSpec(allowed_tools=["t"], actions=[action])
    engine = PolicyEngine(_config({"t": _tool()}, []))
    if ok:
        engine.check_spec("acme", spec)
    else:
        with pytest.raises(errors.InvalidArgument, match="action_id must be 1-64 letters"):
            engine.check_spec("acme", spec)


def test_egress_rules_for_payloads_do_not_switch_on_network_egress_checks():
    """An egress_rule's kind:name destinations are the data plane's: they neither allow a host nor make a
    tenant's network egress subject to rules at all."""
    def rule(name, tenant, classification, destinations):
        spec = json_format.ParseDict({"classification": classification, "destinations": destinations},
                                     struct_pb2.Struct())
        return cpb.Resource(kind=cpb.RESOURCE_KIND_EGRESS_RULE, tenant=tenant, name=name, spec=spec)

    content = cpb.SnapshotContent(resources=[
        rule("payloads", "acme", "confidential", ["tool:push-conf", "sink:*"]),
        rule("mixed", "globex", "internal", ["api.example.com", "model_route:local-*", "sink:9000"]),
    ])
    config = RunConfig(1, b"", content)
    assert config.tenant("acme").egress == {}, "acme's rules are about payloads only"
    internal = common_pb2.CLASSIFICATION_INTERNAL
    assert config.egress_allowed("globex", internal, "api.example.com:443")
    assert not config.egress_allowed("globex", internal, "model_route:local-1")
    assert config.egress_allowed("globex", internal, "sink:9000"), "a host named sink, port 9000, is a host"

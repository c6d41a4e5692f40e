"""Policy decisions from the snapshot: allow, deny, require approval, transform.

Inputs: the tenant's policy rules, its tool contracts (side-effect class, the
highest data class a tool may receive, approval triggers), the classes of the
task's input payloads, and the task's risk. A rule is a table in a ``policy``
resource's ``rules`` list::

    {name = "no-deletes", effect = "deny", tools = ["files.delete"]}
    {name = "big-risk", effect = "require_approval", min_risk = "high"}
    {name = "dry-run", effect = "transform", tools = ["deploy"], set_arguments = {dry_run = true}}

Match keys (all given must hold): ``tools`` (ids, ``"*"`` any), ``side_effects``,
``min_risk`` (low, medium, high, critical), ``classifications`` (a task or
action input of one of these classes). The strongest verdict wins: deny, then
require approval, then transform, then allow. Tool contracts add their own
checks: an input above the tool's classification is denied, and
``approval_triggers`` (``always``, ``risk:<level>``, ``class:<class>``)
require approval.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

from google.protobuf import struct_pb2

from planes.common.v1 import common_pb2
from planes.execution.v1 import execution_service_pb2 as pb
from planes.kernel.errors import InvalidArgument

from .config import CLASS_NAMES, CLASS_ORDER, RunConfig, class_rank

RISKS = {"low": pb.RISK_LOW, "medium": pb.RISK_MEDIUM, "high": pb.RISK_HIGH, "critical": pb.RISK_CRITICAL}
_STRENGTH = {pb.POLICY_VERDICT_ALLOW: 0, pb.POLICY_VERDICT_TRANSFORM: 1,
             pb.POLICY_VERDICT_REQUIRE_APPROVAL: 2, pb.POLICY_VERDICT_DENY: 3}
_EFFECTS = {"allow": pb.POLICY_VERDICT_ALLOW, "deny": pb.POLICY_VERDICT_DENY,
            "require_approval": pb.POLICY_VERDICT_REQUIRE_APPROVAL, "transform": pb.POLICY_VERDICT_TRANSFORM}


def action_digest(action: pb.Action) -> common_pb2.Digest:
    """SHA-256 of the action's deterministic encoding: what an approval binds to."""
    data = action.SerializeToString(deterministic=True)
    return common_pb2.Digest(algorithm=common_pb2.DIGEST_ALGORITHM_SHA256, value=hashlib.sha256(data).digest())


@dataclass
class ActionVerdict:
    verdict: int
    rules: list[str] = field(default_factory=list)
    reason: str = ""
    transforms: list[str] = field(default_factory=list)
    action: pb.Action | None = None


def _inputs_rank(spec: pb.TaskSpec, action: pb.Action) -> int:
    refs = list(spec.inputs)
    target = action.WhichOneof("target")
    if target:
        refs += list(getattr(action, target).inputs)
    return max((class_rank(ref.classification) for ref in refs), default=0)


def _matches(rule: dict, tool: str, side_effect: str, risk: int, rank: int) -> bool:
    tools = rule.get("tools")
    if tools is not None and "*" not in tools and tool not in tools:
        return False
    side_effects = rule.get("side_effects")
    if side_effects is not None and side_effect not in side_effects:
        return False
    min_risk = rule.get("min_risk")
    if min_risk is not None and risk < RISKS.get(str(min_risk), pb.RISK_CRITICAL + 1):
        return False
    classes = rule.get("classifications")
    if classes is not None and CLASS_NAMES.get(rank) not in classes:
        return False
    return True


#: What an action id may be: it is part of idempotency keys (``task/action``) and evidence.
ACTION_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


class PolicyEngine:
    """Decides tasks and run-time actions under one :class:`RunConfig`."""

    def __init__(self, config: RunConfig):
        self.config = config

    def check_spec(self, tenant: str, spec: pb.TaskSpec) -> None:
        """Refuse what no policy could allow: unknown tools, tools outside ``allowed_tools``."""
        seen = set()
        for index, action in enumerate(spec.actions):
            if not action.action_id:
                raise InvalidArgument(f"action {index} has no action_id")
            if not ACTION_ID.fullmatch(action.action_id):
                # It becomes part of idempotency keys, evidence ids and what tools see: a plain name only.
                raise InvalidArgument(f"action {index}: action_id must be 1-64 letters, digits, '.', '_', ':' "
                                      "or '-'")
            if action.action_id in seen:
                raise InvalidArgument(f"action id {action.action_id!r} appears twice")
            seen.add(action.action_id)
            target = action.WhichOneof("target")
            if target is None:
                raise InvalidArgument(f"action {action.action_id!r} names neither a tool nor a model")
            if target == "tool":
                self.check_tool(tenant, spec, action)
            elif action.model.route and self.config.route(tenant, action.model.route) is None:
                raise InvalidArgument(f"action {action.action_id!r}: no model route {action.model.route!r}")

    def check_tool(self, tenant: str, spec: pb.TaskSpec, action: pb.Action) -> None:
        tool = action.tool.tool
        if tool not in spec.allowed_tools:
            raise InvalidArgument(f"action {action.action_id!r} calls {tool!r}, which is not in allowed_tools")
        if self.config.tool(tenant, tool) is None:
            raise InvalidArgument(f"action {action.action_id!r}: no tool contract {tool!r} in config revision "
                                  f"{self.config.revision}")

    def decide_action(self, tenant: str, spec: pb.TaskSpec, action: pb.Action) -> ActionVerdict:
        rank = _inputs_rank(spec, action)
        if action.WhichOneof("target") == "model":
            return self._decide_model(tenant, action, rank)
        contract = self.config.tool(tenant, action.tool.tool)
        if contract is None:
            return ActionVerdict(pb.POLICY_VERDICT_DENY, ["tool-contract"], f"no tool contract {action.tool.tool!r}")
        verdict = ActionVerdict(pb.POLICY_VERDICT_ALLOW, action=action)
        if rank > contract.classification:
            return ActionVerdict(pb.POLICY_VERDICT_DENY, ["data-classification"],
                                 f"{CLASS_NAMES.get(rank)} input to a tool cleared for "
                                 f"{CLASS_NAMES[contract.classification]} data")
        for trigger in contract.approval_triggers:
            kind, _, value = trigger.partition(":")
            hit = (kind == "always"
                   or (kind == "risk" and spec.risk >= RISKS.get(value, pb.RISK_CRITICAL + 1))
                   or (kind == "class" and rank >= CLASS_ORDER.get(value, 99)))
            if hit:
                self._raise(verdict, pb.POLICY_VERDICT_REQUIRE_APPROVAL, f"tool:{contract.name}",
                            f"tool {contract.name} asks approval ({trigger})")
        for rule in self.config.tenant(tenant).rules:
            if not _matches(rule, contract.name, contract.side_effect, spec.risk, rank):
                continue
            effect = _EFFECTS.get(str(rule.get("effect", "")))
            if effect is None:
                continue
            name = f"{rule['policy']}/{rule.get('name', '?')}"
            if effect == pb.POLICY_VERDICT_TRANSFORM:
                verdict.action, described = _transform(verdict.action or action, rule)
                verdict.transforms.extend(described)
            self._raise(verdict, effect, name, str(rule.get("reason", "")) or f"rule {name}")
        return verdict

    def _decide_model(self, tenant: str, action: pb.Action, rank: int) -> ActionVerdict:
        routes = self.config.tenant(tenant).routes
        wanted = action.model.route
        candidates = [routes[wanted]] if wanted else list(routes.values())
        if wanted:
            candidates += [routes[name] for name in routes[wanted].fallbacks if name in routes]
        if not any(class_rank(rank) in route.allowed for route in candidates) and rank:
            return ActionVerdict(pb.POLICY_VERDICT_DENY, ["model-route-classification"],
                                 f"no model route approved for {CLASS_NAMES.get(rank)} data")
        if not candidates:
            return ActionVerdict(pb.POLICY_VERDICT_DENY, ["model-route"], "no model route for this tenant")
        return ActionVerdict(pb.POLICY_VERDICT_ALLOW, action=action)

    @staticmethod
    def _raise(verdict: ActionVerdict, effect: int, rule: str, reason: str) -> None:
        verdict.rules.append(rule)
        if _STRENGTH[effect] > _STRENGTH[verdict.verdict]:
            verdict.verdict = effect
            verdict.reason = reason


def _transform(action: pb.Action, rule: dict) -> tuple[pb.Action, list[str]]:
    changed = pb.Action()
    changed.CopyFrom(action)
    described = []
    arguments = changed.tool.arguments
    for name in rule.get("remove_arguments", []):
        if name in arguments.fields:
            del arguments.fields[name]
            described.append(f"{action.action_id}: removed argument {name}")
    for name, value in dict(rule.get("set_arguments", {})).items():
        holder = struct_pb2.Struct()
        holder.update({name: value})
        arguments.fields[name].CopyFrom(holder.fields[name])
        described.append(f"{action.action_id}: set argument {name}")
    return changed, described

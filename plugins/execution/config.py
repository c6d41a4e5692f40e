"""The desired state execution runs under, read from one verified snapshot.

:class:`RunConfig` indexes a snapshot's tool contracts, model routes, policies,
quotas and egress rules by tenant once per revision, so a decision costs
dictionary look-ups. Its :attr:`stamp` is the config revision every task and
every evidence event records.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from google.protobuf import json_format

from planes.common.v1 import common_pb2
from planes.control.v1 import control_service_pb2 as cpb
from planes.plugins.control.schema import is_data_destination

CLASS_ORDER = {"public": 1, "internal": 2, "confidential": 3, "restricted": 4}
CLASS_NAMES = {value: name for name, value in CLASS_ORDER.items()}


def class_rank(classification: int) -> int:
    """Rank of a ``Classification`` enum value; unspecified counts as internal (the safe middle)."""
    return classification if classification else CLASS_ORDER["internal"]


@dataclass(frozen=True)
class ToolContract:
    name: str
    tenant: str
    spec: dict[str, Any]

    @property
    def adapter(self) -> str:
        return str(self.spec.get("adapter", "python"))

    @property
    def side_effect(self) -> str:
        return str(self.spec.get("side_effect", "non_idempotent"))

    @property
    def classification(self) -> int:
        return CLASS_ORDER[str(self.spec.get("classification", "internal"))]

    @property
    def timeout(self) -> float:
        return float(self.spec.get("timeout_seconds", 30.0))

    @property
    def max_attempts(self) -> int:
        return max(1, int(self.spec.get("max_attempts", 1)))

    @property
    def target(self) -> dict[str, Any]:
        return dict(self.spec.get("target", {}))

    @property
    def egress(self) -> list[str]:
        return [str(item) for item in self.spec.get("egress", [])]

    @property
    def credential_ref(self) -> str:
        return str(self.spec.get("credential_ref", ""))

    @property
    def approval_triggers(self) -> list[str]:
        return [str(item) for item in self.spec.get("approval_triggers", [])]


@dataclass(frozen=True)
class ModelRoute:
    name: str
    tenant: str
    spec: dict[str, Any]

    @property
    def adapter(self) -> str:
        return str(self.spec.get("adapter", "echo"))

    @property
    def endpoint(self) -> str:
        return str(self.spec.get("endpoint", ""))

    @property
    def allowed(self) -> frozenset[int]:
        return frozenset(CLASS_ORDER[c] for c in self.spec.get("allowed_classifications", []))

    @property
    def fallbacks(self) -> list[str]:
        return [str(item) for item in self.spec.get("fallbacks", [])]


@dataclass
class TenantConfig:
    tools: dict[str, ToolContract] = field(default_factory=dict)
    routes: dict[str, ModelRoute] = field(default_factory=dict)
    rules: list[dict[str, Any]] = field(default_factory=list)
    quota_tasks: int = 0
    egress: dict[int, list[str]] = field(default_factory=dict)


class RunConfig:
    """One snapshot's execution-relevant resources, by tenant."""

    def __init__(self, revision: int, digest: bytes, content: cpb.SnapshotContent):
        self.revision = revision
        self.digest = digest
        self.stamp = common_pb2.ConfigStamp(revision=revision, digest=digest)
        self.tenants: dict[str, TenantConfig] = {}
        for resource in content.resources:
            spec = json_format.MessageToDict(resource.spec)
            tenant = self.tenants.setdefault(resource.tenant, TenantConfig())
            kind = resource.kind
            if kind == cpb.RESOURCE_KIND_TOOL_CONTRACT:
                tenant.tools[resource.name] = ToolContract(resource.name, resource.tenant, spec)
            elif kind == cpb.RESOURCE_KIND_MODEL_ROUTE:
                tenant.routes[resource.name] = ModelRoute(resource.name, resource.tenant, spec)
            elif kind == cpb.RESOURCE_KIND_POLICY:
                for rule in spec.get("rules", []):
                    if isinstance(rule, dict):
                        tenant.rules.append({"policy": resource.name, **rule})
            elif kind == cpb.RESOURCE_KIND_QUOTA:
                tenant.quota_tasks = int(spec.get("tasks", 0))
            elif kind == cpb.RESOURCE_KIND_EGRESS_RULE:
                # Network destinations only: a kind:name one (tool:NAME, model_route:NAME, sink:NAME) is
                # the data plane's, about which payloads may reach a tool, not where a tool may connect.
                hosts = [str(d) for d in spec.get("destinations", []) if not is_data_destination(str(d))]
                if hosts:
                    tenant.egress.setdefault(CLASS_ORDER[str(spec["classification"])], []).extend(hosts)

    @classmethod
    def from_verified(cls, verified) -> RunConfig:
        header = verified.header
        return cls(header.revision, header.content_digest.value, verified.content())

    @classmethod
    def empty(cls) -> RunConfig:
        return cls(0, b"", cpb.SnapshotContent())

    def tenant(self, tenant: str) -> TenantConfig:
        return self.tenants.get(tenant) or TenantConfig()

    def tool(self, tenant: str, name: str) -> ToolContract | None:
        return self.tenant(tenant).tools.get(name)

    def route(self, tenant: str, name: str) -> ModelRoute | None:
        return self.tenant(tenant).routes.get(name)

    def egress_allowed(self, tenant: str, classification: int, destination: str) -> bool:
        """True if a payload of ``classification`` may go to ``destination`` (``host`` or ``host:port``)."""
        allowed = self.tenant(tenant).egress.get(class_rank(classification), [])
        host = destination.rsplit(":", 1)[0] if destination.count(":") == 1 else destination
        return destination in allowed or host in allowed or "*" in allowed

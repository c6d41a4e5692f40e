"""Per-kind schemas of desired-state resources, with errors a person can act on."""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format, struct_pb2

from planes.control.v1 import control_service_pb2 as pb
from planes.kernel.errors import InvalidArgument
from planes.kernel.identity import ALL_TENANTS, ROLES

CLASSIFICATIONS = ("public", "internal", "confidential", "restricted")

# field -> (type, required, allowed values or None). Types: str, num, bool, [str], list, dict.
SCHEMAS: dict[int, dict[str, tuple[str, bool, tuple[str, ...] | None]]] = {
    pb.RESOURCE_KIND_TENANT: {"display_name": ("str", False, None)},
    pb.RESOURCE_KIND_IDENTITY_MAPPING: {"principal": ("str", True, None), "roles": ("[str]", True, ROLES)},
    pb.RESOURCE_KIND_MODEL_ROUTE: {
        "adapter": ("str", True, None), "endpoint": ("str", False, None),
        "allowed_classifications": ("[str]", True, CLASSIFICATIONS), "fallbacks": ("[str]", False, None),
        # The route's API key, by reference (resolved on the worker when called), and its model name.
        "credential_ref": ("str", False, None), "model": ("str", False, None)},
    pb.RESOURCE_KIND_TOOL_CONTRACT: {
        "version": ("str", True, None), "input_schema": ("dict", False, None), "output_schema": ("dict", False, None),
        "side_effect": ("str", True, ("none", "idempotent", "non_idempotent")),
        "classification": ("str", True, CLASSIFICATIONS), "egress": ("[str]", False, None),
        "credential_ref": ("str", False, None), "approval_triggers": ("[str]", False, None),
        "timeout_seconds": ("num", False, None), "max_attempts": ("num", False, None),
        # Which tool adapter runs it (python, subprocess, http, mcp or a plugin's) and
        # the adapter's own settings (a command, a URL, an MCP server, a function).
        "adapter": ("str", False, None), "target": ("dict", False, None)},
    pb.RESOURCE_KIND_POLICY: {"rules": ("list", True, None), "description": ("str", False, None)},
    pb.RESOURCE_KIND_QUOTA: {"tasks": ("num", False, None), "tokens": ("num", False, None),
                             "bytes": ("num", False, None)},
    pb.RESOURCE_KIND_RETENTION_RULE: {"event_type": ("str", True, None), "seconds": ("num", True, None)},
    pb.RESOURCE_KIND_EGRESS_RULE: {"classification": ("str", True, CLASSIFICATIONS),
                                   "destinations": ("[str]", True, None)},
    pb.RESOURCE_KIND_DEPLOYMENT_PROFILE: {
        "validity_seconds": ("num", False, None), "lease_seconds": ("num", False, None),
        "lease_expiry": ("str", False, ("degraded", "stop_admitting"))},
}
GLOBAL_KINDS = {pb.RESOURCE_KIND_TENANT, pb.RESOURCE_KIND_DEPLOYMENT_PROFILE}


#: The destination kinds of a data-plane transfer, as ``kind:name`` prefixes in an egress_rule.
DATA_DESTINATION_KINDS = frozenset(("tool", "model_route", "sink"))


def is_data_destination(destination: str) -> bool:
    """True for an egress_rule destination about payloads (``kind:name``, e.g. ``tool:push-*``: the data
    plane decides these), False for a network one (``host`` or ``host:port``: the execution plane's)."""
    kind, sep, name = destination.partition(":")
    return bool(sep and name) and kind in DATA_DESTINATION_KINDS and not name.isdigit()  # sink:9000 is a host


def kind_name(kind: int) -> str:
    return pb.ResourceKind.Name(kind).removeprefix("RESOURCE_KIND_").lower()


def validate(kind: int, tenant: str, name: str, spec: struct_pb2.Struct) -> None:
    """Refuse a resource that does not fit its kind, naming the field and what is expected."""
    if kind not in SCHEMAS:
        raise InvalidArgument(f"kind must be one of {', '.join(kind_name(k) for k in SCHEMAS)}")
    label = f"{kind_name(kind)} {name!r}"
    if not name or len(name) > 128 or not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise InvalidArgument(f"{label}: name must be 1-128 letters, digits, '-', '_' or '.'")
    if kind in GLOBAL_KINDS and tenant != ALL_TENANTS:
        raise InvalidArgument(f"{label}: a {kind_name(kind)} is global; write it with tenant '*'")
    if kind not in GLOBAL_KINDS and tenant == ALL_TENANTS:
        raise InvalidArgument(f"{label}: a {kind_name(kind)} belongs to one tenant, not '*'")
    body: dict[str, Any] = json_format.MessageToDict(spec)
    schema = SCHEMAS[kind]
    unknown = sorted(set(body) - set(schema))
    if unknown:
        raise InvalidArgument(f"{label}: unknown field {unknown[0]!r}; fields of a {kind_name(kind)}: "
                              f"{', '.join(sorted(schema))}")
    for field, (kind_of, required, allowed) in schema.items():
        if field not in body:
            if required:
                raise InvalidArgument(f"{label}: field {field!r} is required")
            continue
        _check_value(label, field, body[field], kind_of, allowed)
    if kind == pb.RESOURCE_KIND_QUOTA and not body:
        raise InvalidArgument(f"{label}: set at least one of tasks, tokens, bytes")


def _check_value(label: str, field: str, value: Any, kind_of: str, allowed) -> None:
    expected = {"str": "a string", "num": "a number", "bool": "true or false", "[str]": "a list of strings",
                "list": "a list", "dict": "a table"}[kind_of]
    ok = {"str": isinstance(value, str), "num": isinstance(value, (int, float)) and not isinstance(value, bool),
          "bool": isinstance(value, bool), "list": isinstance(value, list), "dict": isinstance(value, dict),
          "[str]": isinstance(value, list) and all(isinstance(item, str) for item in value)}[kind_of]
    if not ok:
        raise InvalidArgument(f"{label}: field {field!r} must be {expected}")
    if kind_of == "num" and value < 0:
        raise InvalidArgument(f"{label}: field {field!r} must not be negative")
    if allowed is not None:
        values = value if isinstance(value, list) else [value]
        bad = [item for item in values if item not in allowed]
        if bad:
            raise InvalidArgument(f"{label}: field {field!r} has {bad[0]!r}; allowed: {', '.join(allowed)}")

"""``planes config``: desired state from files, through the control plane's RPCs.

A resource file (TOML or YAML) lists resources::

    [[resource]]
    kind = "model_route"          # tenant, identity_mapping, model_route, tool_contract, policy,
    tenant = "acme"               # quota, retention_rule, egress_rule, deployment_profile
    name = "gpt"
    [resource.spec]
    adapter = "echo"
    allowed_classifications = ["public", "internal"]

``apply`` checks every entry against its kind's schema first and sends
nothing if any is invalid; then it creates what is missing, replaces what
changed (at the version it just read, so a concurrent change is refused, not
overwritten) and leaves the rest alone. Each resource is its own PutResource:
if one is refused by the server (a conflict), those before it stay applied and
the error lists what was and was not. The commands use an admin token (``--token-file``,
``PLANES_TOKEN``, else the state directory's ``admin.token``, which is only
sent to a loopback address). A non-loopback ``--address`` needs
``--ca-file`` (or ``PLANES_CA_FILE``): the token never crosses the network in
clear text unless ``--allow-insecure-remote`` says so.
"""

from __future__ import annotations

import json
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path

from google.protobuf import json_format, struct_pb2

from planes.common.v1 import common_pb2
from planes.control.v1 import control_service_pb2 as pb
from planes.kernel.errors import InvalidArgument, NotFound, PlanesError

from .schema import kind_name, validate
from .store import canonical_spec, digest_of


def add_commands(commands) -> None:
    from planes.kernel.cli import add_client_arguments

    config = commands.add_parser("config", help="manage desired state through the control plane")
    actions = config.add_subparsers(dest="config_command", metavar="ACTION")

    def action(name: str, help_text: str, handler):
        parser = actions.add_parser(name, help=help_text)
        add_client_arguments(parser, token="admin token file (default: $PLANES_TOKEN, else admin.token)",
                             timeout=30.0)
        parser.set_defaults(handler=handler)
        return parser

    action("apply", "create or update the resources of a TOML or YAML file", _apply).add_argument(
        "-f", "--file", required=True, help="resource file (.toml, .yaml or .yml), or - for TOML on stdin")
    get = action("get", "print one resource as JSON", _get)
    get.add_argument("kind")
    get.add_argument("name")
    get.add_argument("--tenant", default="", help="the resource's tenant (needed with an all-tenant token)")
    listing = action("list", "list resources", _list)
    listing.add_argument("--tenant", default="", help="list this tenant's resources (needed with an all-tenant token)")
    listing.add_argument("--kind", default="")
    diff = action("diff", "what changed between two published revisions", _diff)
    diff.add_argument("from_revision", type=int)
    diff.add_argument("to_revision", type=int)
    diff.add_argument("--tenant", default="*")
    publish = action("publish", "sign and publish the current desired state", _publish)
    publish.add_argument("--message", default="")
    publish.add_argument("--staged", action="store_true", help="publish for a canary rollout, not to everyone")
    action("history", "published revisions, newest first", _history)
    rollback = action("rollback", "publish an earlier revision's content as a new revision", _rollback)
    rollback.add_argument("revision", type=int)
    rollback.add_argument("--message", default="")
    status = action("status", "which subscriber runs which revision, and the current or last rollout", _status)
    status.add_argument("--rollout", default="", help="a rollout id (default: the current or last one)")
    config.set_defaults(handler=lambda args: (config.print_usage(sys.stderr), 2)[1])


def _kind(text: str) -> int:
    try:
        return pb.ResourceKind.Value(f"RESOURCE_KIND_{text.upper()}")
    except ValueError:
        known = ", ".join(k.removeprefix("RESOURCE_KIND_").lower() for k in pb.ResourceKind.keys()[1:])
        raise InvalidArgument(f"unknown kind {text!r}; kinds: {known}") from None


def load_resources(path: str) -> list[pb.Resource]:
    """Parse a resource file and check every entry against its kind's schema, as the plane would.

    InvalidArgument naming every invalid entry and its problem, so a file is
    either applied whole or not at all for reasons known before sending.
    """
    if path == "-":
        raw, suffix = sys.stdin.buffer.read(), ".toml"
    else:
        raw, suffix = Path(path).read_bytes(), Path(path).suffix.lower()
    try:
        if suffix in (".yaml", ".yml"):
            import yaml

            document = yaml.safe_load(raw) or {}
        else:
            document = tomllib.loads(raw.decode())
    except Exception as exc:
        raise InvalidArgument(f"{path}: not valid {'YAML' if suffix in ('.yaml', '.yml') else 'TOML'}: {exc}") from None
    entries = document.get("resource") if isinstance(document, dict) else None
    if not isinstance(entries, list) or not entries:
        raise InvalidArgument(f"{path}: expected a list named 'resource' ([[resource]] tables in TOML)")
    resources, problems, seen = [], [], {}
    for index, entry in enumerate(entries):
        try:
            resource = _resource(entry)
        except InvalidArgument as exc:
            problems.append(f"resource #{index + 1}{_label_of(entry)}: {exc.message}")
            continue
        key = (resource.kind, resource.tenant, resource.name)
        if key in seen:
            problems.append(f"resource #{index + 1}{_label_of(entry)}: the same resource as #{seen[key]}")
            continue
        seen[key] = index + 1
        resources.append(resource)
    if problems:
        if len(entries) == 1:
            raise InvalidArgument(f"{path}: {problems[0]}")
        raise InvalidArgument(f"{path}: {len(problems)} of {len(entries)} resources are invalid:\n  "
                              + "\n  ".join(problems))
    return resources


def _label_of(entry) -> str:
    if isinstance(entry, dict) and all(isinstance(entry.get(key), str) for key in ("kind", "tenant", "name")):
        return f" {entry['kind']} {entry['tenant']}/{entry['name']}"
    return ""


def _resource(entry) -> pb.Resource:
    """One file entry as a Resource, checked as PutResource checks it; InvalidArgument otherwise."""
    if not isinstance(entry, dict):
        raise InvalidArgument("must be a table")
    unknown = sorted(set(entry) - {"kind", "tenant", "name", "spec"})
    if unknown:
        raise InvalidArgument(f"unknown key {unknown[0]!r} (keys: kind, tenant, name, spec)")
    for key in ("kind", "tenant", "name"):
        if not isinstance(entry.get(key), str) or not entry[key]:
            raise InvalidArgument(f"{key!r} must be a non-empty string")
    spec = entry.get("spec", {})
    if not isinstance(spec, dict):
        raise InvalidArgument("'spec' must be a table")
    try:
        body = json_format.ParseDict(spec, struct_pb2.Struct())
    except (json_format.ParseError, ValueError, TypeError) as exc:
        raise InvalidArgument(f"'spec' cannot be sent: {exc}") from None
    resource = pb.Resource(kind=_kind(entry["kind"]), tenant=entry["tenant"], name=entry["name"], spec=body)
    validate(resource.kind, resource.tenant, resource.name, resource.spec)
    return resource


def _client(args):
    from planes.kernel.cli import client_address, client_tls, client_token
    from planes.kernel.clients import connect
    from planes.kernel.contracts import ControlPlane
    from planes.kernel.settings import load_settings

    settings = load_settings(args.config, overrides={"state_dir": args.state_dir})
    address = client_address(args, settings)
    return connect(address, ControlPlane, token=client_token(args, settings, address=address), **client_tls(args))


def _run(args, work) -> int:
    from planes.kernel.runtime import run

    async def main():
        client = _client(args)
        try:
            return await work(client)
        finally:
            await client.close()

    return run(main())


def _apply(args) -> int:
    try:
        resources = load_resources(args.file)
    except InvalidArgument as exc:
        exc.message += "\nnothing was applied"
        raise

    async def work(client):
        counts = await apply_resources(client, resources, args.timeout)
        print(f"{counts['created']} created, {counts['updated']} updated, {counts['unchanged']} unchanged")
        return 0

    return _run(args, work)


async def apply_resources(client, resources: list[pb.Resource], timeout: float, *,
                          say: Callable[[str], None] = print) -> dict[str, int]:
    """Create or replace each resource in turn; how many were created, updated, unchanged.

    One PutResource per resource (there is no batch RPC), so a refusal midway
    (a conflict) leaves those before it applied: the PlanesError then names
    what was applied and what was not, so the file can be fixed and applied again.
    """
    counts = {"created": 0, "updated": 0, "unchanged": 0}
    done: list[str] = []
    for position, resource in enumerate(resources):
        label = f"{kind_name(resource.kind)} {resource.tenant}/{resource.name}"
        try:
            outcome = await _apply_one(client, resource, timeout)
        except PlanesError as exc:
            rest = [f"{kind_name(r.kind)} {r.tenant}/{r.name}" for r in resources[position + 1:]]
            exc.message = (f"{label}: {exc.message}\n"
                           f"applied before the failure: {', '.join(done) or 'none'}\n"
                           f"not applied: {', '.join([label, *rest])}")
            raise
        counts[outcome] += 1
        if outcome != "unchanged":
            done.append(f"{label} ({outcome})")
            say(f"{outcome} {label}")
    return counts


async def _apply_one(client, resource: pb.Resource, timeout: float) -> str:
    """Create or replace one resource unless it is unchanged; which of the three it was."""
    try:
        current = (await client.get_resource(pb.GetResourceRequest(
            tenant=resource.tenant, kind=resource.kind, name=resource.name), timeout=timeout)).resource
    except NotFound:
        current = None
    if current is not None and current.spec_digest.value == digest_of(canonical_spec(resource.spec)).value:
        return "unchanged"
    await client.put_resource(pb.PutResourceRequest(
        tenant=resource.tenant, kind=resource.kind, name=resource.name, spec=resource.spec,
        expected_resource_version=current.resource_version if current else 0), timeout=timeout)
    return "updated" if current else "created"


def _get(args) -> int:
    async def work(client):
        reply = await client.get_resource(pb.GetResourceRequest(tenant=args.tenant, kind=_kind(args.kind),
                                                                 name=args.name), timeout=args.timeout)
        print(json_format.MessageToJson(reply.resource, indent=2))
        return 0
    return _run(args, work)


def _list(args) -> int:
    async def work(client):
        kinds = [_kind(args.kind)] if args.kind else []
        token = ""
        while True:
            reply = await client.list_resources(pb.ListResourcesRequest(
                tenant=args.tenant, kinds=kinds, page=common_pb2.PageRequest(page_token=token)), timeout=args.timeout)
            for resource in reply.resources:
                print(f"{kind_name(resource.kind):<20} {resource.tenant:<16} {resource.name:<32} "
                      f"v{resource.resource_version}")
            token = reply.page.next_page_token
            if not token:
                return 0
    return _run(args, work)


def _latest(client, timeout):
    async def latest():
        reply = await client.list_snapshots(pb.ListSnapshotsRequest(page=common_pb2.PageRequest(page_size=1)),
                                            timeout=timeout)
        return reply.snapshots[0].revision if reply.snapshots else 0
    return latest()


def _publish(args) -> int:
    async def work(client):
        reply = await client.publish_snapshot(pb.PublishSnapshotRequest(
            expected_revision=await _latest(client, args.timeout), message=args.message, staged=args.staged),
            timeout=args.timeout)
        snapshot = reply.snapshot
        print(f"published revision {snapshot.revision} ({snapshot.resource_count} resources"
              f"{', staged' if args.staged else ''})")
        return 0
    return _run(args, work)


def _history(args) -> int:
    async def work(client):
        reply = await client.list_snapshots(pb.ListSnapshotsRequest(), timeout=args.timeout)
        for snapshot in reply.snapshots:
            source = f" (content of {snapshot.source_revision})" if snapshot.source_revision else ""
            print(f"{snapshot.revision:>6} {snapshot.created_at.ToJsonString()} {snapshot.created_by:<16} "
                  f"{snapshot.resource_count:>6} resources{source} {snapshot.message}")
        return 0
    return _run(args, work)


def _diff(args) -> int:
    async def work(client):
        reply = await client.diff_snapshots(pb.DiffSnapshotsRequest(
            tenant=args.tenant, from_revision=args.from_revision, to_revision=args.to_revision), timeout=args.timeout)
        marks = {pb.CHANGE_TYPE_ADDED: "+", pb.CHANGE_TYPE_REMOVED: "-", pb.CHANGE_TYPE_MODIFIED: "~"}
        for change in reply.changes:
            resource = change.after if change.change != pb.CHANGE_TYPE_REMOVED else change.before
            print(f"{marks[change.change]} {kind_name(resource.kind)} {resource.tenant}/{resource.name}")
        print(json.dumps({"changes": len(reply.changes)}))
        return 0
    return _run(args, work)


def _rollback(args) -> int:
    async def work(client):
        reply = await client.rollback_snapshot(pb.RollbackSnapshotRequest(
            to_revision=args.revision, expected_revision=await _latest(client, args.timeout),
            message=args.message), timeout=args.timeout)
        print(f"published revision {reply.snapshot.revision} with the content of revision {args.revision}")
        return 0
    return _run(args, work)


def _status(args) -> int:
    async def work(client):
        reply = await client.get_rollout_status(pb.GetRolloutStatusRequest(rollout_id=args.rollout),
                                                timeout=args.timeout)
        print("\n".join(format_status(reply)))
        return 0
    return _run(args, work)


def format_status(reply: pb.GetRolloutStatusResponse) -> list[str]:
    """The status view as lines: the fleet's revision, the rollout, then one line per subscriber."""
    lines = [f"fleet revision {reply.fleet_revision}"]
    if reply.HasField("rollout"):
        rollout = reply.rollout
        state = pb.RolloutState.Name(rollout.state).removeprefix("ROLLOUT_STATE_").lower()
        line = (f"rollout {rollout.rollout_id}: revision {rollout.revision} over {rollout.base_revision}, {state}, "
                f"canaries {','.join(rollout.canary_subscribers)}, window {rollout.window.seconds} s "
                f"from {rollout.started_at.ToJsonString()}")
        if rollout.rollback_revision:
            line += f", rolled back as revision {rollout.rollback_revision}"
        lines.append(line + (f": {rollout.reason}" if rollout.reason else ""))
    if not reply.subscribers:
        lines.append("no subscribers yet")
    for status in reply.subscribers:
        health = common_pb2.HealthSummary.State.Name(status.health.state).removeprefix("STATE_").lower()
        contracts = ",".join(f"{c.plane}={c.major}.{c.minor}" for c in status.contract_versions) or "-"
        line = (f"{status.subscriber_id:<24} applied {status.applied_revision:<5} target {status.target_revision:<5} "
                f"{health:<11} {'watching' if status.watching else 'offline':<8} "
                f"{'canary ' if status.canary else ''}contracts {contracts}")
        if status.last_outcome == pb.APPLY_OUTCOME_ACK:
            line += f"; ACK {status.last_outcome_revision}"
        elif status.last_outcome == pb.APPLY_OUTCOME_NACK:
            line += (f"; NACK {status.last_outcome_revision} "
                     f"{pb.NackReason.Name(status.nack_reason).removeprefix('NACK_REASON_').lower()}: {status.error}")
        lines.append(line)
    return lines

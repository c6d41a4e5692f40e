"""Egress rules from the control plane: the ``egress_rule`` resources of the configuration in force.

The data plane decides each transfer from two sources. ``[plugin.data.egress]``
in the kernel's settings is the base (and all there is on a kernel without a
control plane). The control plane's ``egress_rule`` resources add to it per
tenant: ``{classification, destinations}``, where a destination of the form
``kind:name`` (``tool:NAME``, ``model_route:NAME``, ``sink:NAME``, with
``*`` patterns) is a data-plane destination. Destinations without a known kind
(``host`` or ``host:port``) are network destinations for a tool's own
connections, which the execution plane enforces; the data plane ignores them.

The data plugin follows the configuration as every host does: a snapshot
subscriber verifies each revision with the control plane's public key, keeps
the last one on disk, and reports to the control plane as ``data@<bind>``.
Control-plane rules only ever allow more, so they count only while the
configuration is admitting (its lease is live, or the profile says degraded)
and is the revision the control plane last said this host should run: when it
has expired, when the host is not on its target (it refused the newer
revision, or has not got it yet), and after a restart until the control plane
has answered, transfers fall back to the settings alone: fail closed.
"""

from __future__ import annotations

import fnmatch

from google.protobuf import json_format

from planes.control.v1 import control_service_pb2 as cpb
from planes.plugins.control.schema import DATA_DESTINATION_KINDS, is_data_destination
from planes.plugins.control.subscriber import CachedConfig, SnapshotSubscriber

from .limits import CLASSIFICATIONS, DESTINATION_KINDS

assert DATA_DESTINATION_KINDS == frozenset(DESTINATION_KINDS.values())


class ControlEgress:
    """Per-tenant egress allowances of the snapshot in ``cache``, parsed once per revision."""

    def __init__(self, cache: CachedConfig):
        self.cache = cache
        #: The revision the control plane last said this host should run (None until it has said, since start).
        self.target_revision: int | None = None
        self._revision = -1
        self._rules: dict[tuple[str, int], list[tuple[str, str]]] = {}

    def decide(self, tenant: str, classification: int, kind: str, name: str) -> str | None:
        """The rule allowing the transfer (``egress_rule/NAME:pattern``, revision included), or None."""
        if not self.cache.admitting():
            return None
        current = self.cache.current
        if current is None or current.revision != self.target_revision:
            return None  # the target unknown (no answer from the control plane since start) counts as behind
        if current.revision != self._revision:
            self._rules = _rules(current.content())
            self._revision = current.revision
        target = f"{kind}:{name}"
        for resource, pattern in self._rules.get((tenant, classification), ()):
            if fnmatch.fnmatchcase(target, pattern):
                return f"egress_rule/{resource}@{current.revision}:{pattern}"
        return None


def _rules(content: cpb.SnapshotContent) -> dict[tuple[str, int], list[tuple[str, str]]]:
    rules: dict[tuple[str, int], list[tuple[str, str]]] = {}
    for resource in content.resources:
        if resource.kind != cpb.RESOURCE_KIND_EGRESS_RULE:
            continue
        spec = json_format.MessageToDict(resource.spec)
        classification = CLASSIFICATIONS.get(str(spec.get("classification", "")))
        if classification is None:
            continue  # the control plane validates specs; a rule it let through unparsed allows nothing
        for pattern in spec.get("destinations", []):
            if isinstance(pattern, str) and is_data_destination(pattern):
                rules.setdefault((resource.tenant, classification), []).append((resource.name, pattern))
    return rules


class EgressSubscriber(SnapshotSubscriber):
    """The data plugin's snapshot subscriber: tells its :class:`ControlEgress` the revision it should run."""

    def __init__(self, *args, egress: ControlEgress, **options):
        super().__init__(*args, **options)
        self.egress = egress

    async def report(self, revision: int = 0, rejected=None) -> int:
        target = await super().report(revision, rejected)
        self.egress.target_revision = target
        return target

"""The data plane's settings, byte budgets and egress rules.

Settings (``[plugin.data]``; sizes in bytes, times in seconds)::

    max_chunk_bytes = 16777216          # one chunk's data, either direction
    max_chunks = 1048576                # chunks per payload
    max_payload_bytes = 4294967296      # a payload's declared size, any tenant
    get_chunk_bytes = 1048576           # what Get sends when the reader does not say
    quota_bytes = 68719476736           # bytes a tenant may keep stored
    stream_inflight_bytes = 67108864    # received, not yet on disk, per stream
    tenant_inflight_bytes = 268435456   # the same, summed over a tenant's streams
    max_concurrent_puts = 16            # puts in progress per tenant
    max_concurrent_puts_total = 256     # puts in progress in this process, all tenants
    put_idle_seconds = 30.0             # a put stream silent this long is aborted
    default_ttl_seconds = 604800        # 0: payloads never expire
    durable = true                      # fsync each payload before acknowledging it
    heap_keep_bytes = 67108864          # freed memory kept for reuse (glibc; 0: allocator defaults); see heap.py
    master_key_file = "keys/data-master.key"
    control_public_key = ""             # follow the control plane's egress_rule resources ("": the kernel's own key)
    credential_keys = []                # PEM public keys of remote execution hosts

    [plugin.data.classification_max_bytes]   # per classification
    restricted = 268435456
    [plugin.data.tenant_max_payload_bytes]   # per tenant
    acme = 1073741824
    [plugin.data.tenant_quota_bytes]
    acme = 1099511627776
    [plugin.data.egress]                     # classification -> allowed destinations
    public = ["*"]
    internal = ["tool:*", "model_route:*"]
    confidential = ["model_route:local-*"]
    # ... plus, per tenant, the kind:name destinations of the control plane's
    # egress_rule resources in force (see control_egress.py)
    restricted = []

Each put in progress holds two threads (from its first chunk) and a partial
file, so the number of puts in progress is bounded per tenant and per
process: a put over either limit is refused after its header, before it costs
a thread or a file, with ``LimitExceeded`` (RESOURCE_EXHAUSTED, a retry hint).
A put whose producer sends nothing for ``put_idle_seconds`` (header included)
is aborted with ``DeadlineExceeded``; its threads end, its budgets return and
its partial file is removed (see ``plane.py`` on abandoned puts).

Destinations are ``kind:name`` (``tool``, ``model_route`` or ``sink``) and the
rules are shell-style patterns; a transfer is allowed only when a pattern of
its payload's classification matches. The defaults allow public data
anywhere, internal data to tools and model routes, and nothing else.
"""

from __future__ import annotations

import asyncio
import fnmatch
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from planes.common.v1 import common_pb2
from planes.kernel.errors import SettingsError

__all__ = ["ByteBudget", "DataSettings", "EgressRules", "classification_name"]

MiB = 1 << 20
GiB = 1 << 30

CLASSIFICATIONS = {
    "public": common_pb2.CLASSIFICATION_PUBLIC,
    "internal": common_pb2.CLASSIFICATION_INTERNAL,
    "confidential": common_pb2.CLASSIFICATION_CONFIDENTIAL,
    "restricted": common_pb2.CLASSIFICATION_RESTRICTED,
}
_NAMES = {value: name for name, value in CLASSIFICATIONS.items()}
#: Classifications stored encrypted at rest.
ENCRYPTED = frozenset({common_pb2.CLASSIFICATION_CONFIDENTIAL, common_pb2.CLASSIFICATION_RESTRICTED})

DESTINATION_KINDS = {1: "tool", 2: "model_route", 3: "sink"}

DEFAULT_EGRESS = {
    "public": ("*",),
    "internal": ("tool:*", "model_route:*"),
    "confidential": (),
    "restricted": (),
}


def classification_name(value: int) -> str:
    return _NAMES.get(value, f"unknown({value})")


def _size(settings: Mapping[str, Any], key: str, default: int, *, minimum: int = 1) -> int:
    value = settings.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SettingsError(f"[plugin.data] {key} must be an integer >= {minimum}, got {value!r}")
    return value


def _sizes(settings: Mapping[str, Any], key: str) -> dict[str, int]:
    table = settings.get(key, {})
    if not isinstance(table, Mapping):
        raise SettingsError(f"[plugin.data.{key}] must be a table of name = bytes")
    return {str(name): _size(table, name, 0) for name in table}


@dataclass(frozen=True)
class EgressRules:
    """Which destinations each classification may reach."""

    rules: Mapping[int, tuple[str, ...]] = field(default_factory=dict)

    @classmethod
    def from_settings(cls, table: Mapping[str, Any] | None) -> EgressRules:
        merged = dict(DEFAULT_EGRESS)
        for name, patterns in dict(table or {}).items():
            if name not in CLASSIFICATIONS:
                raise SettingsError(f"[plugin.data.egress] {name!r} is not a classification; use one of "
                                    f"{', '.join(CLASSIFICATIONS)}")
            if isinstance(patterns, str) or not all(isinstance(p, str) for p in patterns):
                raise SettingsError(f"[plugin.data.egress] {name} must be a list of 'kind:name' patterns")
            merged[name] = tuple(patterns)
        return cls({CLASSIFICATIONS[name]: patterns for name, patterns in merged.items()})

    def decide(self, classification: int, kind: str, name: str) -> str | None:
        """The rule (``classification:pattern``) allowing the transfer, or None."""
        target = f"{kind}:{name}"
        for pattern in self.rules.get(classification, ()):
            if fnmatch.fnmatchcase(target, pattern):
                return f"{classification_name(classification)}:{pattern}"
        return None


@dataclass(frozen=True)
class DataSettings:
    max_chunk_bytes: int = 16 * MiB
    max_chunks: int = 1 << 20
    max_payload_bytes: int = 4 * GiB
    get_chunk_bytes: int = MiB
    quota_bytes: int = 64 * GiB
    stream_inflight_bytes: int = 64 * MiB
    tenant_inflight_bytes: int = 256 * MiB
    max_concurrent_puts: int = 16
    max_concurrent_puts_total: int = 256
    put_idle_seconds: float = 30.0
    default_ttl_seconds: float = 7 * 86400.0
    durable: bool = True
    heap_keep_bytes: int = 64 * MiB
    master_key_file: str = "keys/data-master.key"
    #: The control plane's public key, to follow its egress_rule resources ("" for the kernel's own,
    #: keys/control-signing.pub.pem, when there is one: see :mod:`.control_egress`).
    control_public_key: str = ""
    credential_keys: tuple[str, ...] = ()
    classification_max_bytes: Mapping[int, int] = field(default_factory=dict)
    tenant_max_payload_bytes: Mapping[str, int] = field(default_factory=dict)
    tenant_quota_bytes: Mapping[str, int] = field(default_factory=dict)
    egress: EgressRules = field(default_factory=lambda: EgressRules.from_settings(None))

    @classmethod
    def from_mapping(cls, settings: Mapping[str, Any]) -> DataSettings:
        known = {"max_chunk_bytes", "max_chunks", "max_payload_bytes", "get_chunk_bytes", "quota_bytes",
                 "stream_inflight_bytes", "tenant_inflight_bytes", "max_concurrent_puts",
                 "max_concurrent_puts_total", "put_idle_seconds", "default_ttl_seconds", "durable",
                 "heap_keep_bytes", "master_key_file", "control_public_key", "credential_keys", "classification_max_bytes", "tenant_max_payload_bytes",
                 "tenant_quota_bytes", "egress"}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise SettingsError(f"[plugin.data] unknown setting(s) {', '.join(unknown)}; known: "
                                f"{', '.join(sorted(known))}")
        per_class = _sizes(settings, "classification_max_bytes")
        for name in per_class:
            if name not in CLASSIFICATIONS:
                raise SettingsError(f"[plugin.data.classification_max_bytes] {name!r} is not a classification")
        ttl = settings.get("default_ttl_seconds", cls.default_ttl_seconds)
        if isinstance(ttl, bool) or not isinstance(ttl, int | float) or ttl < 0:
            raise SettingsError(f"[plugin.data] default_ttl_seconds must be a number >= 0, got {ttl!r}")
        idle = settings.get("put_idle_seconds", cls.put_idle_seconds)
        if isinstance(idle, bool) or not isinstance(idle, int | float) or not idle > 0:
            raise SettingsError(f"[plugin.data] put_idle_seconds must be a number > 0, got {idle!r}")
        made = cls(
            max_chunk_bytes=_size(settings, "max_chunk_bytes", cls.max_chunk_bytes),
            max_chunks=_size(settings, "max_chunks", cls.max_chunks),
            max_payload_bytes=_size(settings, "max_payload_bytes", cls.max_payload_bytes, minimum=0),
            get_chunk_bytes=_size(settings, "get_chunk_bytes", cls.get_chunk_bytes),
            quota_bytes=_size(settings, "quota_bytes", cls.quota_bytes, minimum=0),
            stream_inflight_bytes=_size(settings, "stream_inflight_bytes", cls.stream_inflight_bytes),
            tenant_inflight_bytes=_size(settings, "tenant_inflight_bytes", cls.tenant_inflight_bytes),
            max_concurrent_puts=_size(settings, "max_concurrent_puts", cls.max_concurrent_puts),
            max_concurrent_puts_total=_size(settings, "max_concurrent_puts_total", cls.max_concurrent_puts_total),
            put_idle_seconds=float(idle),
            default_ttl_seconds=float(ttl),
            durable=bool(settings.get("durable", True)),
            heap_keep_bytes=_size(settings, "heap_keep_bytes", cls.heap_keep_bytes, minimum=0),
            master_key_file=str(settings.get("master_key_file", cls.master_key_file)),
            control_public_key=str(settings.get("control_public_key", cls.control_public_key)),
            credential_keys=tuple(str(p) for p in settings.get("credential_keys", ())),
            classification_max_bytes={CLASSIFICATIONS[k]: v for k, v in per_class.items()},
            tenant_max_payload_bytes=_sizes(settings, "tenant_max_payload_bytes"),
            tenant_quota_bytes=_sizes(settings, "tenant_quota_bytes"),
            egress=EgressRules.from_settings(settings.get("egress")),
        )
        if made.get_chunk_bytes > made.max_chunk_bytes:
            raise SettingsError("[plugin.data] get_chunk_bytes must not exceed max_chunk_bytes")
        return made

    def payload_limit(self, tenant: str, classification: int) -> tuple[str, int]:
        """The tightest limit on one payload's size for this tenant and class: (name, bytes)."""
        limits = [("payload size", self.max_payload_bytes)]
        if classification in self.classification_max_bytes:
            limits.append((f"{classification_name(classification)} payload size",
                           self.classification_max_bytes[classification]))
        if tenant in self.tenant_max_payload_bytes:
            limits.append(("tenant payload size", self.tenant_max_payload_bytes[tenant]))
        return min(limits, key=lambda item: item[1])

    def quota(self, tenant: str) -> int:
        return self.tenant_quota_bytes.get(tenant, self.quota_bytes)


class ByteBudget:
    """Bounded in-flight bytes: :meth:`acquire` waits, first come first served, until they fit.

    A request larger than the whole budget waits until the budget is empty
    and then takes all of it, so one oversized chunk cannot deadlock a stream.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0
        self._waiters: deque[tuple[int, asyncio.Future]] = deque()

    async def acquire(self, size: int) -> int:
        """Reserve ``size`` bytes (capped at the limit); returns what to :meth:`release`."""
        size = min(size, self.limit)
        if not self._waiters and self.used + size <= self.limit:
            self.used += size
            return size
        future = asyncio.get_running_loop().create_future()
        entry = (size, future)
        self._waiters.append(entry)
        try:
            await future
        except BaseException:
            if future.done() and not future.cancelled():
                self.release(size)  # granted just as we were cancelled
            else:
                if entry in self._waiters:
                    self._waiters.remove(entry)
                self._wake()
            raise
        return size

    def release(self, size: int) -> None:
        self.used -= size
        self._wake()

    def _wake(self) -> None:
        while self._waiters:
            size, future = self._waiters[0]
            if future.done():
                self._waiters.popleft()
                continue
            if self.used + size > self.limit:
                return
            self._waiters.popleft()
            self.used += size
            future.set_result(None)

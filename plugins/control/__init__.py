"""The control plane: desired state, signed snapshots and their distribution.

:mod:`.subscriber` is the subscriber side (what an execution host runs): it
verifies signed snapshots and keeps the last good one on disk under a bounded
lease. It depends only on the control contract, so a host that reaches the
control plane over gRPC uses it as is. :class:`ControlPlugin` serves the plane
(:mod:`.plane`) over :mod:`.store`, recording every mutation in evidence.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from planes.kernel.contracts.control import ControlPlane
from planes.kernel.contracts.evidence import EvidencePlane
from planes.kernel.errors import PlanesError, PluginError, SettingsError
from planes.kernel.plugin import Plugin, Provision
from planes.kernel.tokens import SigningKey

if TYPE_CHECKING:
    from .settings import ControlSettings

__all__ = ["ControlPlugin"]

log = logging.getLogger(__name__)

KEY_FILE = "keys/control-signing.pem"
PUBLIC_KEY_FILE = "keys/control-signing.pub.pem"
STORE_FILE = "control/desired-state.sqlite3"


class ControlPlugin(Plugin):
    """Settings (``[plugin.control]``): ``read_only`` (bool): serve reads, refuse mutations;
    ``keepalive_seconds`` (number, default 15): silence on a watch stream before a keepalive, which
    renews subscribers' leases; keep it well under the shortest snapshot lease;
    ``deltas`` (bool, default true): push a revision as a change to the one a subscriber runs when
    that is under half the size of the full snapshot; ``max_subscribers`` (int, default 10,000):
    subscriber ids kept; past it a new one takes the place of the one silent longest, if that one has
    been silent (not watching, not a canary, no report) for ``subscriber_idle_seconds`` (number,
    default 86,400), and is refused otherwise.

    A store file the kernel cannot write (its permissions, a read-only mount) is served as with
    ``read_only``, with one warning naming it; one it cannot read fails start-up, naming it.

    An unknown key or a value of the wrong type fails start-up naming the key (:mod:`.settings`).

    ``clock`` (wall-clock seconds) is for tests that judge rollout windows deterministically.
    """

    name = "control"
    version = "0.1.0"
    provides = (Provision(ControlPlane, supports=("1.0", "2.0")),)
    requires = ("evidence",)

    def __init__(self, clock: Callable[[], float] = time.time):
        self.clock = clock

    def setup(self, kernel) -> None:
        from .settings import ControlSettings
        from .store import ControlStore

        settings = kernel.settings.plugin_settings_as(self.name, ControlSettings)
        path = kernel.state_dir / STORE_FILE
        try:
            self.store = ControlStore(path, clock=self.clock, read_only=settings.read_only)
        except PlanesError as exc:  # names the file: which one is broken is the first thing to know
            raise PluginError(self.name, exc.message) from exc
        if self.store.read_only_reason:
            # Degraded, not down, as with read_only = true: subscribers still get their snapshots.
            log.warning("control store %s is not writable (%s): serving reads and watches, refusing changes",
                        path, self.store.read_only_reason)
        try:
            self._setup_plane(kernel, settings)
        except sqlite3.Error as exc:  # a corrupt page shows only when it is read
            self.store.close()
            raise PluginError(self.name, f"the control store {path} cannot be read: {exc}") from exc

    def _setup_plane(self, kernel, settings: ControlSettings) -> None:
        from planes.plugins.evidence.writer import EvidenceWriter

        from .plane import Control

        key, key_problem = None, ""
        key_path = kernel.state_dir / KEY_FILE
        published = self.store.latest_revision()
        if not key_path.exists() and published:
            # A new key would sign snapshots no subscriber trusts: refuse rather than rotate silently.
            key_problem = (f"{KEY_FILE} is missing, and revision {published} was signed with key "
                           f"{self.store.snapshot(published).key_id}; restore it")
        else:
            try:
                key, _ = SigningKey.load_or_create(key_path)
            except (OSError, SettingsError) as exc:
                key_problem = f"{KEY_FILE}: {getattr(exc, 'message', None) or exc}"
        if key_problem:
            # Degraded, not down: reads and watches keep working, mutations are refused.
            log.warning("control plane signing key unavailable, mutations refused: %s", key_problem)
        public = kernel.state_dir / PUBLIC_KEY_FILE
        if key is not None and not public.exists():
            public.write_bytes(key.public_pem())
        evidence = kernel.client(EvidencePlane, kernel.service_identity("control"))
        # Every control-plane event is evidence-required: a mutation is refused
        # rather than made without its record.
        writer = EvidenceWriter(evidence, kernel.state_dir / "control" / "evidence-spool",
                                required=lambda event_type: True)
        self.plane = Control(self.store, key, writer.record, clock=self.clock, key_problem=key_problem,
                             keepalive=settings.keepalive_seconds, deltas=settings.deltas,
                             max_subscribers=settings.max_subscribers,
                             subscriber_idle_seconds=settings.subscriber_idle_seconds)

    def implementation(self, provision: Provision):
        return self.plane

    async def start(self) -> None:
        await self.plane.start()

    async def stop(self) -> None:
        await self.plane.stop()
        self.store.close()

    def add_cli_commands(self, commands) -> None:
        from .cli import add_commands

        add_commands(commands)

"""The control plane: desired state, signed snapshots and their distribution.

:mod:`.subscriber` is the subscriber side (what an execution host runs): it
verifies signed snapshots and keeps the last good one on disk under a bounded
lease. It depends only on the control contract, so a host that reaches the
control plane over gRPC uses it as is. :class:`ControlPlugin` serves the plane
(:mod:`.plane`) over :mod:`.store`, recording every mutation in evidence.
"""

from __future__ import annotations

from planes.kernel.contracts.control import ControlPlane
from planes.kernel.contracts.evidence import EvidencePlane
from planes.kernel.plugin import Plugin, Provision
from planes.kernel.tokens import SigningKey

__all__ = ["ControlPlugin"]

KEY_FILE = "keys/control-signing.pem"
PUBLIC_KEY_FILE = "keys/control-signing.pub.pem"
STORE_FILE = "control/desired-state.sqlite3"


class ControlPlugin(Plugin):
    """Settings (``[plugin.control]``): ``read_only`` (bool): serve reads, refuse mutations."""

    name = "control"
    version = "0.1.0"
    provides = (Provision(ControlPlane, supports=("1.0", "2.0")),)
    requires = ("evidence",)

    def setup(self, kernel) -> None:
        from planes.plugins.evidence.writer import EvidenceWriter

        from .plane import Control
        from .store import ControlStore

        settings = dict(kernel.settings.plugin_settings(self.name))
        key, _ = SigningKey.load_or_create(kernel.state_dir / KEY_FILE)
        public = kernel.state_dir / PUBLIC_KEY_FILE
        if not public.exists():
            public.write_bytes(key.public_pem())
        self.store = ControlStore(kernel.state_dir / STORE_FILE, read_only=bool(settings.get("read_only", False)))
        evidence = kernel.client(EvidencePlane, kernel.service_identity("control"))
        # Every control-plane event is evidence-required: a mutation is refused
        # rather than made without its record.
        writer = EvidenceWriter(evidence, kernel.state_dir / "control" / "evidence-spool",
                                required=lambda event_type: True)
        self.plane = Control(self.store, key, writer.record)

    def implementation(self, provision: Provision):
        return self.plane

    async def stop(self) -> None:
        self.store.close()

    def add_cli_commands(self, commands) -> None:
        from .cli import add_commands

        add_commands(commands)

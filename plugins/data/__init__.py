"""The data plane: classified payloads (tensors, Arrow tables, files, blobs) streamed in chunks.

:class:`DataPlugin` serves the plane (:mod:`.plane`) over :mod:`.store`
(files and an SQLite catalogue under ``<state>/data``), with the settings,
byte budgets and egress rules of :mod:`.limits` and the encryption at rest of
:mod:`.crypto`. :mod:`.client` is the Python API: numpy arrays, pyarrow
tensors and tables in, the same out, over any data plane client (in-process
or gRPC).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from planes.kernel.contracts.data import DataPlane
from planes.kernel.contracts.evidence import EvidencePlane
from planes.kernel.plugin import Plugin, Provision
from planes.kernel.tokens import key_id, load_public_key

__all__ = ["DataPlugin"]

log = logging.getLogger("planes.plugins.data")

#: Evidence that must exist before the plane acts on it: a transfer decision
#: is not handed out unrecorded.
REQUIRED_EVIDENCE = frozenset({"data.transferred", "data.denied"})
SWEEP_SECONDS = 60.0


class DataPlugin(Plugin):
    """Settings: ``[plugin.data]``, see :mod:`planes.plugins.data.limits`."""

    name = "data"
    version = "0.1.0"
    provides = (Provision(DataPlane, supports=("1.0", "2.0")),)
    requires = ("evidence",)

    def setup(self, kernel) -> None:
        from planes.plugins.evidence.writer import EvidenceWriter

        from .heap import keep_freed_memory
        from .limits import DataSettings
        from .plane import Data
        from .store import ORPHANS, PayloadStore

        self.kernel = kernel
        settings = DataSettings.from_mapping(kernel.settings.plugin_settings(self.name))
        keep_freed_memory(settings.heap_keep_bytes)
        key_path = kernel.state_dir / settings.master_key_file
        self.store = PayloadStore(kernel.state_dir / "data", key_path, durable=settings.durable)
        if self.store.removed_partial:
            log.warning("removed %d partial payload(s) left by an interrupted put", self.store.removed_partial)
        if self.store.orphaned:
            log.warning("moved %d object file(s) with no catalogue row to %s: never acknowledged (a put "
                        "interrupted between storing and cataloguing), kept for inspection",
                        self.store.orphaned, self.store.root / ORPHANS)
        evidence = kernel.client(EvidencePlane, kernel.service_identity("data"))
        writer = EvidenceWriter(evidence, kernel.state_dir / "data" / "evidence-spool",
                                required=REQUIRED_EVIDENCE.__contains__)
        # Task credentials are signed by execution hosts: this kernel's key, and
        # the keys of remote hosts named in [plugin.data] credential_keys.
        keys = {kernel.signing_key.kid: kernel.signing_key.public_key}
        for path in settings.credential_keys:
            public = load_public_key(kernel.state_dir / path)
            keys[key_id(public)] = public
        self.plane = Data(self.store, settings, writer.record, credential_keys=keys)
        self.settings = settings
        self._sweeper: asyncio.Task | None = None
        self._subscriber: asyncio.Task | None = None

    def implementation(self, provision: Provision):
        return self.plane

    async def start(self) -> None:
        self._follow_control_plane()  # first: it may refuse, and then nothing of this plugin is left running
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="data-expiry-sweeper")

    def _follow_control_plane(self) -> None:
        """Subscribe to the control plane's configuration for its egress rules (:mod:`.control_egress`).

        At start, not setup: the control plugin makes its key in its own setup.
        Without a control plane (no plugin here, no ``[planes.control]``
        endpoint) or without its key, egress follows the settings alone; a
        key named in the settings must exist.
        """
        from planes.common.v1 import common_pb2
        from planes.kernel.contracts import ControlPlane
        from planes.kernel.errors import FailedPrecondition, PluginError
        from planes.plugins.control import PUBLIC_KEY_FILE
        from planes.plugins.control.subscriber import CachedConfig, control_keys

        from .control_egress import ControlEgress, EgressSubscriber

        named = self.settings.control_public_key
        try:
            control = self.kernel.client(ControlPlane, self.kernel.service_identity("data"))
        except FailedPrecondition:  # no control plugin here and no [planes.control] endpoint
            if named:
                raise PluginError(self.name, "[plugin.data] control_public_key is set, but this kernel has no "
                                             "control plane (enable its plugin or set [planes.control] "
                                             "endpoint)") from None
            log.info("no control plane: egress follows [plugin.data.egress] alone")
            return
        key_path = self.kernel.state_dir / (named or PUBLIC_KEY_FILE)
        if not key_path.exists():
            if named:
                raise PluginError(self.name, f"no control-plane public key at {key_path} "
                                             "([plugin.data] control_public_key)")
            log.info("no control-plane public key at %s: egress follows [plugin.data.egress] alone", key_path)
            return
        cache = CachedConfig(self.kernel.state_dir / "data" / "config", control_keys(key_path),
                             served=self.kernel.served_contracts())
        egress = self.plane.control_egress = ControlEgress(cache)
        subscriber = EgressSubscriber(
            control, cache, f"data@{self.kernel.settings.server.bind}", egress=egress,
            # What it reports is the plane it follows the configuration for; what it applies is checked
            # against every contract this kernel serves (served= above).
            contracts=[common_pb2.ContractVersion(plane="data", major=DataPlane.version.major,
                                                  minor=DataPlane.version.minor)])
        self._subscriber = asyncio.create_task(subscriber.run(), name="data-config-subscriber")

    async def _sweep_forever(self) -> None:
        from planes.kernel.call import CallContext

        while True:
            try:
                call = CallContext(identity=self.kernel.service_identity("data"), method="data.sweep")
                swept = await self.plane.sweep(call)
                if swept:
                    log.info("removed %d expired payload(s)", swept)
            except Exception:
                log.exception("expiry sweep failed; retrying in %.0f s", SWEEP_SECONDS)
            await asyncio.sleep(SWEEP_SECONDS)

    def add_cli_commands(self, commands) -> None:
        from .cli import add_commands

        add_commands(commands)

    async def stop(self) -> None:
        for task in (self._sweeper, self._subscriber):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self.store.close()

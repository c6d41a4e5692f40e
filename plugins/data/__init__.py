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
        self._sweeper: asyncio.Task | None = None

    def implementation(self, provision: Provision):
        return self.plane

    async def start(self) -> None:
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="data-expiry-sweeper")

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
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        self.store.close()

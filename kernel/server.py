"""Server assembly: one grpc.aio server with the planes this host runs.

It registers each plane's guarded handlers, gRPC health checking (per service,
no token needed) and server reflection (any valid token), binds loopback
unless told otherwise, and on SIGTERM/SIGINT stops taking calls, drains the
ones in flight for up to ``server.grace_seconds`` and stops the plugins.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import signal
import socket
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import _async as reflection_aio
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from .clients import channel_options, is_loopback, plane_handlers
from .contract import PlaneSpec
from .errors import SettingsError
from .guard import AuthenticateFirst, MethodGuard
from .identity import ROLES
from .kernel import Kernel

log = logging.getLogger("planes.kernel.server")


def _check_port_free(bind: str) -> None:
    """Refuse a port another process listens on, with the system's reason.

    gRPC would refuse it too, but only as "Failed to bind" after logging to
    stderr; this catches the common case first. Other bind errors are left
    to gRPC, which accepts a name if any of its addresses binds.
    """
    if bind.startswith("unix:"):
        return
    host, _, port = bind.rpartition(":")
    if not port.isdigit() or int(port) == 0:
        return
    try:
        infos = socket.getaddrinfo(host.strip("[]") or None, int(port), type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except OSError:
        return
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC does: TIME_WAIT is no obstacle
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise SettingsError(f"cannot listen on {bind} (server.bind): port {port} is already in use") from None


class _HandlerCollector:
    """Stands in for a server to collect a generated servicer's handlers."""

    def __init__(self) -> None:
        self.services: dict[str, dict[str, grpc.RpcMethodHandler]] = {}

    def add_registered_method_handlers(self, service: str, handlers) -> None:
        self.services[service] = dict(handlers)

    def add_generic_rpc_handlers(self, handlers) -> None:
        pass  # every generated servicer registers its methods above too


class KernelServer:
    """The running gRPC server of one kernel host."""

    def __init__(self, kernel: Kernel):
        self.kernel = kernel
        self.server: grpc.aio.Server | None = None
        self._bound: grpc.aio.Server | None = None
        self.health = health.aio.HealthServicer()
        self.port: int | None = None
        self.services: list[str] = []
        self._stopped = asyncio.Event()
        self._stop_requested = False

    def bind(self) -> int:
        """Make the gRPC server and take its port; returns the port.

        Needs only the kernel's settings, so ``planes serve`` binds before
        :meth:`Kernel.open`: a port in use then fails before any plugin has
        set anything up. :meth:`start` binds if this was not called.
        """
        if self._bound is not None:
            return self.port
        settings = self.kernel.settings
        bind = settings.server.bind
        if not is_loopback(bind) and not settings.tls.enabled and not settings.server.allow_insecure_remote:
            raise SettingsError(
                f"refusing to serve {bind} without TLS: tokens would cross the network in clear text. "
                "Configure [tls] cert_file and key_file, or set server.allow_insecure_remote = true"
            )
        credentials = self._credentials() if settings.tls.enabled else None
        _check_port_free(bind)
        # Without SO_REUSEPORT a second kernel on the same port fails here
        # instead of silently sharing the port's connections with the first.
        authenticate = AuthenticateFirst(lambda: self.kernel.guard.authenticator if self.kernel.guard else None)
        server = grpc.aio.server(options=[*channel_options(settings.server.max_message_bytes),
                                          ("grpc.so_reuseport", 0)], interceptors=[authenticate])
        try:
            if credentials is not None:
                self.port = server.add_secure_port(bind, credentials)
            else:
                self.port = server.add_insecure_port(bind)
        except RuntimeError:  # grpc says only "Failed to bind to address"
            raise SettingsError(
                f"cannot listen on {bind} (server.bind): the port is in use or the address is not on this host"
            ) from None
        self._bound = server
        return self.port

    async def release(self) -> None:
        """Give back the port of a server that was bound but never started.

        A grpc.aio server keeps its listening socket until it has started and
        stopped (stopping an unstarted one, or dropping it, does not close
        it), so it is started and stopped at once; :meth:`start` registers
        no handler before the plugins have started, so there is nothing to serve.
        """
        server, self._bound = self._bound, None
        if server is None or self.server is not None:
            return
        try:
            await server.start()
        finally:
            await server.stop(0)

    async def start(self) -> int:
        self.bind()
        server = self._bound
        try:
            await self.kernel.start()
        except BaseException:
            await self.release()
            raise
        try:
            self._register_all(server)
            await server.start()
        except BaseException:
            await self.kernel.stop()
            await self.release()
            raise
        self.server = server
        for service in self.services:
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        return self.port

    def _register_all(self, server: grpc.aio.Server) -> None:
        guard = self.kernel.guard
        for loaded, provision in self.kernel.host.plane_provisions():
            spec = PlaneSpec(provision.contract)
            handlers = plane_handlers(spec, loaded.implementations[provision.key], guard)
            self._register(server, spec.contract.service, handlers)

        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        collector = _HandlerCollector()
        reflected = [*self.services, health.SERVICE_NAME, reflection.SERVICE_NAME]
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
            reflection_aio.ReflectionServicer(reflected), collector)
        for service, handlers in collector.services.items():
            guarded = {
                name: guard.wrap(MethodGuard(f"/{service}/{name}", frozenset(ROLES)), handler)
                for name, handler in handlers.items()
            }
            server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, guarded),))

    def _register(self, server: grpc.aio.Server, service: str, handlers) -> None:
        if hasattr(server, "add_registered_method_handlers"):
            # The registered-method path skips the generic handler lookup on every call.
            server.add_registered_method_handlers(service, handlers)
        else:
            server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
        self.services.append(service)

    def _credentials(self) -> grpc.ServerCredentials:
        tls = self.kernel.settings.tls
        try:
            key = Path(tls.key_file).read_bytes()
            chain = Path(tls.cert_file).read_bytes()
            client_ca = Path(tls.client_ca_file).read_bytes() if tls.client_ca_file else None
        except OSError as exc:
            raise SettingsError(f"cannot read TLS files: {exc}") from None
        return grpc.ssl_server_credentials([(key, chain)], root_certificates=client_ca,
                                           require_client_auth=client_ca is not None)

    async def stop(self, grace: float | None = None) -> None:
        """Refuse new calls, let in-flight ones finish up to ``grace`` seconds, stop plugins."""
        if self.server is None:
            return
        grace = self.kernel.settings.server.grace_seconds if grace is None else grace
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        await self.kernel.stop()
        self.server = self._bound = None
        self._stopped.set()

    def stop_on_signals(self) -> None:
        """Stop gracefully on SIGTERM or SIGINT; call before :meth:`start`.

        A signal that arrives while the server is still starting stops it as
        soon as it has started.
        """
        loop = asyncio.get_running_loop()

        def on_signal(signum: int) -> None:
            if self._stop_requested:
                return
            self._stop_requested = True
            log.info("received %s, draining in-flight calls", signal.Signals(signum).name)
            if self.server is not None:
                loop.create_task(self.stop())

        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, on_signal, signum)

    async def wait_stopped(self) -> None:
        """Return once the server has stopped (after a signal or :meth:`stop`)."""
        if self._stop_requested and self.server is not None:
            await self.stop()
        await self._stopped.wait()

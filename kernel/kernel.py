"""The kernel at run time: state directory, keys, plugins and plane clients."""

from __future__ import annotations

import asyncio
import logging
import socket
import stat
import time
from pathlib import Path
from typing import Any, TypeVar

import grpc

from .auth import Authenticator
from .clients import LocalPlaneClient, RemotePlaneClient, TokenSource, channel_options, is_loopback
from .contract import ContractVersion, PlaneContract, PlaneSpec
from .errors import FailedPrecondition, PluginError, SettingsError, Unauthenticated
from .files import DirectoryInUse, DirectoryLock
from .guard import CallGuard
from .host import PluginHost, check_implementation
from .identity import ALL_TENANTS, Identity
from .secrets import ensure_private_dir, read_secret, secret_missing, write_public, write_replacing, write_secret
from .settings import Settings
from .tokens import SigningKey, TokenVerifier, issue_token, load_public_key

C = TypeVar("C", bound=PlaneContract)
log = logging.getLogger("planes.kernel")

SIGNING_KEY_FILE = "keys/kernel-signing.pem"
PUBLIC_KEY_FILE = "keys/kernel-signing.pub.pem"
ADMIN_TOKEN_FILE = "admin.token"
#: The bootstrap admin token lives 30 days; `planes token issue` makes others.
ADMIN_TOKEN_TTL = 30 * 24 * 3600
#: An admin token with less than this left (or expired, or unverifiable) is replaced, at start-up and while
#: the kernel runs.
ADMIN_TOKEN_RENEW_BEFORE = 7 * 24 * 3600
#: How often a running kernel looks at its admin token.
ADMIN_TOKEN_CHECK_EVERY = 6 * 3600


class Kernel:
    """Owns the state directory, the signing key, the plugins and the plane clients.

    ``open()`` prepares everything synchronously (and fails with a clear error
    on a bad plugin or setting); ``start()``/``stop()`` run the plugins'
    async hooks.
    """

    def __init__(self, settings: Settings, host: PluginHost | None = None, *,
                 admin_token_check_every: float = ADMIN_TOKEN_CHECK_EVERY):
        self.settings = settings
        self.admin_token_check_every = admin_token_check_every
        self._renewer: asyncio.Task | None = None
        self._host = host
        self.signing_key: SigningKey | None = None
        self.verifier: TokenVerifier | None = None
        self.guard: CallGuard | None = None
        self.created: list[Path] = []
        #: (file, why) of each secret replaced, at open or since (see :meth:`renew_admin_token`).
        self.renewed: list[tuple[Path, str]] = []
        self._clients: dict[str, Any] = {}
        self._started: list[Any] = []
        self._lock = DirectoryLock(settings.state_dir)

    @property
    def state_dir(self) -> Path:
        return self.settings.state_dir

    @property
    def host(self) -> PluginHost:
        if self._host is None:
            raise FailedPrecondition("kernel is not open")
        return self._host

    # -- lifecycle ---------------------------------------------------------

    def open(self) -> Kernel:
        """Take the state directory (one kernel at a time), load keys and plugins, set each plugin up."""
        self._check_remote_planes()
        if self._host is None:
            # Before anything is created: a broken plugin or a misspelt [plugin.NAME] leaves no state behind.
            self._host = PluginHost.load(self.settings)
        ensure_private_dir(self.state_dir)
        mode = stat.S_IMODE(self.state_dir.stat().st_mode)
        if mode & 0o077:
            raise SettingsError(
                f"state directory {self.state_dir} is accessible by group or others (mode {mode:04o}): its stores "
                f"hold task specs, evidence and payloads; run: chmod 700 {self.state_dir}")
        try:
            self._lock.acquire()
        except DirectoryInUse as exc:
            raise SettingsError(
                f"state directory {self.state_dir} is in use by another kernel (pid {exc.holder or 'unknown'}): "
                "stop that one first, or give this one another state_dir") from None
        try:
            return self._open()
        except BaseException:
            self._lock.release()
            raise

    def _open(self) -> Kernel:
        self.signing_key, created = SigningKey.load_or_create(self.state_dir / SIGNING_KEY_FILE)
        if created:
            self.created.append(self.state_dir / SIGNING_KEY_FILE)
        public = self.state_dir / PUBLIC_KEY_FILE
        if not public.exists() or public.read_bytes() != self.signing_key.public_pem():
            # Derived from the signing key, so rewriting it is always safe.
            write_public(public, self.signing_key.public_pem())
        self.verifier = TokenVerifier({self.signing_key.kid: self.signing_key.public_key},
                                      cache_size=self.settings.auth.token_cache_size)
        for path in self.settings.auth.trusted_public_keys:
            self.verifier.trust(load_public_key(Path(path)))
        self.renew_admin_token()
        self.guard = CallGuard(Authenticator(self.verifier, mtls=bool(self.settings.tls.client_ca_file)))
        for loaded in self._host.plugins:
            try:
                loaded.plugin.setup(self)
                for provision in loaded.plugin.provides:
                    implementation = loaded.plugin.implementation(provision)
                    check_implementation(loaded.plugin, provision, implementation)
                    loaded.implementations[provision.key] = implementation
            except PluginError:
                raise
            except Exception as exc:
                raise PluginError(loaded.name, f"setup failed: {type(exc).__name__}: {exc}") from exc
            loaded.status = "ready"
        return self

    def renew_admin_token(self) -> str | None:
        """Create the bootstrap admin token, or renew one that has expired, will within a week, or no longer
        verifies; why it was replaced (None: it was created or left alone).

        The token is what an operator on this host uses to administer the
        kernel: :meth:`open` calls this, and :meth:`start` again every
        ``admin_token_check_every`` seconds, so that neither a restart after
        30 days nor a kernel running for months locks its own operator out. A
        token that still verifies for over a week is left alone (someone may
        have copied it).
        """
        admin = self.state_dir / ADMIN_TOKEN_FILE
        def issue() -> bytes:
            return issue_token(self.signing_key, principal="admin", tenant=ALL_TENANTS,
                               roles=["admin"], ttl_seconds=ADMIN_TOKEN_TTL).encode() + b"\n"

        if secret_missing(admin):
            if write_secret(admin, issue()):
                self.created.append(admin)
            return None
        why = None
        try:
            token = read_secret(admin).decode("ascii").strip()
            identity, expires = self.verifier.verify(token), self.verifier.expiry(token)
            if "admin" not in identity.roles:
                why = "it did not carry the admin role"
            elif expires - time.time() < ADMIN_TOKEN_RENEW_BEFORE:
                why = f"it expires in {max(0, expires - time.time()) / 3600:.0f} h"
        except Unauthenticated as exc:
            why = exc.message
        except UnicodeDecodeError:
            why = "it was not a token"
        if why is not None:
            write_replacing(admin, issue())
            self.renewed.append((admin, why))
        return why

    async def _renew_admin_token_now_and_then(self) -> None:
        while True:
            await asyncio.sleep(self.admin_token_check_every)
            try:
                why = self.renew_admin_token()
            except Exception as exc:  # a full disk, say: the old token still works until it expires
                log.error("could not renew the admin token %s: %s: %s", self.state_dir / ADMIN_TOKEN_FILE,
                          type(exc).__name__, exc)
            else:
                if why is not None:
                    log.warning("renewed the admin token %s (%s)", self.state_dir / ADMIN_TOKEN_FILE, why)

    def served_contracts(self) -> dict[str, ContractVersion]:
        """The plane contracts this kernel serves, by plane: what its configuration subscribers report and
        check a snapshot's ``required_contracts`` against (a host applies a snapshot if it serves them)."""
        return {provision.key: provision.contract.version for loaded in self.host.plugins
                for provision in loaded.plugin.provides if provision.is_plane}

    def _check_remote_planes(self) -> None:
        """Refuse, before anything is created, a remote plane that would get its tokens in clear text.

        A plane client sends a token minted for every tenant; a host that
        refuses to listen on the network without TLS must not send one
        there without it either.
        """
        for plane, endpoint in self.settings.planes.items():
            if not endpoint.endpoint:
                continue
            if endpoint.ca_file:
                try:
                    Path(endpoint.ca_file).read_bytes()
                except OSError as exc:
                    raise SettingsError(
                        f"[planes.{plane}] ca_file {endpoint.ca_file}: {exc.strerror or exc}") from None
            elif not endpoint.allow_insecure_remote and not is_loopback(endpoint.endpoint):
                raise SettingsError(
                    f"refusing to reach the {plane} plane at {endpoint.endpoint} without TLS: its token "
                    f"would cross the network in clear text. Set [planes.{plane}] ca_file, "
                    f"or [planes.{plane}] allow_insecure_remote = true"
                )

    async def start(self) -> None:
        for loaded in self.host.plugins:
            try:
                await loaded.plugin.start()
            except Exception as exc:
                await self.stop()
                raise PluginError(loaded.name, f"start failed: {type(exc).__name__}: {exc}") from exc
            loaded.status = "running"
            self._started.append(loaded)
        self._renewer = asyncio.get_running_loop().create_task(self._renew_admin_token_now_and_then(),
                                                               name="admin token renewal")

    async def stop(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            await asyncio.gather(self._renewer, return_exceptions=True)
            self._renewer = None
        while self._started:
            loaded = self._started.pop()
            try:
                await loaded.plugin.stop()
                loaded.status = "stopped"
            except Exception:
                loaded.status = "stop failed"
                log.exception("plugin %s failed to stop", loaded.name)
        for client in self._clients.values():
            if isinstance(client, RemotePlaneClient):
                await client.close()
        self._clients.clear()
        self._lock.release()

    # -- plane clients -----------------------------------------------------

    def service_identity(self, principal: str = "kernel", roles: tuple[str, ...] = ("service",)) -> Identity:
        """The identity a plugin's in-process calls run under (all tenants)."""
        return Identity(principal=principal, tenant=ALL_TENANTS, roles=frozenset(roles), source="kernel")

    def client(self, contract: type[C], identity: Identity | None = None) -> C:
        """The plane's interface: in-process if a plugin here provides it, else remote.

        A remote plane is configured with ``[planes.<plane>] endpoint``; its
        token comes from ``token_file`` or is minted with this host's signing
        key for ``identity``.
        """
        identity = identity or self.service_identity()
        key = (contract.plane, identity)
        if key in self._clients:
            return self._clients[key]
        spec = PlaneSpec(contract)
        provider = self.host.providers.get(contract.plane)
        endpoint = self.settings.planes.get(contract.plane)
        if provider is not None and not (endpoint and endpoint.endpoint):
            loaded, provision = provider
            client = LocalPlaneClient(spec, loaded.implementations[provision.key], self.guard, identity)
        elif endpoint and endpoint.endpoint:
            client = RemotePlaneClient(spec, self._channel(endpoint, spec), self._token_source(endpoint, identity),
                                       version_in_user_agent=True)
        else:
            raise FailedPrecondition(
                f"no {contract.plane} plane here: enable a plugin that provides it "
                f"or set [planes.{contract.plane}] endpoint"
            )
        self._clients[key] = client
        return client  # type: ignore[return-value]

    def _channel(self, endpoint, spec: PlaneSpec) -> grpc.aio.Channel:
        options = channel_options(self.settings.server.max_message_bytes, (spec.plane, spec.version))
        if endpoint.ca_file:
            credentials = grpc.ssl_channel_credentials(Path(endpoint.ca_file).read_bytes())
            return grpc.aio.secure_channel(endpoint.endpoint, credentials, options=options)
        return grpc.aio.insecure_channel(endpoint.endpoint, options=options)

    def _token_source(self, endpoint, identity: Identity) -> TokenSource:
        if endpoint.token_file:
            return TokenSource(read_secret(Path(endpoint.token_file)).decode().strip())

        def mint() -> tuple[str, float]:
            import time
            ttl = self.settings.auth.default_token_ttl_seconds
            token = issue_token(self.signing_key, principal=f"{identity.principal}@{socket.gethostname()}",
                                tenant=identity.tenant, roles=sorted(identity.roles), ttl_seconds=ttl)
            return token, time.time() + ttl

        return TokenSource(mint=mint)

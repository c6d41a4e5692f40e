"""The ``planes`` command line.

Errors print as one line a person can act on (``planes: error: ...``) and exit
non-zero: 1 for a failed operation, 2 for a usage mistake.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from . import __version__
from .errors import PlanesError
from .identity import ROLES
from .settings import Settings, load_settings

log = logging.getLogger("planes")


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {"state_dir": getattr(args, "state_dir", None), "server.bind": getattr(args, "bind", None)}
    return load_settings(getattr(args, "config", None), overrides=overrides)


def _run(coro):
    from .runtime import run

    return run(coro)


# -- serve -------------------------------------------------------------------

def cmd_serve(args: argparse.Namespace) -> int:
    from .kernel import ADMIN_TOKEN_FILE, Kernel
    from .server import KernelServer

    settings = _settings(args)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Whatever the stores create (SQLite's -wal and -shm files, spool and payload
    # directories) is the kernel's alone, whoever's umask started it.
    os.umask(0o077)

    async def serve() -> None:
        # Opened on the running loop: plugins may make remote plane clients in
        # setup, and a grpc.aio channel belongs to the loop it was made on.
        kernel = Kernel(settings)
        server = KernelServer(kernel)
        # The port first: if it is taken, no plugin has opened a store yet.
        server.bind()
        try:
            kernel.open()
        except BaseException:
            await server.release()
            raise
        for path in kernel.created:
            print(f"created {path} (mode 0600)", flush=True)
        for path, why in kernel.renewed:
            print(f"renewed {path} ({why})", flush=True)
        print(f"admin token: {settings.state_dir / ADMIN_TOKEN_FILE} (send as 'authorization: Bearer <token>')",
              flush=True)
        server.stop_on_signals()
        port = await server.start()
        host = settings.server.bind.rsplit(":", 1)[0]
        planes = ", ".join(f"{lp.name} {lp.plugin.version}" for lp in kernel.host.plugins) or "none"
        print(f"planes {__version__} serving on {host}:{port} (plugins: {planes}); "
              f"state in {settings.state_dir}; Ctrl-C or SIGTERM drains and stops", flush=True)
        await server.wait_stopped()
        print("stopped", flush=True)

    _run(serve())
    return 0


# -- version / plugins ---------------------------------------------------------

def cmd_version(args: argparse.Namespace) -> int:
    from .contracts import CONTRACTS

    print(f"planes {__version__}")
    for contract in CONTRACTS:
        print(f"  {contract.plane} contract {contract.version} ({contract.service})")
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    from .errors import PluginError
    from .host import PluginHost, discover, unknown_plugin_tables, validate

    settings = _settings(args)
    rows = []
    found = discover(settings)
    for candidate in found:
        if candidate.plugin is None:
            rows.append({"name": candidate.name, "version": "-", "status": "error", "detail": candidate.error})
            continue
        plugin = candidate.plugin
        status, detail = "ok", ", ".join(p.key for p in plugin.provides)
        if plugin.name in settings.plugins.disabled or candidate.name in settings.plugins.disabled:
            status = "disabled"
        else:
            try:
                validate(plugin)
            except PlanesError as exc:
                status, detail = "invalid", exc.message
        rows.append({"name": plugin.name, "version": plugin.version, "status": status, "detail": detail})
    for table, problem in unknown_plugin_tables(settings, found).items():  # `serve` and `worker` refuse these
        rows.append({"name": f"[plugin.{table}]", "version": "-", "status": "invalid", "detail": problem})
    if not any(row["status"] in ("error", "invalid") for row in rows):
        # Each plugin is valid on its own; now the set, as `serve` loads it: a plane
        # provided twice, a required plane nobody provides, a dependency cycle.
        try:
            PluginHost.load(settings)
        except PluginError as exc:
            for row in rows:
                if row["name"] == exc.plugin:
                    row["status"], row["detail"] = "invalid", exc.problem
                    break
            else:
                rows.append({"name": exc.plugin, "version": "-", "status": "invalid", "detail": exc.problem})
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for row in rows:
            print(f"{row['name']:<20} {row['version']:<10} {row['status']:<9} {row['detail']}")
    return 1 if any(row["status"] in ("error", "invalid") for row in rows) else 0


# -- health / ping / whoami ----------------------------------------------------

def client_address(args: argparse.Namespace, settings: Settings) -> str:
    """The kernel a client command talks to: --address, $PLANES_ADDRESS, else server.bind."""
    return args.address or os.environ.get("PLANES_ADDRESS") or settings.server.bind


def client_tls(args: argparse.Namespace) -> dict:
    """:func:`~planes.kernel.clients.connect` keywords from --ca-file ($PLANES_CA_FILE) and --allow-insecure-remote.

    Without a CA file, connect() refuses a non-loopback address rather than
    send the token in clear text.
    """
    ca_file = getattr(args, "ca_file", None) or os.environ.get("PLANES_CA_FILE")
    return {"root_certificates": Path(ca_file).read_bytes() if ca_file else None,
            "allow_insecure": bool(getattr(args, "allow_insecure_remote", False))}


def cmd_health(args: argparse.Namespace) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    settings = _settings(args)
    address = client_address(args, settings)
    roots = client_tls(args)["root_certificates"]

    async def check() -> str:
        # No token is sent, so a plaintext check of a remote address leaks nothing.
        channel = (grpc.aio.secure_channel(address, grpc.ssl_channel_credentials(roots)) if roots
                   else grpc.aio.insecure_channel(address))
        async with channel:
            stub = health_pb2_grpc.HealthStub(channel)
            response = await stub.Check(health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout)
            return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    try:
        status = _run(check())
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.NOT_FOUND and args.service:
            raise PlanesError(f"{address} serves no service named {args.service!r} "
                              "(omit --service for the whole server)") from None
        raise PlanesError(f"health check of {address} failed: {exc.code().name}: "
                          f"{exc.details() or 'no detail given'}") from None
    print(f"{address} {args.service or '(server)'}: {status}")
    return 0 if status == "SERVING" else 1


def client_token(args: argparse.Namespace, settings: Settings, *, admin_fallback: bool = True,
                 address: str | None = None) -> str:
    """The token a client command sends: --token-file, $PLANES_TOKEN, else the state dir's admin.token.

    ``admin_fallback=False`` for commands an admin token cannot run anyway.
    With ``address``, the admin token is only sent to a loopback address: it
    belongs to the kernel of this state directory, and a token for every
    tenant must not go to another host unless asked for by name.
    """
    from .clients import is_loopback
    from .errors import InvalidArgument
    from .secrets import read_secret

    if args.token_file:
        return read_secret(Path(args.token_file)).decode().strip()
    if os.environ.get("PLANES_TOKEN"):
        return os.environ["PLANES_TOKEN"].strip()
    if not admin_fallback:
        raise InvalidArgument("this command needs a token: --token-file or PLANES_TOKEN")
    if address is not None and not is_loopback(address):
        raise InvalidArgument(f"the state directory's admin token is only sent to a loopback address; "
                              f"for {address} give --token-file or PLANES_TOKEN")
    from .kernel import ADMIN_TOKEN_FILE
    return read_secret(settings.state_dir / ADMIN_TOKEN_FILE).decode().strip()


def cmd_whoami(args: argparse.Namespace) -> int:
    from google.protobuf import json_format

    from .clients import connect
    from .contracts.diagnostics import DiagnosticsPlane, pb

    settings = _settings(args)
    address = client_address(args, settings)
    token = client_token(args, settings, address=address)

    async def ask():
        client = connect(address, DiagnosticsPlane, token=token, **client_tls(args))
        try:
            return await client.who_am_i(pb.WhoAmIRequest(), timeout=args.timeout)
        finally:
            await client.close()

    print(json_format.MessageToJson(_run(ask()), indent=2))
    return 0


def cmd_ping(args: argparse.Namespace) -> int:
    from .clients import connect
    from .contracts.diagnostics import DiagnosticsPlane, pb
    from .tokens import decode_claims

    settings = _settings(args)
    address = client_address(args, settings)
    token = client_token(args, settings, address=address)

    async def ping() -> list[float]:
        client = connect(address, DiagnosticsPlane, token=token, **client_tls(args))
        # An all-tenant token must name a tenant; act for the token's own.
        request = pb.EchoRequest(tenant=decode_claims(token).get("ten", ""), payload=os.urandom(args.size))
        times = []
        try:
            for _ in range(args.count):
                start = time.perf_counter()
                await client.echo(request, timeout=args.timeout)
                times.append(time.perf_counter() - start)
        finally:
            await client.close()
        return times

    times = sorted(_run(ping()))
    median = times[len(times) // 2] * 1e6
    print(f"{address}: {len(times)} echoes of {args.size} bytes, median {median:.0f} us, "
          f"min {times[0] * 1e6:.0f} us, max {times[-1] * 1e6:.0f} us")
    return 0


# -- tokens --------------------------------------------------------------------

def cmd_token_issue(args: argparse.Namespace) -> int:
    from .kernel import SIGNING_KEY_FILE
    from .secrets import write_secret
    from .tokens import SigningKey, issue_token

    settings = _settings(args)
    key = SigningKey.load(settings.state_dir / SIGNING_KEY_FILE)
    ttl = args.ttl if args.ttl is not None else settings.auth.default_token_ttl_seconds
    token = issue_token(key, principal=args.principal, tenant=args.tenant, roles=args.role, ttl_seconds=ttl)
    if args.out:
        if not write_secret(Path(args.out), token.encode() + b"\n"):
            raise PlanesError(f"{args.out} exists; choose another path or remove it first")
        print(f"token written to {args.out} (mode 0600), expires in {ttl} s")
    else:
        print(token)
    return 0


def cmd_token_inspect(args: argparse.Namespace) -> int:
    from .errors import Unauthenticated
    from .kernel import PUBLIC_KEY_FILE
    from .tokens import TokenVerifier, decode_claims, load_public_key

    settings = _settings(args)
    if args.token == "-" or args.token is None:
        token = sys.stdin.read().strip()
    else:
        token = args.token.strip()
    claims = decode_claims(token)
    verdict = "valid"
    public = settings.state_dir / PUBLIC_KEY_FILE
    if public.exists():
        verifier = TokenVerifier({})
        verifier.trust(load_public_key(public))
        try:
            verifier.verify(token)
        except Unauthenticated as exc:
            verdict = f"invalid: {exc.message}"
    else:
        verdict = f"not verified: no public key at {public}"
    claims = {**claims, "expires": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(claims.get("exp", 0)))}
    print(json.dumps({"claims": claims, "verdict": verdict}, indent=2))
    return 0 if verdict == "valid" else 1


# -- parser --------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="settings TOML file (default: $PLANES_CONFIG, else built-in defaults)")
    common.add_argument("--state-dir", help="state directory (default: ./var)")
    transport = argparse.ArgumentParser(add_help=False)
    transport.add_argument("--address", help="host:port of the kernel (default: $PLANES_ADDRESS or server.bind)")
    transport.add_argument("--timeout", type=float, default=5.0, help="seconds per call (default 5)")
    add_tls_arguments(transport)
    client = argparse.ArgumentParser(add_help=False, parents=[transport])
    client.add_argument("--token-file", help="token file (default: $PLANES_TOKEN, else the state dir's admin.token)")

    parser = argparse.ArgumentParser(prog="planes", description="A gRPC microkernel for governed AI/agent workloads.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = commands.add_parser("serve", parents=[common], help="run the kernel with every enabled plugin")
    serve.add_argument("--bind", help="host:port to listen on (default 127.0.0.1:50051)")
    serve.set_defaults(handler=cmd_serve)

    commands.add_parser("version", help="print the version and contract versions").set_defaults(handler=cmd_version)

    plugins = commands.add_parser("plugins", parents=[common], help="list plugins with versions and status")
    plugins.add_argument("action", nargs="?", choices=["list"], default="list")
    plugins.add_argument("--json", action="store_true", help="print JSON")
    plugins.set_defaults(handler=cmd_plugins)

    health = commands.add_parser("health", parents=[common, transport], help="check a kernel's health (no token needed)")
    health.add_argument("--service", default="", help="a service name (default: the whole server)")
    # Accepted, so one set of client flags works for every command, but never sent: not in --help.
    health.add_argument("--token-file", help=argparse.SUPPRESS)
    health.set_defaults(handler=cmd_health)

    ping = commands.add_parser("ping", parents=[common, client], help="echo round trips through auth and the kernel")
    ping.add_argument("--count", type=_at_least(1), default=10, help="echoes to send (default 10)")
    ping.add_argument("--size", type=_at_least(0), default=64, help="payload bytes per echo (default 64)")
    ping.set_defaults(handler=cmd_ping)

    whoami = commands.add_parser("whoami", parents=[common, client], help="show the identity a token carries")
    whoami.set_defaults(handler=cmd_whoami)

    token = commands.add_parser("token", help="issue and inspect bearer tokens")
    token_commands = token.add_subparsers(dest="token_command", metavar="ACTION")
    issue = token_commands.add_parser("issue", parents=[common], help="sign a token with this host's key")
    issue.add_argument("--principal", required=True)
    issue.add_argument("--tenant", required=True, help="tenant name, or '*' for every tenant")
    issue.add_argument("--role", action="append", required=True, choices=ROLES, help="repeat for several roles")
    issue.add_argument("--ttl", type=int, help="lifetime in seconds (default: auth.default_token_ttl_seconds)")
    issue.add_argument("--out", help="write to this new file with mode 0600 instead of printing")
    issue.set_defaults(handler=cmd_token_issue)
    inspect = token_commands.add_parser("inspect", parents=[common], help="decode a token and verify it")
    inspect.add_argument("token", nargs="?", help="the token, or - (default) to read standard input")
    inspect.set_defaults(handler=cmd_token_inspect)
    token.set_defaults(handler=lambda args: _usage(token))
    return parser


def add_client_arguments(parser: argparse.ArgumentParser, *, token: str, timeout: float) -> None:
    """What every command that calls a running kernel takes: --address, --token-file (``token`` says whose
    and the default), --config, --state-dir, --timeout (``timeout`` seconds by default) and the TLS options."""
    parser.add_argument("--address", help="host:port of the kernel (default: $PLANES_ADDRESS or server.bind)")
    parser.add_argument("--token-file", help=token)
    parser.add_argument("--config", help="settings TOML file")
    parser.add_argument("--state-dir", help="state directory (default: ./var)")
    parser.add_argument("--timeout", type=float, default=timeout)
    add_tls_arguments(parser)


def add_tls_arguments(parser: argparse.ArgumentParser) -> None:
    """--ca-file and --allow-insecure-remote, for every command that connects to a kernel."""
    parser.add_argument("--ca-file", help="PEM CA certificate of the kernel's TLS certificate "
                        "(default: $PLANES_CA_FILE); needed for a non-loopback address")
    parser.add_argument("--allow-insecure-remote", action="store_true",
                        help="connect to a non-loopback address without TLS, sending the token "
                        "in clear text (only on a network you trust)")


def _at_least(least: int) -> Callable[[str], int]:
    """An argparse type: an integer of at least ``least`` (argparse turns the ValueError into a usage error)."""
    def parse(text: str) -> int:
        value = int(text)
        if value < least:
            raise ValueError(text)
        return value
    parse.__name__ = f"integer >= {least}"  # argparse names the type in its message
    return parse


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_usage(sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    from .host import discover
    try:
        settings = load_settings()
    except PlanesError:
        # Reported again, with context, by the command that needs the settings;
        # the plugins' commands are still added, so that command is found.
        settings = Settings()
    for candidate in discover(settings):
        if candidate.plugin is not None:
            candidate.plugin.add_cli_commands(parser._subparsers._group_actions[0])  # noqa: SLF001
    args = parser.parse_args(argv)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(handler(args) or 0)
    except PlanesError as exc:
        print(f"planes: error: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except OSError as exc:
        print(f"planes: error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

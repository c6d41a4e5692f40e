"""``planes data``: put, get, inspect and delete payloads; review the quarantine.

Payload commands act for the tenant of their token, which must carry the
``service`` (or ``worker``) role: an admin token reads nothing, so there is no
fallback to the state directory's ``admin.token`` here. Quarantine commands
need the ``operator`` role. Pass the token with ``--token-file`` or
``PLANES_TOKEN`` (``planes token issue --role service --tenant acme``).

    planes data put FILE --classification internal [--ttl 3600]
    planes data get PAYLOAD_ID -o FILE
    planes data stat PAYLOAD_ID
    planes data rm PAYLOAD_ID [--reason TEXT]
    planes data quarantine list [--tenant T]
    planes data quarantine release PAYLOAD_ID --reason TEXT
    planes data quarantine delete PAYLOAD_ID --reason TEXT

Output is JSON (metadata only, never payload bytes).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from google.protobuf import json_format

from planes.common.v1 import common_pb2
from planes.data.v1 import data_service_pb2 as pb
from planes.kernel.errors import PlanesError

from .limits import CLASSIFICATIONS


def add_commands(commands) -> None:
    from planes.kernel.cli import add_client_arguments

    data = commands.add_parser("data", help="put, get and inspect data-plane payloads")
    actions = data.add_subparsers(dest="data_command", metavar="ACTION")

    def action(parent, name: str, help_text: str, handler):
        parser = parent.add_parser(name, help=help_text)
        add_client_arguments(parser, token="token file (default: $PLANES_TOKEN)", timeout=600.0)
        parser.add_argument("--tenant", help="tenant (default: the token's)")
        parser.set_defaults(handler=handler)
        return parser

    put = action(actions, "put", "store a file as a payload", _put)
    put.add_argument("file")
    put.add_argument("--classification", required=True, choices=sorted(CLASSIFICATIONS))
    put.add_argument("--ttl", type=float, help="seconds to keep it (default: the plane's)")
    put.add_argument("--chunk-mib", type=int, default=1)
    get = action(actions, "get", "write a payload to a file (checked against its digest)", _get)
    get.add_argument("payload_id")
    get.add_argument("-o", "--out", required=True, help="file to write; must not exist")
    get.add_argument("--max-age", type=float, help="refuse a payload older than this many seconds")
    action(actions, "stat", "print a payload's metadata", _stat).add_argument("payload_id")
    remove = action(actions, "rm", "delete a payload", _remove)
    remove.add_argument("payload_id")
    remove.add_argument("--reason", default="")
    quarantine = actions.add_parser("quarantine", help="review quarantined payloads (operator role)")
    review = quarantine.add_subparsers(dest="quarantine_command", metavar="ACTION")
    action(review, "list", "list quarantined payloads", _quarantine_list)
    for name, handler in (("release", _release), ("delete", _delete_quarantined)):
        parser = action(review, name, f"{name} a quarantined payload", handler)
        parser.add_argument("payload_id")
        parser.add_argument("--reason", required=True, help="recorded in evidence")
    quarantine.set_defaults(handler=lambda args: (quarantine.print_usage(sys.stderr), 2)[1])
    data.set_defaults(handler=lambda args: (data.print_usage(sys.stderr), 2)[1])


def _run(args, work) -> int:
    from planes.kernel.cli import client_address, client_tls, client_token
    from planes.kernel.clients import connect
    from planes.kernel.contracts import DataPlane
    from planes.kernel.runtime import run
    from planes.kernel.settings import load_settings
    from planes.kernel.tokens import decode_claims

    from .client import DataClient

    settings = load_settings(args.config, overrides={"state_dir": args.state_dir})
    address = client_address(args, settings)
    token = client_token(args, settings, admin_fallback=False, address=address)
    tenant = args.tenant or decode_claims(token).get("ten", "")
    tls = client_tls(args)

    async def main():
        client = connect(address, DataPlane, token=token, **tls)
        try:
            return await work(DataClient(client, tenant))
        finally:
            await client.close()

    return run(main())


def _print(message) -> int:
    print(json.dumps(json_format.MessageToDict(message), indent=2, sort_keys=True))
    return 0


def _put(args) -> int:
    async def work(data):
        return _print(await data.put_file(args.file, classification=args.classification, ttl=args.ttl,
                                          chunk_bytes=args.chunk_mib << 20, timeout=args.timeout))
    return _run(args, work)


def _get(args) -> int:
    if Path(args.out).exists():
        raise PlanesError(f"{args.out} exists; choose another path or remove it first")

    async def work(data):
        return _print(await data.get_file(args.payload_id, args.out, max_age=args.max_age, timeout=args.timeout))
    return _run(args, work)


def _stat(args) -> int:
    async def work(data):
        return _print(await data.stat(args.payload_id))
    return _run(args, work)


def _remove(args) -> int:
    async def work(data):
        return _print(await data.delete(args.payload_id, args.reason))
    return _run(args, work)


def _quarantine_list(args) -> int:
    async def work(data):
        token = ""
        while True:
            page = await data.client.list_quarantine(pb.ListQuarantineRequest(
                tenant=data.tenant, page=common_pb2.PageRequest(page_token=token)), timeout=args.timeout)
            for entry in page.payloads:
                print(json.dumps(json_format.MessageToDict(entry), sort_keys=True))
            token = page.page.next_page_token
            if not token:
                return 0
    return _run(args, work)


def _release(args) -> int:
    async def work(data):
        return _print(await data.client.release_quarantine(pb.ReleaseQuarantineRequest(
            tenant=data.tenant, payload_id=args.payload_id, reason=args.reason), timeout=args.timeout))
    return _run(args, work)


def _delete_quarantined(args) -> int:
    async def work(data):
        return _print(await data.client.delete_quarantined(pb.DeleteQuarantinedRequest(
            tenant=data.tenant, payload_id=args.payload_id, reason=args.reason), timeout=args.timeout))
    return _run(args, work)

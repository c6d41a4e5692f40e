from __future__ import annotations

import multiprocessing

import pytest

from planes.common.v1 import common_pb2
from planes.evidence.v1 import evidence_service_pb2 as pb
from planes.kernel.identity import Identity
from planes.plugins.evidence import open_log

SERVICE = Identity("billing-svc", "acme", frozenset({"service"}))


def event(event_id: str, *, event_type="tool.invoked", correlation="corr-1", tenant="", **fields) -> pb.Event:
    message = pb.Event(event_id=event_id, event_type=event_type,
                       correlation=common_pb2.Correlation(correlation_id=correlation, tenant=tenant))
    for name, value in fields.items():
        if isinstance(value, bytes):
            message.fields.add(name=name, bytes_value=value, classification=common_pb2.CLASSIFICATION_INTERNAL)
        else:
            message.fields.add(name=name, string_value=value, classification=common_pb2.CLASSIFICATION_CONFIDENTIAL)
    return message


@pytest.fixture
def log(tmp_path):
    opened = open_log(tmp_path, {"checkpoint_every": 4, "checkpoint_seconds": 3600})
    yield opened
    opened.close()


def _send_result(work, argument, pipe) -> None:
    pipe.send(work(argument))


def in_forked_child(work, argument, timeout: float = 60):
    """``work(argument)`` run in a forked child; what it returns, and the child's exit code.

    Helper threads (the segment syncer, the encoder worker) do not survive
    fork, so this is how the tests show a child makes its own.
    """
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_send_result, args=(work, argument, send))
    child.start()
    child.join(timeout=timeout)
    if child.exitcode is None:
        child.kill()
    return (receive.recv() if child.exitcode == 0 else None), child.exitcode


def serve_evidence(run, state_dir, scenario, **evidence_settings):
    """``scenario(client)`` against the evidence plugin served over loopback gRPC; ``client(roles, tenant)`` makes
    a remote client with a fresh token (``roles``: one role or several), closed at the end."""
    from planes.kernel.clients import connect
    from planes.kernel.contracts import EvidencePlane
    from planes.kernel.host import Candidate, PluginHost
    from planes.kernel.kernel import Kernel
    from planes.kernel.server import KernelServer
    from planes.kernel.tokens import issue_token
    from planes.plugins.evidence import EvidencePlugin
    from tests.conftest import make_settings

    async def main():
        settings = make_settings(state_dir, plugin={"evidence": evidence_settings})
        plugin = EvidencePlugin()
        kernel = Kernel(settings, PluginHost.load(settings, [Candidate(plugin.name, "test", plugin)])).open()
        server = KernelServer(kernel)
        port = await server.start()
        clients = []

        def client(roles, tenant="acme"):
            roles = [roles] if isinstance(roles, str) else list(roles)
            token = issue_token(kernel.signing_key, principal=f"{roles[0]}-{tenant}", tenant=tenant, roles=roles,
                                ttl_seconds=120)
            made = connect(f"127.0.0.1:{port}", EvidencePlane, token=token)
            clients.append(made)
            return made

        try:
            return await scenario(client)
        finally:
            for made in clients:
                await made.close()
            await server.stop(grace=1)
    return run(main())

"""A token never crosses the network in clear text: plaintext only to loopback, TLS everywhere else."""

from __future__ import annotations

import socket
import threading

import grpc
import pytest

from planes.kernel import errors
from planes.kernel.clients import connect, is_loopback
from planes.kernel.contracts.diagnostics import DiagnosticsPlane, pb
from planes.kernel.kernel import Kernel
from planes.kernel.secrets import write_secret
from planes.kernel.settings import PlaneEndpoint, ServerSettings, TlsSettings
from tests.conftest import make_settings, running_kernel
from tests.kernel.test_server import _certificates

TOKEN = "pt1.SECRETTOKENMARKERxyz.sig"


def _outward_ip() -> str | None:
    """This host's address on its default route (no packet is sent), or None if it has only loopback."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.255.255.255", 9))
        except OSError:
            return None
        ip = probe.getsockname()[0]
    return None if is_loopback(f"{ip}:1") else ip


class Listener:
    """A TCP listener on every interface that records the bytes any client sends it."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("0.0.0.0", 0))
        self.port = self.sock.getsockname()[1]
        self.received = bytearray()
        self.connections = 0
        self.sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            with conn:
                conn.settimeout(1)
                conn.sendall(b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")  # empty HTTP/2 SETTINGS
                try:
                    while data := conn.recv(65536):
                        self.received.extend(data)
                except OSError:
                    pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


@pytest.mark.parametrize(("address", "loopback"), [
    ("127.0.0.1:50051", True), ("127.8.0.1:1", True), ("localhost:1", True), ("LOCALHOST", True),
    ("[::1]:50051", True), ("::1", True), ("ipv4:127.0.0.1:1,127.0.0.2:1", True), ("ipv6:[::1]:1", True),
    ("dns:///localhost:1", True), ("dns://8.8.8.8/localhost:1", True), ("unix:/run/planes.sock", True),
    ("unix-abstract:planes", True),
    ("10.0.0.1:50051", False), ("192.0.2.2:1", False), ("0.0.0.0:1", False), ("[::]:1", False),
    ("example.org:50051", False), ("localhost.example.org:1", False), ("127.0.0.1.nip.io:1", False),
    ("ipv4:127.0.0.1:1,10.0.0.1:1", False), ("dns:///example.org:1", False), ("dns://127.0.0.1/example.org:1", False),
    ("", False)])
def test_which_addresses_are_loopback(address, loopback):
    assert is_loopback(address) is loopback


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_loopback_plaintext_still_works(run, tmp_path, host):
    async def scenario():
        async with running_kernel(tmp_path) as k:
            client = connect(f"{host}:{k.port}", DiagnosticsPlane, token=k.token())
            k.clients.append(client)
            return await client.who_am_i(pb.WhoAmIRequest(), timeout=5)

    assert run(scenario()).principal == "svc"


def test_non_loopback_without_ca_is_refused_before_connecting(monkeypatch):
    opened = []
    monkeypatch.setattr(grpc.aio, "insecure_channel", lambda *a, **kw: opened.append(a))
    with pytest.raises(errors.SettingsError) as raised:
        connect("10.0.0.1:50051", DiagnosticsPlane, token=TOKEN)
    assert raised.value.message.startswith("refusing to connect to 10.0.0.1:50051 without TLS")
    assert "--ca-file" in raised.value.message and "allow_insecure=True" in raised.value.message
    assert opened == [], "no channel was made"


def test_no_token_byte_reaches_a_non_loopback_listener(run):
    ip = _outward_ip()
    if ip is None:
        pytest.skip("this host has no non-loopback address")
    listener = Listener()
    try:
        with pytest.raises(errors.SettingsError):
            connect(f"{ip}:{listener.port}", DiagnosticsPlane, token=TOKEN)

        async def insecure_on_purpose():
            client = connect(f"{ip}:{listener.port}", DiagnosticsPlane, token=TOKEN, allow_insecure=True)
            try:
                await client.who_am_i(pb.WhoAmIRequest(), timeout=1)
            except errors.PlanesError:
                pass
            finally:
                await client.close()

        refused_connections = listener.connections
        run(insecure_on_purpose())
    finally:
        listener.close()
    assert refused_connections == 0, "the refused client never connected"
    # The listener is real: the explicit opt-in does reach it, in clear text.
    assert TOKEN.encode() in listener.received


def test_non_loopback_with_a_ca_file_uses_tls(run, tmp_path):
    ip = _outward_ip()
    if ip is None:
        pytest.skip("this host has no non-loopback address")
    files, _, ca_pem = _certificates(tmp_path, server_ip=ip)
    settings = make_settings(tmp_path, server=ServerSettings(bind=f"{ip}:0", grace_seconds=5),
                             tls=TlsSettings(cert_file=files["server.pem"], key_file=files["server.key"]))

    async def scenario():
        async with running_kernel(tmp_path, settings=settings) as k:
            client = connect(f"{ip}:{k.port}", DiagnosticsPlane, token=k.token(), root_certificates=ca_pem)
            k.clients.append(client)
            return await client.who_am_i(pb.WhoAmIRequest(), timeout=5)

    assert run(scenario()).principal == "svc"


def _remote(endpoint: str, **more) -> dict:
    return {"planes": {"diagnostics": PlaneEndpoint(endpoint=endpoint, **more)}}


def test_kernel_refuses_a_remote_plane_without_tls_at_start_up(tmp_path):
    state = tmp_path / "state"
    with pytest.raises(errors.SettingsError) as raised:
        Kernel(make_settings(state, **_remote("evidence.internal:50051"))).open()
    assert raised.value.message == (
        "refusing to reach the diagnostics plane at evidence.internal:50051 without TLS: its token would cross "
        "the network in clear text. Set [planes.diagnostics] ca_file, "
        "or [planes.diagnostics] allow_insecure_remote = true")
    assert not state.exists(), "refused before anything was created"


def test_kernel_names_an_unreadable_ca_file(tmp_path):
    with pytest.raises(errors.SettingsError, match=r"\[planes.diagnostics\] ca_file /nonexistent/ca.pem: No such file"):
        Kernel(make_settings(tmp_path, **_remote("evidence.internal:50051", ca_file="/nonexistent/ca.pem"))).open()


@pytest.mark.parametrize("more", [{"ca_file": "ca.pem"}, {"allow_insecure_remote": True}], ids=["ca_file", "opt-in"])
def test_kernel_accepts_a_remote_plane_with_tls_or_the_opt_in(run, tmp_path, more):
    if "ca_file" in more:
        files, _, _ = _certificates(tmp_path)
        more = {"ca_file": files["ca.pem"]}

    async def scenario():
        kernel = Kernel(make_settings(tmp_path / "state", **_remote("evidence.internal:50051", **more))).open()
        client = kernel.client(DiagnosticsPlane)
        await kernel.stop()
        return client

    assert run(scenario()).plane == "diagnostics"


def test_kernel_reaches_a_loopback_plane_without_tls(run, tmp_path):
    async def scenario():
        async with running_kernel(tmp_path / "server") as k:
            token_file = tmp_path / "svc.token"
            write_secret(token_file, k.token().encode())
            kernel = Kernel(make_settings(tmp_path / "client", **_remote(f"localhost:{k.port}",
                                                                         token_file=str(token_file)))).open()
            try:
                return await kernel.client(DiagnosticsPlane).who_am_i(pb.WhoAmIRequest(), timeout=5)
            finally:
                await kernel.stop()

    assert run(scenario()).principal == "svc"

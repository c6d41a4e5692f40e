"""Start-up errors are one line naming the setting, and a failed start gives back what it took."""

from __future__ import annotations

import os
import signal
import socket

import pytest

from planes.kernel import errors, server as server_module
from planes.kernel.host import PluginHost
from planes.kernel.kernel import SIGNING_KEY_FILE, Kernel
from planes.kernel.server import KernelServer
from planes.kernel.settings import ServerSettings, load_settings
from tests.conftest import RecordingPlugin, candidates, make_settings
from tests.kernel.test_cli import free_port, planes, serving


@pytest.fixture
def taken_port():
    """A loopback port another process (here: a plain socket) listens on."""
    with socket.create_server(("127.0.0.1", 0)) as holder:
        yield holder.getsockname()[1]


def test_an_unknown_log_level_is_a_setting_error():
    with pytest.raises(errors.SettingsError) as raised:
        load_settings(env={"PLANES_LOG_LEVEL": "verbose"})
    assert raised.value.message == (
        "log_level must be one of debug, info, warning, error, critical, got 'verbose' (from PLANES_LOG_LEVEL)")
    assert load_settings(env={"PLANES_LOG_LEVEL": "DEBUG"}).log_level == "DEBUG"


@pytest.mark.parametrize("command", [("serve",), ("config", "history")], ids=["serve", "plugin command"])
def test_planes_with_an_unknown_log_level_prints_one_line(tmp_path, command):
    result = planes(*command, state=tmp_path / "state", env={"PLANES_LOG_LEVEL": "verbose"})
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "planes: error: log_level must be one of debug, info, warning, error, critical, "
        "got 'verbose' (from PLANES_LOG_LEVEL)"]
    assert not (tmp_path / "state").exists()


def test_planes_serve_on_a_port_in_use_prints_one_line_and_sets_nothing_up(tmp_path, taken_port):
    state = tmp_path / "state"
    result = planes("serve", "--bind", f"127.0.0.1:{taken_port}", state=state)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"planes: error: cannot listen on 127.0.0.1:{taken_port} (server.bind): port {taken_port} is already in use"]
    assert not state.exists(), "no key, token or plugin store was created"


def _server(tmp_path, port: int) -> tuple[KernelServer, RecordingPlugin]:
    plugin = RecordingPlugin()
    settings = make_settings(tmp_path, server=ServerSettings(bind=f"127.0.0.1:{port}"))
    return KernelServer(Kernel(settings, PluginHost.load(settings, candidates(plugin))).open()), plugin


@pytest.mark.parametrize("probe", ["probe", "grpc"], ids=["probe", "grpc refuses"])
def test_start_on_a_port_in_use_raises_and_starts_no_plugin(run, tmp_path, taken_port, monkeypatch, probe):
    if probe == "grpc":
        # The port may be taken between the probe and gRPC's own bind.
        monkeypatch.setattr(server_module, "_check_port_free", lambda bind: None)

    async def scenario():
        server, _ = _server(tmp_path, taken_port)
        with pytest.raises(errors.SettingsError) as raised:
            await server.start()
        return server, raised.value

    server, error = run(scenario())
    assert error.message.startswith(f"cannot listen on 127.0.0.1:{taken_port} (server.bind): ")
    assert server.server is None
    assert [p.status for p in server.kernel.host.plugins] == ["ready"], "never started"


def test_a_bound_server_that_never_starts_gives_its_port_back(run, tmp_path):
    async def scenario():
        server, _ = _server(tmp_path, 0)
        port = server.bind()
        await server.release()
        return port

    port = run(scenario())
    with socket.create_server(("127.0.0.1", port)):
        pass  # the port is free again


def test_a_failed_plugin_start_gives_the_port_back(run, tmp_path):
    class Failing(RecordingPlugin):
        async def start(self) -> None:
            raise RuntimeError("store locked")

    async def scenario():
        settings = make_settings(tmp_path)
        server = KernelServer(Kernel(settings, PluginHost.load(settings, candidates(Failing()))).open())
        port = server.bind()
        with pytest.raises(errors.PluginError, match="start failed: RuntimeError: store locked"):
            await server.start()
        return port

    port = run(scenario())
    with socket.create_server(("127.0.0.1", port)):
        pass


# -- one kernel per state directory ---------------------------------------------

def test_a_second_kernel_on_the_same_state_directory_is_refused_until_the_first_stops(run, tmp_path):
    first = Kernel(make_settings(tmp_path)).open()
    with pytest.raises(errors.SettingsError) as raised:
        Kernel(make_settings(tmp_path)).open()
    assert raised.value.message == (
        f"state directory {tmp_path} is in use by another kernel (pid {os.getpid()}): "
        "stop that one first, or give this one another state_dir")
    assert oct((tmp_path / "kernel.lock").stat().st_mode & 0o777) == "0o600"
    run(first.stop())
    second = Kernel(make_settings(tmp_path)).open()
    assert second.host.plugins, "the state directory is free once the first kernel stopped"
    run(second.stop())


def test_a_kernel_whose_open_fails_gives_the_state_directory_back(run, tmp_path):
    key = tmp_path / SIGNING_KEY_FILE
    key.parent.mkdir(mode=0o700)
    key.write_bytes(b"not a key")
    key.chmod(0o600)
    with pytest.raises(errors.PlanesError, match="kernel-signing.pem"):
        Kernel(make_settings(tmp_path)).open()
    key.unlink()
    kernel = Kernel(make_settings(tmp_path)).open()
    run(kernel.stop())


def test_planes_serve_on_a_state_directory_in_use_fails_in_one_line_and_leaves_the_firstserving(tmp_path):
    """Two real processes, two ports, one state directory: the second stops at start-up, the first serves on."""
    state = tmp_path / "state"
    first = serving(state, free_port())
    try:
        evidence_before = sorted(path.name for path in state.rglob("*"))
        result = planes("serve", "--bind", f"127.0.0.1:{free_port()}", state=state)
        assert result.returncode == 1
        assert result.stderr.splitlines() == [
            f"planes: error: state directory {state} is in use by another kernel (pid {first.pid}): "
            "stop that one first, or give this one another state_dir"]
        assert sorted(path.name for path in state.rglob("*")) == evidence_before, "the second touched no store"
        assert first.poll() is None, "the first kernel is still serving"
    finally:
        first.kill()
        first.communicate(timeout=30)
    # Killed, not stopped: the lock went with the process, so the next start needs no clean-up.
    again = serving(state, free_port())
    again.send_signal(signal.SIGTERM)
    out, _ = again.communicate(timeout=30)
    assert again.returncode == 0, out

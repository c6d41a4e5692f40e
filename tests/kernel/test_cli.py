"""The `planes` command line, run as a real process."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import time

import pytest


def planes(*args: str, state=None, stdin: str | None = None, env: dict | None = None, timeout: float = 60):
    environment = {k: v for k, v in os.environ.items() if not k.startswith("PLANES_")}
    environment.update(env or {})
    if state is not None:
        environment["PLANES_STATE_DIR"] = str(state)
    return subprocess.run([sys.executable, "-m", "planes.kernel.cli", *args], capture_output=True, text=True,
                          input=stdin, env=environment, timeout=timeout)


def free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        return probe.getsockname()[1]


def serving(state, port: int) -> subprocess.Popen:
    """A real `planes serve` on ``port``, once it says it serves; its output stays readable."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("PLANES_")}
    environment.update(PLANES_STATE_DIR=str(state), PLANES_SERVER__BIND=f"127.0.0.1:{port}")
    process = subprocess.Popen([sys.executable, "-m", "planes.kernel.cli", "serve"], env=environment,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if "serving on" in line:
            return process
        if not line:
            break
    process.kill()
    raise AssertionError(f"planes serve did not start: {process.communicate()[0]}")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A real `planes serve` on a free loopback port."""
    state = tmp_path_factory.mktemp("served")
    port = free_port()
    process = serving(state, port)
    yield state, f"127.0.0.1:{port}"
    process.terminate()
    process.communicate(timeout=30)


def test_version_lists_contracts():
    result = planes("version")
    assert result.returncode == 0
    assert result.stdout.startswith("planes 0.1.0")
    assert "diagnostics contract 1.0" in result.stdout


def test_plugins_lists_versions_and_status(tmp_path):
    result = planes("plugins", "--json", state=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert rows["diagnostics"]["status"] == "ok" and rows["diagnostics"]["version"] == "0.1.0"


def test_token_issue_then_inspect(served, tmp_path):
    state, _ = served
    out = tmp_path / "svc.token"
    issued = planes("token", "issue", "--principal", "svc", "--tenant", "acme", "--role", "service",
                    "--role", "worker", "--ttl", "120", "--out", str(out), state=state)
    assert issued.returncode == 0, issued.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert out.read_text().strip() not in issued.stdout, "the token is written, not printed"
    inspected = planes("token", "inspect", state=state, stdin=out.read_text())
    assert inspected.returncode == 0, inspected.stderr
    report = json.loads(inspected.stdout)
    assert report["verdict"] == "valid"
    assert report["claims"]["sub"] == "svc" and report["claims"]["roles"] == ["service", "worker"]


def test_inspect_reports_a_forged_token(served):
    state, _ = served
    token = planes("token", "issue", "--principal", "x", "--tenant", "t", "--role", "service", state=state).stdout
    forged = token.strip()[:-6] + "AAAAAA"
    result = planes("token", "inspect", forged, state=state)
    assert result.returncode == 1
    assert json.loads(result.stdout)["verdict"] == "invalid: token signature is invalid"


def test_ping_whoami_and_health_against_a_real_server(served):
    state, address = served
    ping = planes("ping", "--address", address, "--count", "5", state=state)
    assert ping.returncode == 0, ping.stderr
    assert "5 echoes of 64 bytes" in ping.stdout
    who = planes("whoami", "--address", address, state=state)
    assert json.loads(who.stdout)["principal"] == "admin"
    health = planes("health", "--address", address, state=state)
    assert health.returncode == 0 and "SERVING" in health.stdout


def test_bad_token_is_a_one_line_error(served, tmp_path):
    state, address = served
    bad = tmp_path / "bad.token"
    bad.write_text("pt1.e30.AAAA")
    bad.chmod(0o600)
    result = planes("ping", "--address", address, "--token-file", str(bad), state=state)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == ["planes: error: token claims are incomplete"] or \
        result.stderr.strip().startswith("planes: error: token")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(("args", "code", "message"), [
    ((), 2, "usage"),
    (("token", "issue", "--principal", "p", "--tenant", "t", "--role", "root"), 2, "invalid choice"),
    (("token", "issue", "--principal", "p", "--tenant", "t", "--role", "admin"), 1, "secret file"),
    (("health", "--address", "127.0.0.1:9", "--timeout", "1"), 1, "health check of 127.0.0.1:9 failed"),
    (("serve", "--config", "/nonexistent/planes.toml"), 1, "settings file /nonexistent/planes.toml does not exist"),
])
def test_failures_exit_non_zero_with_one_line(tmp_path, args, code, message):
    result = planes(*args, state=tmp_path / "empty")
    assert result.returncode == code
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_refuses_public_bind_without_tls(tmp_path):
    result = planes("serve", "--bind", "0.0.0.0:0", state=tmp_path)
    assert result.returncode == 1
    assert "refusing to serve 0.0.0.0:0 without TLS" in result.stderr


# -- TLS for client commands ---------------------------------------------------

@pytest.mark.parametrize("command", [("whoami",), ("ping", "--count", "1"), ("health",), ("config", "list")],
                         ids=lambda c: " ".join(c[:2]))
def test_client_commands_refuse_a_remote_address_without_ca_file(tmp_path, command):
    token = tmp_path / "svc.token"
    token.write_text(TOKEN_MARKER)
    token.chmod(0o600)
    result = planes(*command, "--address", "10.0.0.1:50051", "--token-file", str(token), "--timeout", "1",
                    state=tmp_path)
    if command == ("health",):
        # health sends no token: a plaintext check leaks nothing, so it is tried (and fails to connect)
        assert result.returncode == 1 and "health check of 10.0.0.1:50051 failed" in result.stderr
        return
    assert result.returncode == 1
    assert result.stderr.startswith("planes: error: refusing to connect to 10.0.0.1:50051 without TLS")
    assert "--ca-file" in result.stderr and "Traceback" not in result.stderr


def test_the_admin_token_goes_only_to_loopback(tmp_path):
    from tests.kernel.test_server import _certificates

    files, _, _ = _certificates(tmp_path)
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / "admin.token").write_text(TOKEN_MARKER)
    (state / "admin.token").chmod(0o600)
    result = planes("whoami", "--address", "10.0.0.1:50051", "--ca-file", files["ca.pem"], state=state)
    assert result.returncode == 1
    assert result.stderr.strip() == ("planes: error: the state directory's admin token is only sent to a loopback "
                                     "address; for 10.0.0.1:50051 give --token-file or PLANES_TOKEN")


def test_client_commands_use_the_ca_file(tmp_path):
    from tests.conftest import serve_env, start_serve, stop_serve
    from tests.kernel.test_server import _certificates

    files, _, _ = _certificates(tmp_path)
    env = serve_env(tmp_path / "state")
    env.update(PLANES_TLS__CERT_FILE=files["server.pem"], PLANES_TLS__KEY_FILE=files["server.key"])
    address = env["PLANES_SERVER__BIND"]
    server = start_serve(env)
    try:
        state, ca = tmp_path / "state", ("--ca-file", files["ca.pem"])
        who = planes("whoami", "--address", address, *ca, state=state)
        ping = planes("ping", "--address", address, "--count", "2", *ca, state=state)
        health = planes("health", "--address", address, *ca, state=state)
        listing = planes("config", "history", "--address", address, *ca, state=state)
        from_env = planes("whoami", "--address", address, state=state, env={"PLANES_CA_FILE": files["ca.pem"]})
        plaintext = planes("whoami", "--address", address, "--timeout", "2", state=state)
    finally:
        stop_serve(server)
    assert who.returncode == 0 and json.loads(who.stdout)["principal"] == "admin", who.stderr
    assert ping.returncode == 0 and "2 echoes" in ping.stdout, ping.stderr
    assert health.returncode == 0 and "SERVING" in health.stdout, health.stderr
    assert listing.returncode == 0, listing.stderr
    assert from_env.returncode == 0 and json.loads(from_env.stdout)["principal"] == "admin", from_env.stderr
    assert plaintext.returncode == 1 and "Traceback" not in plaintext.stderr, "a TLS server refuses plaintext"


TOKEN_MARKER = "pt1.SECRETTOKENMARKERxyz.sig"


@pytest.mark.parametrize(("flag", "value"), [("--count", "0"), ("--size", "-1")])
def test_ping_refuses_a_count_or_size_out_of_range_as_a_usage_error(served, flag, value):
    state, address = served
    result = planes("ping", "--address", address, flag, value, state=state)
    assert result.returncode == 2
    assert f"argument {flag}: invalid integer >= " in result.stderr
    assert "Traceback" not in result.stderr


def test_health_of_an_unknown_service_names_it(served):
    state, address = served
    result = planes("health", "--address", address, "--service", "nope", state=state)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"planes: error: {address} serves no service named 'nope' (omit --service for the whole server)"]


def test_health_help_offers_no_token_flag():
    assert "--token-file" not in planes("health", "--help").stdout


def test_token_issue_refuses_a_lifetime_past_the_maximum(served):
    state, _ = served
    result = planes("token", "issue", "--principal", "p", "--tenant", "t", "--role", "service",
                    "--ttl", "999999999999", state=state)
    assert result.returncode == 1
    assert result.stderr.startswith("planes: error: token lifetime 999999999999 s is longer than the maximum")
    assert len(result.stderr.splitlines()) == 1


def test_served_state_is_private_whatever_the_starting_umask(served):
    """`planes serve` sets umask 077: SQLite's -wal/-shm files and the stores' directories are the kernel's alone."""
    state, _ = served
    exposed = [f"{path} {stat.S_IMODE(path.stat().st_mode):04o}" for path in [state, *state.rglob("*")]
               if stat.S_IMODE(path.stat().st_mode) & 0o077]
    assert exposed == []
    assert any(path.name.endswith("-wal") for path in state.rglob("*")), "the stores are open in WAL mode"

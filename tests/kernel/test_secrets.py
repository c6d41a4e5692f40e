"""Secret files: published whole, once, even when two starters race or an old crash left an empty file."""

from __future__ import annotations

import asyncio
import logging
import os
import stat
import threading
import time

import pytest

from planes.kernel import secrets
from planes.kernel.errors import SettingsError
from planes.kernel.kernel import ADMIN_TOKEN_FILE, PUBLIC_KEY_FILE, SIGNING_KEY_FILE, Kernel
from planes.kernel.tokens import SigningKey, TokenVerifier, issue_token
from planes.kernel.host import PluginHost
from tests.conftest import RecordingPlugin, candidates, make_settings


def test_a_starter_never_reads_the_key_another_is_still_writing(tmp_path, monkeypatch):
    """The first starter stalls inside its write until the second has finished: both end with one key."""
    path = tmp_path / "keys" / "kernel-signing.pem"
    second_done = threading.Event()
    real_write = os.write
    first = {}

    def stalled_write(fd, data):
        if threading.current_thread() is starter:
            second_done.wait(10)
        return real_write(fd, data)

    def start_first():
        try:
            first["result"] = SigningKey.load_or_create(path)
        except Exception as exc:  # reported by the assertions below
            first["error"] = exc

    monkeypatch.setattr(secrets.os, "write", stalled_write)
    starter = threading.Thread(target=start_first)
    starter.start()
    try:
        second_key, second_created = SigningKey.load_or_create(path)
    finally:
        second_done.set()
        starter.join(10)
    assert "error" not in first, first.get("error")
    first_key, first_created = first["result"]
    assert first_key.kid == second_key.kid == SigningKey.load(path).kid
    assert sorted([first_created, second_created]) == [False, True]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir()] == [path.name], "no temporary file is left behind"


def test_many_concurrent_starters_agree_on_one_key(tmp_path):
    path = tmp_path / "keys" / "kernel-signing.pem"
    results, barrier = [], threading.Barrier(8)

    def start():
        barrier.wait()
        results.append(SigningKey.load_or_create(path))

    threads = [threading.Thread(target=start) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(results) == 8
    assert len({key.kid for key, _ in results}) == 1
    assert sum(created for _, created in results) == 1


def test_an_empty_key_left_by_a_crash_is_replaced(tmp_path):
    path = tmp_path / "keys" / "kernel-signing.pem"
    secrets.ensure_private_dir(path.parent)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))  # what the old create-then-write left

    key, created = SigningKey.load_or_create(path)

    assert created
    assert SigningKey.load(path).kid == key.kid
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_partial_key_is_a_clear_error_and_is_left_alone(tmp_path):
    path = tmp_path / "keys" / "kernel-signing.pem"
    secrets.ensure_private_dir(path.parent)
    partial = b"-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2Vw"
    secrets.write_secret(path, partial)

    with pytest.raises(SettingsError, match="is not a PEM private key"):
        SigningKey.load_or_create(path)
    assert path.read_bytes() == partial, "a non-empty secret is never overwritten"


def test_write_secret_never_replaces_a_secret(tmp_path):
    path = tmp_path / "token"
    assert secrets.write_secret(path, b"first")
    assert not secrets.write_secret(path, b"second")
    assert secrets.read_secret(path) == b"first"


def test_an_empty_secret_file_is_refused_when_read(tmp_path):
    path = tmp_path / "empty.token"
    path.touch(mode=0o600)
    with pytest.raises(SettingsError, match=f"secret file {path} is empty"):
        secrets.read_secret(path)


def test_kernel_starts_after_a_crash_left_empty_key_and_admin_token(tmp_path):
    state = tmp_path / "state"
    for name in (SIGNING_KEY_FILE, ADMIN_TOKEN_FILE, PUBLIC_KEY_FILE):
        secrets.ensure_private_dir((state / name).parent)
        (state / name).touch(mode=0o600)

    kernel = Kernel(make_settings(state)).open()

    assert SigningKey.load(state / SIGNING_KEY_FILE).kid == kernel.signing_key.kid
    assert (state / PUBLIC_KEY_FILE).read_bytes() == kernel.signing_key.public_pem()
    admin = secrets.read_secret(state / ADMIN_TOKEN_FILE).decode().strip()
    verifier = TokenVerifier({kernel.signing_key.kid: kernel.signing_key.public_key})
    assert verifier.verify(admin).principal == "admin"


def test_private_dirs_are_private_all_the_way_down(tmp_path):
    """``mkdir -p`` would give the missing parents the umask's mode (0755 here): each one is made 0700."""
    old = os.umask(0o022)
    try:
        secrets.ensure_private_dir(tmp_path / "a" / "b" / "c")
    finally:
        os.umask(old)
    for directory in (tmp_path / "a", tmp_path / "a" / "b", tmp_path / "a" / "b" / "c"):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700, directory


def test_a_state_directory_others_can_read_is_refused_and_left_untouched(tmp_path):
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    state.chmod(0o755)
    with pytest.raises(SettingsError) as raised:
        Kernel(make_settings(state)).open()
    assert raised.value.message == (
        f"state directory {state} is accessible by group or others (mode 0755): its stores hold task specs, "
        f"evidence and payloads; run: chmod 700 {state}")
    assert list(state.iterdir()) == [], "no key, token or store was created"
    state.chmod(0o700)
    Kernel(make_settings(state)).open()
    assert (state / ADMIN_TOKEN_FILE).exists()


def _admin_token(state, key: SigningKey, *, ttl: float, issued: float, roles=("admin",)) -> str:
    token = issue_token(key, principal="admin", tenant="*", roles=list(roles), ttl_seconds=ttl, now=issued)
    (state / ADMIN_TOKEN_FILE).unlink(missing_ok=True)
    secrets.write_secret(state / ADMIN_TOKEN_FILE, token.encode() + b"\n")
    return token


@pytest.mark.parametrize(
    ("ttl", "issued_ago", "roles", "why"),
    [
        (30 * 86400, 31 * 86400, ("admin",), "token expired"),
        (30 * 86400, 25 * 86400, ("admin",), "it expires in 120 h"),
        (30 * 86400, 0, ("service",), "it did not carry the admin role"),
    ],
    ids=["expired", "within a week", "not admin"],
)
def test_an_admin_token_past_its_use_is_renewed_at_open(tmp_path, ttl, issued_ago, roles, why):
    state = tmp_path / "state"
    first = Kernel(make_settings(state)).open()
    old = _admin_token(state, first.signing_key, ttl=ttl, issued=time.time() - issued_ago, roles=roles)
    asyncio.run(first.stop())

    kernel = Kernel(make_settings(state)).open()
    assert kernel.renewed == [(state / ADMIN_TOKEN_FILE, why)]
    renewed = secrets.read_secret(state / ADMIN_TOKEN_FILE).decode().strip()
    assert renewed != old
    assert kernel.verifier.verify(renewed).roles == frozenset({"admin"})
    assert kernel.verifier.expiry(renewed) > time.time() + 29 * 86400
    assert oct((state / ADMIN_TOKEN_FILE).stat().st_mode & 0o777) == "0o600"


def test_an_admin_token_with_weeks_left_is_left_alone(tmp_path):
    state = tmp_path / "state"
    first = Kernel(make_settings(state)).open()
    token = _admin_token(state, first.signing_key, ttl=30 * 86400, issued=time.time() - 20 * 86400)
    asyncio.run(first.stop())
    kernel = Kernel(make_settings(state)).open()
    assert kernel.renewed == []
    assert secrets.read_secret(state / ADMIN_TOKEN_FILE).decode().strip() == token


def _small_kernel(state, check_every: float) -> Kernel:
    settings = make_settings(state)
    return Kernel(settings, PluginHost.load(settings, candidates(RecordingPlugin())),
                  admin_token_check_every=check_every)


def test_a_running_kernel_renews_its_admin_token_before_it_expires(tmp_path, caplog):
    state = tmp_path / "state"

    async def scenario():
        kernel = _small_kernel(state, 0.05).open()
        await kernel.start()
        try:
            old = _admin_token(state, kernel.signing_key, ttl=30 * 86400, issued=time.time() - 25 * 86400)
            for _ in range(200):  # bounded: 10 s at most
                await asyncio.sleep(0.05)
                current = secrets.read_secret(state / ADMIN_TOKEN_FILE).decode().strip()
                if current != old:
                    return kernel, current
            raise AssertionError("the admin token was not renewed while the kernel ran")
        finally:
            await kernel.stop()

    with caplog.at_level(logging.WARNING, logger="planes.kernel"):
        kernel, renewed = asyncio.run(scenario())
    assert kernel.renewed == [(state / ADMIN_TOKEN_FILE, "it expires in 120 h")]
    assert kernel.verifier.verify(renewed).roles == frozenset({"admin"})
    assert kernel.verifier.expiry(renewed) > time.time() + 29 * 86400
    assert oct((state / ADMIN_TOKEN_FILE).stat().st_mode & 0o777) == "0o600"
    assert f"renewed the admin token {state / ADMIN_TOKEN_FILE} (it expires in 120 h)" in caplog.text
    assert renewed not in caplog.text, "the token itself is never logged"


def test_a_running_kernel_leaves_a_good_admin_token_alone(tmp_path):
    state = tmp_path / "state"

    async def scenario():
        kernel = _small_kernel(state, 0.02).open()
        await kernel.start()
        try:
            token = secrets.read_secret(state / ADMIN_TOKEN_FILE)
            await asyncio.sleep(0.2)  # about ten checks
            return token, secrets.read_secret(state / ADMIN_TOKEN_FILE), kernel
        finally:
            await kernel.stop()

    before, after, kernel = asyncio.run(scenario())
    assert after == before
    assert kernel.renewed == []
    assert kernel._renewer is None, "stop() ended the renewal task"

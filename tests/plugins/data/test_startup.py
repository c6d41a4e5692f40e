"""Start-up over a damaged data store: refuse, naming the file, rather than lose or orphan payloads.

Each case stores payloads through a real kernel, damages the state directory
as an operator or a failing disk would, and starts again: the start is
refused with one line, nothing in the store is changed, and once the damage
is undone the payloads read back as they were put.
"""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import tempfile
from pathlib import Path

import pytest

from planes.kernel.errors import PluginError
from planes.kernel.host import Candidate, PluginHost
from planes.kernel.kernel import Kernel
from planes.plugins.data import DataPlugin
from planes.plugins.evidence import EvidencePlugin
from tests.conftest import make_settings
from tests.plugins.evidence.conftest import in_forked_child

SECRET = os.urandom(3 << 20)
PLAIN = b"plain bytes" * 1000


def _open(state) -> Kernel:
    settings = make_settings(state, plugin={"data": {}})
    plugins = [EvidencePlugin(), DataPlugin()]
    return Kernel(settings, PluginHost.load(settings, [Candidate(p.name, "t", p) for p in plugins])).open()


def _refusal(state) -> str:
    with pytest.raises(PluginError) as refused:
        _open(state)
    assert refused.value.plugin == "data"
    message = str(refused.value)
    assert "\n" not in message, "one line"
    return message


@pytest.fixture
def stored(serve, tmp_path):
    """A state directory holding one confidential (encrypted) and one internal (plain) payload."""
    async def scenario(served):
        data = served.data("acme")
        secret = await data.put(SECRET, classification="confidential")
        plain = await data.put(PLAIN, classification="internal")
        return secret.ref.payload_id, plain.ref.payload_id

    secret_id, plain_id = serve(scenario)
    return tmp_path, secret_id, plain_id


def _read_back(serve, state, *ids):
    async def scenario(served):
        data = served.data("acme")
        return [await data.get_bytes(payload_id) for payload_id in ids]
    return serve(scenario, state_dir=state)


def _snapshot(state):
    data = state / "data"
    return {path.relative_to(state): path.read_bytes() for path in sorted(data.rglob("*"))
            if path.is_file() and "evidence-spool" not in path.parts and not path.name.endswith(("-wal", "-shm"))}


@pytest.mark.parametrize("damage", ["deleted", "emptied"])
def test_a_lost_master_key_refuses_start_while_encrypted_payloads_depend_on_it(stored, serve, damage):
    state, secret_id, plain_id = stored
    key = state / "keys" / "data-master.key"
    saved = key.read_bytes()
    if damage == "deleted":
        key.unlink()
    else:
        key.write_bytes(b"")
    before = _snapshot(state)

    message = _refusal(state)

    assert str(key) in message and "1 encrypted payload(s)" in message and "restore it from backup" in message
    assert not key.exists() or key.read_bytes() == b"", "no new key was made in its place"
    assert _snapshot(state) == before
    key.unlink(missing_ok=True)
    key.write_bytes(saved)
    key.chmod(0o600)
    assert _read_back(serve, state, secret_id, plain_id) == [SECRET, PLAIN]


def test_another_master_key_is_refused_at_start_by_its_check_value(stored, serve):
    state, secret_id, _ = stored
    key = state / "keys" / "data-master.key"
    saved = key.read_bytes()
    key.write_bytes(os.urandom(32))

    message = _refusal(state)

    assert str(key) in message and "not the key that wrapped the 1 encrypted payload(s)" in message
    key.write_bytes(saved)
    assert _read_back(serve, state, secret_id) == [SECRET]


def test_a_catalogue_from_before_check_values_is_checked_by_opening_a_data_key(stored, serve):
    state, secret_id, _ = stored
    catalogue = state / "data" / "payloads.sqlite3"
    with sqlite3.connect(catalogue) as db:
        db.execute("DROP TABLE store_meta")    # as an older release left it
    key = state / "keys" / "data-master.key"
    saved = key.read_bytes()
    key.write_bytes(os.urandom(32))

    assert "does not open the data keys of the 1 encrypted payload(s)" in _refusal(state)

    key.write_bytes(saved)
    assert _read_back(serve, state, secret_id) == [SECRET]
    with sqlite3.connect(catalogue) as db:
        (recorded,) = db.execute("SELECT COUNT(*) FROM store_meta WHERE name = 'master_key_check'").fetchone()
    assert recorded == 1, "the migrated catalogue now records the key's check value"


def test_a_missing_key_is_made_anew_when_no_payload_is_encrypted(serve, tmp_path):
    async def put_plain(served):
        return (await served.data("acme").put(PLAIN, classification="internal")).ref.payload_id

    plain_id = serve(put_plain)
    key = tmp_path / "keys" / "data-master.key"
    first = key.read_bytes()
    key.unlink()

    assert _read_back(serve, tmp_path, plain_id) == [PLAIN]
    assert len(key.read_bytes()) == 32 and key.read_bytes() != first


@pytest.mark.parametrize("damage", ["emptied", "deleted"])
def test_a_lost_catalogue_with_object_files_refuses_start(stored, serve, damage):
    state, secret_id, plain_id = stored
    catalogue = state / "data" / "payloads.sqlite3"
    saved = catalogue.read_bytes()
    assert not (state / "data" / "payloads.sqlite3-wal").exists() or \
        (state / "data" / "payloads.sqlite3-wal").stat().st_size == 0
    if damage == "emptied":
        catalogue.write_bytes(b"")
    else:
        catalogue.unlink()
    objects = sorted(p.name for p in (state / "data" / "objects").iterdir())

    message = _refusal(state)

    assert f"data catalogue {catalogue} is {'empty' if damage == 'emptied' else 'missing'}" in message
    assert "2 object file(s) exist" in message and "restore the catalogue from backup" in message
    assert sorted(p.name for p in (state / "data" / "objects").iterdir()) == objects
    assert not (state / "data" / "orphans").exists()
    catalogue.write_bytes(saved)
    assert _read_back(serve, state, secret_id, plain_id) == [SECRET, PLAIN]


def test_object_files_without_a_catalogue_row_are_set_aside_with_a_warning(stored, serve, caplog):
    state, secret_id, plain_id = stored
    objects = state / "data" / "objects"
    # What a crash between the rename into objects/ and the catalogue insert leaves.
    strays = [f"pl_{os.urandom(16).hex()}" for _ in range(2)]
    for name in strays:
        (objects / name).write_bytes(b"never acknowledged")

    with caplog.at_level(logging.WARNING, logger="planes.plugins.data"):
        assert _read_back(serve, state, secret_id, plain_id) == [SECRET, PLAIN]

    orphans = state / "data" / "orphans"
    assert sorted(p.name for p in orphans.iterdir()) == sorted(strays)
    assert all((orphans / name).read_bytes() == b"never acknowledged" for name in strays)
    assert sorted(p.name for p in objects.iterdir()) == sorted([secret_id, plain_id])
    assert any("moved 2 object file(s) with no catalogue row" in r.getMessage() and str(orphans) in r.getMessage()
               for r in caplog.records)


def test_a_failed_catalogue_insert_leaves_no_object_file_and_no_quota_used(serve):
    async def scenario(served):
        data = served.data("acme")
        store = served.plugin.store
        # The insert fails as on a full disk; the object file was already renamed into objects/.
        store._db.execute("CREATE TEMP TRIGGER refuse BEFORE INSERT ON payloads "
                          "BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END")
        with pytest.raises(Exception) as failed:
            await data.put(PLAIN, classification="internal")
        left = sorted(p.name for p in (served.state_dir / "data" / "objects").iterdir())
        store._db.execute("DROP TRIGGER refuse")
        after = await data.put(PLAIN, classification="internal")   # the quota is exactly one payload
        return failed.value, left, after

    failed, left, after = serve(scenario, data_settings={"quota_bytes": len(PLAIN)})
    assert type(failed).__name__ in ("Internal", "Unavailable")
    assert left == [], "the uncatalogued object file was removed"
    assert after.ref.size == len(PLAIN)


def test_a_corrupt_catalogue_is_named(stored):
    state, _, _ = stored
    catalogue = state / "data" / "payloads.sqlite3"
    catalogue.write_bytes(b"this is not an SQLite database, whatever it was" * 100)

    message = _refusal(state)

    assert f"data catalogue {catalogue} cannot be opened" in message and "restore it from backup" in message


def test_a_data_directory_that_is_not_a_directory_is_named(tmp_path):
    (tmp_path / "data").write_bytes(b"")

    message = _refusal(tmp_path)

    assert str(tmp_path / "data") in message


def _refusal_message(state) -> str:
    try:
        _open(state)
    except PluginError as exc:
        return str(exc)
    return ""


def _refusal_as_nobody(state) -> str:
    os.setgid(65534)
    os.setuid(65534)
    return _refusal_message(state)


def test_a_read_only_data_directory_is_named(stored):
    """Root writes anywhere: as root, the state is handed to user nobody, who then starts over it."""
    state, _, _ = stored
    visible = Path(tempfile.mkdtemp(prefix="planes-ro-"))
    try:
        visible.chmod(0o711)  # nobody may pass through to its own state directory
        copy = visible / "state"
        shutil.copytree(state, copy, symlinks=True)
        data = copy / "data"
        if os.geteuid() == 0:
            for path in (copy, *copy.rglob("*")):
                os.chown(path, 65534, 65534, follow_symlinks=False)
        for path in (data, *data.rglob("*")):
            path.chmod(0o500 if path.is_dir() else 0o400)
        before = sorted((path.name, path.stat().st_size) for path in data.rglob("*"))
        if os.geteuid() == 0:
            message, exitcode = in_forked_child(_refusal_as_nobody, copy)
            assert exitcode == 0
        else:
            message = _refusal_message(copy)
        assert message.startswith("plugin 'data': ") and "\n" not in message, message
        assert str(data) in message, message
        assert sorted((path.name, path.stat().st_size) for path in data.rglob("*")) == before
    finally:
        for path in (visible, *visible.rglob("*")):
            path.chmod(0o700)
        shutil.rmtree(visible)

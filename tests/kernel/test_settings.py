"""Settings precedence: defaults < TOML file < PLANES_* environment < CLI flags."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from planes.kernel.errors import SettingsError
from planes.kernel.settings import load_settings


def test_defaults_need_no_file():
    settings = load_settings(env={})
    assert settings.server.bind == "127.0.0.1:50051"
    assert settings.state_dir == Path("var")
    assert not settings.tls.enabled


def test_file_then_env_then_overrides(tmp_path):
    config = tmp_path / "planes.toml"
    config.write_text(
        'state_dir = "/srv/planes"\n[server]\nbind = "127.0.0.1:6000"\ngrace_seconds = 3\n'
        '[planes.evidence]\nendpoint = "127.0.0.1:7000"\n[plugin.diagnostics]\ncolour = "blue"\n'
    )
    from_file = load_settings(config, env={})
    assert (from_file.server.bind, from_file.server.grace_seconds) == ("127.0.0.1:6000", 3.0)
    assert from_file.planes["evidence"].endpoint == "127.0.0.1:7000"
    assert from_file.plugin_settings("diagnostics") == {"colour": "blue"}

    env = {"PLANES_SERVER__BIND": "127.0.0.1:6001", "PLANES_STATE_DIR": "/tmp/x",
           "PLANES_PLUGINS__DISABLED": '["a", "b"]', "PLANES_SERVER__GRACE_SECONDS": "7.5"}
    from_env = load_settings(config, env=env)
    assert from_env.server.bind == "127.0.0.1:6001"
    assert from_env.state_dir == Path("/tmp/x")
    assert from_env.plugins.disabled == ("a", "b")
    assert from_env.server.grace_seconds == 7.5
    assert from_env.planes["evidence"].endpoint == "127.0.0.1:7000", "untouched keys keep the file's value"

    flagged = load_settings(config, env=env, overrides={"server.bind": "127.0.0.1:6002", "state_dir": None})
    assert flagged.server.bind == "127.0.0.1:6002"
    assert flagged.state_dir == Path("/tmp/x"), "a flag left unset does not override"


def test_config_path_from_environment(tmp_path):
    config = tmp_path / "p.toml"
    config.write_text('log_level = "debug"\n')
    assert load_settings(env={"PLANES_CONFIG": str(config)}).log_level == "debug"


@pytest.mark.parametrize(
    ("text", "env", "message"),
    [
        ("[server]\nbnd = 'x'\n", {}, "unknown setting server.bnd"),
        ("[server]\ngrace_seconds = 'soon'\n", {}, "server.grace_seconds must be float"),
        ("[server\n", {}, "not valid TOML"),
        ("", {"PLANES_SERVER__ALLOW_INSECURE_REMOTE": "yes"}, "must be true or false"),
        ("", {"PLANES_NOPE": "1"}, "unknown setting nope"),
        ("server = 3\n", {}, "[server] must be a table"),
    ],
)
def test_bad_settings_are_clear_errors(tmp_path, text, env, message):
    config = tmp_path / "bad.toml"
    config.write_text(text)
    with pytest.raises(SettingsError) as raised:
        load_settings(config, env=env)
    assert message in raised.value.message


def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings(tmp_path / "absent.toml", env={})


@dataclass(frozen=True)
class _EchoSettings:
    greeting: str = "hi"
    repeat: int = 1
    targets: tuple[str, ...] = ()


def test_plugin_settings_as_builds_the_plugin_table(tmp_path):
    path = tmp_path / "planes.toml"
    path.write_text('[plugin.echo]\ngreeting = "hello"\ntargets = ["a", "b"]\n')
    settings = load_settings(path, env={})
    assert settings.plugin_settings_as("echo", _EchoSettings) == _EchoSettings("hello", 1, ("a", "b"))
    assert settings.plugin_settings_as("absent", _EchoSettings) == _EchoSettings()


_CHECKED = {"lease_seconds": float, "max_attempts": int, "modules": tuple[str, ...]}


def test_plugin_settings_checked_returns_the_keys_given_with_their_types(tmp_path):
    path = tmp_path / "planes.toml"
    path.write_text('[plugin.echo]\nlease_seconds = 30\nmodules = ["a"]\n')
    settings = load_settings(path, env={})
    assert settings.plugin_settings_checked("echo", _CHECKED) == {"lease_seconds": 30.0, "modules": ("a",)}
    assert settings.plugin_settings_checked("absent", _CHECKED) == {}, "defaults are the plugin's to apply"


def _as_dataclass(settings):
    return settings.plugin_settings_as("echo", _EchoSettings)


def _checked(settings):
    return settings.plugin_settings_checked("echo", _CHECKED)


@pytest.mark.parametrize(("read", "table", "message"), [
    (_as_dataclass, 'greetin = "x"', "unknown setting plugin.echo.greetin; known here: greeting, repeat, targets"),
    (_as_dataclass, 'repeat = "three"', "plugin.echo.repeat must be int, got 'three'"),
    (_as_dataclass, "targets = [1]", "plugin.echo.targets must be a list of strings"),
    (_checked, "max_attempt = 1", "unknown setting plugin.echo.max_attempt; known here: lease_seconds, max_attempts, "
                                  "modules"),
    (_checked, 'max_attempts = "three"', "plugin.echo.max_attempts must be int, got 'three'"),
    (_checked, "lease_seconds = true", "plugin.echo.lease_seconds must be float, got True"),
])
def test_a_plugin_table_read_either_way_names_the_bad_key(tmp_path, read, table, message):
    path = tmp_path / "planes.toml"
    path.write_text(f"[plugin.echo]\n{table}\n")
    with pytest.raises(SettingsError) as raised:
        read(load_settings(path, env={}))
    assert raised.value.message == message

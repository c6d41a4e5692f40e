"""Settings: defaults, then one TOML file, then ``PLANES_*`` environment overrides.

The defaults need no file: bind 127.0.0.1:50051, state under ``./var``.

The file is named by ``--config`` or ``PLANES_CONFIG``. An environment
variable ``PLANES_<SECTION>__<KEY>=value`` overrides ``[section] key`` (double
underscore between levels; ``PLANES_STATE_DIR`` overrides the top-level
``state_dir``). Values are read as TOML values when they parse as one
(``30``, ``true``, ``["a", "b"]``) and as plain strings otherwise. Unknown keys
are errors, so a typo never silently falls back to a default.

Sections:

* ``[server]`` bind, grace_seconds, max_message_bytes, allow_insecure_remote
* ``[tls]`` cert_file, key_file, client_ca_file (mTLS when set)
* ``[auth]`` default_token_ttl_seconds, trusted_public_keys, token_cache_size
* ``[planes.<plane>]`` endpoint, token_file, ca_file, allow_insecure_remote: reach
  that plane remotely (a non-loopback endpoint needs ca_file; see ``PlaneEndpoint``)
* ``[plugins]`` disabled, modules (extra ``module:attribute`` plugins)
* ``[plugin.<name>]`` settings of the plugin named ``<name>``, which checks its table with
  :meth:`Settings.plugin_settings_as` when it is set up; a table that names no
  installed plugin is refused at start-up (:func:`planes.kernel.host.check_plugin_tables`)
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import SettingsError

T = typing.TypeVar("T")

ENV_PREFIX = "PLANES_"
#: Environment variables with the prefix that are not setting overrides.
#: The values of ``log_level`` (any case), as :mod:`logging` names its levels.
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
RESERVED_ENV = {"PLANES_CONFIG", "PLANES_NO_EXTENSIONS", "PLANES_TOKEN", "PLANES_ADDRESS", "PLANES_CA_FILE"}


@dataclass(frozen=True)
class ServerSettings:
    bind: str = "127.0.0.1:50051"
    #: Seconds in-flight calls get to finish on SIGTERM/SIGINT.
    grace_seconds: float = 10.0
    max_message_bytes: int = 64 * 1024 * 1024
    #: Binding a non-loopback address without TLS is refused unless this is true.
    allow_insecure_remote: bool = False


@dataclass(frozen=True)
class TlsSettings:
    cert_file: str = ""
    key_file: str = ""
    #: When set, clients must present a certificate signed by this CA (mTLS).
    client_ca_file: str = ""

    @property
    def enabled(self) -> bool:
        return bool(self.cert_file)


@dataclass(frozen=True)
class AuthSettings:
    default_token_ttl_seconds: int = 3600
    #: PEM files of other hosts' public keys whose tokens this host accepts.
    trusted_public_keys: tuple[str, ...] = ()
    token_cache_size: int = 4096


@dataclass(frozen=True)
class PlaneEndpoint:
    """Where a plane served by another host is reached.

    The kernel sends that host a token for every tenant, so a non-loopback
    endpoint without ``ca_file`` is refused at start-up, as a non-loopback
    bind without TLS is, unless ``allow_insecure_remote`` is true.
    """

    endpoint: str = ""
    token_file: str = ""
    #: PEM CA certificate(s) the endpoint's TLS certificate must chain to.
    ca_file: str = ""
    #: Reach a non-loopback endpoint in clear text (only on a network you trust).
    allow_insecure_remote: bool = False


@dataclass(frozen=True)
class PluginSettings:
    disabled: tuple[str, ...] = ()
    modules: tuple[str, ...] = ()


@dataclass(frozen=True)
class Settings:
    state_dir: Path = Path("var")
    log_level: str = "info"
    server: ServerSettings = field(default_factory=ServerSettings)
    tls: TlsSettings = field(default_factory=TlsSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    planes: Mapping[str, PlaneEndpoint] = field(default_factory=dict)
    plugins: PluginSettings = field(default_factory=PluginSettings)
    plugin: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    #: Where the settings came from, for error messages.
    source: str = "defaults"

    def plugin_settings(self, name: str) -> Mapping[str, Any]:
        """The raw ``[plugin.NAME]`` table (empty when there is none); :meth:`plugin_settings_as` checks it."""
        return self.plugin.get(name, {})

    def plugin_settings_as(self, name: str, cls: type[T]) -> T:
        """The ``[plugin.NAME]`` table as the dataclass ``cls``, checked as the kernel's own settings are.

        A key that is not a field of ``cls`` and a value of the wrong type are
        :class:`SettingsError` errors that name the key (``plugin.NAME.key``) and,
        for an unknown key, the known ones. Fields may be ``str``, ``int``,
        ``float``, ``bool``, ``Path``, ``tuple[str, ...]``, ``Mapping[str, X]``,
        ``Any`` or nested dataclasses (sub-tables); missing keys take the
        field's default.
        """
        return _build(cls, self._plugin_table(name), f"plugin.{name}")

    def plugin_settings_checked(self, name: str, types: Mapping[str, Any]) -> dict[str, Any]:
        """The ``[plugin.NAME]`` table with its keys and value types checked, for a table a dataclass does not fit.

        ``types`` maps every known key to its type, as a dataclass field of
        :meth:`plugin_settings_as` would declare it; the errors are the same.
        Only the keys present are returned, so the plugin applies its own
        defaults (one derived from another key, say).
        """
        where, table = f"plugin.{name}", self._plugin_table(name)
        if not isinstance(table, dict):
            raise SettingsError(f"[{where}] must be a table, got {type(table).__name__}")
        _refuse_unknown(table, types, where)
        return {key: _coerce(types[key], value, _join(where, key)) for key, value in table.items()}

    def _plugin_table(self, name: str) -> Any:
        table = self.plugin.get(name, {})
        return dict(table) if isinstance(table, Mapping) else table

    def state_path(self, *parts: str) -> Path:
        return self.state_dir.joinpath(*parts)


def load_settings(
    path: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Settings from defaults < file < environment < ``overrides`` (CLI flags)."""
    env = os.environ if env is None else env
    raw: dict[str, Any] = {}
    sources = ["defaults"]
    path = path or env.get("PLANES_CONFIG") or None
    if path:
        try:
            with open(path, "rb") as handle:
                raw = tomllib.load(handle)
        except FileNotFoundError:
            raise SettingsError(f"settings file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise SettingsError(f"settings file {path} is not valid TOML: {exc}") from None
        sources.append(str(path))
    for name, value in sorted(env.items()):
        if not name.startswith(ENV_PREFIX) or name in RESERVED_ENV:
            continue
        keys = [part.lower() for part in name[len(ENV_PREFIX):].split("__")]
        if not all(keys):
            raise SettingsError(f"environment variable {name}: empty key segment")
        _assign(raw, keys, _env_value(value), origin=name)
        sources.append(name)
    for dotted, value in (overrides or {}).items():
        if value is not None:
            _assign(raw, dotted.split("."), value, origin=f"--{dotted}")
    settings = _build(Settings, raw, "", source=" < ".join(sources))
    if settings.log_level.lower() not in LOG_LEVELS:
        # Checked here, not when logging is configured, so a typo is a setting error, not a traceback.
        origin = "PLANES_LOG_LEVEL" if "PLANES_LOG_LEVEL" in env else (path or "overrides")
        raise SettingsError(
            f"log_level must be one of {', '.join(LOG_LEVELS)}, got {settings.log_level!r} (from {origin})")
    return settings


def _env_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _assign(raw: dict[str, Any], keys: list[str], value: Any, origin: str) -> None:
    node = raw
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise SettingsError(f"{origin}: {key} is a value, not a section")
        node = child
    node[keys[-1]] = value


def _build(cls: type, raw: Any, where: str, **extra: Any) -> Any:
    if not isinstance(raw, dict):
        raise SettingsError(f"[{where}] must be a table, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    _refuse_unknown(raw, {f.name for f in dataclasses.fields(cls) if f.name != "source"}, where)
    values = dict(extra)
    for name in raw:
        values[name] = _coerce(hints[name], raw[name], _join(where, name))
    return cls(**values)


def _refuse_unknown(raw: Mapping[str, Any], known: Iterable[str], where: str) -> None:
    known = set(known)
    unknown = sorted(set(raw) - known)
    if unknown:
        raise SettingsError(f"unknown setting {_join(where, unknown[0])}; known here: {', '.join(sorted(known))}")


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    if origin is Mapping:
        _, value_hint = typing.get_args(hint)
        if not isinstance(value, dict):
            raise SettingsError(f"{where} must be a table")
        return {key: _coerce(value_hint, item, f"{where}.{key}") for key, item in value.items()}
    if origin is tuple:
        if isinstance(value, str):
            value = [part for part in value.split(",") if part]
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise SettingsError(f"{where} must be a list of strings")
        return tuple(value)
    if hint is Any:
        return value
    if hint is Path:
        if not isinstance(value, str):
            raise SettingsError(f"{where} must be a path string")
        return Path(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise SettingsError(f"{where} must be true or false, got {value!r}")
        return value
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is str and isinstance(value, str):
        return value
    raise SettingsError(f"{where} must be {getattr(hint, '__name__', hint)}, got {value!r}")


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name

"""The plugin host: discovery, validation, ordering, start and stop.

Every problem with a plugin surfaces here, at start-up, as a
:class:`~planes.kernel.errors.PluginError` naming the plugin and the reason,
never at first call.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any

from .contract import PlaneContract, PlaneSpec
from .errors import PluginError, SettingsError
from .plugin import Plugin, Provision
from .settings import Settings

ENTRY_POINT_GROUP = "planes.plugins"

log = logging.getLogger("planes.kernel.host")


@dataclass
class LoadedPlugin:
    """A plugin instance with where it came from and its state."""

    plugin: Plugin
    origin: str
    status: str = "loaded"
    implementations: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.plugin.name


@dataclass(frozen=True)
class Candidate:
    """A plugin found by discovery, loaded or not."""

    name: str
    origin: str
    plugin: Plugin | None
    error: str = ""


def discover(settings: Settings) -> list[Candidate]:
    """Every plugin from the entry-point group and the ``plugins.modules`` setting."""
    found: list[Candidate] = []
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        origin = f"entry point {ep.name} = {ep.value}"
        try:
            found.append(Candidate(ep.name, origin, _instantiate(ep.load(), ep.name)))
        except Exception as exc:  # a broken plugin must name itself, not crash start-up
            found.append(Candidate(ep.name, origin, None, f"cannot load: {_describe(exc)}"))
    for spec in settings.plugins.modules:
        origin = f"setting plugins.modules {spec}"
        module_name, _, attribute = spec.partition(":")
        try:
            if not attribute:
                raise ValueError("expected 'module:attribute'")
            target = getattr(importlib.import_module(module_name), attribute)
            found.append(Candidate(spec, origin, _instantiate(target, spec)))
        except Exception as exc:
            found.append(Candidate(spec, origin, None, f"cannot load: {_describe(exc)}"))
    return found


def unknown_plugin_tables(settings: Settings, candidates: list[Candidate] | None = None) -> dict[str, str]:
    """Each ``[plugin.NAME]`` table that no plugin is named, by NAME, with the error it is.

    Known are the plugins of ``candidates`` (default: :func:`discover`) and
    every installed entry point, loaded or not, enabled or in ``[plugins]
    disabled``: one settings file serves ``planes serve``, ``planes worker``
    and hosts that disable some plugins. Each plugin checks its own table's
    keys when it is set up.
    """
    candidates = discover(settings) if candidates is None else candidates
    known = {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)}
    known.update(candidate.plugin.name if candidate.plugin else candidate.name for candidate in candidates)
    return {name: f"unknown setting plugin.{name}: no plugin of that name is installed; "
                  f"known here: {', '.join(sorted(known))}"
            for name in sorted(set(settings.plugin) - known)}


def check_plugin_tables(settings: Settings, candidates: list[Candidate] | None = None) -> None:
    """Refuse a ``[plugin.NAME]`` table that no plugin is named (:func:`unknown_plugin_tables`): a misspelt
    name would otherwise be ignored, and its settings with it."""
    problems = unknown_plugin_tables(settings, candidates)
    if problems:
        raise SettingsError(next(iter(problems.values())))


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _instantiate(target: Any, label: str) -> Plugin:
    plugin = target() if isinstance(target, type) else target
    if not isinstance(plugin, Plugin):
        raise TypeError(f"{label} is a {type(plugin).__name__}, not a planes Plugin")
    return plugin


def validate(plugin: Plugin) -> None:
    """Check a plugin's declarations (not yet its implementations)."""
    label = plugin.name or type(plugin).__qualname__
    if not plugin.name:
        raise PluginError(label, "has no name")
    if not plugin.provides and not plugin.requires:
        raise PluginError(label, "provides nothing and requires nothing")
    for provision in plugin.provides:
        contract = provision.contract
        if isinstance(contract, type) and issubclass(contract, PlaneContract):
            PlaneSpec(contract).check_contract_class()
        elif not getattr(contract, "extension_point", None):
            raise PluginError(
                label, f"provides {contract!r}, which is neither a plane contract nor an extension point"
            )
        version = contract.version
        try:
            accepted = provision.accepts(version)
        except ValueError as exc:
            raise PluginError(label, f"bad contract range {provision.supports}: {exc}") from None
        if not accepted:
            raise PluginError(
                label,
                f"supports {provision.key} contract {provision.supports[0]} up to (not including) "
                f"{provision.supports[1]}, but this kernel has {provision.key} contract {version}",
            )


def check_implementation(plugin: Plugin, provision: Provision, implementation: Any) -> None:
    if provision.is_plane:
        contract = provision.contract
        if not isinstance(implementation, contract):
            raise PluginError(
                plugin.name,
                f"implementation of {provision.key} is a {type(implementation).__name__}, "
                f"not a {contract.__qualname__}",
            )
        missing = PlaneSpec(contract).missing_methods(implementation)
    else:
        # Missing, or still the contract's abstract method (a concrete method
        # has no __isabstractmethod__ at all).
        missing = [
            name
            for name in getattr(provision.contract, "__abstractmethods__", ())
            if getattr(implementation, name, None) is None
            or getattr(getattr(implementation, name), "__isabstractmethod__", False)
        ]
    if missing:
        raise PluginError(plugin.name, f"{provision.key} implementation lacks {', '.join(sorted(missing))}")
    if not provision.is_plane:
        # Extensions are awaited by their host (a worker, a plane): a plain def would fail every call, not start-up.
        plain = sorted(name for name, _ in inspect.getmembers(provision.contract, inspect.iscoroutinefunction)
                       if not inspect.iscoroutinefunction(getattr(implementation, name, None)))
        if plain:
            raise PluginError(plugin.name, f"{provision.key} implementation has a plain def where async def is "
                                           f"needed: {', '.join(plain)}")


class PluginHost:
    """Holds the validated plugins in dependency order."""

    def __init__(self, plugins: list[LoadedPlugin]):
        self.plugins = plugins
        self.providers: dict[str, tuple[LoadedPlugin, Provision]] = {}
        for loaded in plugins:
            for provision in loaded.plugin.provides:
                self.providers[provision.key] = (loaded, provision)

    @classmethod
    def load(cls, settings: Settings, candidates: list[Candidate] | None = None) -> PluginHost:
        """Discover, validate and order the enabled plugins; raise on the first problem.

        A ``[plugin.NAME]`` table that names no plugin is one (:func:`check_plugin_tables`).
        """
        candidates = discover(settings) if candidates is None else candidates
        disabled = set(settings.plugins.disabled)
        loaded: list[LoadedPlugin] = []
        seen: dict[str, str] = {}
        for candidate in candidates:
            if candidate.name in disabled or (candidate.plugin and candidate.plugin.name in disabled):
                continue
            if candidate.plugin is None:
                raise PluginError(candidate.name, f"{candidate.error} (from {candidate.origin})")
            plugin = candidate.plugin
            validate(plugin)
            if plugin.name in seen:
                raise PluginError(plugin.name, f"registered twice: {seen[plugin.name]} and {candidate.origin}")
            seen[plugin.name] = candidate.origin
            loaded.append(LoadedPlugin(plugin, candidate.origin))
        providers: dict[str, str] = {}
        for item in loaded:
            for provision in item.plugin.provides:
                if provision.key in providers:
                    raise PluginError(
                        item.name,
                        f"provides {provision.key}, which plugin {providers[provision.key]!r} "
                        "provides too; disable one in [plugins] disabled",
                    )
                providers[provision.key] = item.name
        check_plugin_tables(settings, candidates)
        remote = {plane for plane, endpoint in settings.planes.items() if endpoint.endpoint}
        return cls(_order(loaded, providers, remote))

    def plane_provisions(self) -> list[tuple[LoadedPlugin, Provision]]:
        return [(lp, p) for lp in self.plugins for p in lp.plugin.provides if p.is_plane]

    def extensions(self, point: str) -> dict[str, Any]:
        """The implementations of one extension point, by name."""
        found = {}
        for loaded in self.plugins:
            for provision in loaded.plugin.provides:
                if getattr(provision.contract, "extension_point", None) == point:
                    found[provision.name] = loaded.implementations[provision.key]
        return found


def _order(loaded: list[LoadedPlugin], providers: dict[str, str], remote: set[str]) -> list[LoadedPlugin]:
    """Topological order: providers of a required plane before the plugin requiring it."""
    by_name = {item.name: item for item in loaded}
    ordered: list[LoadedPlugin] = []
    state: dict[str, str] = {}

    def visit(item: LoadedPlugin, path: list[str]) -> None:
        if state.get(item.name) == "done":
            return
        if state.get(item.name) == "visiting":
            cycle = " -> ".join(path[path.index(item.name):] + [item.name])
            raise PluginError(item.name, f"dependency cycle: {cycle}")
        state[item.name] = "visiting"
        for plane in item.plugin.requires:
            provider = providers.get(plane)
            if provider is None:
                if plane in remote:
                    continue
                raise PluginError(
                    item.name,
                    f"requires the {plane} plane, which no enabled plugin provides "
                    f"and no [planes.{plane}] endpoint points to",
                )
            if provider != item.name:
                visit(by_name[provider], path + [item.name])
        state[item.name] = "done"
        ordered.append(item)

    for item in loaded:
        visit(item, [])
    return ordered

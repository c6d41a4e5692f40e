"""What a plugin is: the contract between the kernel and every extension.

The four default planes are plugins like any third-party one. A plugin is a
class registered under the ``planes.plugins`` entry-point group (or named in
the ``plugins.modules`` setting as ``module:attribute``). The kernel creates
one instance with no arguments, validates it, then calls the hooks below.

Example ``pyproject.toml`` registration::

    [project.entry-points."planes.plugins"]
    my-tools = "my_package.plugin:MyToolsPlugin"
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from .contract import ContractVersion

if TYPE_CHECKING:
    from .kernel import Kernel


@dataclass(frozen=True)
class Provision:
    """One thing a plugin provides: a plane, or an extension of a plane.

    ``contract`` is the contract class: a :class:`~planes.kernel.contract.PlaneContract`
    subclass for a plane, or an extension point's interface class (for example
    a tool adapter) that has ``extension_point`` and ``version`` attributes.
    ``supports`` is the half-open range of contract versions the plugin was
    written for, ``("1.0", "2.0")`` meaning 1.0 <= version < 2.0.
    ``name`` tells extensions of the same point apart (ignored for planes).
    """

    contract: type
    supports: tuple[str, str]
    name: str = ""

    @property
    def key(self) -> str:
        """``plane`` for a plane; ``extension_point:name`` for an extension."""
        point = getattr(self.contract, "extension_point", None)
        if point:
            return f"{point}:{self.name}"
        return self.contract.plane

    @property
    def is_plane(self) -> bool:
        return not getattr(self.contract, "extension_point", None)

    def accepts(self, version: ContractVersion) -> bool:
        low, high = (ContractVersion.parse(v) for v in self.supports)
        return low <= version < high


class Plugin:
    """Base class of every plugin. Override what you need; every hook is optional.

    Class attributes:
        name: unique plugin name, used in settings (``[plugin.<name>]``) and errors.
        version: the plugin's own release version.
        provides: the planes and extensions it implements.
        requires: plane names it calls through plane clients; their providers
            are set up and started first. A required plane must be provided by
            a plugin on this host or reachable through ``[planes.<plane>] endpoint``.
    """

    name: ClassVar[str] = ""
    version: ClassVar[str] = "0"
    provides: ClassVar[tuple[Provision, ...]] = ()
    requires: ClassVar[tuple[str, ...]] = ()

    def setup(self, kernel: Kernel) -> None:
        """Called once at start-up, after validation, in dependency order.

        Open stores and read your ``[plugin.NAME]`` table here, checked:
        ``kernel.settings.plugin_settings_as(self.name, YourSettings)`` (docs/plugins.md).
        Raise :class:`~planes.kernel.errors.PluginError` (or any exception) to
        stop the start-up; the kernel reports it with the plugin's name.
        """

    def implementation(self, provision: Provision) -> Any:
        """Return the object implementing ``provision``.

        Called after :meth:`setup`. For a plane, an instance of a subclass of
        the plane's contract with every RPC method implemented.
        """
        raise NotImplementedError

    async def start(self) -> None:
        """Called when the event loop runs, after every plugin's setup, in dependency order."""

    async def stop(self) -> None:
        """Called on shutdown in reverse dependency order, after in-flight calls drained."""

    def add_cli_commands(self, commands: Any) -> None:
        """Add subcommands to the ``planes`` CLI.

        ``commands`` is the ``argparse`` subparsers object. Give each parser a
        ``handler`` default: ``handler(args) -> int`` (the exit code).
        """

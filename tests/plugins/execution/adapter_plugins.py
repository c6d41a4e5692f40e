"""Adapter plugins for the start-up checks of ``planes worker``: one sound, the others each broken one way.

Tests name them in ``[plugins] modules`` as ``tests.plugins.execution.adapter_plugins:<Class>``.
"""

from __future__ import annotations

from planes.kernel.contracts import EvidencePlane
from planes.kernel.plugin import Plugin, Provision
from planes.plugins.execution.tools import ToolAdapter, ToolDescription, ToolResult


class _Described(ToolAdapter):
    def describe(self, contract) -> ToolDescription:
        return ToolDescription(type(self).__name__, "a test adapter")


class GreetingAdapter(_Described):
    def __init__(self, greeting: str):
        self.greeting = greeting

    async def invoke(self, call, context) -> ToolResult:
        return ToolResult(output={"text": self.greeting})


class GreetingPlugin(Plugin):
    """Reads its ``[plugin.greeting]`` settings in setup, as docs/plugins.md says a plugin does."""

    name = "greeting"
    version = "1.0.0"
    provides = (Provision(ToolAdapter, supports=("1.0", "2.0"), name="greet"),)

    def setup(self, kernel) -> None:
        self.greeting = str(kernel.settings.plugin_settings(self.name)["greeting"])
        self.state_dir = kernel.state_dir

    def implementation(self, provision):
        return GreetingAdapter(self.greeting)


class NoInvokeAdapter(_Described):
    async def reconcile(self, call, context):
        raise NotImplementedError


class NoInvokePlugin(Plugin):
    name = "no-invoke"
    provides = (Provision(ToolAdapter, supports=("1.0", "2.0"), name="no_invoke"),)

    def implementation(self, provision):
        return NoInvokeAdapter()


class PlainInvokeAdapter(_Described):
    def invoke(self, call, context):  # should be async def
        return ToolResult(output={})


class PlainInvokePlugin(Plugin):
    name = "plain-invoke"
    provides = (Provision(ToolAdapter, supports=("1.0", "2.0"), name="plain_invoke"),)

    def implementation(self, provision):
        return PlainInvokeAdapter()


class FailingSetupPlugin(Plugin):
    name = "failing-setup"
    provides = (Provision(ToolAdapter, supports=("1.0", "2.0"), name="failing"),)

    def setup(self, kernel) -> None:
        raise RuntimeError("no licence file")

    def implementation(self, provision):
        return GreetingAdapter("never")


class PlaneClientPlugin(Plugin):
    """Asks for a plane client in setup, which a worker does not have."""

    name = "plane-client"
    provides = (Provision(ToolAdapter, supports=("1.0", "2.0"), name="plane_client"),)

    def setup(self, kernel) -> None:
        kernel.client(EvidencePlane)

    def implementation(self, provision):
        return GreetingAdapter("never")


class FutureContractPlugin(Plugin):
    name = "future-contract"
    provides = (Provision(ToolAdapter, supports=("2.0", "3.0"), name="future"),)

    def implementation(self, provision):
        return GreetingAdapter("never")


class OtherGreetingPlugin(GreetingPlugin):
    """A second plugin with an adapter named ``greet``: which one a task gets must not be left to discovery order."""

    name = "other-greeting"

    def setup(self, kernel) -> None:
        self.greeting = "other"

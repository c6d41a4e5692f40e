"""The python adapter: an in-process function, for tests and examples.

``target = {module = "pkg.mod", function = "name", reconcile = "name"}``. The
worker imports only modules under the prefixes its operator allows
(``--python-module``; by default only :mod:`planes.plugins.execution.examples`),
so a tool contract cannot make a worker run arbitrary code. The function
takes ``(arguments, context)`` and returns a dict (or awaits to one); the
optional reconcile function takes ``(call, context)`` and returns a
:class:`~planes.plugins.execution.tools.Reconciliation`.
"""

from __future__ import annotations

import importlib
import inspect

from planes.kernel.errors import InvalidArgument, PermissionDenied

from ..tools import Reconciliation, ToolAdapter, ToolCall, ToolContext, ToolDescription, ToolResult

DEFAULT_MODULES = ("planes.plugins.execution.examples",)


class PythonAdapter(ToolAdapter):
    def __init__(self, allowed_modules: tuple[str, ...] = DEFAULT_MODULES):
        self.allowed_modules = tuple(allowed_modules)

    def _resolve(self, contract, attribute: str):
        target = contract.target
        module_name, name = str(target.get("module", "")), str(target.get(attribute, ""))
        if not module_name or not name:
            raise InvalidArgument(f"tool {contract.name}: target needs 'module' and '{attribute}'")
        if not any(module_name == p or module_name.startswith(p + ".") for p in self.allowed_modules):
            raise PermissionDenied(f"tool {contract.name}: module {module_name!r} is not allowed on this worker")
        function = getattr(importlib.import_module(module_name), name, None)
        if not callable(function):
            raise InvalidArgument(f"tool {contract.name}: {module_name}.{name} is not a function")
        return function

    def describe(self, contract) -> ToolDescription:
        self._resolve(contract, "function")
        target = contract.target
        return ToolDescription("python", f"{target['module']}.{target['function']}")

    async def invoke(self, call: ToolCall, context: ToolContext) -> ToolResult:
        function = self._resolve(call.contract, "function")
        context.notes["isolation"] = "in-process"
        result = function(call.arguments, context)
        if inspect.isawaitable(result):
            result = await result
        return ToolResult(output=dict(result or {}))

    async def reconcile(self, call: ToolCall, context: ToolContext) -> Reconciliation:
        if "reconcile" not in call.contract.target:
            return Reconciliation.UNKNOWN
        result = self._resolve(call.contract, "reconcile")(call, context)
        if inspect.isawaitable(result):
            result = await result
        return Reconciliation(result)

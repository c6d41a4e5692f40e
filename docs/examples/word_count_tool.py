"""A complete tool adapter plugin: counts the words of a text argument.

Register it in your package's pyproject.toml::

    [project.entry-points."planes.plugins"]
    word-count = "word_count_tool:WordCountPlugin"

then name it in a tool contract (``adapter = "word_count"``). The test suite
runs this file (tests/plugins/execution/test_guide.py).
"""

from __future__ import annotations

from planes.kernel.errors import InvalidArgument
from planes.kernel.plugin import Plugin, Provision
from planes.plugins.execution.tools import (
    Reconciliation,
    ToolAdapter,
    ToolCall,
    ToolContext,
    ToolDescription,
    ToolResult,
)


class WordCountAdapter(ToolAdapter):
    def describe(self, contract) -> ToolDescription:
        field = contract.target.get("field", "text")
        if not isinstance(field, str):
            raise InvalidArgument(f"tool {contract.name}: target.field must be a string")
        return ToolDescription("word_count", f"counts the words of argument {field!r}")

    async def invoke(self, call: ToolCall, context: ToolContext) -> ToolResult:
        context.check_cancelled()
        field = call.contract.target.get("field", "text")
        text = call.arguments.get(field)
        if not isinstance(text, str):
            raise InvalidArgument(f"argument {field!r} must be a string")
        context.notes["isolation"] = "in-process"
        return ToolResult(output={"words": len(text.split())})

    async def reconcile(self, call: ToolCall, context: ToolContext) -> Reconciliation:
        # Counting changes nothing outside: running it again is always safe.
        return Reconciliation.NOT_APPLIED


class WordCountPlugin(Plugin):
    name = "word-count"
    version = "1.0.0"
    provides = (Provision(ToolAdapter, supports=("1.0", "2.0"), name="word_count"),)

    def implementation(self, provision: Provision) -> WordCountAdapter:
        return WordCountAdapter()

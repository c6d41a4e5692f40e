"""The built-in tool adapters: python, subprocess (sandboxed), http (egress allow-list), mcp (stdio)."""

from .http_tool import HttpAdapter
from .mcp_tool import McpAdapter
from .python_tool import PythonAdapter
from .subprocess_tool import SubprocessAdapter

__all__ = ["HttpAdapter", "McpAdapter", "PythonAdapter", "SubprocessAdapter"]

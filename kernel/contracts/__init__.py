"""The plane contracts the kernel knows, one module per plane."""

from .diagnostics import DiagnosticsPlane

__all__ = ["CONTRACTS", "DiagnosticsPlane"]

#: Every plane contract this kernel ships, in the order the CLI lists them.
CONTRACTS = (DiagnosticsPlane,)

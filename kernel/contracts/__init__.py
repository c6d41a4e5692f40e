"""The plane contracts the kernel knows, one module per plane."""

from .control import ControlPlane
from .data import DataPlane
from .diagnostics import DiagnosticsPlane
from .evidence import EvidencePlane
from .execution import TaskPlane, WorkerPlane

__all__ = ["CONTRACTS", "ControlPlane", "DataPlane", "DiagnosticsPlane", "EvidencePlane", "TaskPlane", "WorkerPlane"]

#: Every plane contract this kernel ships, in the order the CLI lists them.
CONTRACTS = (ControlPlane, TaskPlane, WorkerPlane, DataPlane, EvidencePlane, DiagnosticsPlane)

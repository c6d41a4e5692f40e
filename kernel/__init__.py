"""planes.kernel: the microkernel. Plugin host, plane contracts, server assembly,
authentication, error mapping, settings and CLI; no plane logic."""

__version__ = "0.1.0"

from .call import CallContext, TraceContext, current_call
from .clients import LocalPlaneClient, PlaneClient, RemotePlaneClient, connect
from .contract import ContractVersion, Encoded, PlaneContract, PlaneSpec
from .errors import (
    AlreadyExists,
    Cancelled,
    Conflict,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    LimitExceeded,
    NotFound,
    PermissionDenied,
    PlanesError,
    PluginError,
    SettingsError,
    Unauthenticated,
    Unavailable,
    Unimplemented,
    VersionMismatch,
)
from .identity import ALL_TENANTS, ROLES, Identity
from .kernel import Kernel
from .plugin import Plugin, Provision
from .settings import Settings, load_settings

__all__ = [
    "ALL_TENANTS", "ROLES", "AlreadyExists", "CallContext", "Cancelled", "Conflict", "ContractVersion",
    "DeadlineExceeded", "Encoded", "FailedPrecondition", "Identity", "Internal", "InvalidArgument", "Kernel",
    "LimitExceeded", "LocalPlaneClient", "NotFound", "PermissionDenied", "PlaneClient", "PlaneContract",
    "PlaneSpec", "PlanesError", "Plugin", "PluginError", "Provision", "RemotePlaneClient", "Settings",
    "SettingsError", "TraceContext", "Unauthenticated", "Unavailable", "Unimplemented", "VersionMismatch",
    "__version__", "connect", "current_call", "load_settings",
]

"""Native hot paths (Cython over Arrow buffers), each with a pure-Python twin.

``load("chain")`` returns the compiled module ``planes.native.chain`` or, when
``PLANES_NO_EXTENSIONS`` is set to a non-empty value other than ``0``, its twin
``planes.native.chain_py``. A missing compiled module is an ImportError, not a
silent fallback: a build that lost its extensions must not pass for a fast one.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

__all__ = ["NATIVE_MODULES", "extensions_disabled", "load"]

#: The compiled modules a build must produce (each with a ``<name>_py`` twin).
NATIVE_MODULES = ("chain", "codec", "eventbatch", "sha256")


def extensions_disabled() -> bool:
    return os.environ.get("PLANES_NO_EXTENSIONS", "") not in ("", "0")


def load(name: str) -> ModuleType:
    if extensions_disabled():
        return importlib.import_module(f"{__name__}.{name}_py")
    return importlib.import_module(f"{__name__}.{name}")

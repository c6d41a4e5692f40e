"""Every native test runs against the compiled module and its pure-Python twin.

The ``chain`` fixture is parametrized with ids ``native`` and ``python``. With
``PLANES_NO_EXTENSIONS`` set the ``native`` cases are skipped (that run is for
installations without the extensions); ``test_loader.py`` fails when the
compiled module should be there and is not.
"""

from __future__ import annotations

import importlib

import pytest

from planes.native import extensions_disabled

IMPLEMENTATIONS = {"native": "planes.native.chain", "python": "planes.native.chain_py"}
OTHER = {"native": "python", "python": "native"}


def _module(kind: str):
    if kind == "native" and extensions_disabled():
        pytest.skip("PLANES_NO_EXTENSIONS is set: the compiled module is not under test")
    return importlib.import_module(IMPLEMENTATIONS[kind])


@pytest.fixture(params=sorted(IMPLEMENTATIONS))
def chain(request):
    """planes.native.chain (id ``native``) or planes.native.chain_py (id ``python``)."""
    return _module(request.param)


@pytest.fixture
def twin(request, chain):
    """The other implementation than ``chain``, for parity checks."""
    return _module(OTHER[request.node.callspec.params["chain"]])

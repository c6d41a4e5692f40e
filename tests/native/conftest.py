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

KINDS = ("native", "python")
OTHER = {"native": "python", "python": "native"}


def implementation(module: str, kind: str):
    """``planes.native.<module>`` (kind ``native``) or its twin ``<module>_py`` (kind ``python``).

    The native kind is skipped under ``PLANES_NO_EXTENSIONS``: that run is for
    installations without the extensions.
    """
    if kind == "native" and extensions_disabled():
        pytest.skip("PLANES_NO_EXTENSIONS is set: the compiled module is not under test")
    return importlib.import_module(f"planes.native.{module}{'' if kind == 'native' else '_py'}")


@pytest.fixture(params=KINDS)
def chain(request):
    """planes.native.chain (id ``native``) or planes.native.chain_py (id ``python``)."""
    return implementation("chain", request.param)


@pytest.fixture
def twin(request, chain):
    """The other implementation than ``chain``, for parity checks."""
    return implementation("chain", OTHER[request.node.callspec.params["chain"]])

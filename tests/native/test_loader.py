"""The loader shim hands out the compiled modules unless the switch asks for the twins.

The first test is the guard: in a normal run it fails when a compiled module
did not get built, so a build that lost its extensions cannot pass for a fast one.
"""

from __future__ import annotations

import importlib.machinery

import pytest

from planes import native


@pytest.mark.skipif(native.extensions_disabled(), reason="PLANES_NO_EXTENSIONS is set: the twins are under test")
@pytest.mark.parametrize("name", native.NATIVE_MODULES)
def test_compiled_modules_are_loaded(name):
    module = native.load(name)
    assert module.__name__ == f"planes.native.{name}"
    assert module.__file__.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES)), module.__file__


@pytest.mark.parametrize("name", native.NATIVE_MODULES)
def test_the_switch_selects_the_twin(monkeypatch, name):
    monkeypatch.setenv("PLANES_NO_EXTENSIONS", "1")
    module = native.load(name)
    assert module.__name__ == f"planes.native.{name}_py"
    assert module.__file__.endswith(f"{name}_py.py")


@pytest.mark.parametrize("value", ["", "0"], ids=["empty", "zero"])
def test_an_empty_or_zero_switch_is_off(monkeypatch, value):
    monkeypatch.setenv("PLANES_NO_EXTENSIONS", value)
    assert not native.extensions_disabled()

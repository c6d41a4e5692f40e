"""The canonical leaf encoding: round trips, and a clear error for anything else."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from planes.plugins.evidence import leaf as leaves

text = st.text(max_size=40)


@st.composite
def leaf_values(draw):
    fields = tuple(
        leaves.CommittedField(draw(text), draw(st.integers(0, 4)), draw(st.sampled_from([1, 2])),
                              draw(st.binary(min_size=32, max_size=32)))
        for _ in range(draw(st.integers(0, 5)))
    )
    return leaves.Leaf(draw(st.integers(0, 2**64 - 1)), draw(text), draw(text), draw(text), draw(text), draw(text),
                       draw(text), draw(text), draw(st.integers(-2**63, 2**63 - 1)), draw(text),
                       draw(st.integers(0, 2**64 - 1)), draw(st.binary(max_size=40)), draw(text), fields)


@given(leaf_values())
def test_round_trip(leaf):
    assert leaves.decode(leaves.encode(leaf)) == leaf


@given(leaf_values(), st.data())
def test_truncation_is_a_clear_error(leaf, data):
    encoded = leaves.encode(leaf)
    cut = data.draw(st.integers(0, len(encoded) - 1))
    with pytest.raises(ValueError):
        leaves.decode(encoded[:cut])


@given(st.binary(max_size=200))
def test_random_bytes_never_crash(blob):
    try:
        leaves.decode(blob)
    except ValueError:
        pass


def test_trailing_bytes_and_bad_magic_are_refused():
    encoded = leaves.encode(leaves.Leaf(1, "e", "t", "c", "", "", "", "a", 0, "x.y", 0, b"", "", ()))
    with pytest.raises(ValueError, match="trailing"):
        leaves.decode(encoded + b"\x00")
    with pytest.raises(ValueError, match="magic"):
        leaves.decode(b"XXXX" + encoded[4:])


def test_commitment_binds_salt_name_kind_and_value():
    salt = b"s" * 16
    base = leaves.commitment(salt, "prompt", leaves.KIND_STRING, b"hello")
    assert base != leaves.commitment(b"t" * 16, "prompt", leaves.KIND_STRING, b"hello")
    assert base != leaves.commitment(salt, "prompts", leaves.KIND_STRING, b"hello")
    assert base != leaves.commitment(salt, "prompt", leaves.KIND_BYTES, b"hello")
    assert base != leaves.commitment(salt, "prompt", leaves.KIND_STRING, b"hellO")
    # The name's length is bound, so the name/value boundary cannot shift.
    assert leaves.commitment(salt, "ab", 1, b"c") != leaves.commitment(salt, "a", 1, b"bc")

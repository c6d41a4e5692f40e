"""Multi-buffer SHA-256 (planes.native.sha256 and its twin) against hashlib.

Each implementation this machine runs (AVX-512, AVX2, OpenSSL in the compiled
module; hashlib in the twin) is checked byte for byte against hashlib on
lengths around every padding boundary, mixed lengths within one group of 16
lanes and group sizes that leave every possible remainder. A subprocess
checks that ``PLANES_SHA256`` caps the implementation the chain and the batch
encoder use, and that their results do not change with it.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from array import array
from hashlib import sha256

import pytest

from planes import native

from .conftest import KINDS, implementation

BOUNDARIES = (0, 1, 54, 55, 56, 57, 63, 64, 65, 118, 119, 120, 121, 127, 128, 129, 183, 184, 191, 192, 255, 256, 300)


def messages_and_offsets(messages: list[bytes]) -> tuple[bytes, array]:
    offsets = array("Q", [0])
    for message in messages:
        offsets.append(offsets[-1] + len(message))
    return b"".join(messages), offsets


def expected(messages: list[bytes], head: bytes = b"") -> bytes:
    return b"".join(sha256(head + message).digest() for message in messages)


def every_implementation():
    for kind in KINDS:
        module = implementation("sha256", kind)
        for name in module.implementations():
            yield module, name


@pytest.fixture(params=KINDS)
def module(request):
    return implementation("sha256", request.param)


def test_every_length_to_300_bytes_in_every_implementation(module):
    rng = random.Random(1)
    messages = [rng.randbytes(length) for length in range(301)]
    data, offsets = messages_and_offsets(messages)
    for name in module.implementations():
        assert module.hash_many(data, offsets, implementation=name) == expected(messages), name


@pytest.mark.parametrize("head", [b"", b"\x00", b"\x01", bytes(range(32)), bytes(range(64)), bytes(70)],
                         ids=["none", "leaf", "node", "32-bytes", "64-bytes", "70-bytes"])
def test_a_head_is_hashed_before_each_message(module, head):
    rng = random.Random(len(head))
    messages = [rng.randbytes(length) for length in BOUNDARIES * 2]
    data, offsets = messages_and_offsets(messages)
    for name in module.implementations():
        assert module.hash_many(data, offsets, head=head, implementation=name) == expected(messages, head), name


def test_mixed_lengths_within_a_group_and_every_group_size(module):
    rng = random.Random(2)
    for count in range(0, 41):
        messages = [rng.randbytes(rng.choice(BOUNDARIES)) for _ in range(count)]
        data, offsets = messages_and_offsets(messages)
        for name in module.implementations():
            assert module.hash_many(data, offsets, implementation=name) == expected(messages), (name, count)


def test_one_long_message_among_short_ones(module):
    messages = [b"a"] * 7 + [bytes(range(256)) * 40] + [b""] * 8
    data, offsets = messages_and_offsets(messages)
    for name in module.implementations():
        assert module.hash_many(data, offsets, head=b"\x00", implementation=name) == expected(messages, b"\x00")


def test_the_compiled_module_offers_avx512_where_the_cpu_has_it():
    compiled = implementation("sha256", "native")
    flags = open("/proc/cpuinfo").read().split() if os.path.exists("/proc/cpuinfo") else []
    assert compiled.implementations()[-1] == "openssl"
    if "avx512f" in flags and "avx512vl" in flags and not os.environ.get("PLANES_SHA256"):
        assert compiled.implementation() == "avx512" == compiled.implementations()[0]


def test_errors_match_the_twin(module):
    with pytest.raises(ValueError, match="implementation must be one of"):
        module.hash_many(b"abc", array("Q", [0, 3]), implementation="sha-ni")
    with pytest.raises(ValueError, match=r"offsets\[1\] = 4 is beyond the end of data \(3 bytes\)"):
        module.hash_many(b"abc", array("Q", [0, 4]))
    with pytest.raises(ValueError, match=r"offsets\[2\] = 1 is less than offsets\[1\] = 2"):
        module.hash_many(b"abc", array("Q", [0, 2, 1]))
    with pytest.raises(ValueError, match="offsets must be n \\+ 1 >= 1 uint64 values"):
        module.hash_many(b"abc", b"")
    with pytest.raises(TypeError, match="offsets must be a buffer of uint64"):
        module.hash_many(b"abc", [0, 3])
    assert module.hash_many(b"", array("Q", [0])) == b""


CAPPED = """
import json, sys
from array import array
from planes.native import chain, chain_py, sha256
leaves = [bytes([i % 251]) * (i % 300) for i in range(3000)]
data = b"".join(leaves)
offsets = array("Q", [0])
for leaf in leaves:
    offsets.append(offsets[-1] + len(leaf))
hashes, heads = chain.hash_and_chain(bytes(32), data, offsets)
same = (hashes, heads) == chain_py.hash_and_chain(bytes(32), data, offsets)
same = same and chain.merkle_root(hashes) == chain_py.merkle_root(hashes)
print(json.dumps([sha256.implementation(), same]))
"""


@pytest.mark.skipif(native.extensions_disabled(), reason="PLANES_NO_EXTENSIONS is set: the compiled modules are not under test")
@pytest.mark.parametrize("cap", ["openssl", "avx2"])
def test_planes_sha256_caps_the_implementation_without_changing_results(cap):
    environment = dict(os.environ, PLANES_SHA256=cap)
    result = subprocess.run([sys.executable, "-c", CAPPED], env=environment, capture_output=True, text=True,
                            check=True)
    chosen, same = json.loads(result.stdout)
    supported = implementation("sha256", "native").implementations()
    assert chosen == (cap if cap in supported else "openssl")
    assert same

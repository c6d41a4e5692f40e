"""The content digest algorithms of ``planes.common.v1.Digest``, and their running hashes.

One table for every plane that declares or checks a digest, so an
algorithm is added (or refused) in one place.
"""

from __future__ import annotations

import hashlib

import blake3

from planes.common.v1 import common_pb2

SHA256 = common_pb2.DIGEST_ALGORITHM_SHA256
BLAKE3 = common_pb2.DIGEST_ALGORITHM_BLAKE3

#: Algorithm -> a constructor of its running hash (``update``, ``digest``).
HASHES = {SHA256: hashlib.sha256, BLAKE3: blake3.blake3}
#: Algorithm -> its name in settings, command lines and messages.
NAMES = {SHA256: "sha256", BLAKE3: "blake3"}


def digest(algorithm: int, data) -> common_pb2.Digest:
    """``data``'s digest under ``algorithm`` (one of :data:`HASHES`)."""
    return common_pb2.Digest(algorithm=algorithm, value=HASHES[algorithm](data).digest())

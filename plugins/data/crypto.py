"""Encryption at rest: a data key per payload, wrapped by the plane's master key.

A confidential or restricted payload is stored as a sequence of AES-256-GCM
records, each the ciphertext of one :data:`SEGMENT` of plaintext (the last may
be shorter, even empty) followed by its 16-byte tag. Segment ``i`` is sealed
with the payload's own data key, the nonce ``0^4 || i`` (64-bit big-endian;
unique because each key seals one payload) and the associated data
``payload id || i || final``, so a record moved, dropped, duplicated or a
file cut short fails to open instead of yielding other plaintext.

The data key is random per payload and stored only wrapped: AES-256-GCM under
the master key with the payload id as associated data. Deleting a payload
deletes its wrapped key, so copies of the file that survive elsewhere (a
backup, a disk image) stay unreadable. The master key is a 0600 file made on
first start, or one named in settings.

The key's check value (:attr:`MasterKey.check_value`, an HMAC of a fixed
label, which reveals nothing of the key) is kept in the catalogue, so a start
with another key than the one that wrapped the stored data keys is refused at
once rather than failing each get. A missing key is never replaced by a new
one while encrypted payloads depend on it (see :meth:`MasterKey.load_or_create`).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from planes.kernel.errors import Internal, SettingsError
from planes.kernel.secrets import read_secret, secret_missing, write_secret

__all__ = ["SEGMENT", "TAG", "MasterKey", "SegmentCipher", "StoredDataCorrupt"]

#: Plaintext bytes per sealed record.
SEGMENT = 1 << 20
TAG = 16
_WRAP_AAD = b"planes-data-key\x00"
_CHECK_LABEL = b"planes-data-master-key-check\x00"


class StoredDataCorrupt(Internal):
    """A stored payload failed authentication: it was changed or cut on disk."""


class MasterKey:
    """The key that wraps every payload's data key."""

    def __init__(self, key: bytes):
        if len(key) != 32:
            raise ValueError("the data master key must be 32 bytes (AES-256)")
        self._aead = AESGCM(key)
        #: Identifies the key without revealing it: stored beside the data keys it wraps.
        self.check_value = hmac.new(key, _CHECK_LABEL, hashlib.sha256).digest()[:16]

    @classmethod
    def load_or_create(cls, path: Path, *, dependents: int = 0) -> MasterKey:
        """The key at ``path``; a new one only when none is there and no payload depends on one.

        ``dependents``: how many stored payloads have a data key wrapped by the
        master key. With any, a missing (or empty) key file is refused: a new
        key would leave each of them unreadable.
        """
        if secret_missing(path):
            if dependents:
                raise SettingsError(
                    f"data master key {path} is missing or empty, and {dependents} encrypted payload(s) "
                    "depend on it: restore it from backup (a new key would leave them unreadable)")
            write_secret(path, AESGCM.generate_key(bit_length=256))
        return cls(read_secret(path))

    def wrap(self, data_key: bytes, payload_id: str) -> bytes:
        nonce = os.urandom(12)
        return nonce + self._aead.encrypt(nonce, data_key, _WRAP_AAD + payload_id.encode())

    def unwrap(self, wrapped: bytes, payload_id: str) -> bytes:
        try:
            return self._aead.decrypt(wrapped[:12], wrapped[12:], _WRAP_AAD + payload_id.encode())
        except InvalidTag:
            raise StoredDataCorrupt(f"the data key of payload {payload_id} does not open with the master "
                                    "key (wrong master key, or the key record was changed)") from None


class SegmentCipher:
    """Seals and opens one payload's segments (see the module docstring)."""

    def __init__(self, data_key: bytes, payload_id: str):
        self._aead = AESGCM(data_key)
        self._id = payload_id.encode()

    def _aad(self, index: int, final: bool) -> bytes:
        return self._id + struct.pack(">QB", index, final)

    def seal(self, index: int, plaintext, final: bool) -> bytes:
        return self._aead.encrypt(struct.pack(">IQ", 0, index), bytes(plaintext), self._aad(index, final))

    def open(self, index: int, record: bytes, final: bool, payload_id: str) -> bytes:
        try:
            return self._aead.decrypt(struct.pack(">IQ", 0, index), record, self._aad(index, final))
        except InvalidTag:
            raise StoredDataCorrupt(f"payload {payload_id}: stored segment {index} failed authentication "
                                    "(changed, moved or truncated on disk)") from None

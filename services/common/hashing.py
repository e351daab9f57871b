"""Stable chained block hashes of token ids (DESIGN.md "Block identity").

hash_0 = blake2b(ROOT || tokens_0), hash_i = blake2b(hash_{i-1} || tokens_i), tokens as uint32
little-endian, keyed with a fixed personalisation string. Only full blocks are hashed. Every
process, restart and replica computes the same hashes; Python's hash() would not.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

BLOCK_HASH_BYTES = 32
_PERSON = b"kvpack-block-v1"  # at most 16 bytes
_ROOT = bytes(BLOCK_HASH_BYTES)


def block_hashes(token_ids: Sequence[int], block_tokens: int) -> list[bytes]:
    """Chained hashes of every full `block_tokens`-sized block of `token_ids`."""
    if block_tokens <= 0:
        raise ValueError(f"block_tokens must be positive, got {block_tokens}")
    hashes: list[bytes] = []
    parent = _ROOT
    for start in range(0, len(token_ids) - block_tokens + 1, block_tokens):
        block = token_ids[start : start + block_tokens]
        digest = hashlib.blake2b(
            parent + struct.pack(f"<{len(block)}I", *block),
            digest_size=BLOCK_HASH_BYTES,
            person=_PERSON,
        ).digest()
        hashes.append(digest)
        parent = digest
    return hashes


def namespace_fingerprint(namespace: str) -> bytes:
    """16 bytes that identify a namespace inside a record header."""
    return hashlib.blake2b(namespace.encode(), digest_size=16, person=_PERSON).digest()

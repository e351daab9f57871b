"""Records and hashes for kvstore tests."""

from __future__ import annotations

import os

from kvpack.common import record
from kvpack.common.hashing import block_hashes


def make_record(namespace: str, payload: bytes, **fields) -> bytes:
    return record.encode(record.RecordHeader.for_namespace(namespace, **fields), payload)


def random_record(namespace: str, payload_bytes: int) -> bytes:
    return make_record(namespace, os.urandom(payload_bytes), codec="test", token_count=256)


def chain(num_blocks: int, salt: int = 0, block_tokens: int = 4) -> list[bytes]:
    tokens = [(salt * 1_000_003 + i) % 2**32 for i in range(num_blocks * block_tokens)]
    return block_hashes(tokens, block_tokens)

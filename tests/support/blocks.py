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


def assert_damage_is_a_counted_miss(client, raw, namespace: str, block_hash: bytes, data: bytes,
                                    damage) -> None:
    """Writes damage(stored value) straight into Redis (raw: a redis-py client) under the
    block's key and checks the store's answer: a miss, counted as corrupt, the key dropped so
    the next writer can replace it, and a fresh put readable again."""
    from kvpack.common.hashing import namespace_fingerprint
    from kvpack.kvstore.backends import block_key

    key = block_key(namespace_fingerprint(namespace), block_hash)
    raw.set(key, damage(raw.get(key)))
    assert client.get(namespace, block_hash) is None
    assert client.stats()["corrupt_blocks"] == 1
    assert raw.exists(key) == 0
    client.put(namespace, block_hash, data)
    assert client.get(namespace, block_hash) == data

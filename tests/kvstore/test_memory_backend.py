"""The embedded backend: byte capacity, LRU order, TTL."""

import time

import pytest
from kvpack.kvstore.backends.base import RecordTooLarge
from kvpack.kvstore.backends.memory import MemoryBackend


def test_capacity_is_never_exceeded_under_many_puts():
    backend = MemoryBackend(capacity_bytes=10_000)
    for i in range(2_000):
        backend.put(f"k{i}", bytes(100 + i % 400))
        assert backend.usage().bytes <= 10_000
    usage = backend.usage()
    assert usage.evictions > 1_900
    assert usage.bytes == sum(len(backend.get(f"k{i}") or b"") for i in range(2_000))


def test_least_recently_used_goes_first():
    backend = MemoryBackend(capacity_bytes=300)
    for key in "abc":
        backend.put(key, bytes(100))
    assert backend.get("a") is not None  # a is now the most recent
    backend.put("d", bytes(100))
    assert backend.exists(["a", "b", "c", "d"]) == [True, False, True, True]


def test_overwrite_does_not_double_count():
    backend = MemoryBackend(capacity_bytes=1000)
    backend.put("a", bytes(400))
    backend.put("a", bytes(300))
    assert backend.usage().bytes == 300 and backend.usage().blocks == 1


def test_record_larger_than_capacity_is_refused():
    with pytest.raises(RecordTooLarge):
        MemoryBackend(capacity_bytes=10).put("a", bytes(11))


def test_ttl_expires_entries():
    backend = MemoryBackend(capacity_bytes=1000, ttl_seconds=0.2)
    backend.put("a", b"x")
    assert backend.get("a") == b"x"
    time.sleep(0.3)
    assert backend.get("a") is None and backend.exists(["a"]) == [False]
    assert backend.usage().bytes == 0

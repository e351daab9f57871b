"""`memory://`: records in this process, bounded by bytes, least recently used evicted first."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

from kvpack.kvstore.backends.base import Backend, RecordTooLarge, Usage


class MemoryBackend(Backend):
    def __init__(self, capacity_bytes: int, ttl_seconds: float | None = None) -> None:
        if capacity_bytes <= 0:
            raise ValueError(f"capacity_bytes must be positive, got {capacity_bytes}")
        self.url = "memory://"
        self.capacity_bytes = capacity_bytes
        self.ttl_seconds = ttl_seconds
        # key -> (record, expiry on the monotonic clock or None); order = recency, oldest first
        self._entries: OrderedDict[str, tuple[bytes, float | None]] = OrderedDict()
        self._bytes = 0
        self._evictions = 0
        self._lock = threading.Lock()

    def put(self, key: str, record: bytes | memoryview) -> None:
        record = bytes(record)
        if len(record) > self.capacity_bytes:
            raise RecordTooLarge(
                f"record of {len(record)} bytes exceeds the store capacity of {self.capacity_bytes}"
            )
        expires = time.monotonic() + self.ttl_seconds if self.ttl_seconds else None
        with self._lock:
            self._remove(key)
            self._entries[key] = (record, expires)
            self._bytes += len(record)
            while self._bytes > self.capacity_bytes:
                _, (old, _) = self._entries.popitem(last=False)
                self._bytes -= len(old)
                self._evictions += 1

    def get(self, key: str) -> bytes | None:
        with self._lock:
            entry = self._live(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
            return entry[0]

    def exists(self, keys: list[str]) -> list[bool]:
        with self._lock:
            present = [self._live(key) is not None for key in keys]
            for key, hit in zip(keys, present, strict=True):
                if hit:  # a matched block is about to be read: keep it warm
                    self._entries.move_to_end(key)
            return present

    def delete(self, key: str) -> bool:
        with self._lock:
            return self._remove(key)

    def ping(self) -> None:
        return None

    def usage(self) -> Usage:
        with self._lock:
            return Usage(len(self._entries), self._bytes, self.capacity_bytes, self._evictions)

    def _live(self, key: str) -> tuple[bytes, float | None] | None:
        entry = self._entries.get(key)
        if entry is not None and entry[1] is not None and entry[1] <= time.monotonic():
            self._remove(key)
            return None
        return entry

    def _remove(self, key: str) -> bool:
        entry = self._entries.pop(key, None)
        if entry is None:
            return False
        self._bytes -= len(entry[0])
        return True

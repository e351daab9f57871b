"""Backends chosen by URL scheme."""

from __future__ import annotations

from urllib.parse import urlparse

from kvpack.kvstore.backends.base import (
    Backend,
    BackendUnavailable,
    RecordTooLarge,
    RecordWriter,
    Usage,
    block_key,
)

SCHEMES = ("memory://", "redis://host:port/db", "redis+cluster://host:port")

__all__ = ["Backend", "BackendUnavailable", "RecordTooLarge", "RecordWriter", "Usage", "block_key",
           "open_backend"]


def open_backend(url: str, *, capacity_bytes: int, ttl_seconds: float | None = None) -> Backend:
    """Raises ValueError for a URL no backend understands."""
    scheme = urlparse(url).scheme
    if scheme == "memory":
        from kvpack.kvstore.backends.memory import MemoryBackend

        return MemoryBackend(capacity_bytes, ttl_seconds)
    if scheme in ("redis", "redis+cluster"):
        from kvpack.kvstore.backends.redis import RedisBackend

        return RedisBackend(url, ttl_seconds)
    raise ValueError(f"unknown backend {url!r}; use one of {', '.join(SCHEMES)}")

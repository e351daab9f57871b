"""The storage contract under the kvstore service: opaque records by string key."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass


class BackendUnavailable(Exception):
    """The backend cannot be reached right now (the service answers UNAVAILABLE)."""


class RecordTooLarge(Exception):
    """The record can never fit in this backend."""


@dataclass(frozen=True)
class Usage:
    blocks: int
    bytes: int  # memory: bytes of records held; Redis: the server's used_memory
    capacity_bytes: int  # 0 = bounded by the backend itself (Redis maxmemory)
    evictions: int  # since the backend started


def block_key(namespace_fingerprint: bytes, block_hash: bytes) -> str:
    """One key per block; readable for operators (`redis-cli --scan --pattern 'kvpack:*'`)."""
    return f"kvpack:{namespace_fingerprint.hex()}:{block_hash.hex()}"


class Backend(ABC):
    url: str

    @abstractmethod
    def put(self, key: str, record: bytes | memoryview) -> None: ...

    @abstractmethod
    def get(self, key: str) -> bytes | None: ...

    @abstractmethod
    def exists(self, keys: list[str]) -> list[bool]:
        """Presence of each key, in order (one round trip where the backend allows)."""

    @abstractmethod
    def delete(self, key: str) -> bool: ...

    @abstractmethod
    def ping(self) -> None:
        """Return if the backend answers; raise BackendUnavailable otherwise."""

    @abstractmethod
    def usage(self) -> Usage: ...

    def close(self) -> None:  # noqa: B027 - optional hook
        pass

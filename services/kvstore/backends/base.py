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
    # Whether reads of several records gain from running concurrently (they wait on a socket).
    parallel_reads: bool = False

    @abstractmethod
    def put(self, key: str, record: bytes | memoryview) -> None: ...

    @abstractmethod
    def get(self, key: str) -> bytes | None: ...

    def get_with_room(self, key: str, room: int) -> tuple[memoryview, int] | None:
        """The record as `(buffer, start)`: it is `buffer[start:]`. A backend that reads the record
        into a fresh buffer leaves `start = room` writable bytes before it, so the service can frame
        the record in place (one copy into the gRPC message instead of two); one that already holds
        it as bytes returns it as is, `start = 0`. None = no such key."""
        record = self.get(key)
        return None if record is None else (memoryview(record), 0)

    def get_range_with_room(self, key: str, offset: int, length: int,
                            room: int) -> tuple[memoryview, int, int] | None:
        """Bytes `offset` to `offset + length` of the record (length 0: to its end; a range past
        the end stops there, an offset past it is empty) as `(buffer, start, record size)`: the
        range is `buffer[start:]`, with `room` writable bytes before it where the backend reads
        into a fresh buffer (as get_with_room). None = no such key. A backend that can reads only
        the range; this default reads the record and slices it (no copy)."""
        record = self.get(key)
        if record is None:
            return None
        view = memoryview(record)
        end = len(view) if length == 0 else min(len(view), offset + length)
        return view[min(offset, end) : end], 0, len(view)

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

    # -- ranged Put -------------------------------------------------------------------------
    def open_upload(self, key: str, total_bytes: int) -> RecordWriter:
        """A writer for one record of `total_bytes` bytes under `key`, fed in record order:
        nothing of it is visible or stored under `key` before RecordWriter.commit, which stores
        it in one step (as put). This default holds the pieces (not copied) and puts them joined
        at commit; the single-Redis backend streams them into one SET as they come."""
        return _HeldRecord(self, key)

    def put_parts(self, key: str, parts: list[memoryview]) -> None:
        """put() of the record that is `parts` joined; this default joins them (one copy)."""
        self.put(key, parts[0] if len(parts) == 1 else b"".join(parts))

    def close(self) -> None:  # noqa: B027 - optional hook
        pass


class RecordWriter(ABC):
    """One record being written in order (Backend.open_upload). Not thread-safe: the service
    feeds one writer from one thread at a time."""

    @abstractmethod
    def write(self, data: memoryview) -> None:
        """The record's next bytes (BackendUnavailable if the backend fails)."""

    @abstractmethod
    def commit(self) -> None:
        """Store the record (all of it written) under its key in one step."""

    @abstractmethod
    def abort(self) -> None:
        """Drop what was written; nothing is stored. Safe to call more than once."""


class _HeldRecord(RecordWriter):
    def __init__(self, backend: Backend, key: str) -> None:
        self._backend = backend
        self._key = key
        self._parts: list[memoryview] = []

    def write(self, data: memoryview) -> None:
        self._parts.append(data)

    def commit(self) -> None:
        parts, self._parts = self._parts, []
        self._backend.put_parts(self._key, parts)

    def abort(self) -> None:
        self._parts = []


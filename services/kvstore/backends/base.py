"""The storage contract under the kvstore service: opaque records by string key."""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass


class BackendUnavailable(Exception):
    """The backend cannot be reached right now (the service answers UNAVAILABLE)."""


class RecordTooLarge(Exception):
    """The record can never fit in this backend."""


class StagingLost(Exception):
    """The staged ranges of an upload are gone or incomplete (evicted or expired): nothing was
    stored."""


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

    # -- staged uploads (ranged Put) ---------------------------------------------------------
    # The ranges of one upload are held apart from the record's key and stored under it in one
    # step (commit_staged), so nothing partial is ever visible or stored under `key`. The service
    # checks the ranges (coverage, overlaps, the record's checksum); this only holds their bytes.
    # They stay in the service's process for every backend: staging them in Redis (SETRANGE into
    # a staging string, RENAME at the end) cost Redis 7 ms of CPU per SETRANGE of 2-16 MiB on the
    # 2-core VM (a fresh string zero-filled, then the bytes copied in) where a SET of the whole
    # record costs it 0.2 ms (it keeps the buffer it received) (`INFO commandstats`).

    def stage_range(self, upload: str, key: str, offset: int, data: memoryview) -> None:
        """Hold `data` (not copied) at `offset` of upload `upload` (an id unique to one upload) of
        the record for `key`."""
        with _STAGING_LOCK:
            self.__dict__.setdefault("_staged_ranges", {}).setdefault(upload, {})[offset] = data

    def commit_staged(self, upload: str, key: str, total_bytes: int) -> None:
        """Store the upload's ranges, joined, under `key` in one step (as put) and drop them.
        StagingLost if they do not make up `total_bytes` bytes; RecordTooLarge as put."""
        with _STAGING_LOCK:
            parts = self.__dict__.get("_staged_ranges", {}).pop(upload, {})
        at = 0
        for offset in sorted(parts):
            if offset != at:
                raise StagingLost(f"upload {upload}: bytes from {at} missing")
            at += len(parts[offset])
        if at != total_bytes:
            raise StagingLost(f"upload {upload}: {at} of {total_bytes} bytes staged")
        self.put_parts(key, [parts[offset] for offset in sorted(parts)])

    def put_parts(self, key: str, parts: list[memoryview]) -> None:
        """put() of the record that is `parts` joined; this default joins them (one copy)."""
        self.put(key, parts[0] if len(parts) == 1 else b"".join(parts))

    def discard_staged(self, upload: str, key: str) -> None:
        """Drop what is staged for the upload (nothing if nothing is)."""
        with _STAGING_LOCK:
            self.__dict__.get("_staged_ranges", {}).pop(upload, None)

    def close(self) -> None:  # noqa: B027 - optional hook
        pass


_STAGING_LOCK = threading.Lock()

"""Python client of the kvstore (DESIGN.md "Python client of the store").

    with KVStoreClient("127.0.0.1:50051") as store:
        store.put(namespace, block_hash, record_bytes)
        data = store.get(namespace, block_hash)        # None = miss
        n = store.match(namespace, [h0, h1, h2])       # leading hashes present

Every call has a deadline. Calls are idempotent (a put writes the same record under the same
content-derived key), so UNAVAILABLE is retried a few times with backoff; after that the store is
reported as `StoreUnavailable`, the one exception callers handle to fall back to recomputation.
Records returned by `get` are verified again here, so nothing corrupted in transit is ever used.
A record of up to `whole_record_bytes` goes as one message each way (PutWhole/GetWhole); larger ones
stream in chunks (Put/Get).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import grpc
from kvpack.common import record
from kvpack.common.grpc_server import CHANNEL_OPTIONS
from kvpack.kvstore import wire
from kvpack.kvstore.protocol import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_MAX_RECORD_BYTES,
    WHOLE_RECORD_BYTES,
)
from kvpack.kvstore.rpc_methods import KVStoreMethods
from kvpack.proto import kvstore_pb2

T = TypeVar("T")
_UNAVAILABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


class StoreError(Exception):
    """Base of the client's errors."""


class StoreUnavailable(StoreError):
    """The store (or its backend) did not answer in time: recompute instead."""


class InvalidRequest(StoreError, ValueError):
    """The store rejected the request (INVALID_ARGUMENT / RESOURCE_EXHAUSTED); the message says why."""


class Unauthenticated(StoreError, PermissionError):
    """Missing or wrong token."""


class KVStoreClient:
    def __init__(self, target: str, *, token: str | None = None, timeout_seconds: float = 5.0,
                 retries: int = 2, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 min_bytes_per_second: float = 50e6, streams: int = 1,
                 whole_record_bytes: int = WHOLE_RECORD_BYTES) -> None:
        """
        Args:
            target: HOST:PORT of a kvstore.
            token: shared secret, sent as `authorization: Bearer TOKEN`.
            timeout_seconds: deadline of one attempt (puts and gets get extra time for their size,
                at `min_bytes_per_second`).
            retries: extra attempts after UNAVAILABLE / deadline exceeded.
            streams: connections `get_many` spreads a large prefix over, in parallel (one
                connection moves at most a few hundred MB/s through Python's gRPC).
            whole_record_bytes: records up to this size go as one message (0: always stream).
        """
        if streams < 1:
            raise ValueError(f"streams must be at least 1, got {streams}")
        self.target = target
        self._timeout = timeout_seconds
        self._retries = retries
        self._chunk_bytes = chunk_bytes
        self._whole_bytes = whole_record_bytes
        # Namespaces whose records turned out too large for GetWhole: their gets stream right away
        # instead of asking for one message first (blocks of one namespace have similar sizes).
        self._streamed_namespaces: set[str] = set()
        self._min_rate = min_bytes_per_second
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        # A local subchannel pool per channel gives each its own TCP connection.
        self._channels = [grpc.insecure_channel(
            target, options=[*CHANNEL_OPTIONS, ("grpc.use_local_subchannel_pool", 1)])
            for _ in range(streams)]
        self._stubs = [KVStoreMethods(channel) for channel in self._channels]
        self._stub = self._stubs[0]
        self._pool = ThreadPoolExecutor(streams, thread_name_prefix="kvstore-get") if streams > 1 else None

    # -- API ---------------------------------------------------------------------------------
    def put(self, namespace: str, block_hash: bytes, data: bytes) -> None:
        deadline = self._timeout + len(data) / self._min_rate
        if 0 < len(data) <= self._whole_bytes:
            message = wire.encode_put_chunk(namespace, block_hash, len(data), 0, data)
            self._call(lambda: self._stub.put_whole(message, timeout=deadline,
                                                    metadata=self._metadata))
        else:
            self._call(lambda: self._stub.put(self._chunks(namespace, block_hash, data),
                                              timeout=deadline, metadata=self._metadata))

    def get(self, namespace: str, block_hash: bytes) -> bytes | None:
        if self._whole_bytes and namespace not in self._streamed_namespaces:
            request = kvstore_pb2.GetWholeRequest(namespace=namespace, block_hash=block_hash,
                                                  max_bytes=self._whole_bytes)
            deadline = self._timeout + self._whole_bytes / self._min_rate
            chunk = self._call(lambda: self._stub.get_whole(request, timeout=deadline,
                                                            metadata=self._metadata))
            if not chunk.found:
                return None
            if len(chunk.data) == chunk.total_bytes:
                return _verified(bytes(chunk.data), namespace)
            self._streamed_namespaces.add(namespace)  # too large for one message
        request = kvstore_pb2.GetRequest(namespace=namespace, block_hash=block_hash)
        blocks = self._call(lambda: self._receive(self._stub.get, request, 1))
        return _verified(blocks[0], namespace)

    def get_many(self, namespace: str, hashes: list[bytes]) -> list[bytes | None]:
        """Several blocks in one call, in order; None for each miss (or corrupt block)."""
        if not hashes:
            return []
        groups = _split(hashes, len(self._stubs))
        if len(groups) == 1:
            blocks = self._get_group(self._stub, namespace, hashes)
        else:
            futures = [self._pool.submit(self._get_group, stub, namespace, group)
                       for stub, group in zip(self._stubs, groups)]
            blocks = [block for future in futures for block in future.result()]
        return [_verified(data, namespace) for data in blocks]

    def _get_group(self, stub, namespace: str, hashes: list[bytes]) -> list[bytes | None]:
        request = kvstore_pb2.GetManyRequest(namespace=namespace, block_hashes=hashes)
        return self._call(lambda: self._receive(stub.get_many, request, len(hashes)))

    def match(self, namespace: str, hashes: list[bytes]) -> int:
        request = kvstore_pb2.MatchRequest(namespace=namespace, block_hashes=hashes)
        return self._call(lambda: self._stub.match(
            request, timeout=self._timeout, metadata=self._metadata)).matched

    def delete(self, namespace: str, block_hash: bytes) -> bool:
        request = kvstore_pb2.DeleteRequest(namespace=namespace, block_hash=block_hash)
        return self._call(lambda: self._stub.delete(
            request, timeout=self._timeout, metadata=self._metadata)).deleted

    def stats(self) -> dict:
        response = self._call(lambda: self._stub.stats(
            kvstore_pb2.StatsRequest(), timeout=self._timeout, metadata=self._metadata))
        return {field.name: getattr(response, field.name) for field in response.DESCRIPTOR.fields}

    def close(self) -> None:
        if self._pool:
            self._pool.shutdown(wait=True)
        for channel in self._channels:
            channel.close()

    def __enter__(self) -> KVStoreClient:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"KVStoreClient({json.dumps(self.target)})"

    # -- plumbing ----------------------------------------------------------------------------
    def _chunks(self, namespace: str, block_hash: bytes, data: bytes) -> Iterator[bytes]:
        """Encoded PutChunks; the first names the block."""
        view = memoryview(data)
        for offset in range(0, max(len(view), 1), self._chunk_bytes):
            first = offset == 0
            yield wire.encode_put_chunk(
                namespace if first else "", block_hash if first else b"",
                len(view) if first else 0, offset, view[offset : offset + self._chunk_bytes])

    def _receive(self, method, request, count: int) -> list[bytes | None]:
        """Reassemble the chunks of `count` blocks (in order, each announced by total_bytes)."""
        blocks: list[bytes | None] = [None] * count
        parts: list[memoryview] = []
        expected = received = 0
        # The deadline must cover the transfer, whose size is learnt only from the chunks: allow
        # the largest record a server accepts by default, per block.
        deadline = self._timeout + count * DEFAULT_MAX_RECORD_BYTES / self._min_rate
        for chunk in method(request, timeout=deadline, metadata=self._metadata):
            if not chunk.found:
                continue
            if chunk.offset == 0:
                parts, expected, received = [], chunk.total_bytes, 0
            if chunk.offset != received or chunk.index >= count:
                raise StoreUnavailable(f"kvstore at {self.target}: malformed Get stream")
            parts.append(chunk.data)
            received += len(chunk.data)
            if received == expected:
                blocks[chunk.index] = b"".join(parts)
        if received != expected:
            raise StoreUnavailable(f"kvstore at {self.target}: Get stream ended early")
        return blocks

    def _call(self, attempt: Callable[[], T]) -> T:
        for attempt_index in range(self._retries + 1):
            try:
                return attempt()
            except grpc.RpcError as error:
                code = error.code()
                if code in _UNAVAILABLE:
                    if attempt_index < self._retries:
                        time.sleep(0.05 * 2**attempt_index)
                        continue
                    raise StoreUnavailable(f"kvstore at {self.target}: {error.details()}") from None
                if code is grpc.StatusCode.UNAUTHENTICATED:
                    raise Unauthenticated(error.details()) from None
                if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED):
                    raise InvalidRequest(error.details()) from None
                raise StoreError(f"kvstore at {self.target}: {code.name}: {error.details()}") from None
        raise AssertionError("unreachable")


def _split(items: list, parts: int) -> list[list]:
    """At most `parts` contiguous groups of near-equal size, in order."""
    parts = min(parts, len(items))
    size, extra = divmod(len(items), parts)
    groups, start = [], 0
    for index in range(parts):
        end = start + size + (index < extra)
        groups.append(items[start:end])
        start = end
    return groups


def _verified(data: bytes | None, namespace: str) -> bytes | None:
    """Checked again after the transfer: nothing corrupted on the way is ever used."""
    if data is None:
        return None
    try:
        record.verify(data, namespace)
    except record.RecordError:
        return None
    return data

"""The kvpack.v1.KVStore gRPC servicer: validation, verification, chunking, metrics.

Nothing partial is ever stored: a Put is written only after every chunk arrived in order and the
whole record verified. A stored record that no longer verifies is dropped and served as a miss.
Served through kvpack.kvstore.rpc_methods: Put/PutWhole receive wire.PutChunkView (data is a view
into the received message) and Get/GetWhole/GetMany answer GetChunks encoded by kvpack.kvstore.wire.
PutWhole/GetWhole are the one-message forms of Put/Get and count under the same op labels. A
PutWhole with an upload_id is one range of a ranged Put (kvpack.kvstore.uploads): staged apart from
the record's key, verified in record order, committed in one step by the range that completes it.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager

import grpc
from kvpack.common import record
from kvpack.common.hashing import BLOCK_HASH_BYTES, namespace_fingerprint
from kvpack.kvstore import uploads, wire
from kvpack.kvstore.backends import Backend, BackendUnavailable, RecordTooLarge, Usage, block_key
from kvpack.kvstore.metrics import OPS, KVStoreMetrics
from kvpack.kvstore.protocol import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_MAX_RECORD_BYTES,
    DEFAULT_MAX_STAGED_BYTES,
    MAX_HASHES_PER_CALL,
    MAX_WHOLE_RECORD_BYTES,
    UPLOAD_TTL_SECONDS,
)
from kvpack.proto import kvstore_pb2, kvstore_pb2_grpc

MAX_NAMESPACE_CHARS = 512
# GetMany on a backend with parallel_reads: records read ahead of the one being sent, per stream.
PREFETCH_BLOCKS = 2
LOADER_THREADS = 8
# Get sends a record in chunks of this size. With the client reading them on its own thread
# (KVStoreClient), 1 MiB chunks moved 4 MiB records on the 2-core VM as fast as or faster than
# 512 KiB or 2 MiB ones, and faster than 256 KiB ones (each message costs a hand-off).
GET_CHUNK_BYTES = 1 << 20
# A loaded record: (buffer, start), the record being buffer[start:] (Backend.get_with_room).
_Loaded = tuple[memoryview, int]


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class KVStoreServicer(kvstore_pb2_grpc.KVStoreServicer):
    def __init__(self, backend: Backend, metrics: KVStoreMetrics, *,
                 max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 upload_ttl_seconds: float = UPLOAD_TTL_SECONDS,
                 max_staged_bytes: int = DEFAULT_MAX_STAGED_BYTES) -> None:
        self.backend = backend
        self.metrics = metrics
        self.max_record_bytes = max_record_bytes
        self.chunk_bytes = chunk_bytes
        self.uploads = uploads.Uploads(backend, metrics, ttl_seconds=upload_ttl_seconds,
                                       max_staged_bytes=max_staged_bytes)
        self._loader = ThreadPoolExecutor(LOADER_THREADS, thread_name_prefix="kvstore-load")

    def close(self) -> None:
        """Stop the loader threads (reads already running finish)."""
        self._loader.shutdown(wait=False)

    @contextmanager
    def _request(self, op: str, context: grpc.ServicerContext):
        """Times the request, counts its outcome, and turns _Abort/backend failures into
        statuses."""
        start = time.perf_counter()
        code, message = grpc.StatusCode.OK, ""
        try:
            yield
        except _Abort as error:
            code, message = error.code, str(error)
        except BackendUnavailable as error:
            self.metrics.backend_errors.labels(op).inc()
            code, message = grpc.StatusCode.UNAVAILABLE, f"backend unavailable: {error}"
        except Exception:
            code = grpc.StatusCode.UNKNOWN  # counted; grpc reports it (client cancellation, bugs)
            raise
        finally:
            self.metrics.request_seconds.labels(op).observe(time.perf_counter() - start)
            self.metrics.requests.labels(op, code.name).inc()
        if code is not grpc.StatusCode.OK:
            context.abort(code, message)

    # -- RPCs ---------------------------------------------------------------------------------
    def Match(self, request, context):
        with self._request("match", context):
            fingerprint = _namespace(request.namespace)
            _check_hashes(request.block_hashes)
            present = self.backend.exists([block_key(fingerprint, h) for h in request.block_hashes])
            matched = next((i for i, hit in enumerate(present) if not hit), len(present))
            self.metrics.match_query_blocks.inc(len(present))
            self.metrics.match_hit_blocks.inc(matched)
            return kvstore_pb2.MatchResponse(matched=matched)

    def Put(self, request_iterator, context):
        with self._request("put", context):
            return self._store(*self._receive(request_iterator))

    def PutWhole(self, request, context):
        with self._request("put", context):
            if _upload_of(request):
                return self._put_range(request)
            return self._store(*self._receive(iter((request,))))

    def _put_range(self, chunk: wire.PutChunkView):
        """One range of a ranged Put: the same checks of namespace, hash and size as a Put's first
        chunk (a record over the limit is refused before anything is staged), then the upload's
        own (kvpack.kvstore.uploads)."""
        fingerprint = _namespace(chunk.namespace)
        _check_hash(chunk.block_hash, "block_hash")
        self._check_total(chunk.total_bytes)
        try:
            return self.uploads.put_range(
                block_key(fingerprint, chunk.block_hash), chunk.namespace, chunk.block_hash,
                chunk.total_bytes, chunk.offset, chunk.data, _upload_of(chunk))
        except uploads.Refused as error:
            raise _Abort(error.code, str(error)) from None

    def sweep_uploads(self) -> None:
        """Abandon ranged uploads not completed in time (the server calls it periodically)."""
        self.uploads.sweep()

    def _check_total(self, total: int) -> None:
        if total == 0:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "total_bytes: must be positive")
        if total > self.max_record_bytes:
            raise _Abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                         f"total_bytes: {total} exceeds the maximum record size of "
                         f"{self.max_record_bytes} bytes")

    def _store(self, namespace: str, block_hash: bytes, data: bytes | memoryview):
        try:
            record.verify(data, namespace)
        except record.RecordError as error:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"data: {error}") from None
        try:
            self.backend.put(block_key(namespace_fingerprint(namespace), block_hash), data)
        except RecordTooLarge as error:
            raise _Abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(error)) from None
        self.metrics.put_bytes.inc(len(data))
        return kvstore_pb2.PutResponse(stored_bytes=len(data))

    def Get(self, request, context):
        with self._request("get", context):
            fingerprint = _namespace(request.namespace)
            _check_hash(request.block_hash, "block_hash")
            loaded = self._load(request.namespace, fingerprint, request.block_hash)
            yield from self._send(loaded, index=0,
                                  chunk_bytes=min(GET_CHUNK_BYTES, self.chunk_bytes))

    def GetWhole(self, request, context):
        with self._request("get", context):
            fingerprint = _namespace(request.namespace)
            _check_hash(request.block_hash, "block_hash")
            limit = min(request.max_bytes or DEFAULT_CHUNK_BYTES, MAX_WHOLE_RECORD_BYTES)
            if any(_range_of(request)):
                return self._range(fingerprint, request, limit)
            loaded = self._load(request.namespace, fingerprint, request.block_hash)
            if loaded is not None and _size(loaded) > limit:
                # Not counted as a hit: the caller comes back for it with Get, which counts it.
                return wire.encode_get_chunk(found=True, total_bytes=_size(loaded))
            return next(self._send(loaded, index=0, chunk_bytes=limit))  # one chunk: it fits

    def _range(self, fingerprint: bytes, request, limit: int) -> bytes:
        """GetWhole of a byte range: read only the range (where the backend can) and send it
        unverified: only the whole record carries a checksum, which the caller checks after
        assembling the ranges (and on failure fetches the record whole, which _load verifies,
        counts and drops). Hits and misses count once per record, on the range at offset 0."""
        offset, length = _range_of(request)
        key = block_key(fingerprint, request.block_hash)
        loaded = self.backend.get_range_with_room(key, offset, length, wire.HEAD_ROOM)
        if loaded is None:
            if offset == 0:
                # A missing key, or (Redis' STRLEN says 0 for both) an empty value, which no record
                # is: the whole read tells them apart and counts and drops an empty one as corrupt.
                self._load(request.namespace, fingerprint, request.block_hash)
                self.metrics.misses.inc()
            return wire.encode_get_chunk(found=False)
        buffer, start, total = loaded
        if offset >= total:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                         f"offset: {offset} is at or past the end of the record ({total} bytes)")
        size = len(buffer) - start
        if size > limit:
            return wire.encode_get_chunk(found=True, total_bytes=total)
        if offset == 0:
            self.metrics.hits.inc()
        self.metrics.get_bytes.inc(size)
        if start >= wire.HEAD_ROOM and not buffer.readonly:
            return wire.frame_get_chunk(buffer, start, total_bytes=total, offset=offset)
        return wire.encode_get_chunk(found=True, total_bytes=total, offset=offset,
                                     data=buffer[start:])

    def GetMany(self, request, context):
        with self._request("get_many", context):
            fingerprint = _namespace(request.namespace)
            _check_hashes(request.block_hashes)
            chunk_bytes = min(request.max_chunk_bytes or DEFAULT_CHUNK_BYTES,
                              MAX_WHOLE_RECORD_BYTES)
            loads = (self._prefetched if self.backend.parallel_reads else self._in_turn)(
                request.namespace, fingerprint, request.block_hashes)
            for index, loaded in enumerate(loads):
                yield from self._send(loaded, index, chunk_bytes)

    def _in_turn(self, namespace: str, fingerprint: bytes, hashes) -> Iterator[_Loaded | None]:
        for block_hash in hashes:
            yield self._load(namespace, fingerprint, block_hash)

    def _prefetched(self, namespace: str, fingerprint: bytes, hashes) -> Iterator[_Loaded | None]:
        """The loads of `hashes` in order, up to PREFETCH_BLOCKS of them read ahead on the loader
        threads while the stream sends the current one (reads wait on the backend's socket, off
        the GIL). A stream that ends early leaves at most that many reads to finish unused."""
        pending: deque[Future] = deque()
        upcoming = iter(hashes)
        while True:
            while len(pending) <= PREFETCH_BLOCKS:
                block_hash = next(upcoming, None)
                if block_hash is None:
                    break
                pending.append(self._loader.submit(self._load, namespace, fingerprint, block_hash))
            if not pending:
                return
            yield pending.popleft().result()

    def _load(self, namespace: str, fingerprint: bytes, block_hash: bytes) -> _Loaded | None:
        """The verified record as (buffer, start) (see Backend.get_with_room), or None (a miss). A
        record that fails verification is dropped."""
        key = block_key(fingerprint, block_hash)
        loaded = self.backend.get_with_room(key, wire.HEAD_ROOM)
        if loaded is not None:
            buffer, start = loaded
            try:
                record.verify(buffer[start:], namespace)
            except record.RecordError:
                self.metrics.corrupt_blocks.inc()
                self.backend.delete(key)  # recomputed and re-put by the next writer
                loaded = None
        return loaded

    def _send(self, loaded: _Loaded | None, index: int,
              chunk_bytes: int | None = None) -> Iterator[bytes]:
        """The answer for one block: encoded GetChunks (one found=false chunk for a miss). A record
        read with room before it and sent whole is framed in place (one copy)."""
        if loaded is None:
            self.metrics.misses.inc()
            yield wire.encode_get_chunk(found=False, index=index)
            return
        buffer, start = loaded
        size = _size(loaded)
        self.metrics.hits.inc()
        self.metrics.get_bytes.inc(size)
        chunk_bytes = chunk_bytes or self.chunk_bytes
        if size <= chunk_bytes and start >= wire.HEAD_ROOM and not buffer.readonly:
            yield wire.frame_get_chunk(buffer, start, index)
            return
        view = buffer[start:]
        for offset in range(0, size, chunk_bytes):
            yield wire.encode_get_chunk(
                found=True, total_bytes=size if offset == 0 else 0, offset=offset,
                data=view[offset : offset + chunk_bytes], index=index)

    def Delete(self, request, context):
        with self._request("delete", context):
            fingerprint = _namespace(request.namespace)
            _check_hash(request.block_hash, "block_hash")
            deleted = self.backend.delete(block_key(fingerprint, request.block_hash))
            return kvstore_pb2.DeleteResponse(deleted=deleted)

    def Stats(self, request, context):
        with self._request("stats", context):
            try:
                usage = self.backend.usage()
            except BackendUnavailable:  # the service's own counters are still worth reporting
                usage = Usage(blocks=0, bytes=0, capacity_bytes=0, evictions=0)
            value = self.metrics.value
            return kvstore_pb2.StatsResponse(
                backend=self.backend.url.split("://")[0],
                backend_healthy=value("kvpack_kvstore_backend_up") == 1.0,
                blocks=usage.blocks, bytes=usage.bytes, capacity_bytes=usage.capacity_bytes,
                evictions=usage.evictions,
                hits=int(value("kvpack_kvstore_hits_total")),
                misses=int(value("kvpack_kvstore_misses_total")),
                corrupt_blocks=int(value("kvpack_kvstore_corrupt_blocks_total")),
                backend_errors=int(sum(value("kvpack_kvstore_backend_errors_total", op=op)
                                       for op in OPS)),
            )

    # -- helpers ------------------------------------------------------------------------------
    def _receive(self, chunks: Iterator[wire.PutChunkView]
                 ) -> tuple[str, bytes, bytes | memoryview]:
        """The record of a Put stream, checked chunk by chunk; a one-chunk record is not copied."""
        first = next(chunks, None)
        if first is None:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "stream ended before the first chunk")
        _namespace(first.namespace)
        _check_hash(first.block_hash, "block_hash")
        if first.upload_id:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                         "upload_id: a range of a ranged Put goes in one PutWhole call")
        total = first.total_bytes
        self._check_total(total)
        parts: list[memoryview] = []
        received = 0
        for index, chunk in enumerate(_chain(first, chunks)):
            if index and (chunk.namespace or chunk.block_hash or chunk.total_bytes):
                if (chunk.namespace, chunk.block_hash, chunk.total_bytes) != (
                        first.namespace, first.block_hash, total):
                    raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                                 f"chunk {index}: namespace/block_hash/total_bytes differ from the "
                                 "first chunk")
            if chunk.offset != received:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                             f"offset: chunk {index} starts at {chunk.offset}, expected {received}")
            if received + len(chunk.data) > total:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                             f"data: more than total_bytes={total} bytes sent")
            parts.append(chunk.data)
            received += len(chunk.data)
        if received != total:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                         f"stream ended early: {received} of total_bytes={total} bytes received")
        return first.namespace, first.block_hash, parts[0] if len(parts) == 1 else b"".join(parts)


def _upload_of(chunk: wire.PutChunkView) -> bytes:
    """The upload a PutWhole's range belongs to; b"" = a whole record (all that servers before
    ranged puts read)."""
    return chunk.upload_id


def _range_of(request) -> tuple[int, int]:
    """(offset, length) of a GetWholeRequest; (0, 0) = the whole record, as servers without
    ranges read every request."""
    return request.offset, request.length


def _size(loaded: _Loaded) -> int:
    buffer, start = loaded
    return len(buffer) - start


def _chain(first, rest):
    yield first
    yield from rest


def _namespace(namespace: str) -> bytes:
    if not namespace:
        raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "namespace: must not be empty")
    if len(namespace) > MAX_NAMESPACE_CHARS:
        raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                     f"namespace: longer than {MAX_NAMESPACE_CHARS} characters")
    return namespace_fingerprint(namespace)


def _check_hashes(block_hashes) -> None:
    if len(block_hashes) > MAX_HASHES_PER_CALL:
        raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                     f"block_hashes: at most {MAX_HASHES_PER_CALL} per call")
    for index, block_hash in enumerate(block_hashes):
        _check_hash(block_hash, f"block_hashes[{index}]")


def _check_hash(block_hash: bytes, field: str) -> None:
    if len(block_hash) != BLOCK_HASH_BYTES:
        raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                     f"{field}: expected {BLOCK_HASH_BYTES} bytes, got {len(block_hash)}")
